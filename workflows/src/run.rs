//! Running a spec: object storage, the strategy, records and the round driver, shared by
//! `pollen simulate`, `pollen coordinator` and `pollen run`.
//!
//! `pollen run` is the whole workflow of a run on a real fleet (what Step Functions does in the
//! AWS reference): discover devices from their retained MQTT status -> select the ones the spec
//! asks for -> start the coordinator and one proxy bridge per selected device -> drive the
//! rounds -> leave the model and the report in the run's records.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pollen_coordinator::privacy::{CentralDp, LocalDp, Mechanism};
use pollen_coordinator::records::{Database, Liveness, RunHandle};
use pollen_coordinator::registry::Registry;
use pollen_coordinator::server::FleetServer;
use pollen_coordinator::storage::embedded::{EmbeddedS3, EmbeddedTls};
use pollen_coordinator::{
    BlobStore, DriverConfig, FedAvg, Metrics, RoundDriver, RoundRecord, RunStore, RunSummary,
    S3Store, StoreConfig,
};
use pollen_dashboard::{HttpServer, HttpSources, serve_http};
use pollen_proto::codec::UpdateCodec;
use pollen_proto::mqtt::BrokerConfig;
use pollen_proxy::{DeviceRecord, Proxy, ProxyConfig, Selection};
use pollen_train::TaskManifest;
use pollen_train::data::Raw;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::spec::RunSpec;
use crate::task::{self, FinalTask};

/// Where weight blobs go.
#[derive(Debug, Clone)]
pub enum Storage {
    /// The in-process S3 server over `root`, listening on `listen` (port 0: any free port),
    /// over HTTPS with `tls`. Devices on other hosts need `listen` to be an address they can
    /// reach.
    Embedded {
        root: PathBuf,
        listen: SocketAddr,
        tls: Option<EmbeddedTls>,
    },
    /// An S3-compatible service (AWS S3, MinIO, ...).
    External(StoreConfig),
    /// No object storage: weights travel inline in gRPC messages (direct clients only).
    Inline,
}

/// Object storage opened for a run; dropping it does not stop the embedded server, the
/// shutdown token given to [`open_storage`] does.
pub struct OpenStorage {
    pub store: Option<Arc<dyn BlobStore>>,
    pub embedded: Option<EmbeddedS3>,
}

impl OpenStorage {
    /// Where blobs live, for the log line a person reads at start.
    pub fn describe(&self) -> String {
        match (&self.embedded, &self.store) {
            (Some(e), _) => format!(
                "embedded S3 at {} (folder {})",
                e.endpoint,
                e.root.display()
            ),
            (None, Some(s)) => s.describe(),
            (None, None) => "none (weights inline)".into(),
        }
    }
}

pub async fn open_storage(
    storage: &Storage,
    shutdown: CancellationToken,
) -> anyhow::Result<OpenStorage> {
    match storage {
        Storage::Inline => Ok(OpenStorage {
            store: None,
            embedded: None,
        }),
        Storage::External(config) => {
            let store = S3Store::connect(config).await?;
            Ok(OpenStorage {
                store: Some(Arc::new(store)),
                embedded: None,
            })
        }
        Storage::Embedded { root, listen, tls } => {
            let embedded = EmbeddedS3::start(root, *listen, tls.as_ref(), shutdown).await?;
            let store = S3Store::connect(&embedded.store_config("pollen")).await?;
            Ok(OpenStorage {
                store: Some(Arc::new(store)),
                embedded: Some(embedded),
            })
        }
    }
}

/// The spec's strategy (its aggregation rule, server optimizer, norm bound and differential
/// privacy) with its fit and evaluate configs, the task's exact aggregation of federated
/// metrics and, when the server has a holdout, centralized evaluation on it.
pub fn build_strategy(
    spec: &RunSpec,
    manifest: &TaskManifest,
    server: Option<Raw>,
    done: &FinalTask,
) -> anyhow::Result<FedAvg> {
    let c = &spec.strategy;
    let mut strategy = FedAvg::new(c.sampling())
        .named(c.name.as_str())
        .with_rule(c.rule())
        .with_fit_config(spec.fit_config())
        .with_evaluate_config(spec.evaluate_config())
        .with_evaluate_metrics_aggregation(task::metrics_aggregation(manifest));
    if let Some(optimizer) = c.server_optimizer().map_err(anyhow::Error::msg)? {
        strategy = strategy.with_server_optimizer(optimizer);
    }
    if let Some(bound) = c.norm_bound {
        strategy = strategy.with_norm_bound(bound);
    }
    match &spec.privacy {
        Some(p) if p.mechanism == Mechanism::Central => {
            strategy = strategy.with_central_dp(CentralDp::new(p.clone()));
        }
        Some(p) => strategy = strategy.with_local_dp(LocalDp::new(p.clone())),
        None => {}
    }
    if let Some(raw) = server {
        anyhow::ensure!(
            manifest.model.is_builtin() || pollen_train::backend::LIBTORCH,
            "centralized evaluation of a TorchScript model runs it with LibTorch, which this build of pollen does not link (build with --features torch, or evaluate on the devices: evaluate.centralized = false and strategy.fraction_evaluate > 0)"
        );
        strategy = strategy.with_evaluate_fn(task::server_evaluator(
            raw,
            spec.evaluate.batch_size,
            spec.evaluate.test_examples,
            done.clone(),
        ));
    }
    Ok(strategy)
}

/// Opens the run records: the runs directory and the run table in `database`.
pub fn open_records(
    runs_dir: &std::path::Path,
    database: &Database,
) -> anyhow::Result<Arc<RunStore>> {
    let liveness = Liveness::from_env().map_err(anyhow::Error::msg)?;
    RunStore::open_with(runs_dir, database, liveness)
        .with_context(|| format!("opening the run records in {}", runs_dir.display()))
}

/// Opens the run records and creates this run's.
pub fn create_run(
    spec: &RunSpec,
    runs_dir: &std::path::Path,
    database: &Database,
) -> anyhow::Result<Arc<RunHandle>> {
    let store = open_records(runs_dir, database)?;
    Ok(Arc::new(store.create_run(
        &spec.name,
        &spec.to_toml(),
        spec.seed,
        spec.rounds,
    )?))
}

/// Serves the dashboard, its API and `/metrics` from `sources` (the coordinator's clients,
/// metrics, operators and control), over the records in `runs_dir`, until `shutdown`; prints
/// where.
async fn serve_dashboard(
    addr: SocketAddr,
    runs_dir: &std::path::Path,
    database: &Database,
    sources: HttpSources,
    shutdown: CancellationToken,
) -> anyhow::Result<HttpServer> {
    let sources = HttpSources {
        runs: Some(open_records(runs_dir, database)?),
        ..sources
    };
    let server = serve_http(addr, sources, shutdown)
        .await
        .with_context(|| format!("serving the dashboard on {addr}"))?;
    eprintln!(
        "Dashboard on http://{0}/ (Prometheus metrics at http://{0}/metrics)",
        server.addr
    );
    Ok(server)
}

/// What [`drive`] runs over.
pub struct DriveOptions {
    /// The clients (direct or proxy bridges) the coordinator's Fleet service registered.
    pub registry: Arc<Registry>,
    pub run: Arc<RunHandle>,
    /// Weights by reference through this store; inline when `None`.
    pub store: Option<Arc<dyn BlobStore>>,
    /// The server's holdout for centralized evaluation.
    pub server: Option<Raw>,
    pub wait_for_clients: Duration,
    /// Prometheus metrics to report each round to.
    pub metrics: Option<Arc<Metrics>>,
    /// Continue a reopened run from its records instead of starting it.
    pub resume: Option<crate::resume::ResumeFrom>,
}

/// Drives the spec's rounds of `manifest`'s task over the clients in `options.registry`.
pub async fn drive(
    spec: &RunSpec,
    manifest: TaskManifest,
    options: DriveOptions,
    on_round: impl FnMut(&RoundRecord) + Send + 'static,
    shutdown: CancellationToken,
) -> anyhow::Result<RunSummary> {
    let DriveOptions {
        registry,
        run,
        store,
        server,
        wait_for_clients,
        metrics,
        resume,
    } = options;
    let done = FinalTask::default();
    // A resumed run's task is the one its rounds used, fitted or not.
    let (manifest, recorded_setup) = match resume.as_ref().and_then(|r| r.task.clone()) {
        Some(bytes) => {
            let (manifest, setup) = task::setup_recorded(bytes, done.clone())?;
            (manifest, Some(setup))
        }
        None => (manifest, None),
    };
    let resumed = match &resume {
        Some(r) => match &r.checkpoint {
            Some((path, model_round)) => Some(pollen_coordinator::Resume {
                parameters: crate::warm::load(path, &manifest)?,
                completed: r.completed,
                model_round: *model_round,
                rng_word_pos: r.rng_word_pos,
            }),
            None => None,
        },
        None => None,
    };
    let warm = match &spec.warm_start {
        // Resuming continues from the run's own checkpoint; the warm-start source may have
        // moved on (a `run` without a round means its latest).
        _ if resumed.is_some() => None,
        Some(w) => {
            let runs_dir = run
                .dir()
                .parent()
                .context("a run directory lies in a runs directory")?;
            let path = w.path(runs_dir)?;
            let parameters = crate::warm::load(&path, &manifest)?;
            eprintln!(
                "warm start: {} ({} parameters)",
                path.display(),
                parameters.num_params()
            );
            Some(parameters)
        }
        None => None,
    };
    let mut strategy = build_strategy(spec, &manifest, server, &done)?;
    let primary = manifest.task.kind.primary_metric().to_string();
    let setup = match recorded_setup {
        Some(setup) => setup,
        None => task::setup(manifest, done.clone())?,
    };
    if setup.statistics.is_none()
        && let Some(task) = done.get()
        && let Some(initial) = crate::torchscript::initial_parameters(task)?
    {
        strategy = strategy.with_initial_parameters(initial);
    }
    let mut driver = RoundDriver::new(
        registry,
        Box::new(strategy),
        DriverConfig {
            num_rounds: spec.rounds,
            round_timeout: spec.round_timeout,
            wait_for_clients,
            seed: spec.seed,
            primary_metric: Some(primary),
            close_after: spec.strategy.close_after,
            fedbuff: spec.fedbuff.clone(),
            model_codec: spec
                .compression
                .as_ref()
                .map(|c| c.model_codec())
                .transpose()
                .map_err(anyhow::Error::msg)?
                .unwrap_or(UpdateCodec::F32),
        },
    )
    .with_task(setup)
    .with_run(run)
    .on_round(on_round);
    if let Some(store) = store {
        driver = driver.with_store(store);
    }
    if let Some(metrics) = metrics {
        driver = driver.with_metrics(metrics);
    }
    let warm_started = warm.is_some();
    if let Some(parameters) = warm {
        driver = driver.with_warm_start(parameters);
    }
    if let Some(resume) = resumed {
        eprintln!(
            "resuming after round {} from the model of round {} (sha256 {})",
            resume.completed,
            resume.model_round,
            resume.parameters.encode().sha256
        );
        driver = driver.with_resume(resume);
    }
    let summary = driver.run(shutdown).await?;
    if warm_started && let Some(e) = &summary.initial_evaluation {
        let accuracy = e.metrics.get("accuracy").copied();
        eprintln!(
            "warm start: before round 1, loss {:.4}{}",
            e.loss,
            accuracy.map_or(String::new(), |a| format!(", accuracy {a:.4}"))
        );
    }
    Ok(summary)
}

/// A coordinator started in this process for one run: the Fleet gRPC service and the run's
/// object storage, which start together and stop together.
pub struct LocalCoordinator {
    pub server: FleetServer,
    pub storage: OpenStorage,
    tls: bool,
    stop: CancellationToken,
    /// Stops everything started here if the caller returns early without [`Self::shut_down`].
    _stop_on_drop: DropGuard,
}

impl LocalCoordinator {
    /// Serves the Fleet API on `listen` (port 0: any free port) and opens `storage`.
    pub async fn start(listen: SocketAddr, storage: &Storage) -> anyhow::Result<Self> {
        Self::start_tls(listen, None, storage).await
    }

    /// [`start`](Self::start), serving the Fleet API over TLS (mutual with a client CA).
    pub async fn start_tls(
        listen: SocketAddr,
        tls: Option<&pollen_proto::grpc_tls::ServerTls>,
        storage: &Storage,
    ) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        let server = pollen_coordinator::server::serve_tls(listen, tls, stop.clone())
            .await
            .with_context(|| format!("serving the coordinator on {listen}"))?;
        let storage = open_storage(storage, stop.clone()).await?;
        Ok(Self {
            server,
            storage,
            tls: tls.is_some(),
            stop,
            _stop_on_drop: guard,
        })
    }

    /// `http://ip:port` (or `https://`) of the Fleet API.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.server.addr)
    }

    /// Fires when this coordinator shuts down; hand it to what runs alongside (clients,
    /// proxies, HTTP endpoints) so that everything stops together.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// What [`drive`] needs to run over this coordinator's clients and storage, with the
    /// defaults (wait up to 60 s for clients, no metrics).
    pub fn drive_options(&self, run: Arc<RunHandle>, server: Option<Raw>) -> DriveOptions {
        DriveOptions {
            registry: self.server.registry.clone(),
            run,
            store: self.storage.store.clone(),
            server,
            wait_for_clients: Duration::from_secs(60),
            metrics: None,
            resume: None,
        }
    }

    /// Serves the dashboard and `/metrics` for this coordinator on `addr` (if given) until it
    /// shuts down; the returned metrics are what [`DriveOptions::metrics`] reports to.
    /// Without operators (`access`) it serves loopback only.
    pub async fn dashboard(
        &self,
        addr: Option<SocketAddr>,
        runs_dir: &std::path::Path,
        database: &Database,
        access: Option<Arc<pollen_dashboard::access::Access>>,
    ) -> anyhow::Result<Option<Arc<Metrics>>> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let metrics = Arc::new(Metrics::new(self.server.registry.clone()));
        let sources = HttpSources {
            registry: Some(self.server.registry.clone()),
            metrics: Some(metrics.clone()),
            access,
            ..HttpSources::default()
        };
        serve_dashboard(addr, runs_dir, database, sources, self.token()).await?;
        Ok(Some(metrics))
    }

    /// [`Self::dashboard`] for a coordinator service: reporting to `metrics`, and taking
    /// control requests (submit, stop, resume) for `control`. Where it listens.
    pub async fn service_endpoint(
        &self,
        addr: SocketAddr,
        runs_dir: &std::path::Path,
        database: &Database,
        access: Option<Arc<pollen_dashboard::access::Access>>,
        control: Arc<dyn pollen_dashboard::control::Control>,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<SocketAddr> {
        let sources = HttpSources {
            registry: Some(self.server.registry.clone()),
            metrics: Some(metrics.clone()),
            access,
            control: Some(control),
            ..HttpSources::default()
        };
        let server = serve_dashboard(addr, runs_dir, database, sources, self.token()).await?;
        Ok(server.addr)
    }

    /// Stops the service and the storage server, and waits for them.
    pub async fn shut_down(self) {
        self.stop.cancel();
        let _ = self.server.handle.await;
        if let Some(e) = self.storage.embedded {
            e.join().await;
        }
    }
}

/// Options of [`run_on_fleet`].
pub struct FleetRunOptions {
    pub broker: BrokerConfig,
    pub storage: Storage,
    pub runs_dir: PathBuf,
    /// Where the run table is (SQLite in `runs_dir` by default).
    pub database: Database,
    /// How long to listen for retained device statuses before selecting.
    pub discovery_wait: Duration,
    /// Heartbeat staleness after which a device counts as offline.
    pub stale_after: Duration,
    /// Serve the live dashboard and `/metrics` here while the run goes.
    pub dashboard: Option<SocketAddr>,
    /// Operators of the dashboard (loopback only without them).
    pub access: Option<Arc<pollen_dashboard::access::Access>>,
}

/// What `pollen run` did.
pub struct FleetRun {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub selected: Vec<DeviceRecord>,
    pub summary: RunSummary,
}

/// `pollen run`: discover, select, bridge and train on the devices of `spec.devices.fleet`.
pub async fn run_on_fleet(
    spec: &RunSpec,
    options: &FleetRunOptions,
    shutdown: CancellationToken,
    on_selected: impl FnOnce(&[DeviceRecord]),
    on_round: impl FnMut(&RoundRecord) + Send + 'static,
) -> anyhow::Result<FleetRun> {
    let fleet = &spec.devices.fleet;
    let found = pollen_proxy::discover(&options.broker, fleet, options.discovery_wait)
        .await
        .with_context(|| format!("discovering the devices of fleet {fleet:?}"))?;
    let mut selection = Selection {
        devices: None,
        min_examples: spec.devices.min_examples,
        max_devices: spec.devices.count,
        data: None,
        shard: None,
    };
    // Resolve the task against the devices that are up, then keep those whose data fits it.
    let candidates = selection.pick(found.iter().cloned());
    let manifest = task::resolve_with_devices(spec, &candidates)?;
    selection.data = Some(task::requirement(&manifest));
    for d in &candidates {
        if let Err(why) = selection.check(d) {
            eprintln!("device {} left out: its data {why}", d.device_id);
        }
    }
    let selected = selection.pick(found.iter().cloned());
    let fedavg = &spec.strategy;
    anyhow::ensure!(
        selected.len() >= fedavg.min_available_clients,
        "fleet {fleet:?}: {} devices online with at least {} examples and data that fits the task ({} known), but the strategy needs min_available_clients = {}; start more agents or lower the minimum",
        selected.len(),
        spec.devices.min_examples,
        found.len(),
        fedavg.min_available_clients
    );
    on_selected(&selected);

    let coordinator =
        LocalCoordinator::start(SocketAddr::from(([127, 0, 0, 1], 0)), &options.storage).await?;
    anyhow::ensure!(
        coordinator.storage.store.is_some(),
        "devices reached over MQTT need object storage; configure S3 or use the embedded store"
    );
    eprintln!("object storage: {}", coordinator.storage.describe());
    let metrics = coordinator
        .dashboard(
            options.dashboard,
            &options.runs_dir,
            &options.database,
            options.access.clone(),
        )
        .await?;
    let spec_for_data = spec.clone();
    let server = tokio::task::spawn_blocking(move || task::server_data(&spec_for_data)).await??;
    let run = create_run(spec, &options.runs_dir, &options.database)?;
    let (run_id, run_dir) = (run.id().to_string(), run.dir().to_path_buf());
    let proxy = Proxy::start(
        ProxyConfig {
            fleet: fleet.clone(),
            proxy_id: format!("run-{run_id}"),
            coordinator: coordinator.endpoint(),
            coordinator_tls: Default::default(),
            broker: options.broker.clone(),
            selection: Selection {
                devices: Some(selected.iter().map(|d| d.device_id.clone()).collect()),
                min_examples: 0,
                max_devices: None,
                data: None,
                shard: None,
            },
            stale_after: options.stale_after,
            keep_alive: Duration::from_secs(30),
            persistent_session: false,
            auto_shard: false,
            heartbeat: pollen_proxy::config::DEFAULT_HEARTBEAT,
        },
        coordinator.token(),
    )
    .await
    .context("starting the device proxy")?;
    // Every selected device takes part from round 1, rather than whoever bridged first.
    if !proxy
        .wait_for_bridges(selected.len(), Duration::from_secs(30))
        .await
    {
        tracing::warn!(
            "not every selected device bridged within 30 s; starting with {}",
            coordinator.server.registry.len()
        );
    }
    let drive_options = DriveOptions {
        metrics,
        ..coordinator.drive_options(run, server)
    };
    let summary = drive(spec, manifest, drive_options, on_round, shutdown).await;
    coordinator.token().cancel();
    proxy.join().await;
    coordinator.shut_down().await;
    Ok(FleetRun {
        run_id,
        run_dir,
        selected,
        summary: summary?,
    })
}
