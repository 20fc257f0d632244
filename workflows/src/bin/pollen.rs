//! `pollen`: the user CLI.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pollen_coordinator::records::RunRow;
use pollen_coordinator::{RoundRecord, RunStore, StoreConfig};
use pollen_proto::mqtt::BrokerConfig;
use pollen_proxy::{DeviceRecord, Proxy, ProxyConfig, Selection};
use pollen_workflows::run::{DriveOptions, FleetRunOptions, LocalCoordinator, Storage};
use pollen_workflows::simulate::{SimulateOptions, Transport, simulate};
use pollen_workflows::spec::RunSpec;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pollen",
    version,
    about = "Federated learning for fleets of IoT gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where weight blobs go (device path).
#[derive(Args, Clone)]
struct StorageArgs {
    /// S3-compatible endpoint (MinIO, Ceph, AWS) instead of the embedded S3 server.
    /// Credentials come from the AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// profiles, instance roles); devices never see them.
    #[arg(long, env = "POLLEN_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "POLLEN_S3_BUCKET", default_value = "pollen")]
    s3_bucket: String,
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Virtual-hosted-style addressing instead of path-style (AWS S3 without --s3-endpoint
    /// works either way).
    #[arg(long)]
    s3_virtual_hosted: bool,
    /// Where the embedded S3 server listens; devices download from and upload to this
    /// address, so it must be reachable from them.
    #[arg(long, default_value = "127.0.0.1:0")]
    s3_listen: SocketAddr,
}

impl StorageArgs {
    fn storage(&self, runs_dir: &std::path::Path) -> Storage {
        match &self.s3_endpoint {
            Some(endpoint) => Storage::External(StoreConfig {
                endpoint: Some(endpoint.clone()),
                region: self.s3_region.clone(),
                bucket: self.s3_bucket.clone(),
                path_style: !self.s3_virtual_hosted,
                ..StoreConfig::default()
            }),
            None => Storage::Embedded {
                root: runs_dir.join("s3"),
                listen: self.s3_listen,
            },
        }
    }

    fn external(&self) -> Option<StoreConfig> {
        match self.storage(std::path::Path::new(".")) {
            Storage::External(c) => Some(c),
            _ => None,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a federated training run with simulated devices in this process. By default over
    /// the device path (proxy, embedded MQTT broker, embedded S3); --transport grpc uses direct
    /// gRPC clients, --transport in-process joins them to the coordinator in memory. Without --config: MNIST 2NN, 100 IID clients, C=0.1, E=1, B=10, lr=0.1.
    Simulate {
        #[command(flatten)]
        spec: SpecArgs,
        /// Override the spec's number of clients.
        #[arg(long)]
        clients: Option<usize>,
        /// Override the spec's simulation.failure_rate: the fraction of fit commands a
        /// simulated device fails, to rehearse an unreliable fleet.
        #[arg(long)]
        failure_rate: Option<f64>,
        #[arg(long, value_enum, default_value_t = Transport::Device)]
        transport: Transport,
        /// MQTT broker for the device path (e.g. mqtt://127.0.0.1:1883); embedded when absent.
        #[arg(long)]
        broker: Option<String>,
        #[command(flatten)]
        storage: StorageArgs,
        /// Print one JSON object per round on stdout, and nothing else there.
        #[arg(long)]
        json: bool,
        /// Where run records go.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Serve the live web dashboard and Prometheus /metrics while the run goes (the URL
        /// is printed).
        #[arg(long)]
        dashboard: bool,
        /// Where the dashboard listens; port 0 picks a free port.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
        http: SocketAddr,
    },
    /// Serve the Fleet gRPC API and run a spec's rounds with the clients that connect:
    /// `pollen proxy` bridges for MQTT devices, or direct `pollen-agent --coordinator` clients.
    Coordinator {
        #[command(flatten)]
        spec: SpecArgs,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// HTTP endpoint: the web dashboard at /, Prometheus metrics at /metrics; port 0 picks
        /// a free port. The URL is printed at start.
        #[arg(long, default_value = "127.0.0.1:0")]
        http: SocketAddr,
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        #[command(flatten)]
        storage: StorageArgs,
        /// No object storage: weights travel inline in gRPC (direct clients only).
        #[arg(long, conflicts_with = "s3_endpoint")]
        inline_weights: bool,
        /// Print one JSON object per round on stdout.
        #[arg(long)]
        json: bool,
        /// How long to wait for min_available_clients to connect, e.g. "90s" or "10m".
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait_for_clients: std::time::Duration,
    },
    /// Bridge MQTT devices to a coordinator: one Fleet client per online device of the fleet.
    Proxy {
        /// Coordinator Fleet endpoint.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        coordinator: String,
        #[arg(long, env = "POLLEN_BROKER", default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "default")]
        fleet: String,
        /// Names this proxy's persistent MQTT session; give each proxy of a fleet its own.
        #[arg(long, default_value = "proxy-0")]
        proxy_id: String,
        /// Only these devices (comma-separated); all online devices when absent.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
        #[arg(long, default_value_t = 0)]
        min_examples: u64,
        #[arg(long)]
        max_devices: Option<usize>,
        /// Bridge only this shard of the fleet, INDEX/COUNT (e.g. 0/3): run COUNT proxies with
        /// indexes 0..COUNT and every device is bridged by exactly one of them (rendezvous
        /// hashing of device ids). Each needs its own --proxy-id.
        #[arg(long, value_name = "INDEX/COUNT")]
        shard: Option<pollen_proxy::ProxyShard>,
        /// Serve the proxy's Prometheus metrics (bridges, devices online, dropped replies,
        /// timeouts) at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
    },
    /// List the devices of a fleet from their retained status messages.
    Devices {
        #[arg(long, env = "POLLEN_BROKER", default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "default")]
        fleet: String,
        /// How long to collect status messages.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// List the recorded runs, newest first.
    Runs {
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// One JSON object per run on stdout.
        #[arg(long)]
        json: bool,
    },
    /// A run's rounds: accuracy, loss, participation, failures and durations.
    Status {
        /// Run id, a unique prefix of one, or "latest".
        run: String,
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// One JSON object ({"run": ..., "rounds": [...]}) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Start a run on the devices the registry holds: discover the fleet's online devices,
    /// select them by the spec's [devices] section, bridge them and train.
    Run {
        /// Run spec (TOML); the built-in MNIST 2NN spec when absent.
        spec: Option<PathBuf>,
        #[arg(long, env = "POLLEN_BROKER", default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        /// Override the spec's fleet.
        #[arg(long)]
        fleet: Option<String>,
        /// Override the spec's device count.
        #[arg(long)]
        devices: Option<usize>,
        #[arg(long)]
        rounds: Option<u64>,
        #[command(flatten)]
        storage: StorageArgs,
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        discovery_wait: std::time::Duration,
        #[arg(long)]
        json: bool,
        /// Serve the live web dashboard and Prometheus /metrics while the run goes (the URL
        /// is printed).
        #[arg(long)]
        dashboard: bool,
        /// Where the dashboard listens; port 0 picks a free port.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
        http: SocketAddr,
    },
    /// Get a CSV file ready for a run: see what it holds, or split it into one file per
    /// device.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// The centralized baseline of a simulation spec: the same model trained on the union of
    /// the simulated devices' training data, evaluated as the federated run is.
    Central {
        #[command(flatten)]
        spec: SpecArgs,
        /// Passes over the data [default: rounds x local_epochs x fraction_fit, the federated
        /// run's].
        #[arg(long)]
        epochs: Option<usize>,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Serve the web dashboard over the recorded runs (charts, participation, failures,
    /// configs) until Ctrl-C. Live runs serve their own dashboard.
    Dashboard {
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

/// The run spec every run command takes, and the override they share.
#[derive(Args, Clone)]
struct SpecArgs {
    /// Run spec (TOML); the built-in MNIST 2NN spec (workflows/mnist-2nn.toml) when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the spec's number of rounds.
    #[arg(long)]
    rounds: Option<u64>,
}

impl SpecArgs {
    /// The spec with these and the command's own `overrides` applied, validated.
    fn load(&self, overrides: impl FnOnce(&mut RunSpec)) -> anyhow::Result<RunSpec> {
        run_spec(self.config.as_ref(), self.rounds, overrides)
    }
}

/// The spec a run command runs: loaded (or built in), the command line's overrides applied by
/// `overrides`, then validated. Every run command goes through here, so that no override
/// skips validation (`--rounds 0` is refused everywhere).
fn run_spec(
    config: Option<&PathBuf>,
    rounds: Option<u64>,
    overrides: impl FnOnce(&mut RunSpec),
) -> anyhow::Result<RunSpec> {
    let mut spec = load_spec(config)?;
    if let Some(r) = rounds {
        spec.rounds = r;
    }
    overrides(&mut spec);
    spec.validate()
        .map_err(|e| anyhow::anyhow!("invalid run: {e}"))?;
    Ok(spec)
}

fn load_spec(config: Option<&PathBuf>) -> anyhow::Result<RunSpec> {
    Ok(match config {
        Some(path) => RunSpec::load(path)?.0,
        None => RunSpec::default_spec(),
    })
}

/// What a run says when Ctrl-C stops it.
const RUN_INTERRUPTED: &str = "interrupted: finishing the records of completed rounds";

/// A token cancelled at Ctrl-C, after printing `message`.
fn shutdown_on_ctrl_c(message: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("{message}");
            t.cancel();
        }
    });
    token
}

/// A metric as a person reads it: fractions as percentages.
fn show_metric(name: &str, value: f64) -> String {
    match name {
        "accuracy" | "macro_f1" => format!("{:.2}%", value * 100.0),
        _ => format!("{value:.4}"),
    }
}

/// Prints rounds as JSON lines or drives a progress bar.
fn reporter(
    spec: &RunSpec,
    json: bool,
) -> (ProgressBar, impl FnMut(&RoundRecord) + Send + 'static) {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(spec.rounds)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let b = bar.clone();
    let report = move |r: &RoundRecord| {
        if json {
            match serde_json::to_string(r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("round {} could not be printed: {e}", r.round),
            }
        } else {
            let name = r.primary_metric.as_deref().unwrap_or("accuracy");
            let value = r
                .metrics
                .get(name)
                .map_or("-".to_string(), |v| show_metric(name, *v));
            b.set_message(format!(
                "{name} {value}  ok {}/{}  {:.2}s/round",
                r.succeeded, r.sampled, r.seconds
            ));
            b.inc(1);
        }
    };
    (bar, report)
}

fn print_summary(run_id: &str, run_dir: &std::path::Path, rounds: &[RoundRecord]) {
    let mut secs: Vec<f64> = rounds.iter().map(|r| r.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs.get(secs.len() / 2).copied().unwrap_or(0.0);
    let metric = rounds
        .iter()
        .rev()
        .find_map(|r| r.primary_metric.clone())
        .unwrap_or_else(|| "accuracy".into());
    let evaluation = rounds
        .iter()
        .rev()
        .find_map(|r| r.evaluation.clone())
        .unwrap_or_else(|| "no".into());
    let last = rounds
        .last()
        .and_then(|r| r.metrics.get(&metric))
        .map_or("-".into(), |v| show_metric(&metric, *v));
    // MNIST runs are compared with McMahan et al. by the round that first reaches 97%.
    let first97 = if metric == "accuracy" {
        let at = rounds
            .iter()
            .find(|r| r.accuracy.is_some_and(|a| a >= 0.97))
            .map_or("not reached".into(), |r| format!("at round {}", r.round));
        format!(", 97% {at}")
    } else {
        String::new()
    };
    let failed: usize = rounds.iter().map(|r| r.failed).sum();
    eprintln!(
        "run {run_id}: {} rounds, final {metric} {last} ({evaluation} evaluation){first97}, median {median:.3} s/round, {failed} client failures\nrecords: {}",
        rounds.len(),
        run_dir.display()
    );
}

fn open_records(runs_dir: &std::path::Path) -> anyhow::Result<std::sync::Arc<RunStore>> {
    anyhow::ensure!(
        runs_dir.join("pollen.db").exists(),
        "no run records in {}: start a run first (pollen simulate), or pass --runs-dir",
        runs_dir.display()
    );
    Ok(RunStore::open(runs_dir)?)
}

/// The run `wanted` names: an exact id, a unique prefix, or "latest".
fn find_run(runs: &[RunRow], wanted: &str) -> anyhow::Result<RunRow> {
    if wanted == "latest" {
        return runs
            .first()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no runs recorded yet"));
    }
    if let Some(r) = runs.iter().find(|r| r.id == wanted) {
        return Ok(r.clone());
    }
    let matching: Vec<&RunRow> = runs.iter().filter(|r| r.id.starts_with(wanted)).collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => anyhow::bail!("no run {wanted:?}; `pollen runs` lists them"),
        many => anyhow::bail!(
            "{wanted:?} matches {} runs ({}, ...); give more of the id",
            many.len(),
            many[0].id
        ),
    }
}

fn print_devices(devices: &[DeviceRecord]) {
    eprintln!(
        "{:<24} {:<8} {:>9} {:<20} {:<10} {:>10}",
        "DEVICE", "STATE", "EXAMPLES", "DATA", "AGENT", "LAST SEEN"
    );
    let now = pollen_proto::now_unix_ms();
    for d in devices {
        let ago = now.saturating_sub(d.last_seen_unix_ms) as f64 / 1000.0;
        eprintln!(
            "{:<24} {:<8} {:>9} {:<20} {:<10} {:>9.1}s",
            d.device_id,
            if d.online { "online" } else { "offline" },
            d.num_examples,
            d.data.as_ref().map_or("-".to_string(), |v| v.summary()),
            d.agent_version,
            ago
        );
    }
}

#[derive(Subcommand)]
enum DataCommand {
    /// What a CSV file holds (columns, kinds, ranges; a label column's values) and a draft
    /// [task] section for it.
    Inspect {
        file: PathBuf,
        /// A column whose values are labels.
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write one CSV file per device: by a column's values (--by site), or into --parts N
    /// files that keep each --group series whole.
    Split {
        file: PathBuf,
        /// Folder for the files (FILE-<part>.csv).
        #[arg(long)]
        out: PathBuf,
        /// One file per value of this column.
        #[arg(long, conflicts_with = "parts")]
        by: Option<String>,
        /// This many files of about equal size.
        #[arg(long)]
        parts: Option<usize>,
        /// With --parts: rows with the same value here stay in one file.
        #[arg(long, requires = "parts")]
        group: Option<String>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate {
            spec,
            clients,
            failure_rate,
            transport,
            broker,
            storage,
            json,
            runs_dir,
            dashboard,
            http,
        } => {
            let spec = spec.load(|spec| {
                if let Some(c) = clients {
                    spec.data.clients = Some(c);
                }
                if let Some(f) = failure_rate {
                    spec.simulation.failure_rate = f;
                }
            })?;
            let (bar, report) = reporter(&spec, json);
            let mut options = SimulateOptions::new(runs_dir);
            options.transport = transport;
            options.broker = broker.map(BrokerConfig::new);
            options.s3 = storage.external();
            options.dashboard = dashboard.then_some(http);
            let sim =
                simulate(&spec, &options, shutdown_on_ctrl_c(RUN_INTERRUPTED), report).await?;
            bar.finish_and_clear();
            print_summary(&sim.run_id, &sim.run_dir, &sim.summary.rounds);
        }
        Command::Coordinator {
            spec,
            listen,
            http,
            runs_dir,
            storage,
            inline_weights,
            json,
            wait_for_clients,
        } => {
            let spec = spec.load(|_| {})?;
            let shutdown = shutdown_on_ctrl_c(RUN_INTERRUPTED);
            let storage = if inline_weights {
                Storage::Inline
            } else {
                storage.storage(&runs_dir)
            };
            let coordinator = LocalCoordinator::start(listen, &storage).await?;
            eprintln!("Fleet gRPC API on {}", coordinator.endpoint());
            let metrics = coordinator.dashboard(Some(http), &runs_dir).await?;
            eprintln!("object storage: {}", coordinator.storage.describe());
            let manifest = pollen_workflows::task::resolve_blind(&spec)?;
            let for_data = spec.clone();
            let server =
                tokio::task::spawn_blocking(move || pollen_workflows::task::server_data(&for_data))
                    .await??;
            let run = pollen_workflows::run::create_run(&spec, &runs_dir)?;
            let (run_id, run_dir) = (run.id().to_string(), run.dir().to_path_buf());
            let (bar, report) = reporter(&spec, json);
            let options = DriveOptions {
                wait_for_clients,
                metrics,
                ..coordinator.drive_options(run, server)
            };
            let summary =
                pollen_workflows::run::drive(&spec, manifest, options, report, shutdown).await;
            bar.finish_and_clear();
            coordinator.shut_down().await;
            let summary = summary?;
            print_summary(&run_id, &run_dir, &summary.rounds);
        }
        Command::Proxy {
            coordinator,
            broker,
            fleet,
            proxy_id,
            devices,
            min_examples,
            max_devices,
            shard,
            http,
        } => {
            let shutdown = shutdown_on_ctrl_c("stopping the proxy");
            let proxy = Proxy::start(
                ProxyConfig {
                    fleet: fleet.clone(),
                    proxy_id,
                    coordinator: coordinator.clone(),
                    broker: BrokerConfig::new(broker.clone()),
                    selection: Selection {
                        devices: devices.map(|d| d.into_iter().collect()),
                        min_examples,
                        max_devices,
                        data: None,
                        shard,
                    },
                    stale_after: std::time::Duration::from_secs(30),
                    keep_alive: std::time::Duration::from_secs(30),
                    persistent_session: true,
                },
                shutdown.clone(),
            )
            .await?;
            eprintln!(
                "proxy for fleet {fleet:?}: broker {}, coordinator {coordinator}; Ctrl-C to stop",
                pollen_proto::mqtt::redact(&broker)
            );
            if let Some(addr) = http {
                let server = pollen_proto::prometheus::serve(
                    addr,
                    proxy.metrics_registry(),
                    shutdown.clone(),
                )
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
                eprintln!("Prometheus metrics on http://{}/metrics", server.addr);
            }
            shutdown.cancelled().await;
            let stats = proxy.stats();
            proxy.join().await;
            eprintln!("proxy stopped: {stats:?}");
        }
        Command::Data { command } => match command {
            DataCommand::Inspect { file, label, json } => {
                let inspection = pollen_workflows::data::inspect(&file, label.as_deref())?;
                if json {
                    println!("{}", serde_json::to_string(&inspection)?);
                } else {
                    print!("{}", inspection.human(label.as_deref()));
                }
            }
            DataCommand::Split {
                file,
                out,
                by,
                parts,
                group,
                seed,
            } => {
                let how = match (by, parts) {
                    (Some(column), _) => pollen_workflows::data::SplitBy::Column(column),
                    (None, Some(parts)) => {
                        pollen_workflows::data::SplitBy::Parts { parts, group, seed }
                    }
                    (None, None) => anyhow::bail!("say how to split: --by COLUMN or --parts N"),
                };
                for (path, rows) in pollen_workflows::data::split(&file, &how, &out)? {
                    println!("{}\t{rows} rows", path.display());
                }
            }
        },
        Command::Central { spec, epochs, json } => {
            let spec = spec.load(|_| {})?;
            let report =
                tokio::task::spawn_blocking(move || pollen_workflows::central::run(&spec, epochs))
                    .await??;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
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
            }
        }
        Command::Dashboard { runs_dir, listen } => {
            let runs = open_records(&runs_dir)?;
            let shutdown = shutdown_on_ctrl_c("stopping the dashboard");
            let sources = pollen_dashboard::HttpSources {
                runs: Some(runs),
                ..Default::default()
            };
            let server = pollen_dashboard::serve_http(listen, sources, shutdown)
                .await
                .with_context(|| format!("serving the dashboard on {listen}"))?;
            eprintln!(
                "Dashboard of the runs in {} on http://{}/ (Ctrl-C to stop)",
                runs_dir.display(),
                server.addr
            );
            server.handle.await??;
        }
        Command::Runs { runs_dir, json } => {
            let store = open_records(&runs_dir)?;
            let runs = store.overviews()?;
            if !json {
                println!(
                    "{:<36} {:<10} {:>7} {:<9} {:>9} {:>9}  CREATED",
                    "RUN", "STATUS", "ROUNDS", "METRIC", "LAST", "BEST"
                );
            }
            for overview in runs {
                if json {
                    println!("{}", serde_json::to_string(&overview)?);
                } else {
                    let run = &overview.run;
                    let metric = overview.metric.clone().unwrap_or_else(|| "accuracy".into());
                    let (last, best) = match &overview.metric {
                        Some(_) => (overview.value, overview.best),
                        None => (overview.accuracy, overview.best_accuracy),
                    };
                    let show = |v: Option<f64>| v.map_or("-".into(), |v| show_metric(&metric, v));
                    println!(
                        "{:<36} {:<10} {:>3}/{:<3} {:<9} {:>9} {:>9}  {}",
                        run.id,
                        run.status,
                        run.last_round,
                        run.num_rounds,
                        metric,
                        show(last),
                        show(best),
                        run.created_at
                    );
                }
            }
        }
        Command::Status {
            run,
            runs_dir,
            json,
        } => {
            let store = open_records(&runs_dir)?;
            let row = find_run(&store.list_runs()?, &run)?;
            let rounds = store.rounds(&row.id)?;
            if json {
                println!("{}", serde_json::json!({ "run": row, "rounds": rounds }));
            } else {
                println!(
                    "run {} ({}), {} of {} rounds, seed {}, records in {}",
                    row.id, row.status, row.last_round, row.num_rounds, row.seed, row.dir
                );
                let metric = rounds
                    .iter()
                    .find_map(|r| r.primary_metric.clone())
                    .unwrap_or_else(|| "accuracy".into());
                println!(
                    "{:>5} {:<6} {:>9} {:>8} {:>7} {:>4} {:>5} {:>8}  FAILURES",
                    "ROUND",
                    "STATUS",
                    metric.to_uppercase(),
                    "LOSS",
                    "SAMPLED",
                    "OK",
                    "FAIL",
                    "SECONDS"
                );
                for r in &rounds {
                    let failures = r
                        .failures_by_reason
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ");
                    println!(
                        "{:>5} {:<6} {:>9} {:>8} {:>7} {:>4} {:>5} {:>8.3}  {}",
                        r.round,
                        serde_json::to_value(r.status)?.as_str().unwrap_or("?"),
                        r.metrics
                            .get(&metric)
                            .copied()
                            .or(if metric == "accuracy" {
                                r.accuracy
                            } else {
                                None
                            })
                            .map_or("-".into(), |v| show_metric(&metric, v)),
                        r.loss.map_or("-".into(), |l| format!("{l:.4}")),
                        r.sampled,
                        r.succeeded,
                        r.failed,
                        r.seconds,
                        failures
                    );
                }
            }
        }
        Command::Devices {
            broker,
            fleet,
            wait,
            json,
        } => {
            let devices = pollen_proxy::discover(&BrokerConfig::new(broker), &fleet, wait).await?;
            if json {
                for d in &devices {
                    println!("{}", serde_json::to_string(d)?);
                }
            } else {
                print_devices(&devices);
                eprintln!("{} devices in fleet {fleet:?}", devices.len());
            }
        }
        Command::Run {
            spec: spec_path,
            broker,
            fleet,
            devices,
            rounds,
            storage,
            runs_dir,
            discovery_wait,
            json,
            dashboard,
            http,
        } => {
            let spec = run_spec(spec_path.as_ref(), rounds, |spec| {
                if let Some(f) = fleet {
                    spec.devices.fleet = f;
                }
                if devices.is_some() {
                    spec.devices.count = devices;
                }
            })?;
            let options = FleetRunOptions {
                broker: BrokerConfig::new(broker),
                storage: storage.storage(&runs_dir),
                runs_dir,
                discovery_wait,
                stale_after: std::time::Duration::from_secs(30),
                dashboard: dashboard.then_some(http),
            };
            let (bar, report) = reporter(&spec, json);
            let fleet_name = spec.devices.fleet.clone();
            let done = pollen_workflows::run::run_on_fleet(
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
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    pollen_workflows::cli::main(run(Cli::parse()))
}
