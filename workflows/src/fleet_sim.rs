//! `pollen fleet simulate`: many simulated edge agents in one process, against any broker and
//! object store, over the real protocols (MQTT commands and statuses, presigned HTTP
//! transfers). Like AWS's IoT Device Simulator, a large fleet is spread over processes or pods
//! sharing one broker: each runs shard `i/n` of the device ids, and together they are
//! `--devices` distinct devices with disjoint data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pollen_client::agent::{Agent, AgentOptions};
use pollen_client::{Client, ClientError, ClientEvaluate, ClientFit, Work};
use pollen_proto::Parameters;
use pollen_proto::mqtt::BrokerConfig;
use pollen_train::{Backend, Shard, TaskClient};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::shares::SimulationData;
use crate::spec::RunSpec;

/// Answers every fit with the model it received: load tests of everything but training.
pub struct NoOpClient {
    pub examples: u64,
    /// The data it claims to hold, so that runs select it (`None`: it says nothing).
    pub schema: Option<pollen_proto::fleet::DataSchema>,
}

impl Client for NoOpClient {
    fn num_examples(&self) -> u64 {
        self.examples
    }

    fn data_schema(&self) -> Option<pollen_proto::fleet::DataSchema> {
        self.schema.clone()
    }

    fn get_parameters(&mut self, _work: &Work<'_>) -> Result<Parameters, ClientError> {
        Err(ClientError::training(
            "a no-op client holds no model of its own",
        ))
    }

    fn fit(&mut self, _work: &Work<'_>, parameters: Parameters) -> Result<ClientFit, ClientError> {
        Ok(ClientFit {
            parameters,
            num_examples: self.examples,
            metrics: Default::default(),
        })
    }

    fn evaluate(
        &mut self,
        _work: &Work<'_>,
        _parameters: Parameters,
    ) -> Result<ClientEvaluate, ClientError> {
        Ok(ClientEvaluate {
            loss: 0.0,
            num_examples: self.examples,
            metrics: Default::default(),
        })
    }
}

/// What the simulated devices do when asked to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Train the spec's model on the device's share of the spec's data.
    Train,
    /// Return the model received (10 examples): load tests of the protocols and the fleet.
    Noop,
}

/// Options of [`run`].
pub struct FleetSimOptions {
    /// Devices in the whole simulated fleet, over every shard.
    pub devices: usize,
    /// This process's part: device `k` is here when `k % count == index`.
    pub shard: Shard,
    pub broker: BrokerConfig,
    pub fleet: String,
    /// Device ids are `<prefix>-<k>` (k zero-padded to six digits).
    pub prefix: String,
    pub workload: Workload,
    /// The spec whose data and model `Workload::Train` uses.
    pub spec: RunSpec,
    pub backend: Backend,
    /// The object store's private CA, if it has one.
    pub object_store_ca: Option<std::path::PathBuf>,
    /// How long to wait for every device of the shard to be online in the broker's registry.
    pub wait_online: Duration,
}

/// What one process of the simulated fleet holds, reported once its devices are online.
#[derive(Debug, Serialize)]
pub struct FleetSimReport {
    pub fleet: String,
    pub shard: String,
    pub agents: usize,
    pub workload: &'static str,
    /// From start until the broker's registry showed every device of the shard online.
    pub startup_seconds: f64,
    pub rss_bytes: Option<u64>,
    pub rss_bytes_per_agent: Option<u64>,
    pub open_files: Option<usize>,
    pub open_files_limit: Option<u64>,
}

/// The device ids of `shard` in a fleet of `devices`.
pub fn device_ids(prefix: &str, devices: usize, shard: Shard) -> Vec<String> {
    (0..devices)
        .filter(|k| k % shard.count as usize == shard.index as usize)
        .map(|k| format!("{prefix}-{k:06}"))
        .collect()
}

fn proc_value(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// What every agent of the process shares.
struct Agents<'a> {
    options: &'a FleetSimOptions,
    http: reqwest::Client,
    slots: Arc<Semaphore>,
    shutdown: &'a CancellationToken,
}

impl Agents<'_> {
    /// One agent task per id, each with its client.
    fn spawn<C: Client>(
        &self,
        ids: &[String],
        clients: impl Iterator<Item = C>,
    ) -> anyhow::Result<tokio::task::JoinSet<()>> {
        let mut tasks = tokio::task::JoinSet::new();
        for (id, client) in ids.iter().zip(clients) {
            let o = self.options;
            let mut agent_options =
                AgentOptions::new(id.as_str(), o.fleet.as_str(), o.broker.clone());
            agent_options.model = o.spec.model.family().to_string();
            agent_options.compute_slots = Some(self.slots.clone());
            let agent = Agent::new(agent_options, client)?.with_http_client(self.http.clone());
            let stop = self.shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = agent.run(stop).await {
                    tracing::warn!("simulated agent ended: {e}");
                }
            });
        }
        Ok(tasks)
    }
}

/// Starts this shard's agents, reports once they are online (`on_online`), and serves until
/// `shutdown`.
pub async fn run(
    options: FleetSimOptions,
    on_online: impl FnOnce(&FleetSimReport),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(options.devices >= 1, "--devices must be at least 1");
    anyhow::ensure!(
        options.shard.count >= 1 && options.shard.index < options.shard.count,
        "--shard {}/{}: the index must be below the count",
        options.shard.index,
        options.shard.count
    );
    let started = Instant::now();
    let ids = device_ids(&options.prefix, options.devices, options.shard);
    for id in &ids {
        pollen_proto::topics::validate_id("device id", id)?;
    }
    let ca = match &options.object_store_ca {
        Some(path) => Some(pollen_client::transfer::read_ca(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    // One connection pool and one compute slot per core, as one host with many devices.
    let http = pollen_client::transfer::http_client(ca.as_deref())
        .context("building the HTTP client for weight transfers")?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let agents = Agents {
        options: &options,
        http,
        slots: Arc::new(Semaphore::new(cores)),
        shutdown: &shutdown,
    };
    let mut tasks = match options.workload {
        Workload::Noop => {
            // The spec's data, read once, says what the devices claim to hold: `pollen run`
            // selects devices whose data fits its task.
            let mut spec = options.spec.clone();
            spec.data.clients = Some(1);
            let data = tokio::task::spawn_blocking(move || SimulationData::load(&spec))
                .await?
                .context("reading the spec's data for the devices' schema")?;
            let schema = data.shares.into_iter().next().and_then(|raw| {
                TaskClient::in_memory(raw, data.format, 0)
                    .data_schema()
                    .map(|s| pollen_proto::fleet::DataSchema { rows: 10, ..s })
            });
            let clients = ids.iter().map(|_| NoOpClient {
                examples: 10,
                schema: schema.clone(),
            });
            agents.spawn(&ids, clients)?
        }
        Workload::Train => {
            let mut spec = options.spec.clone();
            spec.data.clients = Some(options.devices);
            let data = tokio::task::spawn_blocking(move || SimulationData::load(&spec))
                .await?
                .context("preparing the simulated devices' data")?;
            let (format, seed, shard) = (data.format, options.spec.seed, options.shard);
            let clients = data
                .shares
                .into_iter()
                .enumerate()
                .filter(|(k, _)| k % shard.count as usize == shard.index as usize)
                .map(|(k, raw)| {
                    TaskClient::in_memory(raw, format, seed.wrapping_add(k as u64 + 1))
                        .with_backend(options.backend)
                });
            agents.spawn(&ids, clients)?
        }
    };

    // Online as the broker's registry says: the retained statuses an operator's
    // `pollen devices` reads.
    let wanted: std::collections::BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let deadline = started + options.wait_online;
    // Retained statuses arrive at a few thousand a second (QoS 1, bounded in flight): the
    // window grows with the fleet so that a reading is complete.
    let window = Duration::from_secs(2) + Duration::from_millis(wanted.len() as u64);
    loop {
        let seen = pollen_proxy::discover(&options.broker, &options.fleet, window)
            .await
            .context("reading the fleet's statuses")?;
        let online = seen
            .iter()
            .filter(|d| d.online && wanted.contains(d.device_id.as_str()))
            .count();
        if online == wanted.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline && !shutdown.is_cancelled(),
            "{online} of {} simulated devices online after {:?}",
            wanted.len(),
            started.elapsed()
        );
    }
    let rss = proc_value("/proc/self/status", "VmRSS:").map(|kib| kib * 1024);
    let report = FleetSimReport {
        fleet: options.fleet.clone(),
        shard: format!("{}/{}", options.shard.index, options.shard.count),
        agents: ids.len(),
        workload: match options.workload {
            Workload::Train => "train",
            Workload::Noop => "noop",
        },
        startup_seconds: started.elapsed().as_secs_f64(),
        rss_bytes: rss,
        rss_bytes_per_agent: rss.map(|r| r / ids.len().max(1) as u64),
        open_files: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count()),
        open_files_limit: proc_value("/proc/self/limits", "Max open files"),
    };
    on_online(&report);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_the_fleet_into_disjoint_parts() {
        let all: Vec<String> = (0..3)
            .flat_map(|i| device_ids("sim", 10, Shard { index: i, count: 3 }))
            .collect();
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 10, "{all:?}");
        assert_eq!(
            device_ids("sim", 10, Shard { index: 1, count: 3 }),
            ["sim-000001", "sim-000004", "sim-000007"]
        );
    }
}
