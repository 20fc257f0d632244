//! `pollen simulate`: a coordinator and N simulated clients in one process, talking real gRPC
//! over loopback, training real models.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use pollen_client::fleet::ClientOptions;
use pollen_client::mnist::{Mnist, MnistSplit};
use pollen_client::trainer::{self, LocalData};
use pollen_client::{TrainerClient, model};
use pollen_coordinator::strategy::Evaluation;
use pollen_coordinator::{DriverConfig, FedAvg, RoundDriver, RoundRecord, RunStore, RunSummary};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::spec::{RunSpec, StrategySpec};

/// Where and how a simulation runs.
pub struct SimulateOptions {
    /// Records go to `<runs_dir>/<run-id>/` and `<runs_dir>/pollen.db`.
    pub runs_dir: PathBuf,
    /// Clients training at once; defaults to the number of cores.
    pub parallelism: Option<usize>,
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

    let store = RunStore::open(&options.runs_dir)
        .with_context(|| format!("opening {}", options.runs_dir.display()))?;
    let run = Arc::new(store.create_run(&spec.name, &spec.to_toml(), spec.seed, spec.rounds)?);
    let run_id = run.id().to_string();
    let run_dir = run.dir().to_path_buf();

    let stop_all = CancellationToken::new();
    let server =
        pollen_coordinator::server::serve(SocketAddr::from(([127, 0, 0, 1], 0)), stop_all.clone())
            .await
            .context("binding the coordinator on 127.0.0.1")?;
    let endpoint = format!("http://{}", server.addr);

    let StrategySpec::Fedavg(fedavg) = &spec.strategy;
    let initial = model::initial_parameters(spec.model, spec.seed)?;
    let mut strategy = FedAvg::new(fedavg.clone())
        .with_initial_parameters(initial)
        .with_fit_config(spec.fit_config());
    if spec.evaluate.centralized {
        strategy = strategy.with_evaluate_fn(centralized_evaluator(spec, test.clone()));
    }

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let slots = Arc::new(Semaphore::new(options.parallelism.unwrap_or(cores).max(1)));
    let mut clients = tokio::task::JoinSet::new();
    for (i, indices) in parts.into_iter().enumerate() {
        let client = TrainerClient {
            model: spec.model,
            train: LocalData {
                split: train.clone(),
                indices,
            },
            test: None,
            seed: spec.seed.wrapping_add(i as u64 + 1),
        };
        let (endpoint, stop) = (endpoint.clone(), stop_all.clone());
        let opts = ClientOptions {
            compute_slots: Some(slots.clone()),
            ..Default::default()
        };
        let id = format!("sim-{i:04}");
        clients.spawn(async move {
            if let Err(e) = pollen_client::run_client(&endpoint, &id, client, opts, stop).await {
                tracing::warn!(client = %id, "client ended: {e}");
            }
        });
    }

    let driver = RoundDriver::new(
        server.registry.clone(),
        Box::new(strategy),
        DriverConfig {
            num_rounds: spec.rounds,
            round_timeout: spec.round_timeout,
            wait_for_clients: std::time::Duration::from_secs(60),
            seed: spec.seed,
        },
    )
    .with_run(run)
    .on_round(on_round);
    let summary = driver.run(shutdown).await;
    stop_all.cancel();
    while clients.join_next().await.is_some() {}
    let _ = server.handle.await;
    Ok(Simulation {
        run_id,
        run_dir,
        summary: summary?,
    })
}
