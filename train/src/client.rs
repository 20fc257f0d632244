//! [`TaskClient`]: a [`Client`] that trains whatever task each instruction names on this
//! device's own data.
//!
//! The device's files are read once (and again when they change on disk); each task's
//! prepared examples are cached by manifest digest, so a run prepares its data once and one
//! agent can serve runs with different models one after the other.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use pollen_client::{Client, ClientError, ClientEvaluate, ClientFit, Work};
use pollen_proto::Parameters;
use pollen_proto::fleet::{DataSchema, Statistics};
use pollen_proto::scalar::{self, ScalarMap};

use crate::backend::Backend;
use crate::data::{DataError, DataSource, Format, LocalData, Raw};
use crate::manifest::TrainSpec;
use crate::task::{Task, TaskError};
use crate::trainer::TrainError;

/// Tasks whose prepared data is kept: the current run's, and the previous one's while runs
/// change over.
const PREPARED: usize = 2;

/// Evaluation batch size when the instruction does not say.
const EVAL_BATCH: usize = 256;

/// Where the client's data comes from.
#[derive(Debug, Clone)]
enum Source {
    /// Files on the device, re-read when they change.
    File(DataSource),
    /// Data handed over in memory (simulated devices).
    Memory,
}

/// A device's trainer: its own data, any task.
pub struct TaskClient {
    source: Source,
    format: Format,
    /// Mixed into every seed, so that devices of one run draw differently.
    seed: u64,
    raw: Arc<Raw>,
    /// Modification time and size of the file when it was read.
    stamp: Option<(SystemTime, u64)>,
    prepared: VecDeque<(String, Arc<Task>, Arc<LocalData>)>,
    /// Which library trains here.
    backend: Backend,
}

fn stamp_of(source: &DataSource) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(&source.path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl From<TaskError> for ClientError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Data(d) => ClientError::data_mismatch(d.to_string()),
            TaskError::Train(TrainError::NoData(m)) => ClientError::data_mismatch(m),
            TaskError::Manifest(_) | TaskError::Unresolved(_) => {
                ClientError::bad_instruction(e.to_string())
            }
            other => ClientError::training(other.to_string()),
        }
    }
}

impl TaskClient {
    /// Reads the device's data now (so that a bad file is reported at start).
    pub fn open(source: DataSource, seed: u64) -> Result<Self, DataError> {
        let format = source.format()?;
        let stamp = stamp_of(&source);
        let raw = Arc::new(source.read()?);
        Ok(Self {
            source: Source::File(source),
            format,
            seed,
            raw,
            stamp,
            prepared: VecDeque::new(),
            backend: Backend::default(),
        })
    }

    /// A client over data already in memory (a simulated device's share of a data set).
    pub fn in_memory(raw: Raw, format: Format, seed: u64) -> Self {
        Self {
            source: Source::Memory,
            format,
            seed,
            raw: Arc::new(raw),
            stamp: None,
            prepared: VecDeque::new(),
            backend: Backend::default(),
        }
    }

    /// Trains with `backend` (`auto` by default: LibTorch where it is compiled in and faster).
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The device's data as read.
    pub fn raw(&self) -> &Raw {
        &self.raw
    }

    /// Re-reads the file if it changed since it was read (a gateway keeps logging).
    fn refresh(&mut self) -> Result<(), ClientError> {
        let Source::File(source) = &self.source else {
            return Ok(());
        };
        let now = stamp_of(source);
        if now.is_some() && now != self.stamp {
            let raw = source
                .read()
                .map_err(|e| ClientError::data_mismatch(e.to_string()))?;
            tracing::info!(
                rows = raw.rows(),
                "local data changed on disk; read it again"
            );
            self.raw = Arc::new(raw);
            self.stamp = now;
            self.prepared.clear();
        }
        Ok(())
    }

    fn task(&self, work: &Work<'_>) -> Result<Task, ClientError> {
        let blob = work.task.ok_or_else(|| {
            ClientError::bad_instruction(
                "the instruction names no task; this client trains what a run's task manifest says",
            )
        })?;
        let files = blob
            .files
            .iter()
            .map(|f| (f.sha256.as_str(), f.bytes.clone()));
        Ok(Task::parse(&blob.bytes)?
            .with_backend(self.backend)
            .with_files(files)?)
    }

    /// The instruction's task and this device's data prepared for it (cached by digest).
    fn prepared(&mut self, work: &Work<'_>) -> Result<(Arc<Task>, Arc<LocalData>), ClientError> {
        self.refresh()?;
        let sha = work.task.map(|t| t.sha256.clone()).unwrap_or_default();
        if let Some((_, task, data)) = self.prepared.iter().find(|(s, _, _)| *s == sha) {
            return Ok((task.clone(), data.clone()));
        }
        let task = Arc::new(self.task(work)?);
        task.io().map_err(ClientError::from)?;
        let started = Instant::now();
        let data = Arc::new(task.prepare(&self.raw)?);
        tracing::info!(
            task = %task.manifest.name,
            examples = data.examples.len(),
            train = data.train.len(),
            holdout = data.holdout.len(),
            shape = ?data.examples.shape,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "local data prepared for the task"
        );
        self.prepared.push_front((sha, task.clone(), data.clone()));
        self.prepared.truncate(PREPARED);
        Ok((task, data))
    }

    /// Per-round seed: the run's, this device's and the round's.
    fn fit_seed(&self, task: &Task, round: u64) -> u64 {
        task.manifest.seed
            ^ self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
            ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

fn read_usize(config: &ScalarMap, key: &str, default: usize) -> Result<usize, ClientError> {
    match config.get(key) {
        None => Ok(default),
        Some(v) => scalar::as_i64(v)
            .filter(|n| *n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                ClientError::bad_instruction(format!(
                    "config {key} = {v:?} must be a positive integer"
                ))
            }),
    }
}

/// The task's local-training settings, with a fit instruction's `local_epochs`, `batch_size`,
/// `learning_rate`, `proximal_mu` (FedProx) and `time_budget_ms` taking precedence (Flower's
/// per-round config).
pub fn train_config(base: &TrainSpec, config: &ScalarMap) -> Result<TrainSpec, ClientError> {
    let learning_rate = match config.get("learning_rate") {
        None => base.learning_rate,
        Some(v) => scalar::as_f64(v)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| {
                ClientError::bad_instruction(format!(
                    "config learning_rate = {v:?} must be a positive number"
                ))
            })?,
    };
    let proximal_mu = match config.get("proximal_mu") {
        None => base.proximal_mu,
        Some(v) => scalar::as_f64(v)
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| {
                ClientError::bad_instruction(format!(
                    "config proximal_mu = {v:?} must be 0 or a positive number"
                ))
            })?,
    };
    let time_budget = match config.get("time_budget_ms") {
        None => base.time_budget,
        Some(v) => Some(
            scalar::as_f64(v)
                .filter(|ms| ms.is_finite() && *ms > 0.0)
                .map(|ms| std::time::Duration::from_secs_f64(ms / 1000.0))
                .ok_or_else(|| {
                    ClientError::bad_instruction(format!(
                        "config time_budget_ms = {v:?} must be a positive number"
                    ))
                })?,
        ),
    };
    Ok(TrainSpec {
        local_epochs: read_usize(config, "local_epochs", base.local_epochs)?,
        batch_size: read_usize(config, "batch_size", base.batch_size)?,
        learning_rate,
        proximal_mu,
        time_budget,
        ..base.clone()
    })
}

impl Client for TaskClient {
    fn num_examples(&self) -> u64 {
        self.raw.rows() as u64
    }

    fn data_schema(&self) -> Option<DataSchema> {
        Some(self.raw.schema(self.format))
    }

    fn get_parameters(&mut self, work: &Work<'_>) -> Result<Parameters, ClientError> {
        Ok(self.task(work)?.initial_parameters()?)
    }

    fn fit(&mut self, work: &Work<'_>, parameters: Parameters) -> Result<ClientFit, ClientError> {
        let (task, data) = self.prepared(work)?;
        let cfg = train_config(&task.manifest.train, work.config)?;
        let started = Instant::now();
        let out = task.fit(&data, &parameters, &cfg, self.fit_seed(&task, work.round))?;
        let mut metrics = ScalarMap::new();
        metrics.insert("loss".into(), scalar::f64(out.loss));
        metrics.insert("steps".into(), scalar::int(out.steps as i64));
        metrics.insert("epochs".into(), scalar::f64(out.epochs));
        metrics.insert(
            "train_seconds".into(),
            scalar::f64(started.elapsed().as_secs_f64()),
        );
        Ok(ClientFit {
            parameters: out.parameters,
            num_examples: out.num_examples,
            metrics,
        })
    }

    fn evaluate(
        &mut self,
        work: &Work<'_>,
        parameters: Parameters,
    ) -> Result<ClientEvaluate, ClientError> {
        let (task, data) = self.prepared(work)?;
        let batch = read_usize(work.config, "batch_size", EVAL_BATCH)?;
        let (loss, num_examples, metrics) =
            task.evaluate(&data, &data.holdout, &parameters, batch)?;
        Ok(ClientEvaluate {
            loss,
            num_examples,
            metrics,
        })
    }

    fn statistics(&mut self, work: &Work<'_>) -> Result<Statistics, ClientError> {
        self.refresh()?;
        Ok(self.task(work)?.statistics(&self.raw)?)
    }
}
