//! End-to-end tests live in tests/tests; this library holds what several of them share.

use std::net::SocketAddr;
use std::time::Duration;

/// Where the shared Mosquitto of the test machine listens.
pub const MOSQUITTO: &str = "127.0.0.1:1883";

/// Checks that the shared Mosquitto is up, failing with instructions when it is not, and
/// returns its URL.
pub fn mosquitto_url() -> String {
    let addr: SocketAddr = MOSQUITTO.parse().expect("valid address");
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_or_else(|e| {
        panic!("Mosquitto is not reachable on {MOSQUITTO} ({e}); start it with `mosquitto -d`")
    });
    format!("mqtt://{MOSQUITTO}")
}
