//! pollen-agent: the edge agent a gateway runs.
//!
//! It reads the device's own data (a CSV file, NumPy arrays or MNIST), announces what it
//! looks like, and trains whatever task each run sends, either as an MQTT device behind a proxy
//! ([`run_mqtt`], the default) or as a direct gRPC Fleet client ([`run_direct`]).
//!
//! # Layout
//! - [`config`]: the agent's TOML file, its environment overrides and validation.
//! - `main.rs`: the `pollen-agent` binary (arguments, tracing, Ctrl-C).

pub mod config;

use std::net::SocketAddr;

use anyhow::Context;
use pollen_client::agent::Agent;
use pollen_client::transfer::redact;
use pollen_client::{ClientOptions, Exit, run_client};
use pollen_train::{Backend, DataSource, TaskClient};
use tokio_util::sync::CancellationToken;

pub use config::{AgentConfig, ConfigError};

/// A device's training seed, from its id: devices of a fleet draw differently, and a device
/// draws the same way after a restart.
pub fn device_seed(device_id: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
    device_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Reads the device's data (off the async threads) into its trainer.
pub async fn open_data(
    source: DataSource,
    device_id: &str,
    backend: Backend,
) -> anyhow::Result<TaskClient> {
    let seed = device_seed(device_id);
    let path = source.path.clone();
    tokio::task::spawn_blocking(move || {
        TaskClient::open(source, seed).map(|c| c.with_backend(backend))
    })
    .await?
    .with_context(|| format!("reading the device's data at {}", path.display()))
}

/// `pollen-agent --check`: what the agent would run with, or what is wrong with it, without
/// connecting: the broker options (TLS files read and parsed) and the device's data (read once,
/// as at start). For deployment tooling to call before (re)starting the service.
pub async fn check(config: &AgentConfig) -> anyhow::Result<String> {
    pollen_proto::mqtt::mqtt_options(&config.broker, &config.device_id)
        .with_context(|| format!("broker {}", redact(&config.broker.url)))?;
    let consent = match config.consent()? {
        Some(_) => format!(
            "; consent policy {}",
            config
                .consent
                .policy
                .as_deref()
                .unwrap_or_else(|| std::path::Path::new(""))
                .display()
        ),
        None => String::new(),
    };
    let client = open_data(config.data.clone(), &config.device_id, config.backend).await?;
    let data = match pollen_client::Client::data_schema(&client) {
        Some(s) if s.example_shape.is_empty() => {
            format!("{} {} rows x {} columns", s.format, s.rows, s.columns.len())
        }
        Some(s) => format!(
            "{} {} examples of shape {:?}",
            s.format, s.rows, s.example_shape
        ),
        None => "no schema".into(),
    };
    Ok(format!(
        "device {} of fleet {:?} on {}; data {}: {data}; work dir {}{consent}",
        config.device_id,
        config.fleet,
        redact(&config.broker.url),
        config.data.path.display(),
        config.work_dir.display()
    ))
}

/// MQTT mode: serves the proxy's commands until `shutdown`; `metrics` serves the agent's
/// Prometheus counters.
pub async fn run_mqtt(
    config: AgentConfig,
    metrics: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = open_data(config.data.clone(), &config.device_id, config.backend).await?;
    let schema = pollen_client::Client::data_schema(&client);
    let mut options = config.agent_options();
    options.consent = config.consent()?;
    let agent = Agent::new(options, client)?;
    tracing::info!(
        device = %config.device_id,
        fleet = %config.fleet,
        broker = %redact(&config.broker.url),
        data = %config.data.path.display(),
        format = schema.as_ref().map_or("", |s| s.format.as_str()),
        rows = schema.as_ref().map_or(0, |s| s.rows),
        columns = schema.as_ref().map_or(0, |s| s.columns.len()),
        work_dir = %config.work_dir.display(),
        "pollen-agent starting (MQTT)"
    );
    if let Some(addr) = metrics {
        let server =
            pollen_proto::prometheus::serve(addr, agent.stats().registry(), shutdown.clone())
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!("Prometheus metrics on http://{}/metrics", server.addr);
    }
    agent.run(shutdown).await?;
    Ok(())
}

/// Direct mode: joins `coordinator` as `client_id` and serves it until it stops the client;
/// `options`: zstd on the stream, TLS to the coordinator.
pub async fn run_direct(
    coordinator: &str,
    client_id: &str,
    data: DataSource,
    backend: Backend,
    options: ClientOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<Exit> {
    let client = open_data(data, client_id, backend).await?;
    eprintln!(
        "{client_id}: {} local rows, joining {coordinator}",
        client.raw().rows()
    );
    Ok(run_client(coordinator, client_id, client, options, shutdown).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_seeds_are_stable_and_differ_between_devices() {
        assert_eq!(device_seed("gw-1"), device_seed("gw-1"));
        assert_ne!(device_seed("gw-1"), device_seed("gw-2"));
        // Fixed across builds: a restarted device trains as before.
        assert_eq!(device_seed(""), 0xcbf2_9ce4_8422_2325);
    }
}
