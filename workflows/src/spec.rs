//! Run specs: TOML files that say everything a run needs, seed included.
//!
//! A spec names the task (`[task]`: what is learned and from which columns), the model
//! (`model = "<preset>"` or a `[model]` table), local training (`[train]`), the strategy, how
//! evaluation works, and the data a simulation splits across its devices (`[data]`). Specs
//! without a `[task]` are MNIST runs, as they were before tasks existed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pollen_coordinator::StrategyConfig;
use pollen_coordinator::fedbuff::FedBuffConfig;
use pollen_coordinator::privacy::{Mechanism, PrivacyConfig};
use pollen_coordinator::strategy::config::StrategyName;
use pollen_proto::codec::UpdateCodec;
use pollen_proto::scalar::{self, ScalarMap};
use pollen_train::data::partition::Partition;
use pollen_train::manifest::{MANIFEST_VERSION, Normalize, TaskKind, TaskManifest, TaskSpec};
use pollen_train::{DataSource, Format, ModelSpec, TrainSpec};
use serde::{Deserialize, Serialize};

/// The default spec (`workflows/mnist-2nn.toml`), built in so `pollen simulate` needs no file.
pub const DEFAULT_SPEC: &str = include_str!("../mnist-2nn.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub name: String,
    pub seed: u64,
    pub rounds: u64,
    #[serde(with = "humantime_serde")]
    pub round_timeout: Duration,
    /// A preset (`mnist-2nn`, `mnist-cnn`) or a `[model]` table with `family` and settings.
    pub model: ModelSpec,
    /// What is learned from which columns; MNIST classification when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskSpec>,
    pub data: DataSpec,
    pub strategy: StrategyConfig,
    pub train: TrainSpec,
    pub evaluate: EvaluateSpec,
    /// Which devices a run on a real fleet (`pollen run`) selects from the device registry.
    #[serde(default)]
    pub devices: DevicesSpec,
    /// Differential privacy: central (noise at aggregation) or local (noise on the devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyConfig>,
    /// How weights travel: the update codec devices send, the codec of the global model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionSpec>,
    /// Run asynchronously (FedBuff) instead of in synchronous rounds; `rounds` then counts
    /// model versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fedbuff: Option<FedBuffConfig>,
    /// How simulated devices behave (`pollen simulate` only).
    #[serde(default)]
    pub simulation: SimulationSpec,
    /// Start from an earlier run's checkpoint instead of fresh weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_start: Option<crate::warm::WarmStartSpec>,
}

/// The `[compression]` table: codecs beside f32 safetensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSpec {
    /// What devices send back: `f32` (weights), or their change to the global model as `f16`,
    /// `int8` (per-channel scales) or `topk` (the `topk_fraction` largest changes per tensor,
    /// the rest kept on the device and sent later: error feedback).
    #[serde(default = "default_codec")]
    pub update: String,
    /// The global model sent to devices: `f32`, `f16` or `int8`. Compressed global models need
    /// an update codec that sends changes, which the coordinator adds to its own f32 model.
    #[serde(default = "default_codec")]
    pub model: String,
    /// `topk`: the fraction of each tensor's values sent per update.
    #[serde(default = "default_topk")]
    pub topk_fraction: f64,
}

fn default_codec() -> String {
    "f32".into()
}

fn default_topk() -> f64 {
    0.01
}

impl CompressionSpec {
    /// The codec of updates, as devices are told.
    pub fn update_codec(&self) -> Result<UpdateCodec, String> {
        match self.update.as_str() {
            "f32" => Ok(UpdateCodec::F32),
            "f16" => Ok(UpdateCodec::DeltaF16),
            "int8" => Ok(UpdateCodec::DeltaInt8),
            "topk" => {
                // Each kept value costs its index too: above half the values, top-k is larger
                // than f32, and beyond what the coordinator reads as an update.
                if !(self.topk_fraction > 0.0 && self.topk_fraction <= 0.5) {
                    return Err(format!(
                        "compression.topk_fraction = {} must be in (0, 0.5]",
                        self.topk_fraction
                    ));
                }
                Ok(UpdateCodec::DeltaTopK {
                    fraction: self.topk_fraction,
                })
            }
            other => Err(format!(
                "compression.update = {other:?}: use f32, f16, int8 or topk"
            )),
        }
    }

    /// The codec of the global model.
    pub fn model_codec(&self) -> Result<UpdateCodec, String> {
        match self.model.as_str() {
            "f32" => Ok(UpdateCodec::F32),
            "f16" => Ok(UpdateCodec::F16),
            "int8" => Ok(UpdateCodec::Int8),
            other => Err(format!(
                "compression.model = {other:?}: use f32, f16 or int8"
            )),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let update = self.update_codec()?;
        let model = self.model_codec()?;
        if model != UpdateCodec::F32 && !update.is_delta() {
            return Err(format!(
                "compression.model = {} needs compression.update = f16, int8 or topk: devices then send changes, which the coordinator adds to its f32 model (f32 weights trained from a compressed model would carry its rounding into the next one)",
                self.model
            ));
        }
        Ok(())
    }
}

/// How simulated devices behave, for rehearsing what a real fleet does to a run. Every draw
/// comes from the run's seed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationSpec {
    /// Fraction of fit commands a simulated device fails (it reports a training error instead
    /// of an update). 0 by default.
    #[serde(default)]
    pub failure_rate: f64,
    /// Extra time a device takes to answer each fit (slow hardware, a slow link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<crate::device::LatencySpec>,
    /// Devices that go away and come back (asleep, out of coverage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<crate::device::AvailabilitySpec>,
    /// Devices that train only part of what they are asked (FedProx's stragglers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stragglers: Option<crate::device::StragglerSpec>,
    /// Malicious devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<crate::device::AttackSpec>,
}

/// Device selection for runs on a fleet: the most recently seen online devices of `fleet` with
/// at least `min_examples` local examples and data that fits the task, up to `count` (all of
/// them when absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesSpec {
    #[serde(default = "default_fleet")]
    pub fleet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    #[serde(default)]
    pub min_examples: u64,
}

fn default_fleet() -> String {
    "default".into()
}

impl Default for DevicesSpec {
    fn default() -> Self {
        Self {
            fleet: default_fleet(),
            count: None,
            min_examples: 0,
        }
    }
}

/// The data a simulation splits across its devices (and, for MNIST, where the test split
/// for centralized evaluation is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// A CSV file, a `.npy` features file or an MNIST folder; relative paths are tried from
    /// the current directory, then from the Pollen checkout.
    #[serde(alias = "dir")]
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// npy: labels or targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    /// Simulated devices the data is split across (a `column` partition makes one per value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<usize>,
    pub partition: Partition,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    /// Evaluate the global model on server-side data after every round: `data`, or the MNIST
    /// test split for MNIST runs.
    pub centralized: bool,
    /// The server's own holdout file, when it has one (same formats as `[data]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// npy: the labels of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Evaluate on the first N server examples only (quicker smoke runs); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_examples: Option<usize>,
}

fn default_eval_batch() -> usize {
    1000
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Finds a path as given, or relative to the Pollen checkout.
pub fn resolve_path(path: &Path) -> PathBuf {
    if path.is_absolute() || path.exists() {
        return path.to_path_buf();
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    if checkout.exists() {
        checkout
    } else {
        path.to_path_buf()
    }
}

impl RunSpec {
    /// Parses and validates a spec; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let spec: RunSpec = toml::from_str(text).map_err(|source| SpecError::Parse {
            origin: origin.to_string(),
            source,
        })?;
        spec.validate().map_err(|message| SpecError::Invalid {
            origin: origin.to_string(),
            message,
        })?;
        Ok(spec)
    }

    pub fn load(path: &Path) -> Result<(Self, String), SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let spec = Self::parse(&text, &path.display().to_string())?;
        Ok((spec, text))
    }

    pub fn default_spec() -> Self {
        Self::parse(DEFAULT_SPEC, "built-in mnist-2nn.toml").expect("the built-in spec is valid")
    }

    /// The task, MNIST classification for specs without a `[task]`.
    pub fn task(&self) -> TaskSpec {
        match &self.task {
            Some(t) => t.clone(),
            None => {
                let mut t = TaskSpec::new(TaskKind::Classification);
                t.classes = Some((0..10).map(|d| d.to_string()).collect());
                t.shape = Some(vec![1, 28, 28]);
                // The MNIST loader standardises pixels itself.
                t.normalize = Normalize::None;
                t
            }
        }
    }

    /// Whether devices evaluate the global model each round.
    pub fn federated_evaluation(&self) -> bool {
        self.strategy.fraction_evaluate > 0.0
    }

    /// Checks values that TOML types alone cannot; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        pollen_proto::topics::validate_id("name", &self.name).map_err(|e| e.to_string())?;
        pollen_proto::topics::validate_id("devices.fleet", &self.devices.fleet)
            .map_err(|e| e.to_string())?;
        if self.devices.count == Some(0) {
            return Err("devices.count must be at least 1 (or left out for all)".into());
        }
        if self.rounds == 0 {
            return Err("rounds must be at least 1".into());
        }
        if let Some(w) = &self.warm_start {
            w.validate()?;
        }
        if self.data.clients == Some(0) {
            return Err("data.clients must be at least 1".into());
        }
        if self.data.clients.is_none() && !matches!(self.data.partition, Partition::Column { .. }) {
            return Err(format!(
                "data.clients is needed for a {} partition (only a column partition counts its own)",
                self.data.partition.name()
            ));
        }
        if self.round_timeout.is_zero() {
            return Err("round_timeout must be longer than 0s".into());
        }
        let f = &self.strategy;
        f.validate()?;
        if let Some(clients) = self.data.clients
            && f.min_available_clients > clients
        {
            return Err(format!(
                "strategy.min_available_clients = {} exceeds data.clients = {clients}",
                f.min_available_clients
            ));
        }
        self.validate_learning()?;
        self.train.validate()?;
        if self.evaluate.batch_size == 0 {
            return Err("evaluate.batch_size must be at least 1".into());
        }
        let task = self.task();
        task.validate()?;
        if matches!(self.data.partition, Partition::Column { .. })
            && task.features.is_none()
            && task.features_except.is_none()
        {
            return Err("a column partition splits CSV rows: the task needs task.features or task.features_except".into());
        }
        if self.task.is_some() {
            if !self.evaluate.centralized && !self.federated_evaluation() {
                return Err(
                    "nothing evaluates the model: set evaluate.centralized = true with evaluate.data (a server-side holdout file), or strategy.fraction_evaluate > 0 (devices evaluate on their holdout)"
                        .into(),
                );
            }
            if self.evaluate.centralized && self.evaluate.data.is_none() {
                return Err(
                    "evaluate.centralized needs evaluate.data, the server's own holdout file"
                        .into(),
                );
            }
            if self.federated_evaluation() && task.holdout == Some(0.0) {
                return Err(
                    "strategy.fraction_evaluate > 0 asks devices to evaluate, but task.holdout = 0 keeps no data for it"
                        .into(),
                );
            }
        } else if self.data_format() != Some(Format::Mnist) {
            return Err(
                "a spec without [task] is an MNIST run: data.path must be an MNIST folder, or describe the task in [task]"
                    .into(),
            );
        }
        // The model must fit the task wherever the input shape is already known (classes the
        // data will tell count as two here: what matters is the input).
        if let Ok(mut manifest) = self.manifest_with(task.clone())
            && manifest.task.shape.is_some()
        {
            if task.kind == TaskKind::Classification && manifest.task.classes.is_none() {
                manifest.task.classes = Some(vec!["a".into(), "b".into()]);
            }
            let io = manifest.io()?;
            self.model.check(&io).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Checks what privacy, compression, FedBuff and the simulated fleet ask for, alone and
    /// together with the strategy.
    fn validate_learning(&self) -> Result<(), String> {
        let name = self.strategy.name;
        if let Some(p) = &self.privacy {
            p.validate()?;
            if p.mechanism == Mechanism::Central
                && !matches!(
                    name,
                    StrategyName::Fedavg
                        | StrategyName::Fedavgm
                        | StrategyName::Fedprox
                        | StrategyName::Fedadam
                        | StrategyName::Fedyogi
                        | StrategyName::Fedadagrad
                )
            {
                return Err(format!(
                    "central DP calibrates its noise to a mean of clipped updates; strategy {} combines updates another way (use fedavg, fedavgm, fedprox or the fedopt family)",
                    name.as_str()
                ));
            }
            if self.fedbuff.is_some() {
                return Err(
                    "[privacy] with [fedbuff]: the accountant composes sampled rounds, which FedBuff does not have"
                        .into(),
                );
            }
        }
        if let Some(c) = &self.compression {
            c.validate()?;
        }
        if let Some(b) = &self.fedbuff {
            b.validate()?;
            if !matches!(name, StrategyName::Fedavg | StrategyName::Fedprox) {
                return Err(format!(
                    "[fedbuff] buffers staleness-weighted changes itself; strategy {} cannot be combined with it (use fedavg, or fedprox for its proximal term)",
                    name.as_str()
                ));
            }
            if self.strategy.close_after.is_some() {
                return Err("strategy.close_after is for synchronous rounds, not [fedbuff]".into());
            }
        }
        self.simulation.validate()
    }

    /// The data format of `[data]`, given or guessed.
    pub fn data_format(&self) -> Option<Format> {
        self.data
            .format
            .or_else(|| Format::guess(&resolve_path(&self.data.path)))
    }

    /// The simulation's data source.
    pub fn data_source(&self) -> DataSource {
        DataSource {
            path: resolve_path(&self.data.path),
            format: self.data.format,
            labels: self.data.labels.as_deref().map(resolve_path),
            shard: None,
            seed: self.seed,
        }
    }

    /// The server-side holdout for centralized evaluation: `evaluate.data`, or MNIST's test
    /// split for MNIST runs. `None` when the run does not evaluate centrally.
    pub fn server_data(&self) -> Option<(DataSource, bool)> {
        if !self.evaluate.centralized {
            return None;
        }
        match &self.evaluate.data {
            Some(path) => Some((
                DataSource {
                    path: resolve_path(path),
                    format: None,
                    labels: self.evaluate.labels.as_deref().map(resolve_path),
                    shard: None,
                    seed: self.seed,
                },
                false,
            )),
            // MNIST: the t10k split of the data folder.
            None => Some((self.data_source(), true)),
        }
    }

    /// The manifest of this spec with `task` (resolved as far as the caller could).
    pub fn manifest_with(&self, mut task: TaskSpec) -> Result<TaskManifest, String> {
        if task.holdout.is_none() {
            // Data is held out on devices only when they evaluate on it.
            task.holdout = Some(if self.federated_evaluation() {
                0.2
            } else {
                0.0
            });
        }
        if task.shape.is_none()
            && let Some(features) = &task.features
        {
            task.shape = Some(match &task.window {
                Some(w) => vec![features.len(), w.length],
                None => vec![features.len()],
            });
        }
        Ok(TaskManifest {
            version: MANIFEST_VERSION,
            name: self.name.clone(),
            seed: self.seed,
            task,
            model: self.model.clone(),
            train: self.train.clone(),
            fitted: Default::default(),
        })
    }

    /// The spec as TOML (what is saved next to the run's records).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunSpec always serializes")
    }

    /// The fit config every sampled client receives: local training's settings (`eta_l`, the
    /// FedOpt family's client learning rate, overriding `train.learning_rate`), FedProx's
    /// `proximal_mu`, and the update codec.
    pub fn fit_config(&self) -> ScalarMap {
        let mut m = ScalarMap::new();
        m.insert(
            "local_epochs".into(),
            scalar::int(self.train.local_epochs as i64),
        );
        m.insert(
            "batch_size".into(),
            scalar::int(self.train.batch_size as i64),
        );
        m.insert(
            "learning_rate".into(),
            scalar::f64(self.strategy.eta_l.unwrap_or(self.train.learning_rate)),
        );
        if let Some(mu) = self.strategy.proximal_mu {
            m.insert("proximal_mu".into(), scalar::f64(mu));
        }
        if let Some(budget) = self.train.time_budget {
            m.insert(
                "time_budget_ms".into(),
                scalar::f64(budget.as_secs_f64() * 1000.0),
            );
        }
        if let Some(codec) = self
            .compression
            .as_ref()
            .and_then(|c| c.update_codec().ok())
            .filter(|c| *c != UpdateCodec::F32)
        {
            m.insert("update_codec".into(), scalar::string(codec.to_string()));
        }
        m
    }

    /// The evaluate config every client sampled for federated evaluation receives.
    pub fn evaluate_config(&self) -> ScalarMap {
        let mut m = ScalarMap::new();
        m.insert(
            "batch_size".into(),
            scalar::int(self.evaluate.batch_size as i64),
        );
        m
    }
}

#[cfg(test)]
mod tests;
