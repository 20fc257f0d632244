//! The task manifest: what a run asks every device to learn, as one JSON document named by its
//! SHA-256.
//!
//! A manifest holds the task (kind, input schema, holdout, normalisation mode), the model (a
//! family and its settings), the local-training config and what the run fitted from federated
//! statistics (feature and target scaling). It is *resolved*: feature columns, classes and the
//! input shape are explicit, so every device builds the same model and reads its data the same
//! way. The run spec's `[task]`, `[model]` and `[train]` sections are these same types.

use serde::{Deserialize, Deserializer, Serialize};

use crate::model::{ModelIo, ModelSpec};

/// Version of the manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// What is learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// One label per example out of `classes`: cross-entropy; accuracy and macro-F1.
    Classification,
    /// One numeric target per example: mean squared error; RMSE, MAE and R².
    Regression,
    /// An autoencoder learns normal data: reconstruction error is the anomaly score; ROC AUC
    /// when labels exist, and a threshold from the federated score distribution.
    Anomaly,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Classification => "classification",
            TaskKind::Regression => "regression",
            TaskKind::Anomaly => "anomaly",
        }
    }

    /// The metric a run of this kind is judged by (in rounds' `metrics`).
    pub fn primary_metric(self) -> &'static str {
        match self {
            TaskKind::Classification => "accuracy",
            TaskKind::Regression => "rmse",
            TaskKind::Anomaly => "auc",
        }
    }
}

/// How long-format time series (one row per reading) are cut into examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Readings per window.
    pub length: usize,
    /// Readings between the starts of consecutive windows; `length` (no overlap) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    /// Largest step of the time column inside a window; a longer gap starts a new segment
    /// (in the time column's unit: seconds for timestamps). No limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gap: Option<f64>,
}

impl WindowSpec {
    pub fn stride(&self) -> usize {
        self.stride.unwrap_or(self.length)
    }
}

/// Where feature scaling comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Per-channel mean and standard deviation from federated statistics, fitted before round
    /// 1 (targets too, for regression).
    #[default]
    Federated,
    /// Values are used as they are (the data is already scaled, as the MNIST loader does).
    None,
}

/// What a missing value (an empty cell) in a feature, label or target column means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// The data does not fit: the error names the file, line and column.
    #[default]
    Error,
    /// The row is left out.
    Drop,
}

/// The learning problem and the input schema devices check their data against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub kind: TaskKind,
    /// CSV feature columns, in order (the channels of a window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
    /// CSV: every column but these (and the label, target, time and group columns) is a
    /// feature. Resolved into `features` before a run starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features_except: Option<Vec<String>>,
    /// The label column (classification; optional for anomaly detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The target column (regression). For windows, the target of the window's last reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Orders readings within a group (numbers, or timestamps such as
    /// `2024-05-01T12:00:00Z` / `2024-05-01 12:00:00.015`, in seconds); file order without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// One series per value (a recording, a machine): windows never cross it, and the local
    /// holdout takes whole series.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Cut long-format series into windows of `[features, length]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSpec>,
    /// Classification: the label set, in class-index order. Resolved from the data (or the
    /// devices' federated label counts) when absent.
    #[serde(
        default,
        deserialize_with = "strings_or_numbers",
        skip_serializing_if = "Option::is_none"
    )]
    pub classes: Option<Vec<String>>,
    /// Anomaly detection: the label value of normal examples ("0" when absent); every other
    /// value is an anomaly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normal_label: Option<String>,
    /// The shape of one example as the model sees it: `[features]`, `[channels, length]` for
    /// windows, `[channels, height, width]` for images. Resolved from the data when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Vec<usize>>,
    /// Fraction of each device's data kept out of training for federated evaluation. 0.2 when
    /// the run evaluates on devices, 0 when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<f64>,
    #[serde(default)]
    pub normalize: Normalize,
    /// Anomaly detection: the quantile of normal examples' scores that becomes the threshold.
    #[serde(default = "default_quantile")]
    pub threshold_quantile: f64,
    #[serde(default)]
    pub missing: Missing,
}

fn default_quantile() -> f64 {
    0.99
}

impl TaskSpec {
    /// A task with every optional field left out.
    pub fn new(kind: TaskKind) -> Self {
        Self {
            kind,
            features: None,
            features_except: None,
            label: None,
            target: None,
            time: None,
            group: None,
            window: None,
            classes: None,
            normal_label: None,
            shape: None,
            holdout: None,
            normalize: Normalize::default(),
            threshold_quantile: default_quantile(),
            missing: Missing::default(),
        }
    }

    /// The holdout fraction (0 unless set).
    pub fn holdout(&self) -> f64 {
        self.holdout.unwrap_or(0.0)
    }

    /// The label value of normal examples (anomaly detection).
    pub fn normal_label(&self) -> &str {
        self.normal_label.as_deref().unwrap_or("0")
    }

    /// Columns that are not features: label, target, time and group.
    pub fn role_columns(&self) -> Vec<&str> {
        [&self.label, &self.target, &self.time, &self.group]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    /// Checks what can be checked without data; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let holdout = self.holdout();
        if !(0.0..1.0).contains(&holdout) {
            return Err(format!(
                "task.holdout = {holdout} must be at least 0 and below 1"
            ));
        }
        if self.features.is_some() && self.features_except.is_some() {
            return Err("task.features and task.features_except exclude each other".into());
        }
        if let Some(features) = &self.features {
            if features.is_empty() {
                return Err("task.features is empty".into());
            }
            if let Some(dup) = first_duplicate(features) {
                return Err(format!("task.features names {dup:?} twice"));
            }
            for role in self.role_columns() {
                if features.iter().any(|f| f == role) {
                    return Err(format!(
                        "task.features includes {role:?}, which is the label, target, time or group column"
                    ));
                }
            }
        }
        match self.kind {
            TaskKind::Classification => {
                if self.target.is_some() {
                    return Err(
                        "task.target is for regression; classification reads task.label".into(),
                    );
                }
                if let Some(classes) = &self.classes {
                    if classes.len() < 2 {
                        return Err(format!(
                            "task.classes has {} entries; a classifier needs at least 2",
                            classes.len()
                        ));
                    }
                    if let Some(dup) = first_duplicate(classes) {
                        return Err(format!("task.classes names {dup:?} twice"));
                    }
                }
            }
            TaskKind::Regression => {
                if self.label.is_some() || self.classes.is_some() {
                    return Err(
                        "task.label and task.classes are for classification; regression reads task.target"
                            .into(),
                    );
                }
            }
            TaskKind::Anomaly => {
                if self.target.is_some() || self.classes.is_some() {
                    return Err(
                        "anomaly detection takes an optional task.label (and task.normal_label), not task.target or task.classes"
                            .into(),
                    );
                }
                let q = self.threshold_quantile;
                if !(q > 0.0 && q < 1.0) {
                    return Err(format!(
                        "task.threshold_quantile = {q} must be between 0 and 1"
                    ));
                }
            }
        }
        if let Some(w) = &self.window {
            if w.length == 0 || w.stride() == 0 {
                return Err("task.window.length and task.window.stride must be at least 1".into());
            }
            if let Some(gap) = w.max_gap
                && !(gap.is_finite() && gap > 0.0)
            {
                return Err(format!(
                    "task.window.max_gap = {gap} must be a positive number"
                ));
            }
            if w.max_gap.is_some() && self.time.is_none() {
                return Err(
                    "task.window.max_gap needs task.time, the column gaps are measured in".into(),
                );
            }
        }
        if let Some(shape) = &self.shape
            && (shape.is_empty() || shape.contains(&0))
        {
            return Err(format!(
                "task.shape = {shape:?} must be non-empty with no zero"
            ));
        }
        Ok(())
    }
}

fn first_duplicate(names: &[String]) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    names
        .iter()
        .find(|n| !seen.insert(n.as_str()))
        .map(String::as_str)
}

/// Accepts `classes = ["a", "b"]` as well as `classes = [0, 1]` (labels are compared as text).
fn strings_or_numbers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Label {
        Text(String),
        Int(i64),
        Float(f64),
    }
    let labels: Option<Vec<Label>> = Option::deserialize(d)?;
    Ok(labels.map(|labels| {
        labels
            .into_iter()
            .map(|l| match l {
                Label::Text(s) => s,
                Label::Int(i) => i.to_string(),
                Label::Float(f) => crate::data::table::number_label(f),
            })
            .collect()
    }))
}

/// Which optimizer local training uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Plain minibatch SGD (McMahan et al.), with optional momentum and L2 weight decay.
    #[default]
    Sgd,
    /// Adam with optional L2 weight decay.
    Adam,
    /// Adam with decoupled weight decay.
    Adamw,
}

/// Local training: the optimizer and its settings. All randomness is seeded from the run's
/// seed, the device and the round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// E: passes over the local training data per round.
    pub local_epochs: usize,
    /// B: examples per minibatch.
    pub batch_size: usize,
    pub learning_rate: f64,
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// SGD momentum (0: none).
    #[serde(default)]
    pub momentum: f64,
    /// L2 penalty (SGD, Adam) or decoupled decay rate (AdamW).
    #[serde(default)]
    pub weight_decay: f64,
    /// Clips each parameter's gradient to this L2 norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// FedProx's mu: local training minimises `loss + mu / 2 * |w - w_global|^2`, which keeps
    /// a device's model near the global one on non-IID data (0: plain local training). The
    /// `fedprox` strategy sends it in the fit config.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub proximal_mu: f64,
    /// Stop local training once this much time is spent (at a minibatch boundary, after one
    /// minibatch at least) and send what was learned: FedProx's "variable amount of work", so
    /// that a slow device contributes before the round's deadline instead of missing it.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub time_budget: Option<std::time::Duration>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl TrainSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.local_epochs == 0 || self.batch_size == 0 {
            return Err("train.local_epochs and train.batch_size must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!(
                "train.learning_rate = {} must be a positive number",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!(
                "train.momentum = {} must be at least 0 and below 1",
                self.momentum
            ));
        }
        if self.momentum > 0.0 && self.optimizer != OptimizerKind::Sgd {
            return Err("train.momentum is an SGD setting; Adam and AdamW keep their own".into());
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "train.weight_decay = {} must be 0 or a positive number",
                self.weight_decay
            ));
        }
        if let Some(clip) = self.clip_grad_norm
            && !(clip.is_finite() && clip > 0.0)
        {
            return Err(format!(
                "train.clip_grad_norm = {clip} must be a positive number"
            ));
        }
        if self.time_budget.is_some_and(|b| b.is_zero()) {
            return Err("train.time_budget must be longer than 0s (or left out)".into());
        }
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return Err(format!(
                "train.proximal_mu = {} must be 0 or a positive number",
                self.proximal_mu
            ));
        }
        Ok(())
    }
}

/// Per-channel affine scaling: `(x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Scaling {
    /// Standard deviations this small are treated as 1: a constant channel stays constant
    /// instead of blowing up.
    pub const MIN_STD: f64 = 1e-12;

    pub fn std_or_one(&self, channel: usize) -> f64 {
        let s = self.std[channel];
        if s > Self::MIN_STD { s } else { 1.0 }
    }

    /// A regression target in the units the model predicts (standardised).
    pub fn standardize_target(&self, y: f32) -> f32 {
        ((f64::from(y) - self.mean[0]) / self.std_or_one(0)) as f32
    }

    /// A prediction back in the target's own units.
    pub fn restore_target(&self, y: f64) -> f64 {
        y * self.std_or_one(0) + self.mean[0]
    }
}

/// What the run fitted before round 1.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fitted {
    /// Feature scaling per channel, from federated statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Scaling>,
    /// Target scaling (regression): predictions are made in scaled units and reported in the
    /// target's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Scaling>,
}

/// The document every instruction of a run references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskManifest {
    /// [`MANIFEST_VERSION`]; a device refuses versions it does not know.
    pub version: u32,
    /// The run spec's name.
    pub name: String,
    /// The run's seed; every random choice on a device derives from it.
    pub seed: u64,
    pub task: TaskSpec,
    pub model: ModelSpec,
    pub train: TrainSpec,
    #[serde(default)]
    pub fitted: Fitted,
}

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the task manifest is not valid JSON for this agent: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "the task manifest has version {0}; this agent reads version {MANIFEST_VERSION} (upgrade the agent)"
    )]
    Version(u32),
    #[error("the task manifest is inconsistent: {0}")]
    Invalid(String),
}

impl TaskManifest {
    /// Reads a manifest (as received, digest already verified); [`crate::Task::new`] checks
    /// it.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let Version { version } = serde_json::from_slice(bytes)?;
        if version != MANIFEST_VERSION {
            return Err(ManifestError::Version(version));
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The manifest's bytes (what its digest is taken over).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serializes")
    }

    /// Checks the manifest is resolved and consistent.
    pub fn validate(&self) -> Result<(), String> {
        self.task.validate()?;
        self.train.validate()?;
        if self.task.features_except.is_some() {
            return Err("task.features_except is not resolved into task.features".into());
        }
        if self.task.kind == TaskKind::Classification && self.task.classes.is_none() {
            return Err("task.classes is not resolved".into());
        }
        let io = self.io()?;
        self.model.check(&io).map_err(|e| e.to_string())?;
        if let Some(s) = &self.fitted.features {
            let channels = io.channels();
            if s.mean.len() != channels || s.std.len() != channels {
                return Err(format!(
                    "fitted.features has {} channels; the input has {channels}",
                    s.mean.len()
                ));
            }
        }
        Ok(())
    }

    /// The model's input and output sizes.
    pub fn io(&self) -> Result<ModelIo, String> {
        let input = self
            .task
            .shape
            .clone()
            .ok_or("task.shape (the input shape) is not resolved")?;
        let outputs = match self.task.kind {
            TaskKind::Classification => self.task.classes.as_ref().map_or(0, Vec::len),
            TaskKind::Regression => 1,
            TaskKind::Anomaly => input.iter().product(),
        };
        Ok(ModelIo {
            kind: self.task.kind,
            input,
            outputs,
        })
    }
}
