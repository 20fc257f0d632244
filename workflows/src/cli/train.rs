//! The commands that train: `pollen simulate`, `pollen coordinator`, `pollen run` and
//! `pollen central`, with the spec and storage arguments they share.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use pollen_coordinator::StoreConfig;
use pollen_coordinator::records::Database;
use pollen_coordinator::storage::embedded::EmbeddedTls;
use pollen_proto::mqtt::BrokerConfig;
use pollen_train::Backend;

use super::report::{print_devices, print_summary, reporter, show_metric};
use super::{RUN_INTERRUPTED, shutdown_on_ctrl_c};
use crate::run::{DriveOptions, FleetRunOptions, LocalCoordinator, Storage};
use crate::simulate::{SimulateOptions, Transport};
use crate::spec::RunSpec;

/// The run spec every run command takes, and the override they share.
#[derive(Args, Clone, Debug)]
pub struct SpecArgs {
    /// Run spec (TOML); the built-in MNIST 2NN spec (workflows/mnist-2nn.toml) when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override the spec's number of rounds.
    #[arg(long)]
    pub rounds: Option<u64>,
}

impl SpecArgs {
    /// The spec with these and the command's own `overrides` applied, validated.
    fn load(&self, overrides: impl FnOnce(&mut RunSpec)) -> anyhow::Result<RunSpec> {
        run_spec(self.config.as_deref(), self.rounds, overrides)
    }
}

/// The spec a run command runs: loaded (or built in), the command line's overrides applied by
/// `overrides`, then validated. Every run command goes through here, so that no override
/// skips validation (`--rounds 0` is refused everywhere).
fn run_spec(
    config: Option<&Path>,
    rounds: Option<u64>,
    overrides: impl FnOnce(&mut RunSpec),
) -> anyhow::Result<RunSpec> {
    let mut spec = match config {
        Some(path) => RunSpec::load(path)?.0,
        None => RunSpec::default_spec(),
    };
    if let Some(r) = rounds {
        spec.rounds = r;
    }
    overrides(&mut spec);
    spec.validate()
        .map_err(|e| anyhow::anyhow!("invalid run: {e}"))?;
    Ok(spec)
}

/// Where weight blobs go (device path).
#[derive(Args, Clone, Debug)]
pub struct StorageArgs {
    /// S3-compatible endpoint (MinIO, Ceph, AWS) instead of the embedded S3 server.
    /// Credentials come from the AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// profiles, instance roles); devices never see them.
    #[arg(long, env = "POLLEN_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "POLLEN_S3_BUCKET", default_value = "pollen")]
    pub s3_bucket: String,
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Virtual-hosted-style addressing instead of path-style (AWS S3 without --s3-endpoint
    /// works either way).
    #[arg(long)]
    pub s3_virtual_hosted: bool,
    /// Where the embedded S3 server listens; devices download from and upload to this
    /// address, so it must be reachable from them.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub s3_listen: SocketAddr,
    /// Serve the embedded S3 server over HTTPS with this PEM certificate (valid for the
    /// --s3-listen address; `pollen fleet provision`'s coordinator.pem) and its key. Needs
    /// --s3-ca; devices trust that CA with [storage] ca_file (POLLEN_STORAGE_CA).
    #[arg(long, value_name = "PEM", requires_all = ["s3_tls_key", "s3_ca"])]
    pub s3_tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "PEM", requires = "s3_tls_cert")]
    pub s3_tls_key: Option<PathBuf>,
    /// A PEM CA trusted for the object store's HTTPS besides the platform's roots: the one
    /// that signed --s3-tls-cert, or a private CA of --s3-endpoint.
    #[arg(long, env = "POLLEN_S3_CA", value_name = "PEM")]
    pub s3_ca: Option<PathBuf>,
}

impl StorageArgs {
    fn external(&self) -> Option<StoreConfig> {
        self.s3_endpoint.as_ref().map(|endpoint| StoreConfig {
            endpoint: Some(endpoint.clone()),
            region: self.s3_region.clone(),
            bucket: self.s3_bucket.clone(),
            path_style: !self.s3_virtual_hosted,
            ca_file: self.s3_ca.clone(),
            ..StoreConfig::default()
        })
    }

    /// The external store when one is named, else the embedded one under `runs_dir`.
    fn storage(&self, runs_dir: &Path) -> Storage {
        match self.external() {
            Some(config) => Storage::External(config),
            None => Storage::Embedded {
                root: runs_dir.join("s3"),
                listen: self.s3_listen,
                tls: match (&self.s3_tls_cert, &self.s3_tls_key, &self.s3_ca) {
                    (Some(cert), Some(key), Some(ca)) => Some(EmbeddedTls {
                        cert_file: cert.clone(),
                        key_file: key.clone(),
                        ca_file: ca.clone(),
                    }),
                    _ => None,
                },
            },
        }
    }
}

/// The live dashboard of a run that trains in this process.
#[derive(Args, Clone, Debug)]
pub struct LiveDashboardArgs {
    /// Serve the live web dashboard and Prometheus /metrics while the run goes (the URL
    /// is printed).
    #[arg(long)]
    pub dashboard: bool,
    /// Where the dashboard listens; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub http: SocketAddr,
    #[command(flatten)]
    pub operators: super::records::OperatorArgs,
}

impl LiveDashboardArgs {
    /// Where to serve it, if asked to.
    fn addr(&self) -> Option<SocketAddr> {
        self.dashboard.then_some(self.http)
    }
}

/// Arguments of `pollen simulate`.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Override the spec's number of clients.
    #[arg(long)]
    pub clients: Option<usize>,
    /// Override the spec's simulation.failure_rate: the fraction of fit commands a
    /// simulated device fails, to rehearse an unreliable fleet.
    #[arg(long)]
    pub failure_rate: Option<f64>,
    #[arg(long, value_enum, default_value_t = Transport::Device)]
    pub transport: Transport,
    /// With --transport grpc: compress the clients' streams with zstd (inline weights).
    #[arg(long)]
    pub grpc_compression: bool,
    /// Which library the simulated devices train with: auto, burn or libtorch (a pollen built
    /// with --features torch). A TorchScript model needs LibTorch.
    #[arg(long, default_value = "auto", value_parser = Backend::parse)]
    pub backend: Backend,
    /// MQTT broker for the device path (e.g. mqtt://127.0.0.1:1883); embedded when absent.
    #[arg(long)]
    pub broker: Option<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Print one JSON object per round on stdout, and nothing else there.
    #[arg(long)]
    pub json: bool,
    /// Where run records go.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// The run table's database: postgres://user:password@host:port/db, or SQLite in
    /// --runs-dir (the default). Checkpoints and logs stay in --runs-dir either way.
    #[arg(long, env = "POLLEN_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    #[command(flatten)]
    pub dashboard: LiveDashboardArgs,
}

pub async fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    let spec = a.spec.load(|spec| {
        if let Some(c) = a.clients {
            spec.data.clients = Some(c);
        }
        if let Some(f) = a.failure_rate {
            spec.simulation.failure_rate = f;
        }
    })?;
    let (bar, report) = reporter(&spec, a.json);
    let mut options = SimulateOptions::new(a.runs_dir);
    options.database = Database::parse(a.database.as_deref()).map_err(anyhow::Error::msg)?;
    options.transport = a.transport;
    anyhow::ensure!(
        !a.grpc_compression || a.transport == Transport::Grpc,
        "--grpc-compression is for --transport grpc (the device path moves weights through object storage)"
    );
    options.grpc_compression = a.grpc_compression;
    options.backend = a.backend;
    options.broker = a.broker.map(BrokerConfig::new);
    anyhow::ensure!(
        a.storage.s3_tls_cert.is_none(),
        "--s3-tls-cert serves the embedded S3 server over HTTPS to devices on other hosts (pollen coordinator, pollen run); simulate's devices share its process"
    );
    options.s3 = a.storage.external();
    options.dashboard = a.dashboard.addr();
    options.access = a.dashboard.operators.access()?;
    let sim =
        crate::simulate::simulate(&spec, &options, shutdown_on_ctrl_c(RUN_INTERRUPTED), report)
            .await?;
    bar.finish_and_clear();
    print_summary(&sim.run_id, &sim.run_dir, &sim.summary.rounds);
    Ok(())
}

/// What a coordinator process serves on, and where it keeps runs: shared by `pollen
/// coordinator` (one run) and `pollen serve` (a service).
#[derive(Args, Debug)]
pub struct ServiceArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Serve the Fleet API over TLS with this PEM certificate (`pollen fleet provision`
    /// writes DIR/coordinator.pem); clients then use https://.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS): a client may join only as
    /// the id its certificate names, a proxy (pollen-proxy.<id>) as the devices it bridges.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// HTTP endpoint: the web dashboard at /, its JSON API (and, for `pollen serve`, the
    /// control API) under /api/, Prometheus metrics at /metrics; port 0 picks a free port. The
    /// URL is printed at start.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: SocketAddr,
    #[command(flatten)]
    pub operators: super::records::OperatorArgs,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// The run table's database: postgres://user:password@host:port/db, or SQLite in
    /// --runs-dir (the default). Checkpoints and logs stay in --runs-dir either way.
    #[arg(long, env = "POLLEN_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// No object storage: weights travel inline in gRPC (direct clients only).
    #[arg(long, conflicts_with = "s3_endpoint")]
    pub inline_weights: bool,
    /// How long each run waits for min_available_clients to connect, e.g. "90s" or "10m".
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub wait_for_clients: std::time::Duration,
}

impl ServiceArgs {
    pub fn database(&self) -> anyhow::Result<Database> {
        Database::parse(self.database.as_deref()).map_err(anyhow::Error::msg)
    }

    /// Starts the Fleet gRPC service and the object storage; prints where they are.
    pub async fn start(&self) -> anyhow::Result<LocalCoordinator> {
        let storage = if self.inline_weights {
            Storage::Inline
        } else {
            self.storage.storage(&self.runs_dir)
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert_file), Some(key_file)) => Some(pollen_proto::grpc_tls::ServerTls {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                client_ca_file: self.client_ca.clone(),
            }),
            _ => None,
        };
        let coordinator = LocalCoordinator::start_tls(self.listen, tls.as_ref(), &storage).await?;
        eprintln!("Fleet gRPC API on {}", coordinator.endpoint());
        eprintln!("object storage: {}", coordinator.storage.describe());
        Ok(coordinator)
    }
}

/// Arguments of `pollen coordinator`.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Continue run RUN_ID (interrupted: its coordinator died; or stopped, or failed) from its
    /// records in --runs-dir / --database instead of starting a run: its spec, its last
    /// recorded round's model and sampler position; the interrupted round is redone.
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["config", "rounds"])]
    pub resume: Option<String>,
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Print one JSON object per round on stdout.
    #[arg(long)]
    pub json: bool,
}

pub async fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let s = &a.service;
    let database = s.database()?;
    // A resumed run is checked before it is claimed, so that a refusal leaves it as it was.
    let (spec, reopened) = match &a.resume {
        Some(id) => {
            let store = crate::run::open_records(&s.runs_dir, &database)?;
            let (_, text) = store.run(id)?.with_context(|| {
                format!(
                    "no run {id:?} in {} (`pollen runs` lists them)",
                    store.database()
                )
            })?;
            let spec = RunSpec::parse(&text, &format!("run {id}'s spec"))?;
            if let Some(why) = crate::resume::refusal(&spec) {
                anyhow::bail!("run {id}: {why}");
            }
            let reopened = store.reopen_run(id, crate::resume::RESUMABLE)?;
            (spec, Some(reopened))
        }
        None => (a.spec.load(|_| {})?, None),
    };
    let shutdown = shutdown_on_ctrl_c(RUN_INTERRUPTED);
    let coordinator = s.start().await?;
    let metrics = coordinator
        .dashboard(Some(s.http), &s.runs_dir, &database, s.operators.access()?)
        .await?;
    let manifest = crate::task::resolve_blind(&spec)?;
    let for_data = spec.clone();
    let server = tokio::task::spawn_blocking(move || crate::task::server_data(&for_data)).await??;
    let (run, resume, earlier) = match reopened {
        Some(r) => {
            let resume = crate::resume::locate(&r.handle, &r.rounds)?;
            (Arc::new(r.handle), Some(resume), r.rounds)
        }
        None => (
            crate::run::create_run(&spec, &s.runs_dir, &database)?,
            None,
            Vec::new(),
        ),
    };
    let (run_id, run_dir) = (run.id().to_string(), run.dir().to_path_buf());
    if let Some(r) = &resume {
        eprintln!(
            "run {run_id}: {} of {} rounds recorded",
            r.completed, spec.rounds
        );
    }
    let (bar, report) = reporter(&spec, a.json);
    bar.set_position(earlier.len() as u64);
    let options = DriveOptions {
        wait_for_clients: s.wait_for_clients,
        metrics,
        resume,
        ..coordinator.drive_options(run, server)
    };
    let summary = crate::run::drive(&spec, manifest, options, report, shutdown).await;
    bar.finish_and_clear();
    coordinator.shut_down().await;
    let mut rounds = earlier;
    rounds.extend(summary?.rounds);
    print_summary(&run_id, &run_dir, &rounds);
    Ok(())
}

/// Arguments of `pollen run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run spec (TOML); the built-in MNIST 2NN spec when absent.
    pub spec: Option<PathBuf>,
    #[command(flatten)]
    pub broker: super::fleet::BrokerArgs,
    /// Override the spec's fleet.
    #[arg(long)]
    pub fleet: Option<String>,
    /// Override the spec's device count.
    #[arg(long)]
    pub devices: Option<usize>,
    #[arg(long)]
    pub rounds: Option<u64>,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// The run table's database: postgres://user:password@host:port/db, or SQLite in
    /// --runs-dir (the default). Checkpoints and logs stay in --runs-dir either way.
    #[arg(long, env = "POLLEN_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub discovery_wait: std::time::Duration,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dashboard: LiveDashboardArgs,
}

pub async fn run(a: RunArgs) -> anyhow::Result<()> {
    let spec = run_spec(a.spec.as_deref(), a.rounds, |spec| {
        if let Some(f) = a.fleet {
            spec.devices.fleet = f;
        }
        if a.devices.is_some() {
            spec.devices.count = a.devices;
        }
    })?;
    let options = FleetRunOptions {
        broker: a.broker.config(),
        storage: a.storage.storage(&a.runs_dir),
        runs_dir: a.runs_dir,
        database: Database::parse(a.database.as_deref()).map_err(anyhow::Error::msg)?,
        discovery_wait: a.discovery_wait,
        stale_after: std::time::Duration::from_secs(30),
        dashboard: a.dashboard.addr(),
        access: a.dashboard.operators.access()?,
    };
    let (bar, report) = reporter(&spec, a.json);
    let fleet_name = spec.devices.fleet.clone();
    let json = a.json;
    let done = crate::run::run_on_fleet(
        &spec,
        &options,
        shutdown_on_ctrl_c(RUN_INTERRUPTED),
        |selected| {
            eprintln!("fleet {fleet_name:?}: {} devices selected", selected.len());
            if !json {
                print_devices(selected);
            }
        },
        report,
    )
    .await?;
    bar.finish_and_clear();
    print_summary(&done.run_id, &done.run_dir, &done.summary.rounds);
    Ok(())
}

/// Arguments of `pollen central`.
#[derive(Args, Debug)]
pub struct CentralArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Passes over the data [default: rounds x local_epochs x fraction_fit, the federated
    /// run's].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub async fn central(a: CentralArgs) -> anyhow::Result<()> {
    let spec = a.spec.load(|_| {})?;
    let epochs = a.epochs;
    let report = tokio::task::spawn_blocking(move || crate::central::run(&spec, epochs)).await??;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let value = report
        .final_value
        .map_or("-".into(), |v| show_metric(&report.metric, v));
    println!(
        "{}: centralized {} after {} epochs: {value} on {} ({} examples; trained on {}), {:.1} s",
        report.spec,
        report.metric,
        report.epochs.len(),
        report.evaluated_on,
        report.eval_examples,
        report.train_examples,
        report.seconds
    );
    Ok(())
}
