//! The round driver: runs federated rounds over the clients in a [`Registry`].
//!
//! Per round: sample (strategy) -> send `Fit` to each sampled client with one shared encoding
//! of the global model -> as each answer arrives, verify and decode it off the async threads,
//! ask the round's state machine ([`crate::round::FitRound`]) whether it counts, and fold it
//! into the strategy's aggregator -> close when everyone answered, when the round's target is
//! met (stragglers are cancelled) or at the deadline -> aggregate -> evaluate -> record.
//! A round that fails (no quorum) keeps the previous global model and the run goes on.
//!
//! # Layout
//! - this file: the driver, its configuration and the run loop.
//! - `synchronous`: one synchronous round (fit, aggregate, evaluate, record).
//! - `fedbuff`: the asynchronous discipline (devices kept training, a version every K updates).
//! - `record`: the end of a round or version (evaluation, record, checkpoint), shared by both.
//! - `fanout`: instructions out, answers awaited, read and checked (shared by both
//!   disciplines).
//! - `task`: the task manifest and the statistics phase before round 1.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pollen_proto::Parameters;
use pollen_proto::blob::EncodedBlob;
use pollen_proto::codec::{self, UpdateCodec};
use pollen_proto::fleet::{
    GetParametersIns, ServerMessage, Stop, Upload, server_message::Msg as ServerMsg,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio_util::sync::CancellationToken;

use crate::records::{RoundRecord, RunHandle};
use crate::registry::{Registry, Reply};
use crate::storage::{BlobStore, MAX_PRESIGN_TTL, StoreError};
use crate::strategy::{Evaluation, Strategy};
use crate::task::{FitManifest, Fitted, Published, TaskSetup};

pub(crate) mod fanout;
mod fedbuff;
mod record;
mod synchronous;
mod task;
#[cfg(test)]
mod tests;

use fanout::{FanOut, Global};

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
    /// Close a fit round once this many results are in (sample more to over-select); the
    /// clients still training are cancelled and counted as stragglers.
    pub close_after: Option<usize>,
    /// Run asynchronously (FedBuff) instead of in synchronous rounds; `num_rounds` then counts
    /// model versions.
    pub fedbuff: Option<crate::fedbuff::FedBuffConfig>,
    /// The codec of the global model sent to clients (`F32`, `F16` or `Int8`); checkpoints are
    /// always f32.
    pub model_codec: pollen_proto::codec::UpdateCodec,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            num_rounds: 3,
            round_timeout: Duration::from_secs(120),
            wait_for_clients: Duration::from_secs(60),
            seed: 0,
            primary_metric: None,
            close_after: None,
            fedbuff: None,
            model_codec: pollen_proto::codec::UpdateCodec::F32,
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
    #[error("encoding the global model: {0}")]
    Encode(String),
    #[error("resuming: {0}")]
    Resume(String),
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
    /// The last global model encoded as f32, so that the checkpoint, the next round's fit and
    /// the federated evaluation share one encoding instead of hashing the model three times.
    encoded: Option<(Arc<Parameters>, EncodedBlob)>,
    /// The last global model as instructions carry it (in `model_codec`, the f32 encoding
    /// itself when that is f32) and, with object storage, the key it was written to (written
    /// once, read by every device).
    wire: Option<(Arc<Parameters>, EncodedBlob, Option<String>)>,
    /// Weights go by reference through this store when set, inline otherwise.
    store: Option<Arc<dyn BlobStore>>,
    /// The round that produced the current global model (0 = initial), naming its object key.
    global_round: u64,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The run's task manifest, referenced by every instruction.
    task: Option<Published>,
    /// The files the manifest names (a TorchScript model), kept for the fitted manifest.
    task_files: Vec<bytes::Bytes>,
    /// Fits the manifest from federated statistics before round 1.
    fit_manifest: Option<FitManifest>,
    /// The initial model a statistics phase produced.
    fitted_initial: Option<Parameters>,
    /// An earlier run's model to start from: before the fitted and the strategy's.
    warm_start: Option<Parameters>,
    /// The run continues after this many recorded rounds (crash resume).
    resumed_after: Option<u64>,
}

/// Where a resumed run stood when its coordinator stopped: read back from its records.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The global model after the last recorded round (its checkpoint, or that of the last
    /// successful round before it, or the initial one).
    pub parameters: Parameters,
    /// Rounds recorded; the run goes on with the next.
    pub completed: u64,
    /// The round that produced `parameters` (0: the initial model).
    pub model_round: u64,
    /// The sampler's position after the last recorded round.
    pub rng_word_pos: u64,
}

/// Largest blob accepted as a client's initial model (no shapes to check it against yet).
const MAX_INITIAL_BLOB_BYTES: u64 = pollen_proto::limits::MAX_GRPC_MESSAGE_BYTES as u64;

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
            wire: None,
            store: None,
            global_round: 0,
            metrics: None,
            task: None,
            task_files: Vec::new(),
            fit_manifest: None,
            fitted_initial: None,
            warm_start: None,
            resumed_after: None,
        }
    }

    /// Continues a run after its recorded rounds (crash resume): from their model, with the
    /// sampler where they left it, without evaluating or checkpointing the starting model
    /// again. Synchronous rounds only (FedBuff's versions in flight are not recorded).
    pub fn with_resume(mut self, resume: Resume) -> Self {
        self.warm_start = Some(resume.parameters);
        self.global_round = resume.model_round;
        self.rng.set_word_pos(u128::from(resume.rng_word_pos));
        self.resumed_after = Some(resume.completed);
        self
    }

    /// Every instruction references this task; with a statistics phase, the manifest is fitted
    /// from the clients' federated statistics before round 1.
    pub fn with_task(mut self, setup: TaskSetup) -> Self {
        self.task = Some(Published::new(setup.manifest, &setup.files));
        self.task_files = setup.files;
        self.fit_manifest = setup.statistics;
        self
    }

    /// Reports every finished round to `metrics` (Prometheus).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Starts from `parameters` (an earlier run's model), whatever the strategy or the task's
    /// statistics would start from.
    pub fn with_warm_start(mut self, parameters: Parameters) -> Self {
        self.warm_start = Some(parameters);
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
        self.registry.stop_all(ServerMessage {
            msg: Some(ServerMsg::Stop(Stop {
                reason: format!("run {} {status}", self.run_id),
                reconnect: false,
                reconnect_after_ms: 0,
            })),
        });
        outcome
    }

    async fn run_inner(&mut self, shutdown: &CancellationToken) -> Result<RunSummary, DriverError> {
        // A run stopped while it waits for its clients ends then, not when the wait does.
        tokio::select! {
            waited = self.wait_for_clients() => waited?,
            _ = shutdown.cancelled() => {
                return Ok(RunSummary {
                    rounds: Vec::new(),
                    initial_evaluation: None,
                    parameters: Arc::default(),
                    cancelled: true,
                });
            }
        }
        if let Some(fit) = self.fit_manifest.take() {
            let stats = tokio::select! {
                s = self.statistics() => s?,
                _ = shutdown.cancelled() => {
                    return Err(DriverError::Statistics("the run was stopped before round 1".into()));
                }
            };
            let Fitted { manifest, initial } = fit(&stats).map_err(DriverError::Statistics)?;
            self.task = Some(Published::new(manifest, &self.task_files));
            self.fitted_initial = initial;
        }
        self.record_task()?;
        let resumed = self.resumed_after.is_some();
        if resumed && self.config.fedbuff.is_some() {
            return Err(DriverError::Resume(
                "FedBuff runs cannot be resumed: the versions in flight are not recorded".into(),
            ));
        }
        let mut global = Arc::new(self.initial_parameters().await?);
        tracing::info!(
            tensors = global.tensors.len(),
            params = global.num_params(),
            after_round = self.resumed_after.unwrap_or(0),
            "global model ready"
        );
        let initial_evaluation = if resumed {
            None
        } else {
            self.checkpoint_initial(&global).await?;
            self.evaluate_centralized(0, &global).await?
        };
        if let Some(config) = self.config.fedbuff.clone() {
            let (rounds, parameters, cancelled) =
                self.run_fedbuff(config, global, shutdown).await?;
            return Ok(RunSummary {
                rounds,
                initial_evaluation,
                parameters,
                cancelled,
            });
        }
        let mut rounds = Vec::new();
        for round in self.resumed_after.unwrap_or(0) + 1..=self.config.num_rounds {
            if shutdown.is_cancelled() {
                return Ok(RunSummary {
                    rounds,
                    initial_evaluation,
                    parameters: global,
                    cancelled: true,
                });
            }
            let record = tokio::select! {
                r = self.run_round(round, &mut global) => r?,
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

    /// Writes the starting model as the run's round-0 checkpoint, so that a run resumed before
    /// any round succeeded starts from exactly it (it may have come from a client, or from a
    /// warm-start source that has moved since).
    async fn checkpoint_initial(&mut self, global: &Arc<Parameters>) -> Result<(), DriverError> {
        let Some(run) = self.run.clone() else {
            return Ok(());
        };
        let model = global.clone();
        let meta = self.checkpoint_metadata(0);
        tokio::task::spawn_blocking(move || {
            run.write_checkpoint(0, &model.encode_with_metadata(meta))
        })
        .await?
        .map_err(|source| DriverError::Record { round: 0, source })?;
        Ok(())
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
        let fitted = self.fitted_initial.take();
        if let Some(p) = self.warm_start.take().or(fitted).or(from_strategy) {
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
            Reply::Parameters(p) => fanout::resolve_weights(
                p.weights.unwrap_or_default(),
                expected.as_deref(),
                self.store.as_deref(),
                None,
                MAX_INITIAL_BLOB_BYTES,
                None,
            )
            .await
            .map(|(params, _)| params)
            .map_err(|(_, e)| {
                DriverError::NoInitialParameters(format!("client {}: {e}", client.id))
            }),
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

    /// The f32 safetensors encoding of `global`, computed once per model (off the async
    /// threads).
    async fn encode(&mut self, global: &Arc<Parameters>) -> Result<EncodedBlob, DriverError> {
        if let Some((model, blob)) = &self.encoded
            && Arc::ptr_eq(model, global)
        {
            return Ok(blob.clone());
        }
        let params = global.clone();
        let blob = tokio::task::spawn_blocking(move || params.encode()).await?;
        self.encoded = Some((global.clone(), blob.clone()));
        Ok(blob)
    }

    /// The global model as instructions carry it: inline, or written to the store once and
    /// named by a presigned GET URL that every device of this fan-out shares; in the run's
    /// model codec.
    async fn global(&mut self, global: &Arc<Parameters>) -> Result<Global, DriverError> {
        let cached = match &self.wire {
            Some((model, blob, key)) if Arc::ptr_eq(model, global) => {
                Some((blob.clone(), key.clone()))
            }
            _ => None,
        };
        let (blob, stored) = match cached {
            Some(hit) => hit,
            None => {
                let codec = self.config.model_codec;
                let blob = if codec == UpdateCodec::F32 {
                    self.encode(global).await?
                } else {
                    let params = global.clone();
                    tokio::task::spawn_blocking(move || codec::encode(&params, codec, None, None))
                        .await?
                        .map_err(|e| DriverError::Encode(e.to_string()))?
                };
                self.wire = Some((global.clone(), blob.clone(), None));
                (blob, None)
            }
        };
        let specs = Arc::new(global.specs());
        let Some(store) = self.store.clone() else {
            let weights = blob.to_inline();
            return Ok(Global {
                parameters: global.clone(),
                blob,
                weights,
                specs,
            });
        };
        let key = match stored {
            Some(key) => key,
            None => {
                let key = store.keys().global(&self.run_id, self.global_round);
                store.put(&key, blob.bytes.clone()).await?;
                if let Some(entry) = self.wire.as_mut() {
                    entry.2 = Some(key.clone());
                }
                key
            }
        };
        let url = store.presign_get(&key, self.presign_ttl()).await?;
        let weights = blob.to_reference(key, url);
        Ok(Global {
            parameters: global.clone(),
            blob,
            weights,
            specs,
        })
    }

    /// The fan-out over this driver's clients and store.
    fn fanout(&self) -> FanOut {
        FanOut {
            registry: self.registry.clone(),
            store: self.store.clone(),
            run_id: self.run_id.clone(),
            timeout: self.config.round_timeout,
            presign_ttl: self.presign_ttl(),
        }
    }
}
