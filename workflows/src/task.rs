//! From a run spec to the task manifest the coordinator publishes: resolving what the spec
//! leaves open (feature columns, classes, the input shape) against whatever the workflow can
//! see — a simulation's data file, the schemas devices announce, or nothing — fitting the rest
//! from federated statistics, and evaluating on the server's own holdout when it has one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use pollen_coordinator::Fitted;
use pollen_coordinator::fedavg::{EvaluateFn, MetricsAggregationFn};
use pollen_coordinator::statistics::FederatedStatistics;
use pollen_coordinator::strategy::Evaluation;
use pollen_coordinator::task::TaskSetup;
use pollen_proxy::{DataRequirement, DeviceRecord};
use pollen_train::data::arrays::MnistSplit;
use pollen_train::data::prepare::{label_names, sorted_labels};
use pollen_train::data::{LocalData, Raw};
use pollen_train::manifest::{Normalize, Scaling, TaskKind, TaskManifest, TaskSpec};
use pollen_train::{Task, data};

use crate::spec::RunSpec;
use crate::torchscript;

/// The task once the run has fitted it (set by the statistics phase, or at once without one).
pub type FinalTask = Arc<OnceLock<Task>>;

/// Resolves `features_except` against a list of columns.
fn resolve_features(task: &mut TaskSpec, columns: &[String]) {
    if let Some(except) = task.features_except.take() {
        let roles = task.role_columns();
        task.features = Some(
            columns
                .iter()
                .filter(|c| !except.contains(c) && !roles.contains(&c.as_str()))
                .cloned()
                .collect(),
        );
    }
}

/// The manifest of `spec`, resolved against data the workflow holds (a simulation's file).
pub fn resolve_with_data(spec: &RunSpec, raw: &Raw) -> anyhow::Result<TaskManifest> {
    let mut task = spec.task();
    match raw {
        Raw::Table(t) => resolve_features(&mut task, t.names()),
        Raw::Arrays(a) => {
            if task.shape.is_none() {
                task.shape = Some(a.shape.clone());
            }
        }
    }
    if task.kind == TaskKind::Classification && task.classes.is_none() {
        task.classes = Some(label_names(raw, &task)?);
    }
    finish(spec, task)
}

/// The manifest of `spec`, resolved against the schemas `devices` announce (`pollen run`):
/// `features_except` from the first device with a header; classes are left to the devices'
/// federated label counts.
pub fn resolve_with_devices(
    spec: &RunSpec,
    devices: &[DeviceRecord],
) -> anyhow::Result<TaskManifest> {
    let mut task = spec.task();
    if task.features_except.is_some() {
        let header = devices
            .iter()
            .filter_map(|d| d.data.as_ref())
            .find(|d| !d.columns.is_empty())
            .map(|d| d.columns.clone())
            .context("task.features_except needs a device that announces its CSV header; list task.features instead")?;
        resolve_features(&mut task, &header);
    }
    if task.shape.is_none() && task.features.is_none() {
        let shape = devices
            .iter()
            .filter_map(|d| d.data.as_ref())
            .find(|d| !d.example_shape.is_empty())
            .map(|d| {
                d.example_shape
                    .iter()
                    .map(|&x| x as usize)
                    .collect::<Vec<_>>()
            });
        task.shape = shape;
    }
    finish(spec, task)
}

/// The manifest of `spec` resolved from the spec alone (`pollen coordinator`, which sees no
/// data before clients join).
pub fn resolve_blind(spec: &RunSpec) -> anyhow::Result<TaskManifest> {
    let task = spec.task();
    anyhow::ensure!(
        task.features_except.is_none(),
        "task.features_except is resolved against data this command does not see; list the columns in task.features (`pollen data inspect FILE` prints them)"
    );
    finish(spec, task)
}

fn finish(spec: &RunSpec, task: TaskSpec) -> anyhow::Result<TaskManifest> {
    let mut manifest = spec.manifest_with(task).map_err(anyhow::Error::msg)?;
    torchscript::pin(&mut manifest)?;
    anyhow::ensure!(
        manifest.task.shape.is_some(),
        "the input shape of the task cannot be told: give task.features (CSV) or task.shape (arrays)"
    );
    Ok(manifest)
}

/// Whether the manifest must be fitted from federated statistics before round 1.
pub fn needs_statistics(m: &TaskManifest) -> bool {
    m.task.normalize == Normalize::Federated
        || (m.task.kind == TaskKind::Classification && m.task.classes.is_none())
}

/// What devices must hold for this task, to select them by their announced schema.
pub fn requirement(m: &TaskManifest) -> DataRequirement {
    match &m.task.features {
        Some(features) => {
            let mut columns = features.clone();
            columns.extend(m.task.role_columns().into_iter().map(String::from));
            DataRequirement {
                columns,
                example_values: None,
            }
        }
        None => DataRequirement {
            columns: Vec::new(),
            example_values: m
                .task
                .shape
                .as_ref()
                .map(|s| s.iter().product::<usize>() as u64),
        },
    }
}

/// `m` with what federated statistics tell: per-channel scaling (and target scaling for
/// regression) when normalisation is federated, and the classes when the spec left them to the
/// devices' labels.
pub fn fit(m: &TaskManifest, stats: &FederatedStatistics) -> Result<TaskManifest, String> {
    let mut m = m.clone();
    if m.task.kind == TaskKind::Classification && m.task.classes.is_none() {
        let classes = sorted_labels(stats.label_counts.keys().cloned().collect());
        if classes.len() < 2 {
            return Err(format!(
                "the devices' labels hold {} class(es) ({classes:?}); a classifier needs at least 2",
                classes.len()
            ));
        }
        m.task.classes = Some(classes);
    }
    if m.task.normalize == Normalize::Federated {
        let f = &stats.features;
        m.fitted.features = Some(Scaling {
            mean: f.mean().to_vec(),
            std: f.std(),
        });
        if let Some(t) = &stats.targets {
            m.fitted.targets = Some(Scaling {
                mean: t.mean().to_vec(),
                std: t.std(),
            });
        }
    }
    m.validate()?;
    Ok(m)
}

/// The coordinator's task: the manifest, and the statistics phase when it needs one. The
/// final task lands in `done`.
pub fn setup(manifest: TaskManifest, done: FinalTask) -> anyhow::Result<TaskSetup> {
    let files = torchscript::files(&manifest)?;
    if !needs_statistics(&manifest) {
        let task = torchscript::task_with_files(manifest.clone(), &files)?;
        let _ = done.set(task);
        return Ok(TaskSetup::fixed(manifest.to_bytes()).with_files(files));
    }
    let query = manifest.to_bytes();
    let task_files = files.clone();
    let fit_manifest = move |stats: &FederatedStatistics| -> Result<Fitted, String> {
        let fitted = fit(&manifest, stats)?;
        let task = torchscript::task_with_files(fitted.clone(), &task_files)
            .map_err(|e| format!("{e:#}"))?;
        let initial = torchscript::initial_parameters(&task).map_err(|e| format!("{e:#}"))?;
        tracing::info!(
            classes = ?fitted.task.classes,
            scaling = ?fitted.fitted.features,
            "task fitted from federated statistics"
        );
        let _ = done.set(task);
        Ok(Fitted {
            manifest: fitted.to_bytes().into(),
            initial,
        })
    };
    Ok(TaskSetup {
        manifest: query.into(),
        statistics: Some(Box::new(fit_manifest)),
        files,
    })
}

/// The coordinator's task for a resumed run: the manifest its rounds used (`task.json`), byte
/// for byte so that its digest (and the devices' cached copies) stay the same, with no
/// statistics phase. The manifest parsed, and the setup.
pub fn setup_recorded(
    bytes: Vec<u8>,
    done: FinalTask,
) -> anyhow::Result<(TaskManifest, TaskSetup)> {
    let manifest = TaskManifest::parse(&bytes).context("the run's recorded task.json")?;
    let files = torchscript::files(&manifest)?;
    let task = torchscript::task_with_files(manifest.clone(), &files)?;
    let _ = done.set(task);
    Ok((manifest, TaskSetup::fixed(bytes).with_files(files)))
}

/// Federated evaluation metrics of this kind of task, aggregated exactly.
pub fn metrics_aggregation(m: &TaskManifest) -> MetricsAggregationFn {
    let (kind, quantile) = (m.task.kind, m.task.threshold_quantile);
    Box::new(move |results: &[(u64, &BTreeMap<String, f64>)]| {
        pollen_train::metrics::aggregate(kind, quantile, results)
    })
}

/// Reads the server's holdout (`evaluate.data`, or MNIST's test split), if the spec has one.
pub fn server_data(spec: &RunSpec) -> anyhow::Result<Option<Raw>> {
    let Some((source, mnist_test)) = spec.server_data() else {
        return Ok(None);
    };
    let raw = if mnist_test {
        source.read_split(MnistSplit::Test)
    } else {
        source.read()
    }
    .with_context(|| format!("reading the server's holdout {}", source.path.display()))?;
    Ok(Some(raw))
}

/// Centralized evaluation of each round's model on the server's holdout, with the final task
/// (its scaling included). The data is prepared once, at the first evaluation.
pub fn server_evaluator(
    raw: Raw,
    batch_size: usize,
    first: Option<usize>,
    done: FinalTask,
) -> EvaluateFn {
    let prepared: Mutex<Option<(LocalData, Vec<usize>)>> = Mutex::new(None);
    Box::new(move |_round, params| {
        let task = done.get()?;
        let mut slot = prepared.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            match task.prepare(&raw) {
                Ok(mut local) => {
                    // All of it is held out: the server trains on nothing.
                    let mut all: Vec<usize> = (0..local.examples.len()).collect();
                    if let Some(n) = first {
                        all.truncate(n);
                    }
                    local.train.clear();
                    *slot = Some((local, all));
                }
                Err(e) => {
                    tracing::error!("the server's holdout does not fit the task: {e}");
                    return None;
                }
            }
        }
        let (local, idx) = slot.as_ref()?;
        match task.evaluate(local, idx, params, batch_size) {
            Ok((loss, n, metrics)) => {
                let numeric: BTreeMap<String, f64> =
                    pollen_proto::scalar::numeric_entries(&metrics)
                        .map(|(k, v)| (k.to_string(), v))
                        .collect();
                Some(Evaluation {
                    loss,
                    metrics: task.aggregate(&[(n, &numeric)]),
                })
            }
            Err(e) => {
                tracing::error!("centralized evaluation failed: {e}");
                None
            }
        }
    })
}

/// Each simulated device's share of the data as the task sees it, for the run's records.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceShare {
    pub device: String,
    pub rows: usize,
    pub examples: usize,
    pub train: usize,
    pub holdout: usize,
    /// Examples per label (classification and labelled anomaly detection).
    pub labels: BTreeMap<String, usize>,
}

/// What a device's share looks like under `task`.
pub fn share(device: &str, raw: &Raw, task: &Task) -> anyhow::Result<DeviceShare> {
    let local = task
        .prepare(raw)
        .with_context(|| format!("device {device}'s data"))?;
    let names = data::prepare::label_names(raw, &task.manifest.task)?;
    let mut labels = BTreeMap::new();
    if let Some(l) = &local.examples.labels {
        for &y in l {
            let name = names
                .get(y as usize)
                .cloned()
                .unwrap_or_else(|| y.to_string());
            *labels.entry(name).or_insert(0) += 1;
        }
    }
    Ok(DeviceShare {
        device: device.to_string(),
        rows: raw.rows(),
        examples: local.examples.len(),
        train: local.train.len(),
        holdout: local.holdout.len(),
        labels,
    })
}
