//! `pollen-agent`: the edge agent. Today it joins a coordinator directly over gRPC and trains
//! on its share of local MNIST data; the MQTT device path builds on the same trainer.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use pollen_client::mnist::Mnist;
use pollen_client::partition::Partition;
use pollen_client::trainer::LocalData;
use pollen_client::{ClientOptions, Exit, ModelKind, TrainerClient, run_client};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pollen-agent",
    version,
    about = "Pollen edge agent (direct gRPC client)"
)]
struct Args {
    /// Coordinator Fleet endpoint.
    #[arg(
        long,
        env = "POLLEN_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// This device's id (letters, digits, '_', '.', '-').
    #[arg(long, env = "POLLEN_CLIENT_ID")]
    client_id: String,
    /// Folder with the MNIST IDX files.
    #[arg(long, env = "POLLEN_DATA_DIR", default_value = "data/mnist")]
    data_dir: PathBuf,
    /// Which IID share of the training set this device holds, as INDEX/COUNT (e.g. 3/10).
    #[arg(long, default_value = "0/1")]
    shard: String,
    #[arg(long, default_value = "mnist-2nn")]
    model: ModelKind,
    /// Seed of the IID split (must match across the fleet for disjoint shards).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    let (i, n) = s
        .split_once('/')
        .with_context(|| format!("--shard {s:?} must look like INDEX/COUNT, e.g. 3/10"))?;
    let (i, n): (usize, usize) = (
        i.parse().with_context(|| format!("--shard index {i:?}"))?,
        n.parse().with_context(|| format!("--shard count {n:?}"))?,
    );
    anyhow::ensure!(n > 0 && i < n, "--shard {s}: INDEX must be below COUNT");
    Ok((i, n))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (index, count) = parse_shard(&args.shard)?;
    let dir = args.data_dir.clone();
    let mnist = tokio::task::spawn_blocking(move || Mnist::load(dir)).await??;
    let train = Arc::new(mnist.train);
    let mut parts = Partition::Iid.split(&train.labels, count, args.seed)?;
    let client = TrainerClient {
        model: args.model,
        train: LocalData {
            split: train,
            indices: parts.swap_remove(index),
        },
        test: Some(LocalData::all(Arc::new(mnist.test))),
        seed: args.seed.wrapping_add(index as u64 + 1),
    };
    let shutdown = CancellationToken::new();
    let t = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            t.cancel();
        }
    });
    eprintln!(
        "{}: {} local examples, joining {}",
        args.client_id,
        client.train.len(),
        args.coordinator
    );
    match run_client(
        &args.coordinator,
        &args.client_id,
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
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
