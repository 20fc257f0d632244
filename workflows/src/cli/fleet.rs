//! The commands that talk to a fleet's broker: `pollen proxy` and `pollen devices`.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use pollen_proto::mqtt::BrokerConfig;
use pollen_proxy::{Proxy, ProxyConfig, ProxyShard, Selection};

use super::report::print_devices;
use super::shutdown_on_ctrl_c;

/// Arguments of `pollen proxy`.
#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Coordinator Fleet endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    #[arg(long, env = "POLLEN_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    #[arg(long, default_value = "default")]
    pub fleet: String,
    /// Names this proxy's persistent MQTT session; give each proxy of a fleet its own.
    #[arg(long, default_value = "proxy-0")]
    pub proxy_id: String,
    /// Only these devices (comma-separated); all online devices when absent.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    #[arg(long, default_value_t = 0)]
    pub min_examples: u64,
    #[arg(long)]
    pub max_devices: Option<usize>,
    /// Bridge only this shard of the fleet, INDEX/COUNT (e.g. 0/3): run COUNT proxies with
    /// indexes 0..COUNT and every device is bridged by exactly one of them (rendezvous
    /// hashing of device ids). Each needs its own --proxy-id.
    #[arg(long, value_name = "INDEX/COUNT")]
    pub shard: Option<ProxyShard>,
    /// Serve the proxy's Prometheus metrics (bridges, devices online, dropped replies,
    /// timeouts) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
}

pub async fn proxy(a: ProxyArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_ctrl_c("stopping the proxy");
    let proxy = Proxy::start(
        ProxyConfig {
            fleet: a.fleet.clone(),
            proxy_id: a.proxy_id,
            coordinator: a.coordinator.clone(),
            broker: BrokerConfig::new(a.broker.clone()),
            selection: Selection {
                devices: a.devices.map(|d| d.into_iter().collect()),
                min_examples: a.min_examples,
                max_devices: a.max_devices,
                data: None,
                shard: a.shard,
            },
            stale_after: std::time::Duration::from_secs(30),
            keep_alive: std::time::Duration::from_secs(30),
            persistent_session: true,
        },
        shutdown.clone(),
    )
    .await?;
    eprintln!(
        "proxy for fleet {:?}: broker {}, coordinator {}; Ctrl-C to stop",
        a.fleet,
        pollen_proto::mqtt::redact(&a.broker),
        a.coordinator
    );
    if let Some(addr) = a.http {
        let server =
            pollen_proto::prometheus::serve(addr, proxy.metrics_registry(), shutdown.clone())
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
        eprintln!("Prometheus metrics on http://{}/metrics", server.addr);
    }
    shutdown.cancelled().await;
    let stats = proxy.stats();
    proxy.join().await;
    eprintln!("proxy stopped: {stats:?}");
    Ok(())
}

/// Arguments of `pollen devices`.
#[derive(Args, Debug)]
pub struct DevicesArgs {
    #[arg(long, env = "POLLEN_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    #[arg(long, default_value = "default")]
    pub fleet: String,
    /// How long to collect status messages.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub wait: std::time::Duration,
    #[arg(long)]
    pub json: bool,
}

pub async fn devices(a: DevicesArgs) -> anyhow::Result<()> {
    let devices = pollen_proxy::discover(&BrokerConfig::new(a.broker), &a.fleet, a.wait).await?;
    if a.json {
        for d in &devices {
            println!("{}", serde_json::to_string(d)?);
        }
    } else {
        print_devices(&devices);
        eprintln!("{} devices in fleet {:?}", devices.len(), a.fleet);
    }
    Ok(())
}
