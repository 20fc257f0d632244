//! The embedded MQTT broker (rumqttd), for runs that need zero setup.
//!
//! It is a real MQTT 3.1.1 broker on a loopback TCP port: the proxy and the agents connect to it
//! exactly as they would to Mosquitto or AWS IoT Core. Its QoS 1 throughput (~5k msg/s measured
//! here) is far below Mosquitto's (~76k msg/s); point `--broker` at a real broker for large
//! fleets.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// A running embedded broker. rumqttd has no shutdown: it lives until the process exits.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
    /// `mqtt://127.0.0.1:PORT`
    pub url: String,
}

/// Largest payload the embedded broker accepts: well above what Pollen sends (16 KiB) so that
/// oversize garbage reaches subscribers and is counted there, instead of cutting connections.
const MAX_PAYLOAD: usize = 256 * 1024;

/// Starts a broker on a free loopback port and waits until it accepts connections.
pub fn start_embedded_broker(max_connections: usize) -> anyhow::Result<EmbeddedBroker> {
    // rumqttd binds its own listener and does not report an OS-chosen port, so take a free
    // one from the OS and hand it over (the window between the two binds is tiny).
    let addr = TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port for the embedded MQTT broker")?;
    let server = ServerSettings {
        name: "pollen-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 1_000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: max_connections.max(16) + 16,
            max_outgoing_packet_count: 1_000,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("pollen-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .context("starting the embedded MQTT broker thread")?;
    let started = Instant::now();
    while !answers_connect(addr) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the embedded MQTT broker did not start listening on {addr} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(%addr, "embedded MQTT broker listening");
    Ok(EmbeddedBroker {
        addr,
        url: format!("mqtt://{addr}"),
    })
}

/// Whether an MQTT 3.1.1 CONNECT on `addr` is answered with an accepting CONNACK. A full
/// handshake (and a DISCONNECT) rather than a bare TCP probe, which the broker would log as a
/// failed connection.
fn answers_connect(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    const CLIENT_ID: &[u8] = b"pollen-probe";
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut packet = vec![0x10, (12 + CLIENT_ID.len()) as u8];
    // Protocol "MQTT", level 4 (3.1.1), clean session, keep-alive 10 s, then the client id.
    packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10]);
    packet.extend_from_slice(&[0, CLIENT_ID.len() as u8]);
    packet.extend_from_slice(CLIENT_ID);
    let mut connack = [0u8; 4];
    let accepted = stream.write_all(&packet).is_ok()
        && stream.read_exact(&mut connack).is_ok()
        && connack == [0x20, 0x02, 0x00, 0x00];
    let _ = stream.write_all(&[0xE0, 0x00]);
    accepted
}
