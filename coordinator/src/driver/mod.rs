//! The round driver: runs federated rounds over the clients in a [`Registry`].
//!
//! Per round: sample (strategy) -> send `Fit` to each sampled client with one shared encoding
//! of the global model -> as each reply arrives, verify and decode it off the async threads and
//! fold it into the strategy's streaming aggregator -> at the deadline, cut off whoever has not
//! answered (their replies will be counted as late) -> aggregate -> evaluate -> record.
//! A round that fails (no quorum) keeps the previous global model and the run goes on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pollen_proto::blob::EncodedBlob;
use pollen_proto::fleet::{
    EvaluateIns, FailureCode, FitIns, GetParametersIns, ServerMessage, Stop, Upload, Weights,
    server_message::Msg as ServerMsg, weights::Body,
};
use pollen_proto::{Parameters, TensorSpec, scalar};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::records::{FailureRecord, RoundRecord, RoundStatus, RunHandle};
use crate::registry::{Registry, Reply};
use crate::storage::{BlobStore, MAX_PRESIGN_TTL, StoreError};
use crate::strategy::{
    ClientFailure, EvaluateSummary, Evaluation, FailureReason, FitSummary, Instruction, Strategy,
};
use crate::task::{FitManifest, Fitted, Published, TaskSetup};

mod task;
#[cfg(test)]
mod tests;

/// How a run is driven (the strategy decides the rest).
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub num_rounds: u64,
    /// Deadline for each fit and evaluate phase; clients that have not answered by then fail
    /// with `timeout`.
    pub round_timeout: Duration,
    /// How long to wait for `min_available_clients` before a round (and at the start).
    pub wait_for_clients: Duration,
    /// Seed of the client sampler.
    pub seed: u64,
    /// The metric rounds are judged by (recorded with each round).
    pub primary_metric: Option<String>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            num_rounds: 3,
            round_timeout: Duration::from_secs(120),
            wait_for_clients: Duration::from_secs(60),
            seed: 0,
            primary_metric: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(
        "only {connected} of the {needed} clients the strategy needs (min_available_clients) connected within {waited:?}; start more clients or lower the minimum"
    )]
    NotEnoughClients {
        connected: usize,
        needed: usize,
        waited: Duration,
    },
    #[error("no initial parameters: {0}")]
    NoInitialParameters(String),
    #[error("federated statistics: {0}")]
    Statistics(String),
    #[error("recording round {round}: {source}")]
    Record {
        round: u64,
        source: crate::records::RecordError,
    },
    #[error("a driver task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a finished run returns.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds: Vec<RoundRecord>,
    pub initial_evaluation: Option<Evaluation>,
    pub parameters: Arc<Parameters>,
    pub cancelled: bool,
}

type RoundCallback = Box<dyn FnMut(&RoundRecord) + Send>;

/// Drives a run: owns the strategy and the global model.
pub struct RoundDriver {
    registry: Arc<Registry>,
    strategy: Arc<Mutex<Box<dyn Strategy>>>,
    config: DriverConfig,
    run: Option<Arc<RunHandle>>,
    run_id: String,
    on_round: Option<RoundCallback>,
    rng: ChaCha8Rng,
    /// The last global model encoded, so that the checkpoint, the next round's fit and the
    /// federated evaluation share one encoding instead of hashing the model three times; with
    /// object storage, also the key it was written to (written once, read by every device).
    encoded: Option<(Arc<Parameters>, EncodedBlob, Option<String>)>,
    /// Weights go by reference through this store when set, inline otherwise.
    store: Option<Arc<dyn BlobStore>>,
    /// The round that produced the current global model (0 = initial), naming its object key.
    global_round: u64,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The run's task manifest, referenced by every instruction.
    task: Option<Published>,
    /// Fits the manifest from federated statistics before round 1.
    fit_manifest: Option<FitManifest>,
    /// The initial model a statistics phase produced.
    fitted_initial: Option<Parameters>,
}

/// Which instruction a fan-out sends.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Fit,
    Evaluate,
}

/// An instruction that reached its client.
struct OpenRequest {
    client_id: String,
    request_id: u64,
    rx: oneshot::Receiver<Reply>,
    /// The only object key its answer may name (weights by reference).
    upload_location: Option<String>,
}

/// What a fan-out started: the shared blob, the phase deadline, the requests that reached
/// their clients and the clients that could not be reached.
struct FanOut {
    blob: EncodedBlob,
    deadline: tokio::time::Instant,
    open: Vec<OpenRequest>,
    failures: Vec<ClientFailure>,
}

/// Largest blob accepted as a client's initial model (no shapes to check it against yet).
const MAX_INITIAL_BLOB_BYTES: u64 = pollen_proto::limits::MAX_GRPC_MESSAGE_BYTES as u64;

/// The outcome of one fit request, decided inside its own task.
enum FitOutcome {
    Update {
        client_id: String,
        parameters: Parameters,
        num_examples: u64,
        metrics: BTreeMap<String, f64>,
        bytes: u64,
    },
    Failed(ClientFailure),
}

fn failure(client_id: &str, reason: FailureReason, message: impl Into<String>) -> ClientFailure {
    ClientFailure {
        client_id: client_id.to_string(),
        reason,
        message: message.into(),
    }
}

fn numeric(map: &scalar::ScalarMap) -> BTreeMap<String, f64> {
    scalar::numeric_entries(map)
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn lock(s: &Mutex<Box<dyn Strategy>>) -> std::sync::MutexGuard<'_, Box<dyn Strategy>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl RoundDriver {
    pub fn new(registry: Arc<Registry>, strategy: Box<dyn Strategy>, config: DriverConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Self {
            registry,
            strategy: Arc::new(Mutex::new(strategy)),
            config,
            run: None,
            run_id: "unrecorded".into(),
            on_round: None,
            rng,
            encoded: None,
            store: None,
            global_round: 0,
            metrics: None,
            task: None,
            fit_manifest: None,
            fitted_initial: None,
        }
    }

    /// Every instruction references this task; with a statistics phase, the manifest is fitted
    /// from the clients' federated statistics before round 1.
    pub fn with_task(mut self, setup: TaskSetup) -> Self {
        self.task = Some(Published::new(setup.manifest));
        self.fit_manifest = setup.statistics;
        self
    }

    /// Reports every finished round to `metrics` (Prometheus).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sends weights by reference through `store` (presigned URLs) instead of inline.
    pub fn with_store(mut self, store: Arc<dyn BlobStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Presigned URLs must outlive the round: a device may start its upload just before the
    /// deadline.
    fn presign_ttl(&self) -> Duration {
        (self.config.round_timeout + Duration::from_secs(60)).min(MAX_PRESIGN_TTL)
    }

    /// Records rounds, checkpoints and status into this run.
    pub fn with_run(mut self, run: Arc<RunHandle>) -> Self {
        self.run_id = run.id().to_string();
        self.run = Some(run);
        self
    }

    /// Called after every round is recorded (progress bars, JSON lines).
    pub fn on_round(mut self, f: impl FnMut(&RoundRecord) + Send + 'static) -> Self {
        self.on_round = Some(Box::new(f));
        self
    }

    /// Runs all rounds, or until `shutdown` is cancelled (the current round is abandoned, the
    /// completed ones stay recorded). Clients are told to stop at the end.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<RunSummary, DriverError> {
        if let Some(m) = &self.metrics {
            m.observe_run(&self.run_id, "running");
        }
        let outcome = self.run_inner(&shutdown).await;
        let status = match &outcome {
            Ok(s) if s.cancelled => "cancelled",
            Ok(_) => "completed",
            Err(_) => "failed",
        };
        if let Some(run) = &self.run
            && let Err(e) = run.finish(status)
        {
            tracing::error!("could not mark run {} {status}: {e}", self.run_id);
        }
        if let Some(m) = &self.metrics {
            m.observe_run(&self.run_id, status);
        }
        self.registry.broadcast(ServerMessage {
            msg: Some(ServerMsg::Stop(Stop {
                reason: format!("run {} {status}", self.run_id),
                reconnect: false,
                reconnect_after_ms: 0,
            })),
        });
        outcome
    }

    async fn run_inner(&mut self, shutdown: &CancellationToken) -> Result<RunSummary, DriverError> {
        self.wait_for_clients().await?;
        if let Some(fit) = self.fit_manifest.take() {
            let stats = tokio::select! {
                s = self.statistics() => s?,
                _ = shutdown.cancelled() => {
                    return Err(DriverError::Statistics("the run was stopped before round 1".into()));
                }
            };
            let Fitted { manifest, initial } = fit(&stats).map_err(DriverError::Statistics)?;
            self.task = Some(Published::new(manifest));
            self.fitted_initial = initial;
        }
        self.record_task()?;
        let mut global = Arc::new(self.initial_parameters().await?);
        let specs: Arc<Vec<TensorSpec>> = Arc::new(global.specs());
        tracing::info!(
            tensors = specs.len(),
            params = global.num_params(),
            "initial global model ready"
        );
        let initial_evaluation = self.evaluate_centralized(0, &global).await?;
        let mut rounds = Vec::new();
        for round in 1..=self.config.num_rounds {
            if shutdown.is_cancelled() {
                return Ok(RunSummary {
                    rounds,
                    initial_evaluation,
                    parameters: global,
                    cancelled: true,
                });
            }
            let record = tokio::select! {
                r = self.run_round(round, &mut global, &specs) => r?,
                _ = shutdown.cancelled() => {
                    return Ok(RunSummary { rounds, initial_evaluation, parameters: global, cancelled: true });
                }
            };
            if let Some(f) = self.on_round.as_mut() {
                f(&record);
            }
            rounds.push(record);
        }
        Ok(RunSummary {
            rounds,
            initial_evaluation,
            parameters: global,
            cancelled: false,
        })
    }

    async fn wait_for_clients(&self) -> Result<(), DriverError> {
        let needed = lock(&self.strategy).min_available_clients();
        if !self
            .registry
            .wait_for(needed, self.config.wait_for_clients)
            .await
        {
            return Err(DriverError::NotEnoughClients {
                connected: self.registry.len(),
                needed,
                waited: self.config.wait_for_clients,
            });
        }
        Ok(())
    }

    async fn initial_parameters(&mut self) -> Result<Parameters, DriverError> {
        // The strategy's initial model is taken either way, so that it never lingers.
        let from_strategy = lock(&self.strategy).initialize_parameters();
        if let Some(p) = self.fitted_initial.take().or(from_strategy) {
            return Ok(p);
        }
        let task = self.task_ref().await?;
        // Flower's fallback: ask one connected client for its weights.
        let clients = self.registry.available();
        let client = clients
            .first()
            .ok_or_else(|| DriverError::NoInitialParameters("no client connected".into()))?;
        let upload = match &self.store {
            Some(store) => {
                let key = store.keys().initial(&self.run_id, &client.id);
                let url = store.presign_put(&key, self.presign_ttl()).await?;
                Some(Upload { location: key, url })
            }
            None => None,
        };
        let expected = upload.as_ref().map(|u| u.location.clone());
        let run_id = self.run_id.clone();
        let (request_id, rx) = self
            .registry
            .request(&client.id, 0, |request_id| ServerMessage {
                msg: Some(ServerMsg::GetParameters(GetParametersIns {
                    request_id,
                    config: Default::default(),
                    upload,
                    run_id,
                    task,
                })),
            })
            .await
            .map_err(|e| DriverError::NoInitialParameters(e.to_string()))?;
        let reply = tokio::time::timeout(self.config.round_timeout, rx)
            .await
            .map_err(|_| {
                self.registry.time_out(request_id);
                DriverError::NoInitialParameters(format!("client {} did not answer", client.id))
            })?
            .map_err(|_| {
                DriverError::NoInitialParameters(format!("client {} disconnected", client.id))
            })?;
        match reply {
            Reply::Parameters(p) => resolve_weights(
                p.weights.unwrap_or_default(),
                expected.as_deref(),
                self.store.as_deref(),
                None,
                MAX_INITIAL_BLOB_BYTES,
            )
            .await
            .map(|(params, _)| params)
            .map_err(|e| DriverError::NoInitialParameters(format!("client {}: {e}", client.id))),
            other => Err(DriverError::NoInitialParameters(format!(
                "client {} answered get-parameters with {other:?}",
                client.id
            ))),
        }
    }

    async fn evaluate_centralized(
        &self,
        round: u64,
        global: &Arc<Parameters>,
    ) -> Result<Option<Evaluation>, DriverError> {
        let strategy = self.strategy.clone();
        let params = global.clone();
        Ok(tokio::task::spawn_blocking(move || lock(&strategy).evaluate(round, &params)).await?)
    }

    async fn run_round(
        &mut self,
        round: u64,
        global: &mut Arc<Parameters>,
        specs: &Arc<Vec<TensorSpec>>,
    ) -> Result<RoundRecord, DriverError> {
        let started = Instant::now();
        let before = self.registry.counters().snapshot();
        self.registry.forget_closed_before(round);
        let needed = lock(&self.strategy).min_available_clients();
        // A round starts once enough clients are back; if they are not, the round fails.
        let _ = self
            .registry
            .wait_for(needed, self.config.wait_for_clients)
            .await;
        let available = self.registry.available();
        let instructions = lock(&self.strategy).configure_fit(round, &available, &mut self.rng);

        let fit_started = Instant::now();
        let mut store_error = None;
        let (results, failures, aggregator_out) = if instructions.is_empty() {
            (Vec::new(), Vec::new(), None)
        } else {
            match self.fit(round, global, specs, instructions.clone()).await {
                Ok((r, f, a)) => (r, f, Some(a)),
                // Storage trouble costs this round, not the run: the model stays as it was.
                Err(DriverError::Store(e)) => {
                    store_error = Some(format!("round {round}: {e}"));
                    (Vec::new(), Vec::new(), None)
                }
                Err(e) => return Err(e),
            }
        };
        let fit_seconds = fit_started.elapsed().as_secs_f64();

        let agg_started = Instant::now();
        let mut status = RoundStatus::Ok;
        let mut error = None;
        let mut train_metrics = BTreeMap::new();
        match aggregator_out {
            None => {
                status = RoundStatus::Failed;
                error = Some(store_error.unwrap_or_else(|| {
                    format!(
                        "round {round}: {} clients connected, fewer than min_available_clients = {needed}",
                        available.len()
                    )
                }));
            }
            Some(aggregator) => {
                let strategy = self.strategy.clone();
                let (res, fails) = (results.clone(), failures.clone());
                let outcome = tokio::task::spawn_blocking(move || {
                    lock(&strategy).aggregate_fit(round, aggregator, &res, &fails)
                })
                .await?;
                match outcome {
                    Ok((Some(p), metrics)) => {
                        *global = Arc::new(p);
                        self.global_round = round;
                        train_metrics = metrics;
                    }
                    Ok((None, metrics)) => train_metrics = metrics,
                    Err(e) => {
                        status = RoundStatus::Failed;
                        error = Some(e.to_string());
                    }
                }
            }
        }
        let aggregate_seconds = agg_started.elapsed().as_secs_f64();
        if let Some(e) = &error {
            tracing::warn!("{e}; the global model stays as it was");
        }

        let eval_started = Instant::now();
        let central = self.evaluate_centralized(round, global).await?;
        let federated = match self.federated_evaluate(round, global).await {
            Err(DriverError::Store(e)) => {
                tracing::warn!("round {round}: federated evaluation skipped: {e}");
                None
            }
            other => other?,
        };
        let evaluate_seconds = eval_started.elapsed().as_secs_f64();
        let evaluation = match (&central, &federated) {
            (Some(_), _) => Some("centralized".to_string()),
            (None, Some(_)) => Some("federated".to_string()),
            (None, None) => None,
        };
        let shown = central.as_ref().or(federated.as_ref());

        let mut failures_by_reason = BTreeMap::new();
        for f in &failures {
            *failures_by_reason
                .entry(f.reason.as_str().to_string())
                .or_insert(0) += 1;
        }
        let delta = self.registry.counters().snapshot().since(&before);
        let mut record = RoundRecord {
            run_id: self.run_id.clone(),
            round,
            status,
            error,
            accuracy: shown.and_then(|e| e.metrics.get("accuracy").copied()),
            loss: shown.map(|e| e.loss),
            metrics: shown.map(|e| e.metrics.clone()).unwrap_or_default(),
            primary_metric: self.config.primary_metric.clone(),
            evaluation,
            sampled: instructions.len(),
            succeeded: results.len(),
            failed: failures.len(),
            failures_by_reason,
            train_loss: train_metrics.get("loss").copied(),
            train_metrics,
            federated_loss: federated.as_ref().map(|e| e.loss),
            federated_metrics: federated.map(|e| e.metrics).unwrap_or_default(),
            seconds: 0.0,
            fit_seconds,
            aggregate_seconds,
            evaluate_seconds,
            bytes_sent: 0,
            bytes_received: 0,
            late_replies: 0,
            rejected_updates: 0,
            participants: results.iter().map(|r| r.client_id.clone()).collect(),
            failures: failures
                .iter()
                .map(|f| FailureRecord {
                    client: f.client_id.clone(),
                    reason: f.reason.as_str().into(),
                    message: f.message.clone(),
                })
                .collect(),
            finished_at: chrono::Utc::now().to_rfc3339(),
        }
        .with_counters(&delta);
        // Measured before writing, so that the records carry it too (the checkpoint write
        // itself is not part of the round's time).
        record.seconds = started.elapsed().as_secs_f64();
        if let Some(run) = self.run.clone() {
            let model = match record.status {
                RoundStatus::Ok => Some(self.encode(global).await?.0),
                RoundStatus::Failed => None,
            };
            let rec = record.clone();
            tokio::task::spawn_blocking(move || run.record_round(&rec, model.as_ref()))
                .await?
                .map_err(|source| DriverError::Record { round, source })?;
        }
        if let Some(m) = &self.metrics {
            m.observe_round(&record);
        }
        Ok(record)
    }

    /// The safetensors encoding of `global`, computed once per model (off the async threads).
    async fn encode(
        &mut self,
        global: &Arc<Parameters>,
    ) -> Result<(EncodedBlob, Option<String>), DriverError> {
        if let Some((model, blob, key)) = &self.encoded
            && Arc::ptr_eq(model, global)
        {
            return Ok((blob.clone(), key.clone()));
        }
        let params = global.clone();
        let blob = tokio::task::spawn_blocking(move || params.encode()).await?;
        self.encoded = Some((global.clone(), blob.clone(), None));
        Ok((blob, None))
    }

    /// The global model as instructions carry it: inline, or written to the store once and
    /// named by a presigned GET URL that every device of this fan-out shares.
    async fn global_weights(
        &mut self,
        global: &Arc<Parameters>,
    ) -> Result<(EncodedBlob, Weights), DriverError> {
        let (blob, stored) = self.encode(global).await?;
        let Some(store) = self.store.clone() else {
            return Ok((blob.clone(), blob.to_inline()));
        };
        let key = match stored {
            Some(key) => key,
            None => {
                let key = store.keys().global(&self.run_id, self.global_round);
                store.put(&key, blob.bytes.clone()).await?;
                if let Some(entry) = self.encoded.as_mut() {
                    entry.2 = Some(key.clone());
                }
                key
            }
        };
        let url = store.presign_get(&key, self.presign_ttl()).await?;
        let weights = blob.to_reference(key, url);
        Ok((blob, weights))
    }

    /// Sends one instruction per sampled client, all sharing one encoding (or one stored
    /// object) of the global model and one deadline. Clients that cannot be reached become
    /// `disconnected` failures.
    async fn send_all(
        &mut self,
        round: u64,
        global: &Arc<Parameters>,
        instructions: Vec<Instruction>,
        phase: Phase,
    ) -> Result<FanOut, DriverError> {
        let (blob, weights) = self.global_weights(global).await?;
        let task = self.task_ref().await?;
        let deadline = tokio::time::Instant::now() + self.config.round_timeout;
        let deadline_unix_ms = pollen_proto::unix_ms(SystemTime::now() + self.config.round_timeout);
        let mut open = Vec::with_capacity(instructions.len());
        let mut failures = Vec::new();
        // Each fit gets its own upload key, so a device can write nothing but its update. All
        // URLs are signed before anything is sent: a signing error then leaves no request open.
        let mut uploads = Vec::with_capacity(instructions.len());
        for Instruction { client_id, .. } in &instructions {
            uploads.push(match (&self.store, phase) {
                (Some(store), Phase::Fit) => {
                    let key = store.keys().update(&self.run_id, round, client_id);
                    let url = store.presign_put(&key, self.presign_ttl()).await?;
                    Some(Upload { location: key, url })
                }
                _ => None,
            });
        }
        for (Instruction { client_id, config }, upload) in instructions.into_iter().zip(uploads) {
            let weights = Some(weights.clone());
            let task = task.clone();
            let location = upload.as_ref().map(|u| u.location.clone());
            let run_id = self.run_id.clone();
            let build = move |request_id| {
                let msg = match phase {
                    Phase::Fit => ServerMsg::Fit(FitIns {
                        request_id,
                        round,
                        weights,
                        config,
                        deadline_unix_ms,
                        upload,
                        run_id,
                        task,
                    }),
                    Phase::Evaluate => ServerMsg::Evaluate(EvaluateIns {
                        request_id,
                        round,
                        weights,
                        config,
                        deadline_unix_ms,
                        run_id,
                        task,
                    }),
                };
                ServerMessage { msg: Some(msg) }
            };
            match self.registry.request(&client_id, round, build).await {
                Ok((request_id, rx)) => {
                    self.registry
                        .counters()
                        .bytes_sent
                        .inc_by(blob.bytes.len() as u64);
                    open.push(OpenRequest {
                        client_id,
                        request_id,
                        rx,
                        upload_location: location,
                    });
                }
                Err(e) => failures.push(failure(
                    &client_id,
                    FailureReason::Disconnected,
                    e.to_string(),
                )),
            }
        }
        Ok(FanOut {
            blob,
            deadline,
            open,
            failures,
        })
    }

    /// The fit phase: fan out, fold replies as they arrive, cut off at the deadline.
    async fn fit(
        &mut self,
        round: u64,
        global: &Arc<Parameters>,
        specs: &Arc<Vec<TensorSpec>>,
        instructions: Vec<Instruction>,
    ) -> Result<
        (
            Vec<FitSummary>,
            Vec<ClientFailure>,
            Box<dyn crate::strategy::FitAggregator>,
        ),
        DriverError,
    > {
        let FanOut {
            blob,
            deadline,
            open,
            mut failures,
        } = self
            .send_all(round, global, instructions, Phase::Fit)
            .await?;
        // An update is the global model's shapes again; anything much larger is not one.
        let limit = 2 * blob.bytes.len() as u64 + 64 * 1024;
        let mut tasks = JoinSet::new();
        for request in open {
            tasks.spawn(await_fit(
                self.registry.clone(),
                self.store.clone(),
                request,
                round,
                deadline,
                specs.clone(),
                limit,
            ));
        }

        let strategy = self.strategy.clone();
        let g = global.clone();
        let mut aggregator =
            tokio::task::spawn_blocking(move || lock(&strategy).fit_aggregator(round, &g)).await?;
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined? {
                FitOutcome::Failed(f) => failures.push(f),
                FitOutcome::Update {
                    client_id,
                    parameters,
                    num_examples,
                    metrics,
                    bytes,
                } => {
                    self.registry.counters().bytes_received.inc_by(bytes);
                    let (agg, folded) = tokio::task::spawn_blocking(move || {
                        let r = aggregator.fold(&parameters, num_examples);
                        (aggregator, r)
                    })
                    .await?;
                    aggregator = agg;
                    match folded {
                        Ok(()) => results.push(FitSummary {
                            client_id,
                            num_examples,
                            metrics,
                        }),
                        Err(e) => {
                            self.registry.counters().updates_rejected.inc();
                            let message = format!("client {client_id}, round {round}: {e}");
                            tracing::warn!("update rejected: {message}");
                            failures.push(failure(&client_id, FailureReason::Rejected, message));
                        }
                    }
                }
            }
        }
        Ok((results, failures, aggregator))
    }

    /// Federated evaluation, when the strategy asks for it.
    async fn federated_evaluate(
        &mut self,
        round: u64,
        global: &Arc<Parameters>,
    ) -> Result<Option<Evaluation>, DriverError> {
        let available = self.registry.available();
        let instructions =
            lock(&self.strategy).configure_evaluate(round, &available, &mut self.rng);
        if instructions.is_empty() {
            return Ok(None);
        }
        let FanOut {
            deadline,
            open,
            mut failures,
            ..
        } = self
            .send_all(round, global, instructions, Phase::Evaluate)
            .await?;
        let mut tasks = JoinSet::new();
        for OpenRequest {
            client_id,
            request_id,
            rx,
            ..
        } in open
        {
            let registry = self.registry.clone();
            tasks.spawn(async move {
                match await_reply(&registry, request_id, rx, deadline).await {
                    Err((reason, message)) => Err(failure(&client_id, reason, message)),
                    Ok(Reply::Evaluate(r)) if r.loss.is_finite() => Ok(EvaluateSummary {
                        client_id,
                        loss: r.loss,
                        num_examples: r.num_examples,
                        metrics: numeric(&r.metrics),
                    }),
                    Ok(Reply::Evaluate(r)) => Err(failure(
                        &client_id,
                        FailureReason::Rejected,
                        format!("evaluation loss {} is not finite", r.loss),
                    )),
                    Ok(other) => Err(unexpected(&client_id, other)),
                }
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined? {
                Ok(r) => results.push(r),
                Err(f) => failures.push(f),
            }
        }
        Ok(lock(&self.strategy).aggregate_evaluate(round, &results, &failures))
    }
}

fn unexpected(client_id: &str, reply: Reply) -> ClientFailure {
    match reply {
        Reply::Failure(f) => {
            let code = FailureCode::try_from(f.code).unwrap_or(FailureCode::Unspecified);
            // A proxy reports its device's deadline and disappearance; they are the same
            // failures as a direct client's, whoever noticed them first.
            let reason = match code {
                FailureCode::Timeout => FailureReason::Timeout,
                FailureCode::DeviceOffline => FailureReason::Disconnected,
                _ => FailureReason::ClientError,
            };
            failure(client_id, reason, format!("{code:?}: {}", f.message))
        }
        other => failure(
            client_id,
            FailureReason::ProtocolError,
            format!("unexpected reply {other:?}"),
        ),
    }
}

/// Waits for one reply until the deadline; on timeout the request is closed (so a later reply
/// counts as late) and the client is told to cancel.
async fn await_reply(
    registry: &Registry,
    request_id: u64,
    rx: oneshot::Receiver<Reply>,
    deadline: tokio::time::Instant,
) -> Result<Reply, (FailureReason, String)> {
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(_)) => Err((
            FailureReason::Disconnected,
            "client disconnected before answering".into(),
        )),
        Err(_) => {
            registry.time_out(request_id);
            Err((
                FailureReason::Timeout,
                "no answer before the round deadline".into(),
            ))
        }
    }
}

async fn await_fit(
    registry: Arc<Registry>,
    store: Option<Arc<dyn BlobStore>>,
    request: OpenRequest,
    round: u64,
    deadline: tokio::time::Instant,
    specs: Arc<Vec<TensorSpec>>,
    limit: u64,
) -> FitOutcome {
    let OpenRequest {
        client_id,
        request_id,
        rx,
        upload_location,
    } = request;
    let outcome = fit_outcome(
        &registry,
        store.as_deref(),
        (client_id, request_id, rx, upload_location.as_deref()),
        round,
        deadline,
        specs,
        limit,
    )
    .await;
    // Folded, rejected or abandoned, the update's object is not needed any more. (An upload
    // that lands after this, from a device past its deadline, stays until the run's objects are
    // removed.)
    if let (Some(store), Some(key)) = (store, upload_location) {
        tokio::spawn(async move {
            if let Err(e) = store.delete(&key).await {
                tracing::debug!("could not delete an update object: {e}");
            }
        });
    }
    outcome
}

async fn fit_outcome(
    registry: &Registry,
    store: Option<&dyn BlobStore>,
    (client_id, request_id, rx, upload_location): (
        String,
        u64,
        oneshot::Receiver<Reply>,
        Option<&str>,
    ),
    round: u64,
    deadline: tokio::time::Instant,
    specs: Arc<Vec<TensorSpec>>,
    limit: u64,
) -> FitOutcome {
    let reply = match await_reply(registry, request_id, rx, deadline).await {
        Ok(r) => r,
        Err((reason, message)) => return FitOutcome::Failed(failure(&client_id, reason, message)),
    };
    let res = match reply {
        Reply::Fit(res) => res,
        other => return FitOutcome::Failed(unexpected(&client_id, other)),
    };
    let reject = |message: String| {
        registry.counters().updates_rejected.inc();
        let message = format!("client {client_id}, round {round}: {message}");
        tracing::warn!("update rejected: {message}");
        FitOutcome::Failed(failure(&client_id, FailureReason::Rejected, message))
    };
    if res.round != round {
        return reject(format!("reply names round {}", res.round));
    }
    if res.num_examples == 0 {
        return reject("num_examples is 0".into());
    }
    let Some(weights) = res.weights else {
        return reject("fit result carries no weights".into());
    };
    let resolved = resolve_weights(weights, upload_location, store, Some(specs), limit).await;
    match resolved {
        Ok((parameters, bytes)) => FitOutcome::Update {
            client_id: client_id.clone(),
            parameters,
            num_examples: res.num_examples,
            metrics: numeric(&res.metrics),
            bytes,
        },
        Err(message) => reject(message),
    }
}

/// Turns wire weights into parameters: inline bytes as they are, references by reading the one
/// object key this request allowed. Digest, size, codec, shapes and finiteness are all checked;
/// the byte work runs off the async threads. Returns the parameters and the blob size.
async fn resolve_weights(
    weights: Weights,
    expected_location: Option<&str>,
    store: Option<&dyn BlobStore>,
    specs: Option<Arc<Vec<TensorSpec>>>,
    limit: u64,
) -> Result<(Parameters, u64), String> {
    let decode = |bytes: bytes::Bytes, sha256: String, codec: i32, inline: bool| async move {
        let size = bytes.len() as u64;
        tokio::task::spawn_blocking(move || {
            if inline {
                pollen_proto::blob::verify_inline(&bytes, &sha256, codec)?;
            } else {
                pollen_proto::blob::verify(&bytes, &sha256, codec)?;
            }
            Parameters::decode(&bytes, specs.as_deref().map(|s| s.as_slice()))
        })
        .await
        .map_err(|e| format!("decoding task failed: {e}"))?
        .map(|p| (p, size))
        .map_err(|e| e.to_string())
    };
    match weights.body {
        None => Err(pollen_proto::BlobError::Empty.to_string()),
        Some(Body::Inline(b)) => decode(b.data, b.sha256, b.codec, true).await,
        Some(Body::Reference(r)) => {
            let Some(store) = store else {
                return Err(format!(
                    "weights by reference ({:?}) but this coordinator has no object storage",
                    r.location
                ));
            };
            let Some(expected) = expected_location else {
                return Err(format!(
                    "weights by reference ({:?}) where none was asked for",
                    r.location
                ));
            };
            if r.location != expected {
                return Err(format!(
                    "answer names object {:?}, but this request's upload key is {expected:?}",
                    r.location
                ));
            }
            let bytes = store
                .get(&r.location, limit.min(r.size_bytes.max(1)))
                .await
                .map_err(|e| e.to_string())?;
            if bytes.len() as u64 != r.size_bytes {
                return Err(format!(
                    "object {:?} is {} bytes, the answer says {}",
                    r.location,
                    bytes.len(),
                    r.size_bytes
                ));
            }
            decode(bytes, r.sha256, r.codec, false).await
        }
    }
}
