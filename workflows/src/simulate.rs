//! `pollen simulate`: a coordinator and N simulated clients in one process, training real
//! models over the real protocols.
//!
//! By default the clients are edge agents behind the device path, exactly as in production:
//! coordinator --gRPC--> proxy bridges --MQTT (embedded broker)--> agents, with weights through
//! the embedded S3 server and presigned URLs. `Transport::Grpc` keeps the direct gRPC clients
//! with inline weights (the algorithm fast path).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pollen_client::TrainerClient;
use pollen_client::agent::{Agent, AgentOptions};
use pollen_client::fleet::ClientOptions;
use pollen_client::fleet::{Client, ClientError, ClientEvaluate, ClientFit};
use pollen_client::mnist::{Mnist, MnistSplit};
use pollen_client::trainer::{self, LocalData};
use pollen_coordinator::strategy::Evaluation;
use pollen_coordinator::{RoundRecord, RunSummary, StoreConfig};
use pollen_proto::Parameters;
use pollen_proto::mqtt::BrokerConfig;
use pollen_proto::scalar::ScalarMap;
use pollen_proxy::{Proxy, ProxyConfig, Selection};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::broker::start_embedded_broker;
use crate::run::{DriveOptions, LocalCoordinator, Storage};
use crate::spec::RunSpec;

/// How simulated clients reach the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Transport {
    /// The production device path: proxy bridges + MQTT agents + weights through S3.
    #[default]
    Device,
    /// Direct gRPC Fleet clients, weights inline (the algorithm fast path).
    Grpc,
}

/// Where and how a simulation runs.
pub struct SimulateOptions {
    /// Records go to `<runs_dir>/<run-id>/` and `<runs_dir>/pollen.db`.
    pub runs_dir: PathBuf,
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
}

impl SimulateOptions {
    pub fn new(runs_dir: impl Into<PathBuf>) -> Self {
        Self {
            runs_dir: runs_dir.into(),
            parallelism: None,
            transport: Transport::Device,
            broker: None,
            s3: None,
            dashboard: None,
        }
    }
}

/// What a simulation returns.
pub struct Simulation {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub summary: RunSummary,
}

/// Server-side evaluation on the test set, handed to the strategy.
pub fn centralized_evaluator(
    spec: &RunSpec,
    test: Arc<MnistSplit>,
) -> pollen_coordinator::fedavg::EvaluateFn {
    let kind = spec.model;
    let batch = spec.evaluate.batch_size;
    let mut data = LocalData::all(test);
    if let Some(n) = spec.evaluate.test_examples {
        data.indices.truncate(n);
    }
    Box::new(
        move |_round, params| match trainer::evaluate(kind, params, &data, batch) {
            Ok(out) => Some(Evaluation {
                loss: out.loss,
                metrics: [("accuracy".to_string(), out.accuracy)].into(),
            }),
            Err(e) => {
                tracing::error!("centralized evaluation failed: {e}");
                None
            }
        },
    )
}

/// A simulated device that fails a fraction of its fit commands (the spec's
/// `simulation.failure_rate`), as devices of a real fleet do: the coordinator sees a
/// `client_error` failure with the device's message, and the round goes on without it.
struct Unreliable {
    inner: TrainerClient,
    failure_rate: f64,
    rng: ChaCha8Rng,
}

impl Client for Unreliable {
    fn num_examples(&self) -> u64 {
        self.inner.num_examples()
    }

    fn get_parameters(&mut self, config: &ScalarMap) -> Result<Parameters, ClientError> {
        self.inner.get_parameters(config)
    }

    fn fit(
        &mut self,
        round: u64,
        parameters: Parameters,
        config: &ScalarMap,
    ) -> Result<ClientFit, ClientError> {
        if self.failure_rate > 0.0 && self.rng.random::<f64>() < self.failure_rate {
            return Err(ClientError::training(format!(
                "simulated device failure in round {round} (simulation.failure_rate = {})",
                self.failure_rate
            )));
        }
        self.inner.fit(round, parameters, config)
    }

    fn evaluate(
        &mut self,
        round: u64,
        parameters: Parameters,
        config: &ScalarMap,
    ) -> Result<ClientEvaluate, ClientError> {
        self.inner.evaluate(round, parameters, config)
    }
}

/// Runs `spec` with simulated clients; `on_round` sees each round's record as it is recorded.
pub async fn simulate(
    spec: &RunSpec,
    options: &SimulateOptions,
    shutdown: CancellationToken,
    on_round: impl FnMut(&RoundRecord) + Send + 'static,
) -> anyhow::Result<Simulation> {
    let data_dir = spec.resolve_data_dir();
    let mnist = tokio::task::spawn_blocking(move || Mnist::load(&data_dir))
        .await?
        .context("loading MNIST")?;
    let train = Arc::new(mnist.train);
    let test = Arc::new(mnist.test);
    let parts = spec
        .data
        .partition
        .split(&train.labels, spec.data.clients, spec.seed)
        .context("partitioning the training set")?;

    let run = crate::run::create_run(spec, &options.runs_dir)?;
    let run_id = run.id().to_string();
    let run_dir = run.dir().to_path_buf();

    let storage = match options.transport {
        Transport::Grpc => Storage::Inline,
        Transport::Device => match &options.s3 {
            Some(config) => Storage::External(config.clone()),
            None => Storage::Embedded {
                root: options.runs_dir.join("s3"),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            },
        },
    };
    let coordinator =
        LocalCoordinator::start(SocketAddr::from(([127, 0, 0, 1], 0)), &storage).await?;
    let endpoint = coordinator.endpoint();
    // Clients, agents and the proxy stop with the coordinator (also on an early return).
    let stop_all = coordinator.token();
    let metrics = coordinator
        .dashboard(options.dashboard, &options.runs_dir)
        .await?;

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let slots = Arc::new(Semaphore::new(options.parallelism.unwrap_or(cores).max(1)));
    let failure_rate = spec.simulation.failure_rate;
    let clients: Vec<Unreliable> = parts
        .into_iter()
        .enumerate()
        .map(|(i, indices)| {
            let seed = spec.seed.wrapping_add(i as u64 + 1);
            Unreliable {
                inner: TrainerClient {
                    model: spec.model,
                    train: LocalData {
                        split: train.clone(),
                        indices,
                    },
                    test: None,
                    seed,
                },
                failure_rate,
                rng: ChaCha8Rng::seed_from_u64(seed ^ 0x0fa1_1ed0),
            }
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    let mut proxy = None;
    match options.transport {
        Transport::Grpc => {
            for (i, client) in clients.into_iter().enumerate() {
                let (endpoint, stop) = (endpoint.clone(), stop_all.clone());
                let opts = ClientOptions {
                    compute_slots: Some(slots.clone()),
                    ..Default::default()
                };
                let id = format!("sim-{i:04}");
                tasks.spawn(async move {
                    if let Err(e) =
                        pollen_client::run_client(&endpoint, &id, client, opts, stop).await
                    {
                        tracing::warn!(client = %id, "client ended: {e}");
                    }
                });
            }
        }
        Transport::Device => {
            let broker = match &options.broker {
                Some(b) => b.clone(),
                None => {
                    let n = spec.data.clients;
                    let embedded =
                        tokio::task::spawn_blocking(move || start_embedded_broker(n + 8)).await??;
                    BrokerConfig::new(embedded.url)
                }
            };
            // A fleet of its own per run, so runs sharing a broker never see each other.
            let fleet = format!("sim-{run_id}");
            // One HTTP connection pool for all simulated devices, as one host has.
            let http = pollen_client::agent::transfer::http_client()
                .context("building the HTTP client for weight transfers")?;
            for (i, client) in clients.into_iter().enumerate() {
                let agent = Agent::new(
                    AgentOptions {
                        device_id: format!("sim-{i:04}"),
                        fleet: fleet.clone(),
                        broker: broker.clone(),
                        heartbeat: Duration::from_secs(10),
                        keep_alive: Duration::from_secs(30),
                        work_dir: None,
                        model: spec.model.name().to_string(),
                        compute_slots: Some(slots.clone()),
                        properties: Default::default(),
                    },
                    client,
                )?
                .with_http_client(http.clone());
                let stop = stop_all.clone();
                tasks.spawn(async move {
                    if let Err(e) = agent.run(stop).await {
                        tracing::warn!("simulated agent ended: {e}");
                    }
                });
            }
            proxy = Some(
                Proxy::start(
                    ProxyConfig {
                        fleet,
                        proxy_id: "sim".into(),
                        coordinator: endpoint.clone(),
                        broker,
                        selection: Selection::default(),
                        stale_after: Duration::from_secs(60),
                        keep_alive: Duration::from_secs(30),
                        persistent_session: false,
                    },
                    stop_all.clone(),
                )
                .await
                .context("starting the device proxy")?,
            );
        }
    }

    // Every simulated device is there from the start, so the first rounds sample from all of
    // them rather than from whoever connected first.
    let everyone = spec.data.clients;
    let joined = match &proxy {
        Some(p) => p.wait_for_bridges(everyone, Duration::from_secs(120)).await,
        None => {
            coordinator
                .server
                .registry
                .wait_for(everyone, Duration::from_secs(120))
                .await
        }
    };
    if !joined {
        tracing::warn!(
            "not all {everyone} simulated devices joined within 120 s; starting with {}",
            coordinator.server.registry.len()
        );
    }
    let test = spec.evaluate.centralized.then_some(test);
    let options = DriveOptions {
        metrics,
        ..coordinator.drive_options(run, test)
    };
    let summary = crate::run::drive(spec, options, on_round, shutdown).await;
    stop_all.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some(proxy) = proxy {
        proxy.join().await;
    }
    coordinator.shut_down().await;
    Ok(Simulation {
        run_id,
        run_dir,
        summary: summary?,
    })
}
