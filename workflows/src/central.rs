//! `pollen central`: the centralized baseline of a simulation spec. The same model is trained
//! on the union of the simulated devices' training examples (the same shares, holdouts and
//! preprocessing as the federated run, with scaling from the union's statistics), then
//! evaluated as the federated run is: on the server's holdout when the spec has one, else on
//! the union of the devices' holdouts. What is left between the two numbers is the cost of
//! federation.

use std::time::Instant;

use anyhow::Context;
use pollen_coordinator::statistics::Combiner;
use pollen_proto::scalar::numeric_entries;
use pollen_train::data::{Examples, LocalData};
use pollen_train::{Task, TrainSpec};
use serde::Serialize;

use crate::shares::SimulationData;
use crate::spec::RunSpec;

/// One epoch of the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Epoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub loss: f64,
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub seconds: f64,
}

/// What `pollen central` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CentralReport {
    pub spec: String,
    pub metric: String,
    pub evaluated_on: String,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub epochs: Vec<Epoch>,
    /// The metric after the last epoch.
    pub final_value: Option<f64>,
    pub seconds: f64,
}

/// Concatenates devices' prepared data: their training examples, and their holdouts.
fn union(parts: Vec<LocalData>) -> anyhow::Result<LocalData> {
    let mut parts = parts.into_iter();
    let first = parts.next().context("no devices")?;
    let mut out = LocalData {
        examples: Examples {
            x: Vec::new(),
            labels: first.examples.labels.as_ref().map(|_| Vec::new()),
            targets: first.examples.targets.as_ref().map(|_| Vec::new()),
            series: Vec::new(),
            position: Vec::new(),
            ..first.examples.clone()
        },
        train: Vec::new(),
        holdout: Vec::new(),
    };
    let mut series_offset = 0u32;
    for part in std::iter::once(first).chain(parts) {
        let e = &part.examples;
        anyhow::ensure!(
            e.shape == out.examples.shape,
            "devices' examples differ in shape"
        );
        let base = out.examples.len();
        let push = |i: usize, out: &mut LocalData| {
            let o = &mut out.examples;
            o.x.extend_from_slice(e.example(i));
            if let (Some(dst), Some(src)) = (o.labels.as_mut(), e.labels.as_ref()) {
                dst.push(src[i]);
            }
            if let (Some(dst), Some(src)) = (o.targets.as_mut(), e.targets.as_ref()) {
                dst.push(src[i]);
            }
            o.series.push(e.series[i] + series_offset);
            o.position.push(e.position[i]);
        };
        let mut next = base;
        for &i in &part.train {
            push(i, &mut out);
            out.train.push(next);
            next += 1;
        }
        for &i in &part.holdout {
            push(i, &mut out);
            out.holdout.push(next);
            next += 1;
        }
        series_offset += e.series.iter().max().map_or(0, |m| m + 1);
    }
    Ok(out)
}

/// Trains the spec's model centrally for `epochs` passes (default: as many passes over the
/// data as the federated run makes, rounds x local epochs x fraction_fit).
pub fn run(spec: &RunSpec, epochs: Option<usize>) -> anyhow::Result<CentralReport> {
    let started = Instant::now();
    let data = SimulationData::load(spec)?;
    let query = Task::new(data.manifest.clone())?;
    let shares: Vec<LocalData> = data
        .shares
        .iter()
        .map(|raw| query.prepare(raw))
        .collect::<Result<_, _>>()?;
    let mut all = union(shares)?;
    // Scaling from the union's statistics, through the same fitting as the federated run's.
    let names = pollen_train::data::prepare::label_names(&data.shares[0], &data.manifest.task)?;
    let mut combiner = Combiner::default();
    combiner
        .add(
            "union",
            &pollen_train::data::stats::statistics(&all, &names),
        )
        .map_err(anyhow::Error::msg)?;
    let stats = combiner.finish().context("no statistics")?;
    let manifest = crate::task::fit(&data.manifest, &stats).map_err(anyhow::Error::msg)?;
    let task = Task::new(manifest.clone())?;
    if let Some(scaling) = &manifest.fitted.features {
        all.examples.scale(scaling);
    }
    let (eval_data, eval_on) = match &data.server {
        Some(raw) => {
            let mut local = task.prepare(raw)?;
            local.train.clear();
            local.holdout = (0..local.examples.len()).collect();
            if let Some(n) = spec.evaluate.test_examples {
                local.holdout.truncate(n);
            }
            (local, "the server's holdout".to_string())
        }
        None => (
            all.clone(),
            "the union of the devices' holdouts".to_string(),
        ),
    };
    anyhow::ensure!(
        !eval_data.holdout.is_empty(),
        "nothing to evaluate on: no server holdout and no device holdout"
    );
    let epochs = epochs.unwrap_or_else(|| {
        let passes =
            spec.rounds as f64 * spec.train.local_epochs as f64 * spec.strategy.fraction_fit;
        (passes.ceil() as usize).max(1)
    });
    let cfg = TrainSpec {
        local_epochs: 1,
        ..spec.train.clone()
    };
    let mut params = task.initial_parameters()?;
    let metric = manifest.task.kind.primary_metric().to_string();
    let mut records = Vec::with_capacity(epochs);
    for epoch in 1..=epochs {
        let t = Instant::now();
        let out = task.fit(&all, &params, &cfg, spec.seed ^ epoch as u64)?;
        params = out.parameters;
        let (loss, n, m) = task.evaluate(
            &eval_data,
            &eval_data.holdout,
            &params,
            spec.evaluate.batch_size,
        )?;
        let numeric: std::collections::BTreeMap<String, f64> = numeric_entries(&m)
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let metrics = task.aggregate(&[(n, &numeric)]);
        eprintln!(
            "epoch {epoch}/{epochs}: train loss {:.4}, {metric} {}",
            out.loss,
            metrics
                .get(&metric)
                .map_or("-".to_string(), |v| format!("{v:.4}"))
        );
        records.push(Epoch {
            epoch,
            train_loss: out.loss,
            loss,
            metrics,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    Ok(CentralReport {
        spec: spec.name.clone(),
        final_value: records.last().and_then(|e| e.metrics.get(&metric).copied()),
        metric,
        evaluated_on: eval_on,
        train_examples: all.train.len(),
        eval_examples: eval_data.holdout.len(),
        epochs: records,
        seconds: started.elapsed().as_secs_f64(),
    })
}
