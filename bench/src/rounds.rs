//! `pollen-bench rounds`: federated rounds with no-op clients, so that what is timed is the
//! system (fan-out, transport, storage, decoding, aggregation), not training.
//!
//! A no-op client answers a fit with the model it was sent, as in Flower's no-op benchmark.
//! Every round samples `fraction` of the clients (all of them by default) and must succeed
//! with every sampled client, or the benchmark fails rather than report a fast broken round.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use pollen_coordinator::fedavg::FedAvgConfig;
use pollen_coordinator::records::RoundStatus;
use pollen_coordinator::{DriverConfig, FedAvg, RoundDriver, RoundRecord};
use pollen_proto::mqtt::BrokerConfig;
use pollen_proto::{NamedTensor, Parameters};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{Machine, Stats, header, human_bytes, peak_rss_bytes};
use pollen_workflows::run::{LocalCoordinator, Storage};
use pollen_workflows::simulate::{AgentProcess, FleetOptions, SimulatedFleet, Transport};

#[derive(Debug, Clone)]
pub struct RoundsOptions {
    pub clients: usize,
    pub params: usize,
    pub transport: Transport,
    /// External broker (device path); embedded when `None`.
    pub broker: Option<BrokerConfig>,
    /// Timed rounds, after one untimed warm-up round.
    pub rounds: u64,
    pub fraction: f64,
    pub round_timeout: Duration,
    /// Device path: every agent in a process of its own (`pollen-bench agent`), the
    /// coordinator, embedded S3 and proxy in this one, as `pollen run` deploys them.
    pub agent_processes: bool,
}

pub use pollen_workflows::fleet_sim::NoOpClient;

/// Where the embedded S3 server keeps objects for the benchmark (removed when dropped):
/// tmpfs when the machine has one with room for a round's objects. Every round creates and
/// deletes one object per device; on ext4 that churn alone (inode allocation scanning recently
/// deleted inodes, renames in one directory) took 9.6 s of kernel time in 21 rounds of 100
/// devices here: the disk's cost, not Pollen's.
fn scratch_dir(round_bytes: u64) -> anyhow::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    let roomy = |dir: &std::path::Path| {
        fs2::available_space(dir).is_ok_and(|free| free > 2 * round_bytes + (256 << 20))
    };
    let base = if shm.is_dir() && roomy(shm) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("pollen-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a scratch folder in {}", base.display()))
}

#[derive(Debug, Serialize)]
pub struct RoundsReport {
    pub bench: &'static str,
    pub workload: String,
    pub transport: &'static str,
    pub broker: String,
    /// Where the embedded S3 server kept its objects (device path).
    pub object_store: Option<String>,
    pub clients: usize,
    pub params: usize,
    pub sampled_per_round: usize,
    /// Whether each agent ran in a process of its own (else all in this process).
    pub agent_processes: bool,
    pub round_seconds: Stats,
    pub median_round_seconds: f64,
    /// Seconds from start until every client had joined (not part of any round).
    pub setup_seconds: f64,
    /// MQTT messages through the broker per second of the timed rounds, as the proxy counts
    /// them (commands it published + replies it received); device path only.
    pub mqtt_messages_per_second: Option<f64>,
    /// Bytes of weights the coordinator sent and received in the median round.
    pub bytes_per_round: u64,
    pub peak_rss_bytes: Option<u64>,
    pub machine: Machine,
}

/// How long the fleet and the coordinator get to stop after the rounds.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(30);

pub async fn run(options: &RoundsOptions) -> anyhow::Result<RoundsReport> {
    anyhow::ensure!(options.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(options.params >= 1, "--params must be at least 1");
    anyhow::ensure!(options.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(
        !options.agent_processes || options.transport == Transport::Device,
        "--agent-processes needs --transport device"
    );
    anyhow::ensure!(
        options.fraction > 0.0 && options.fraction <= 1.0,
        "--fraction {} must be in (0, 1]",
        options.fraction
    );
    let setup = std::time::Instant::now();
    // The global model and one update per sampled device live in storage during a round.
    let scratch = scratch_dir((options.clients as u64 + 1) * options.params as u64 * 4)?;
    let storage = match options.transport {
        Transport::Grpc | Transport::InProcess => Storage::Inline,
        Transport::Device => Storage::Embedded {
            root: scratch.path().join("s3"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
        },
    };
    let coordinator =
        LocalCoordinator::start(SocketAddr::from(([127, 0, 0, 1], 0)), &storage).await?;
    let clients: Vec<NoOpClient> = (0..options.clients)
        .map(|_| NoOpClient {
            examples: 10,
            schema: None,
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let fleet = SimulatedFleet::start(
        &coordinator,
        clients,
        FleetOptions {
            transport: options.transport,
            broker: options.broker.clone(),
            fleet: format!("bench-{}", std::process::id()),
            model: "no-op".into(),
            compute_slots: Arc::new(Semaphore::new(cores)),
            agent_process: match options.agent_processes {
                false => None,
                true => Some(AgentProcess {
                    program: std::env::current_exe().context("locating the pollen-bench binary")?,
                    args: vec!["agent".into()],
                }),
            },
            grpc_compression: false,
            object_store_ca: None,
        },
    )
    .await?;
    anyhow::ensure!(
        fleet
            .wait_joined(&coordinator, Duration::from_secs(300))
            .await,
        "not every client joined within 300 s"
    );
    let setup_seconds = setup.elapsed().as_secs_f64();

    let n = options.clients;
    // Every round waits for the whole fleet; any failure fails the round (and the benchmark).
    let config = FedAvgConfig {
        fraction_fit: options.fraction,
        fraction_evaluate: 0.0,
        min_fit_clients: 1,
        min_evaluate_clients: 1,
        min_available_clients: n,
        accept_failures: false,
    };
    let sampled = config.num_fit_clients(n);
    let initial = Parameters::new(vec![NamedTensor::new(
        "w",
        vec![options.params],
        (0..options.params)
            .map(|i| (i % 1000) as f32 * 1e-3)
            .collect(),
    )])?;
    let strategy = FedAvg::new(config).with_initial_parameters(initial);
    // Each round's record, the proxy's MQTT message count and the time when it ended.
    type Ended = (RoundRecord, Option<u64>, std::time::Instant);
    let records: Arc<Mutex<Vec<Ended>>> = Arc::default();
    // The first round that is not a clean success ends the benchmark: its numbers would mean
    // nothing, and the remaining rounds would only delay the error.
    let stop = CancellationToken::new();
    let stats_at_round = {
        let records = records.clone();
        let proxy = fleet.mqtt_messages();
        let stop = stop.clone();
        move |r: &RoundRecord| {
            if r.status != RoundStatus::Ok || r.succeeded != sampled {
                stop.cancel();
            }
            let messages = proxy.as_ref().map(|f| f());
            records.lock().unwrap_or_else(|e| e.into_inner()).push((
                r.clone(),
                messages,
                std::time::Instant::now(),
            ));
        }
    };
    let mut driver = RoundDriver::new(
        coordinator.server.registry.clone(),
        Box::new(strategy),
        DriverConfig {
            num_rounds: options.rounds + 1,
            round_timeout: options.round_timeout,
            wait_for_clients: Duration::from_secs(60),
            seed: 1,
            primary_metric: None,
            ..Default::default()
        },
    )
    .on_round(stats_at_round);
    if let Some(store) = coordinator.storage.store.clone() {
        driver = driver.with_store(store);
    }
    let summary = driver.run(stop).await;
    let peak_rss_bytes = peak_rss_bytes();
    let records = std::mem::take(&mut *records.lock().unwrap_or_else(|e| e.into_inner()));
    let failed = records
        .iter()
        .find(|(r, _, _)| r.status != RoundStatus::Ok || r.succeeded != sampled);
    // Thousands of agents stop in a bounded time, or are left to the process's exit.
    coordinator.token().cancel();
    let stopped = async {
        fleet.join().await;
        coordinator.shut_down().await;
    };
    if tokio::time::timeout(SHUTDOWN_LIMIT, stopped).await.is_err() {
        eprintln!("the simulated fleet did not stop within {SHUTDOWN_LIMIT:?}; leaving it");
    }
    if let Some((r, _, _)) = failed {
        anyhow::bail!(
            "round {} did not succeed with all {sampled} sampled clients ({} succeeded, failures {:?}{})",
            r.round,
            r.succeeded,
            r.failures_by_reason,
            r.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
        );
    }
    summary.context("driving the rounds")?;
    // Round 1 is the warm-up: connections, caches and allocator pools fill there.
    let timed = &records[1..];
    let seconds: Vec<f64> = timed.iter().map(|(r, _, _)| r.seconds).collect();
    let round_seconds = Stats::of(&seconds).context("no timed rounds")?;
    // Messages from the end of the warm-up round to the end of the last, over that wall time.
    let (_, first_count, first_end) = &records[0];
    let (_, last_count, last_end) = records.last().context("no rounds")?;
    let mqtt_messages_per_second = match (first_count, last_count) {
        (Some(start), Some(end)) => {
            Some((end - start) as f64 / last_end.duration_since(*first_end).as_secs_f64())
        }
        _ => None,
    };
    let bytes: Vec<f64> = timed
        .iter()
        .map(|(r, _, _)| (r.bytes_sent + r.bytes_received) as f64)
        .collect();
    let transport = options.transport.name();
    let broker = match (options.transport, &options.broker) {
        (Transport::Grpc | Transport::InProcess, _) => "none".to_string(),
        (Transport::Device, None) => "embedded (rumqttd)".to_string(),
        (Transport::Device, Some(b)) => b.url.clone(),
    };
    Ok(RoundsReport {
        bench: "rounds",
        workload: format!(
            "no-op rounds, {n} clients x {} params, {sampled} sampled per round, over {}",
            options.params,
            match options.transport {
                Transport::Grpc => "direct gRPC over loopback (weights inline)".to_string(),
                Transport::InProcess => {
                    "in-process clients (Fleet service in memory, weights inline)".to_string()
                }
                Transport::Device => format!(
                    "the device path (proxy + MQTT broker {broker} + embedded S3 + agents{})",
                    if options.agent_processes {
                        ", one process per agent"
                    } else {
                        " in this process"
                    }
                ),
            }
        ),
        transport,
        broker,
        object_store: (options.transport == Transport::Device)
            .then(|| format!("embedded S3 over {}", scratch.path().display())),
        clients: n,
        params: options.params,
        sampled_per_round: sampled,
        agent_processes: options.agent_processes,
        median_round_seconds: round_seconds.median,
        round_seconds,
        setup_seconds,
        mqtt_messages_per_second,
        bytes_per_round: Stats::of(&bytes).map_or(0, |b| b.median as u64),
        peak_rss_bytes,
        machine: Machine::detect(),
    })
}

impl RoundsReport {
    pub fn human(&self) -> Vec<String> {
        let mut lines = header("rounds", &self.workload, &self.machine);
        lines.extend([
            format!(
                "seconds per round: {} (set-up, not timed: {:.1} s)",
                self.round_seconds.describe(3, " s"),
                self.setup_seconds
            ),
            format!(
                "weights moved per round: {:.1} MB",
                self.bytes_per_round as f64 / 1e6
            ),
        ]);
        if let Some(m) = self.mqtt_messages_per_second {
            lines.push(format!("MQTT messages per second: {m:.0}"));
        }
        if let Some(p) = self.peak_rss_bytes {
            lines.push(format!("peak RSS: {}", human_bytes(p)));
        }
        lines
    }
}

/// `pollen-bench agent`: one no-op edge agent, for `bench rounds --agent-processes`. It
/// stops (publishing its offline status) when its stdin closes or on Ctrl-C.
pub async fn run_agent(
    broker: BrokerConfig,
    fleet: String,
    device_id: String,
) -> anyhow::Result<()> {
    let agent = pollen_client::agent::Agent::new(
        pollen_client::agent::AgentOptions {
            device_id,
            fleet,
            broker,
            heartbeat: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            work_dir: None,
            model: "no-op".into(),
            compute_slots: None,
            properties: Default::default(),
            consent: None,
            object_store_ca: None,
        },
        NoOpClient {
            examples: 10,
            schema: None,
        },
    )?;
    let stop = CancellationToken::new();
    // A plain thread: tokio's stdin would keep the runtime from shutting down while it reads.
    let on_eof = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        on_eof.cancel();
    });
    let on_ctrl_c = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });
    agent.run(stop).await?;
    Ok(())
}
