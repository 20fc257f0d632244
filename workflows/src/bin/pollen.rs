//! `pollen`: the user CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pollen_client::mnist::Mnist;
use pollen_client::model;
use pollen_coordinator::{DriverConfig, FedAvg, RoundDriver, RoundRecord, RunStore};
use pollen_workflows::simulate::{SimulateOptions, centralized_evaluator, simulate};
use pollen_workflows::spec::{RunSpec, StrategySpec};
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

#[derive(Subcommand)]
enum Command {
    /// Run a federated training run with simulated clients in this process (real gRPC on
    /// loopback). Without --config: MNIST 2NN, 100 IID clients, C=0.1, E=1, B=10, lr=0.1.
    Simulate {
        /// Run spec (TOML); defaults to the built-in workflows/mnist-2nn.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the spec's number of rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Override the spec's number of clients.
        #[arg(long)]
        clients: Option<usize>,
        /// Print one JSON object per round on stdout, and nothing else there.
        #[arg(long)]
        json: bool,
        /// Where run records go.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
    },
    /// Serve the Fleet gRPC API and run a spec's rounds with the clients that connect
    /// (e.g. `pollen-agent` processes).
    Coordinator {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        #[arg(long)]
        rounds: Option<u64>,
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// Print one JSON object per round on stdout.
        #[arg(long)]
        json: bool,
        /// How long to wait for min_available_clients to connect, e.g. "90s" or "10m".
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait_for_clients: std::time::Duration,
    },
}

fn load_spec(config: Option<&PathBuf>) -> anyhow::Result<RunSpec> {
    Ok(match config {
        Some(path) => RunSpec::load(path)?.0,
        None => RunSpec::default_spec(),
    })
}

fn shutdown_on_ctrl_c() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: finishing the records of completed rounds");
            t.cancel();
        }
    });
    token
}

/// Prints rounds as JSON lines or drives a progress bar.
fn reporter(total: u64, json: bool) -> (ProgressBar, impl FnMut(&RoundRecord) + Send + 'static) {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
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
            let acc = r
                .accuracy
                .map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0));
            b.set_message(format!(
                "accuracy {acc}  ok {}/{}  {:.2}s/round",
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
    let last = rounds.last();
    let acc = last
        .and_then(|r| r.accuracy)
        .map_or("-".into(), |a| format!("{:.2}%", a * 100.0));
    let first97 = rounds
        .iter()
        .find(|r| r.accuracy.is_some_and(|a| a >= 0.97))
        .map_or("not reached".into(), |r| format!("round {}", r.round));
    let failed: usize = rounds.iter().map(|r| r.failed).sum();
    eprintln!(
        "run {run_id}: {} rounds, final accuracy {acc}, 97% at {first97}, median {median:.3} s/round, {failed} client failures\nrecords: {}",
        rounds.len(),
        run_dir.display()
    );
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate {
            config,
            rounds,
            clients,
            json,
            runs_dir,
        } => {
            let mut spec = load_spec(config.as_ref())?;
            if let Some(r) = rounds {
                spec.rounds = r;
            }
            if let Some(c) = clients {
                spec.data.clients = c;
            }
            spec.validate()
                .map_err(|e| anyhow::anyhow!("invalid run: {e}"))?;
            let (bar, report) = reporter(spec.rounds, json);
            let sim = simulate(
                &spec,
                &SimulateOptions {
                    runs_dir,
                    parallelism: None,
                },
                shutdown_on_ctrl_c(),
                report,
            )
            .await?;
            bar.finish_and_clear();
            print_summary(&sim.run_id, &sim.run_dir, &sim.summary.rounds);
        }
        Command::Coordinator {
            config,
            listen,
            rounds,
            runs_dir,
            json,
            wait_for_clients,
        } => {
            let mut spec = load_spec(config.as_ref())?;
            if let Some(r) = rounds {
                spec.rounds = r;
            }
            let shutdown = shutdown_on_ctrl_c();
            let server = pollen_coordinator::server::serve(listen, shutdown.clone())
                .await
                .with_context(|| format!("listening on {listen}"))?;
            eprintln!("Fleet gRPC API on http://{}", server.addr);
            let StrategySpec::Fedavg(fedavg) = &spec.strategy;
            let mut strategy = FedAvg::new(fedavg.clone())
                .with_initial_parameters(model::initial_parameters(spec.model, spec.seed)?)
                .with_fit_config(spec.fit_config());
            if spec.evaluate.centralized {
                let dir = spec.resolve_data_dir();
                let mnist = tokio::task::spawn_blocking(move || Mnist::load(dir)).await??;
                strategy =
                    strategy.with_evaluate_fn(centralized_evaluator(&spec, Arc::new(mnist.test)));
            }
            let store = RunStore::open(&runs_dir)?;
            let run =
                Arc::new(store.create_run(&spec.name, &spec.to_toml(), spec.seed, spec.rounds)?);
            let (run_id, run_dir) = (run.id().to_string(), run.dir().to_path_buf());
            let (bar, report) = reporter(spec.rounds, json);
            let summary = RoundDriver::new(
                server.registry.clone(),
                Box::new(strategy),
                DriverConfig {
                    num_rounds: spec.rounds,
                    round_timeout: spec.round_timeout,
                    wait_for_clients,
                    seed: spec.seed,
                },
            )
            .with_run(run)
            .on_round(report)
            .run(shutdown.clone())
            .await?;
            bar.finish_and_clear();
            print_summary(&run_id, &run_dir, &summary.rounds);
            shutdown.cancel();
            let _ = server.handle.await;
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
