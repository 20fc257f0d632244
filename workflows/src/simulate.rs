//! `pollen simulate`: a coordinator and N simulated clients in one process, training real
//! models over the real protocols.
//!
//! By default the clients are edge agents behind the device path, exactly as in production:
//! coordinator --gRPC--> proxy bridges --MQTT (embedded broker)--> agents, with weights through
//! the embedded S3 server and presigned URLs. `Transport::Grpc` uses direct gRPC clients with
//! inline weights over loopback sockets; `Transport::InProcess` joins the clients to the
//! Fleet service in memory (the algorithm fast path).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pollen_client::agent::{Agent, AgentOptions};
use pollen_client::{Client, ClientOptions};
use pollen_coordinator::{RoundRecord, RunSummary, StoreConfig};
use pollen_proto::mqtt::BrokerConfig;
use pollen_proxy::{Proxy, ProxyConfig, ProxyHandle, Selection};
use pollen_train::{Backend, TaskClient};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::broker::start_embedded_broker;
use crate::device::{AttackKind, SimulatedDevice, flip_labels};
use crate::run::{DriveOptions, LocalCoordinator, Storage};
use crate::shares::SimulationData;
use crate::spec::RunSpec;

/// How simulated clients reach the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Transport {
    /// The production device path: proxy bridges + MQTT agents + weights through S3.
    #[default]
    Device,
    /// Direct gRPC Fleet clients over loopback sockets, weights inline.
    Grpc,
    /// Clients joined to the coordinator's Fleet service in memory: the same registry,
    /// protocol messages and checks, no sockets and no serialisation (weights inline, shared).
    /// The algorithm fast path, as Flower's simulation engine is for Flower.
    InProcess,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Device => "device",
            Transport::Grpc => "grpc",
            Transport::InProcess => "in-process",
        }
    }
}

/// Where and how a simulation runs.
pub struct SimulateOptions {
    /// Records go to `<runs_dir>/<run-id>/` and `<runs_dir>/pollen.db`.
    pub runs_dir: PathBuf,
    /// Where the run table is (SQLite in `runs_dir` by default).
    pub database: pollen_coordinator::records::Database,
    /// Clients training at once; defaults to the number of cores.
    pub parallelism: Option<usize>,
    pub transport: Transport,
    /// External broker for the device path; `None` starts the embedded one.
    pub broker: Option<BrokerConfig>,
    /// External object storage for the device path; `None` starts the embedded S3 server over
    /// `<runs_dir>/s3`.
    pub s3: Option<StoreConfig>,
    /// Serve the live dashboard and `/metrics` on this address while the run goes (port 0:
    /// any free port; the URL is printed).
    pub dashboard: Option<SocketAddr>,
    /// Operators of the dashboard (loopback only without them).
    pub access: Option<Arc<pollen_dashboard::access::Access>>,
    /// `Transport::Grpc`: compress the clients' streams with zstd.
    pub grpc_compression: bool,
    /// Which library the simulated devices train with.
    pub backend: Backend,
}

impl SimulateOptions {
    pub fn new(runs_dir: impl Into<PathBuf>) -> Self {
        Self {
            runs_dir: runs_dir.into(),
            database: Default::default(),
            parallelism: None,
            transport: Transport::Device,
            broker: None,
            s3: None,
            dashboard: None,
            access: None,
            grpc_compression: false,
            backend: Backend::Auto,
        }
    }
}

/// What a simulation returns.
pub struct Simulation {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub summary: RunSummary,
}

/// Runs `spec` with simulated clients; `on_round` sees each round's record as it is recorded.
pub async fn simulate(
    spec: &RunSpec,
    options: &SimulateOptions,
    shutdown: CancellationToken,
    on_round: impl FnMut(&RoundRecord) + Send + 'static,
) -> anyhow::Result<Simulation> {
    let for_load = spec.clone();
    let data = tokio::task::spawn_blocking(move || SimulationData::load(&for_load))
        .await?
        .context("preparing the simulation's data")?;

    let run = crate::run::create_run(spec, &options.runs_dir, &options.database)?;
    let run_id = run.id().to_string();
    let run_dir = run.dir().to_path_buf();
    run.write_file("partition.json", &serde_json::to_vec_pretty(&data.report)?)
        .context("recording the partition")?;
    eprintln!("{}", data.summary());

    let storage = match options.transport {
        Transport::Grpc | Transport::InProcess => Storage::Inline,
        Transport::Device => match &options.s3 {
            Some(config) => Storage::External(config.clone()),
            None => Storage::Embedded {
                root: options.runs_dir.join("s3"),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                tls: None,
            },
        },
    };
    let coordinator =
        LocalCoordinator::start(SocketAddr::from(([127, 0, 0, 1], 0)), &storage).await?;
    // Clients, agents and the proxy stop with the coordinator (also on an early return).
    let stop_all = coordinator.token();
    let metrics = coordinator
        .dashboard(
            options.dashboard,
            &options.runs_dir,
            &options.database,
            options.access.clone(),
        )
        .await?;

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let slots = Arc::new(Semaphore::new(options.parallelism.unwrap_or(cores).max(1)));
    let SimulationData {
        manifest,
        shares,
        format,
        server,
        ..
    } = data;
    let clients = simulated_devices(spec, &manifest, shares, format, options.backend)?;
    let fleet = SimulatedFleet::start(
        &coordinator,
        clients,
        FleetOptions {
            transport: options.transport,
            broker: options.broker.clone(),
            fleet: format!("sim-{run_id}"),
            model: manifest.model.family().to_string(),
            compute_slots: slots,
            agent_process: None,
            grpc_compression: options.grpc_compression,
            object_store_ca: options.s3.as_ref().and_then(|s3| s3.ca_file.clone()),
        },
    )
    .await?;
    // Every simulated device is there from the start, so the first rounds sample from all of
    // them rather than from whoever connected first.
    fleet
        .wait_joined(&coordinator, Duration::from_secs(120))
        .await;
    let options = DriveOptions {
        metrics,
        ..coordinator.drive_options(run, server)
    };
    let summary = crate::run::drive(spec, manifest, options, on_round, shutdown).await;
    stop_all.cancel();
    fleet.join().await;
    coordinator.shut_down().await;
    Ok(Simulation {
        run_id,
        run_dir,
        summary: summary?,
    })
}

/// The simulated fleet of `spec`: one device per data share, each behaving as
/// `spec.simulation` says (label-flipping attackers get their labels flipped here).
fn simulated_devices(
    spec: &RunSpec,
    manifest: &pollen_train::TaskManifest,
    shares: Vec<pollen_train::data::Raw>,
    format: pollen_train::Format,
    backend: Backend,
) -> anyhow::Result<Vec<SimulatedDevice>> {
    let attackers = spec.simulation.attackers(shares.len(), spec.seed);
    let started = std::time::Instant::now();
    let flip = spec
        .simulation
        .attack
        .as_ref()
        .is_some_and(|a| a.kind == AttackKind::LabelFlip);
    shares
        .into_iter()
        .enumerate()
        .map(|(i, mut raw)| {
            if flip && attackers[i] {
                let classes = manifest.task.classes.as_deref().unwrap_or_default();
                flip_labels(&mut raw, classes).map_err(anyhow::Error::msg)?;
            }
            let seed = spec.seed.wrapping_add(i as u64 + 1);
            Ok(SimulatedDevice::new(
                TaskClient::in_memory(raw, format, seed).with_backend(backend),
                &spec.simulation,
                spec.seed,
                i,
                attackers[i],
                started,
            ))
        })
        .collect()
}

/// How [`SimulatedFleet::start`] connects its clients.
pub struct FleetOptions {
    pub transport: Transport,
    /// External broker for the device path; `None` starts the embedded one.
    pub broker: Option<BrokerConfig>,
    /// The MQTT fleet name (device path); one per run, so runs sharing a broker never see
    /// each other.
    pub fleet: String,
    /// The model name devices report in their status.
    pub model: String,
    /// Clients computing at once.
    pub compute_slots: Arc<Semaphore>,
    /// Device path: run each device's agent as a process of its own, as on a real fleet (the
    /// clients given are then only counted: the process brings its own).
    pub agent_process: Option<AgentProcess>,
    /// Direct gRPC clients: zstd on their streams.
    pub grpc_compression: bool,
    /// Device path: the object store's private CA (PEM), which the devices trust.
    pub object_store_ca: Option<PathBuf>,
}

/// A command that runs one device's edge agent: `program args.. --broker URL --fleet F
/// --device-id ID`. The process must stop, publishing its offline status, when its stdin
/// closes.
#[derive(Debug, Clone)]
pub struct AgentProcess {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl AgentProcess {
    fn spawn(
        &self,
        device_id: &str,
        broker: &BrokerConfig,
        fleet: &str,
    ) -> std::io::Result<tokio::process::Child> {
        tokio::process::Command::new(&self.program)
            .args(&self.args)
            .args([
                "--broker",
                &broker.url,
                "--fleet",
                fleet,
                "--device-id",
                device_id,
            ])
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
    }
}

/// Simulated clients `sim-0000`, `sim-0001`, ... connected to a local coordinator: direct gRPC
/// clients, or edge agents behind a proxy over MQTT (weights through the coordinator's
/// object storage). They stop when the coordinator's token fires.
pub struct SimulatedFleet {
    tasks: tokio::task::JoinSet<()>,
    proxy: Option<ProxyHandle>,
    /// Agent processes (with [`FleetOptions::agent_process`]); closing their stdin stops them.
    children: Vec<tokio::process::Child>,
    size: usize,
}

impl SimulatedFleet {
    pub async fn start<C: Client>(
        coordinator: &LocalCoordinator,
        clients: Vec<C>,
        options: FleetOptions,
    ) -> anyhow::Result<Self> {
        let endpoint = coordinator.endpoint();
        let stop_all = coordinator.token();
        let size = clients.len();
        let mut fleet = Self {
            tasks: tokio::task::JoinSet::new(),
            proxy: None,
            children: Vec::new(),
            size,
        };
        match options.transport {
            Transport::Grpc => {
                for (i, client) in clients.into_iter().enumerate() {
                    let (endpoint, stop) = (endpoint.clone(), stop_all.clone());
                    let opts = ClientOptions {
                        compute_slots: Some(options.compute_slots.clone()),
                        // A thousand clients connecting at once can overflow the listener's
                        // accept queue; a reset there is not the end of a client.
                        connect_attempts: 10,
                        grpc_compression: options.grpc_compression,
                        ..Default::default()
                    };
                    let id = format!("sim-{i:04}");
                    fleet.tasks.spawn(async move {
                        if let Err(e) =
                            pollen_client::run_client(&endpoint, &id, client, opts, stop).await
                        {
                            tracing::warn!(client = %id, "client ended: {e}");
                        }
                    });
                }
            }
            Transport::InProcess => {
                let service = coordinator.server.service.clone();
                for (i, client) in clients.into_iter().enumerate() {
                    let (service, stop) = (service.clone(), stop_all.clone());
                    let opts = ClientOptions {
                        compute_slots: Some(options.compute_slots.clone()),
                        // Bytes that never leave this process need no digest.
                        skip_inline_digest: true,
                        ..Default::default()
                    };
                    let id = format!("sim-{i:04}");
                    fleet.tasks.spawn(async move {
                        let (tx, rx) = tokio::sync::mpsc::channel(16);
                        let join = pollen_client::fleet::join_message(&id, &client, &opts);
                        let inbound = tokio_stream::StreamExt::map(
                            tokio_stream::wrappers::ReceiverStream::new(rx),
                            Ok,
                        );
                        let outcome = match service.join_local(join, inbound).await {
                            Ok(stream) => {
                                pollen_client::fleet::serve(stream, tx, client, opts, stop)
                                    .await
                                    .map(drop)
                                    .map_err(|e| e.to_string())
                            }
                            Err(status) => Err(status.message().to_string()),
                        };
                        if let Err(e) = outcome {
                            tracing::warn!(client = %id, "client ended: {e}");
                        }
                    });
                }
            }
            Transport::Device => {
                let broker = match &options.broker {
                    Some(b) => b.clone(),
                    None => {
                        let embedded =
                            tokio::task::spawn_blocking(move || start_embedded_broker(size + 8))
                                .await??;
                        BrokerConfig::new(embedded.url)
                    }
                };
                if let Some(process) = &options.agent_process {
                    for i in 0..size {
                        fleet.children.push(
                            process
                                .spawn(&format!("sim-{i:04}"), &broker, &options.fleet)
                                .context("starting an agent process")?,
                        );
                    }
                } else {
                    fleet.spawn_agents(clients, &broker, &options, &stop_all)?;
                }
                fleet.proxy = Some(
                    Proxy::start(
                        ProxyConfig {
                            fleet: options.fleet,
                            proxy_id: "sim".into(),
                            coordinator: endpoint,
                            coordinator_tls: Default::default(),
                            broker,
                            selection: Selection::default(),
                            stale_after: Duration::from_secs(60),
                            keep_alive: Duration::from_secs(30),
                            persistent_session: false,
                            auto_shard: false,
                            heartbeat: pollen_proxy::config::DEFAULT_HEARTBEAT,
                        },
                        stop_all,
                    )
                    .await
                    .context("starting the device proxy")?,
                );
            }
        }
        Ok(fleet)
    }

    /// One edge agent task per client, sharing one HTTP connection pool as one host does.
    fn spawn_agents<C: Client>(
        &mut self,
        clients: Vec<C>,
        broker: &BrokerConfig,
        options: &FleetOptions,
        stop_all: &CancellationToken,
    ) -> anyhow::Result<()> {
        let ca = match &options.object_store_ca {
            Some(path) => Some(pollen_client::transfer::read_ca(path).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let http = pollen_client::transfer::http_client(ca.as_deref())
            .context("building the HTTP client for weight transfers")?;
        for (i, client) in clients.into_iter().enumerate() {
            let agent = Agent::new(
                AgentOptions {
                    device_id: format!("sim-{i:04}"),
                    fleet: options.fleet.clone(),
                    broker: broker.clone(),
                    heartbeat: Duration::from_secs(10),
                    keep_alive: Duration::from_secs(30),
                    work_dir: None,
                    model: options.model.clone(),
                    compute_slots: Some(options.compute_slots.clone()),
                    properties: Default::default(),
                    consent: None,
                    object_store_ca: None,
                },
                client,
            )?
            .with_http_client(http.clone());
            let stop = stop_all.clone();
            self.tasks.spawn(async move {
                if let Err(e) = agent.run(stop).await {
                    tracing::warn!("simulated agent ended: {e}");
                }
            });
        }
        Ok(())
    }

    /// Waits until every client has joined the coordinator (through its bridge on the device
    /// path); false, with a warning, if they have not within `timeout`.
    pub async fn wait_joined(&self, coordinator: &LocalCoordinator, timeout: Duration) -> bool {
        let joined = match &self.proxy {
            Some(p) => p.wait_for_bridges(self.size, timeout).await,
            None => {
                coordinator
                    .server
                    .registry
                    .wait_for(self.size, timeout)
                    .await
            }
        };
        if !joined {
            tracing::warn!(
                "not all {} simulated devices joined within {timeout:?}; starting with {}",
                self.size,
                coordinator.server.registry.len()
            );
        }
        joined
    }

    /// Reads, at each call, how many MQTT messages the proxy has exchanged with the devices
    /// (commands published + replies received); device path only.
    pub fn mqtt_messages(&self) -> Option<impl Fn() -> u64 + Clone + Send + Sync + 'static> {
        self.proxy.as_ref().map(|p| {
            let read = p.stats_reader();
            move || {
                let s = read();
                s.commands_published + s.replies_received
            }
        })
    }

    /// Waits for every client (and the proxy) to end, once the coordinator's token fired.
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        for mut child in self.children.drain(..) {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                tracing::warn!("an agent process did not stop within 10 s of its stdin closing");
                let _ = child.kill().await;
            }
        }
        if let Some(proxy) = self.proxy.take() {
            proxy.join().await;
        }
    }
}
