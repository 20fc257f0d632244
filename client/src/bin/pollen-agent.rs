//! `pollen-agent`: the edge agent.
//!
//! - MQTT mode (default): `pollen-agent --config agent.toml` connects to the broker as one
//!   device, trains on its share of local MNIST data when a proxy commands it, and moves
//!   weights through presigned URLs. `--print-default-config` prints a commented config.
//! - Direct mode (`--coordinator URL` or `--client-id ID`): joins a coordinator over gRPC.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pollen_client::agent::Shard;
use pollen_client::agent::transfer::redact;
use pollen_client::mnist::Mnist;
use pollen_client::partition::Partition;
use pollen_client::trainer::LocalData;
use pollen_client::{
    Agent, AgentConfig, ClientOptions, Exit, ModelKind, TrainerClient, run_client,
};
use tokio_util::sync::CancellationToken;

const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

#[derive(Parser)]
#[command(
    name = "pollen-agent",
    version,
    about = "Pollen edge agent: an MQTT device agent (default), or a direct gRPC client (--coordinator)"
)]
struct Args {
    /// MQTT mode: the agent's TOML config (see --print-default-config).
    #[arg(long, env = "POLLEN_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT mode: print the default config, commented, and exit.
    #[arg(long)]
    print_default_config: bool,
    /// MQTT mode: this device's id (overrides the config file and POLLEN_DEVICE_ID).
    #[arg(long)]
    device_id: Option<String>,
    /// MQTT mode: broker url, mqtt://host:port or mqtts://host:port (overrides the config file
    /// and POLLEN_BROKER).
    #[arg(long)]
    broker: Option<String>,
    /// Direct mode: the coordinator's Fleet endpoint [default: http://127.0.0.1:50051].
    #[arg(long, env = "POLLEN_COORDINATOR")]
    coordinator: Option<String>,
    /// Direct mode: this client's id (letters, digits, '_', '.', '-').
    #[arg(long, env = "POLLEN_CLIENT_ID")]
    client_id: Option<String>,
    /// Folder with the MNIST IDX files [default: data/mnist, or the config's data.dir].
    #[arg(long, env = "POLLEN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Which IID share of the training set this device holds, as INDEX/COUNT (e.g. 3/10)
    /// [default: 0/1, or the config's data.shard].
    #[arg(long)]
    shard: Option<String>,
    /// mnist-2nn or mnist-cnn [default: mnist-2nn, or the config's model].
    #[arg(long)]
    model: Option<ModelKind>,
    /// Seed of the IID split (must match across the fleet for disjoint shards) [default: 42,
    /// or the config's seed].
    #[arg(long)]
    seed: Option<u64>,
    /// MQTT mode: serve the agent's Prometheus metrics (commands by outcome, reconnects) at
    /// http://ADDR/metrics; off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn parse_shard(s: &str) -> anyhow::Result<Shard> {
    s.parse::<Shard>()
        .map_err(|e| anyhow::anyhow!("--shard {e}"))
}

/// Loads MNIST and builds a trainer on the `shard` share of its training split, evaluating on
/// the first `test_examples` test images (all of them when `None`).
async fn trainer(
    data_dir: PathBuf,
    shard: Shard,
    model: ModelKind,
    seed: u64,
    test_examples: Option<usize>,
) -> anyhow::Result<TrainerClient> {
    let dir = data_dir.clone();
    let mnist = tokio::task::spawn_blocking(move || Mnist::load(dir))
        .await?
        .with_context(|| format!("loading MNIST from {}", data_dir.display()))?;
    let train = Arc::new(mnist.train);
    let mut parts = Partition::Iid.split(&train.labels, shard.count, seed)?;
    let test = Arc::new(mnist.test);
    let test = match test_examples {
        None => LocalData::all(test),
        Some(n) => LocalData {
            indices: (0..n.min(test.len())).collect(),
            split: test,
        },
    };
    Ok(TrainerClient {
        model,
        train: LocalData {
            split: train,
            indices: parts.swap_remove(shard.index),
        },
        test: Some(test),
        seed: seed.wrapping_add(shard.index as u64 + 1),
    })
}

/// A token cancelled by Ctrl-C.
fn ctrl_c() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            token.cancel();
        }
    });
    shutdown
}

async fn run_direct(args: Args, client_id: String) -> anyhow::Result<()> {
    let coordinator = args
        .coordinator
        .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string());
    let shard = parse_shard(args.shard.as_deref().unwrap_or("0/1"))?;
    let client = trainer(
        args.data_dir.unwrap_or_else(|| "data/mnist".into()),
        shard,
        args.model.unwrap_or(ModelKind::Mnist2nn),
        args.seed.unwrap_or(42),
        None,
    )
    .await?;
    let shutdown = ctrl_c();
    eprintln!(
        "{}: {} local examples, joining {}",
        client_id,
        client.train.len(),
        coordinator
    );
    match run_client(
        &coordinator,
        &client_id,
        client,
        ClientOptions::default(),
        shutdown,
    )
    .await?
    {
        Exit::Stopped { reason } => eprintln!("stopped by the coordinator: {reason}"),
        Exit::Closed => eprintln!("the coordinator closed the stream"),
        Exit::Shutdown => eprintln!("interrupted"),
    }
    Ok(())
}

/// The config file, then `POLLEN_*` variables, then flags; validated.
fn mqtt_config(args: &Args) -> anyhow::Result<AgentConfig> {
    let (mut config, origin) = match &args.config {
        Some(path) => (AgentConfig::load(path)?, path.display().to_string()),
        None => (AgentConfig::default(), "(no config file)".to_string()),
    };
    config.apply_env(|name| std::env::var(name).ok())?;
    if let Some(id) = &args.device_id {
        config.device_id = id.clone();
    }
    if let Some(url) = &args.broker {
        config.broker.url = url.clone();
    }
    if let Some(dir) = &args.data_dir {
        config.data.dir = dir.clone();
    }
    if let Some(shard) = &args.shard {
        config.data.shard = parse_shard(shard)?;
    }
    if let Some(model) = args.model {
        config.model = model;
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    config.validate(&origin)?;
    Ok(config)
}

async fn run_mqtt(args: Args) -> anyhow::Result<()> {
    let config = mqtt_config(&args)?;
    let client = trainer(
        config.data.dir.clone(),
        config.data.shard,
        config.model,
        config.seed,
        Some(config.data.test_examples),
    )
    .await?;
    let examples = client.train.len();
    let agent = Agent::new(config.agent_options(), client)?;
    tracing::info!(
        device = %config.device_id,
        fleet = %config.fleet,
        broker = %redact(&config.broker.url),
        examples,
        shard = %config.data.shard,
        model = config.model.name(),
        work_dir = %config.work_dir.display(),
        "pollen-agent starting (MQTT)"
    );
    let shutdown = ctrl_c();
    if let Some(addr) = args.metrics {
        let stats = agent.stats();
        let render = move || stats.snapshot().render_prometheus();
        let server = pollen_proto::prometheus::serve(addr, render, shutdown.clone())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!("Prometheus metrics on http://{}/metrics", server.addr);
    }
    agent.run(shutdown).await?;
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.print_default_config {
        print!("{}", AgentConfig::default_toml());
        return Ok(());
    }
    match (&args.coordinator, &args.client_id) {
        (_, Some(_)) if args.metrics.is_some() => anyhow::bail!(
            "--metrics serves the MQTT agent's counters; the direct mode (--client-id) has none"
        ),
        (_, Some(id)) => {
            let id = id.clone();
            run_direct(args, id).await
        }
        (Some(_), None) => anyhow::bail!("--coordinator needs --client-id (or POLLEN_CLIENT_ID)"),
        (None, None) => run_mqtt(args).await,
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(args));
    // Training abandoned at shutdown may still occupy a blocking thread; do not wait for it.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
