//! A simulation's data: the spec's file read once, the task resolved against it, and the
//! rows split into one share per simulated device by the spec's partition. Series (the task's
//! group column) are split whole, so that no window spans two devices.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use pollen_train::Task;
use pollen_train::data::partition::{Partition, by_key};
use pollen_train::data::table::{label_of, number_label};
use pollen_train::data::{Format, Raw};
use pollen_train::manifest::{TaskKind, TaskManifest};

use crate::spec::RunSpec;
use crate::task::{self, DeviceShare};

/// What `pollen simulate` trains on.
pub struct SimulationData {
    /// The task, resolved against the file (fitted later from federated statistics).
    pub manifest: TaskManifest,
    /// One share of the rows per device.
    pub shares: Vec<Raw>,
    pub format: Format,
    /// The server's holdout, when the spec evaluates centrally.
    pub server: Option<Raw>,
    /// Per device: rows, examples, holdout and labels (recorded as `partition.json`).
    pub report: Vec<DeviceShare>,
}

/// The units a partition hands out (rows, or the rows of one series each).
struct Units {
    rows: Vec<Vec<usize>>,
    /// Each unit's class (its most frequent label), when the task has labels.
    labels: Option<Vec<u32>>,
}

fn mode(classes: impl Iterator<Item = u32>) -> u32 {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for c in classes {
        *counts.entry(c).or_insert(0) += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(c, n)| (n, std::cmp::Reverse(c)))
        .map_or(0, |(c, _)| c)
}

/// Each row's class under the task, when it has one.
fn row_classes(raw: &Raw, m: &TaskManifest) -> anyhow::Result<Option<Vec<u32>>> {
    let t = &m.task;
    let class_index = |label: &str| -> u32 {
        match t.kind {
            TaskKind::Anomaly => u32::from(label != label_of(t.normal_label())),
            _ => t
                .classes
                .as_ref()
                .and_then(|c| c.iter().position(|x| x == label))
                .map_or(u32::MAX, |i| i as u32),
        }
    };
    let labels: Option<Vec<String>> = match (raw, &t.label) {
        (_, _) if t.kind == TaskKind::Regression => None,
        (Raw::Table(table), Some(column)) => Some(
            table
                .labels(column)?
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect(),
        ),
        (Raw::Arrays(a), _) => {
            a.y.as_ref()
                .map(|y| y.iter().map(|&v| number_label(v)).collect())
        }
        _ => None,
    };
    Ok(labels.map(|l| l.iter().map(|x| class_index(x)).collect()))
}

fn units(raw: &Raw, m: &TaskManifest) -> anyhow::Result<Units> {
    let classes = row_classes(raw, m)?;
    let rows: Vec<Vec<usize>> = match (raw, &m.task.group) {
        (Raw::Table(table), Some(group)) => by_key(&table.texts(group)?),
        _ => (0..raw.rows()).map(|r| vec![r]).collect(),
    };
    let labels = classes.map(|c| {
        rows.iter()
            .map(|unit| mode(unit.iter().map(|&r| c[r]).filter(|&k| k != u32::MAX)))
            .collect()
    });
    Ok(Units { rows, labels })
}

impl SimulationData {
    /// Reads and splits the spec's data.
    pub fn load(spec: &RunSpec) -> anyhow::Result<Self> {
        let source = spec.data_source();
        let format = source.format()?;
        let raw = source
            .read()
            .with_context(|| format!("reading {}", source.path.display()))?;
        let manifest = task::resolve_with_data(spec, &raw)?;
        let units = units(&raw, &manifest)?;
        let parts: Vec<Vec<usize>> = match &spec.data.partition {
            Partition::Column { column } => {
                let Raw::Table(table) = &raw else {
                    anyhow::bail!(
                        "a column partition splits CSV rows; {} holds arrays",
                        raw.origin()
                    );
                };
                let keys = table.texts(column)?;
                // A series goes where its first row's value says.
                let unit_keys: Vec<&str> = units.rows.iter().map(|u| keys[u[0]]).collect();
                by_key(&unit_keys)
            }
            partition => {
                let clients = spec
                    .data
                    .clients
                    .context("data.clients is needed for this partition")?;
                partition
                    .split(
                        units.labels.as_deref(),
                        units.rows.len(),
                        clients,
                        spec.seed,
                    )
                    .with_context(|| format!("partitioning {}", raw.origin()))?
            }
        };
        let task = Task::new(manifest.clone()).context("the run's task")?;
        let mut shares = Vec::with_capacity(parts.len());
        let mut report = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let mut rows: Vec<usize> = part
                .iter()
                .flat_map(|&u| units.rows[u].iter().copied())
                .collect();
            // Tables keep file order (readings of a series in sequence); arrays keep the
            // partition's order, as devices would have received their examples.
            if matches!(raw, Raw::Table(_)) {
                rows.sort_unstable();
            }
            let share = raw.select(&rows);
            report.push(task::share(&format!("sim-{i:04}"), &share, &task)?);
            shares.push(share);
        }
        let server = task::server_data(spec)?;
        Ok(Self {
            manifest,
            shares,
            format,
            server,
            report,
        })
    }

    /// One line for the person who started the simulation.
    pub fn summary(&self) -> String {
        let examples: Vec<usize> = self.report.iter().map(|d| d.examples).collect();
        let (min, max) = (
            examples.iter().min().copied().unwrap_or(0),
            examples.iter().max().copied().unwrap_or(0),
        );
        let labels: HashMap<&str, usize> = self
            .report
            .iter()
            .flat_map(|d| d.labels.iter().map(|(k, v)| (k.as_str(), *v)))
            .fold(HashMap::new(), |mut acc, (k, v)| {
                *acc.entry(k).or_insert(0) += v;
                acc
            });
        format!(
            "{} devices, {}..{} examples each ({} in all, {} labels), input {:?}",
            self.report.len(),
            min,
            max,
            examples.iter().sum::<usize>(),
            labels.len(),
            self.manifest.task.shape.as_deref().unwrap_or_default()
        )
    }
}
