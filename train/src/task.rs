//! A [`Task`]: a parsed manifest and what can be done with it — initial weights, a device's
//! prepared data, local training, evaluation and statistics. The same code runs on devices,
//! in simulation and for server-side evaluation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pollen_proto::Parameters;
use pollen_proto::fleet::Statistics;
use pollen_proto::scalar::ScalarMap;

use crate::backend::{Backend, Engine};
use crate::data::{self, DataError, LocalData, Raw};
use crate::manifest::{ManifestError, TaskKind, TaskManifest, TrainSpec};
use crate::metrics::{self, Tally};
use crate::model::{self, ModelIo, ModelSpec, WeightsError};
use crate::trainer::{FitOutput, Learner, TrainError};

/// A task ready to train: its manifest, input and output sizes, and label names.
#[derive(Debug, Clone)]
pub struct Task {
    pub manifest: TaskManifest,
    /// `None` while classes or the input shape are still to be resolved (a statistics query
    /// may come before them).
    io: Option<ModelIo>,
    /// Which library trains it here.
    backend: Backend,
    /// The TorchScript file, for a `torchscript` model.
    script: Option<Bytes>,
    /// The LibTorch network, kept between rounds: a TorchScript module's buffers (batch-norm
    /// statistics) are the device's own and stay.
    net: Arc<Mutex<Option<crate::torch::Net>>>,
}

/// Why a task cannot be carried out on this device.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("the task is not complete: {0}")]
    Unresolved(String),
    /// This device cannot train the task's model (a TorchScript module without LibTorch).
    #[error("{0}")]
    Backend(String),
}

impl Task {
    /// A task from a manifest's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, TaskError> {
        Self::new(TaskManifest::parse(bytes)?)
    }

    /// A task from a manifest.
    pub fn new(manifest: TaskManifest) -> Result<Self, TaskError> {
        manifest.task.validate().map_err(ManifestError::Invalid)?;
        manifest.train.validate().map_err(ManifestError::Invalid)?;
        let resolved = manifest.task.shape.is_some()
            && (manifest.task.kind != TaskKind::Classification || manifest.task.classes.is_some());
        let io = if resolved {
            manifest.validate().map_err(ManifestError::Invalid)?;
            Some(manifest.io().map_err(TaskError::Unresolved)?)
        } else {
            None
        };
        Ok(Self {
            manifest,
            io,
            backend: Backend::default(),
            script: None,
            net: Arc::default(),
        })
    }

    /// Trains with `backend` (`auto` by default).
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Takes the task's files (by SHA-256) the manifest names: a TorchScript model's.
    pub fn with_files<'a>(
        mut self,
        files: impl IntoIterator<Item = (&'a str, Bytes)>,
    ) -> Result<Self, TaskError> {
        if let ModelSpec::TorchScript(c) = &self.manifest.model {
            let found = files
                .into_iter()
                .find(|(sha, _)| sha.eq_ignore_ascii_case(&c.sha256));
            let Some((_, bytes)) = found else {
                return Err(TaskError::Unresolved(format!(
                    "the TorchScript model (sha256 {}) did not come with the task",
                    c.sha256
                )));
            };
            self.script = Some(bytes);
        }
        Ok(self)
    }

    /// The library that trains this task here.
    pub fn engine(&self) -> Result<Engine, TaskError> {
        self.backend
            .engine(&self.manifest.model)
            .map_err(TaskError::Backend)
    }

    /// Runs `f` on the LibTorch network, built on first use.
    fn with_net<T>(
        &self,
        f: impl FnOnce(&mut crate::torch::Net, &ModelIo) -> Result<T, TrainError>,
    ) -> Result<T, TaskError> {
        let io = self.io()?;
        let mut net = self.net.lock().unwrap_or_else(|e| e.into_inner());
        if net.is_none() {
            let built = crate::torch::Net::new(&self.manifest.model, io, self.script.as_deref())
                .map_err(TaskError::Backend)?;
            *net = Some(built);
        }
        let Some(net) = net.as_mut() else {
            return Err(TaskError::Backend(
                "the LibTorch network was not built".into(),
            ));
        };
        Ok(f(net, io)?)
    }

    pub fn kind(&self) -> TaskKind {
        self.manifest.task.kind
    }

    /// Input and output sizes; an error while the task is unresolved.
    pub fn io(&self) -> Result<&ModelIo, TaskError> {
        self.io.as_ref().ok_or_else(|| {
            TaskError::Unresolved(
                "classes or the input shape are not known yet (a statistics query only)".into(),
            )
        })
    }

    fn learner(&self) -> Result<Learner<'_>, TaskError> {
        Ok(Learner {
            model: &self.manifest.model,
            io: self.io()?,
            targets: self.manifest.fitted.targets.as_ref(),
        })
    }

    /// Freshly initialised weights, from the manifest's seed; a TorchScript module's own
    /// (LibTorch only).
    pub fn initial_parameters(&self) -> Result<Parameters, TaskError> {
        if !self.manifest.model.is_builtin() {
            return self.module_parameters();
        }
        Ok(model::initial_parameters(
            &self.manifest.model,
            self.io()?,
            self.manifest.seed,
        )?)
    }

    fn module_parameters(&self) -> Result<Parameters, TaskError> {
        self.engine()?;
        self.with_net(|net, _| crate::torch::initial_parameters(net))
    }

    /// A device's examples under this task: prepared, split into training data and the local
    /// holdout, and scaled with the run's fitted feature scaling.
    pub fn prepare(&self, raw: &Raw) -> Result<LocalData, TaskError> {
        let spec = &self.manifest.task;
        let examples = data::prepare(raw, spec)?;
        if let Some(shape) = &spec.shape
            && shape.iter().product::<usize>() != examples.width()
        {
            return Err(DataError::Mismatch {
                origin: raw.origin().to_string(),
                reason: format!(
                    "examples have shape {:?}; the task's input is {shape:?}",
                    examples.shape
                ),
            }
            .into());
        }
        let mut local = data::split(examples, spec.holdout(), self.manifest.seed);
        if let Some(scaling) = &self.manifest.fitted.features {
            if scaling.mean.len() != local.examples.channels() {
                return Err(DataError::Mismatch {
                    origin: raw.origin().to_string(),
                    reason: format!(
                        "examples have {} channels; the run's scaling has {}",
                        local.examples.channels(),
                        scaling.mean.len()
                    ),
                }
                .into());
            }
            local.examples.scale(scaling);
        }
        Ok(local)
    }

    /// Federated statistics of `data`'s training examples (prepared without scaling).
    pub fn statistics(&self, raw: &Raw) -> Result<Statistics, TaskError> {
        let spec = &self.manifest.task;
        let examples = data::prepare(raw, spec)?;
        let local = data::split(examples, spec.holdout(), self.manifest.seed);
        let names = data::prepare::label_names(raw, spec)?;
        Ok(data::stats::statistics(&local, &names))
    }

    /// Trains from `global`; `seed` fixes the order of batches and the dropout masks.
    pub fn fit(
        &self,
        data: &LocalData,
        global: &Parameters,
        train: &TrainSpec,
        seed: u64,
    ) -> Result<FitOutput, TaskError> {
        let targets = self.manifest.fitted.targets.as_ref();
        match self.engine()? {
            Engine::Burn => Ok(self.learner()?.fit(global, data, train, seed)?),
            Engine::Libtorch => self.with_net(|net, io| {
                crate::torch::TorchLearner { io, targets }.fit(net, global, data, train, seed)
            }),
        }
    }

    /// Evaluates `params` on the examples `idx`: loss, examples and the metrics (the task's
    /// own and the sums that aggregate across devices).
    pub fn evaluate(
        &self,
        data: &LocalData,
        idx: &[usize],
        params: &Parameters,
        batch_size: usize,
    ) -> Result<(f64, u64, ScalarMap), TaskError> {
        if idx.is_empty() {
            return Err(TrainError::NoData(format!(
                "no examples to evaluate on ({} examples, {} held out; raise task.holdout)",
                data.examples.len(),
                data.holdout.len()
            ))
            .into());
        }
        let targets = self.manifest.fitted.targets.as_ref();
        let (loss, tally): (f64, Tally) = match self.engine()? {
            Engine::Burn => self.learner()?.evaluate(params, data, idx, batch_size)?,
            Engine::Libtorch => self.with_net(|net, io| {
                crate::torch::TorchLearner { io, targets }
                    .evaluate(net, params, data, idx, batch_size)
            })?,
        };
        let metrics = metrics::report(self.kind(), self.manifest.task.threshold_quantile, &tally);
        Ok((loss, idx.len() as u64, metrics))
    }

    /// The federated metrics of many evaluations (Flower's `evaluate_metrics_aggregation_fn`).
    pub fn aggregate(&self, results: &[(u64, &BTreeMap<String, f64>)]) -> BTreeMap<String, f64> {
        metrics::aggregate(self.kind(), self.manifest.task.threshold_quantile, results)
    }
}
