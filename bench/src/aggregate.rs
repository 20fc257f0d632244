//! `pollen-bench aggregate`: how fast the coordinator folds client updates into FedAvg's
//! weighted sum, in GB/s of update bytes, and how much memory aggregation itself takes.
//!
//! The workload is Flower's: `updates` distinct client models, all in memory, averaged with
//! example weights. With `--from-wire` each update starts as the safetensors blob a client
//! uploads, and the coordinator's whole per-update work is timed (digest check, decode with
//! finiteness check, fold), as in a real round.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use pollen_coordinator::FedAvg;
use pollen_coordinator::fedavg::FedAvgConfig;
use pollen_coordinator::strategy::{ClientUpdate, Strategy};
use pollen_proto::blob::EncodedBlob;
use pollen_proto::{NamedTensor, Parameters};
use pollen_train::manifest::TaskKind;
use pollen_train::model::{ModelIo, ModelSpec, initial_parameters};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::{Machine, Stats, header, human_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes};

/// The model whose updates are folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// The MNIST CNN's tensors: 1,663,370 parameters (Flower's reference workload).
    Cnn,
    /// The MNIST 2NN's tensors: 199,210 parameters.
    #[value(name = "2nn")]
    #[serde(rename = "2nn")]
    Mlp,
    /// One flat tensor of `--params` values.
    Flat,
}

#[derive(Debug, Clone)]
pub struct AggregateOptions {
    pub shape: Shape,
    /// Parameters of the flat shape.
    pub params: usize,
    pub updates: usize,
    pub runs: usize,
    pub from_wire: bool,
}

#[derive(Debug, Serialize)]
pub struct AggregateReport {
    pub bench: &'static str,
    pub workload: String,
    pub shape: Shape,
    pub params: usize,
    pub tensors: usize,
    pub updates: usize,
    pub from_wire: bool,
    /// Update bytes folded per run (`updates * params * 4`).
    pub bytes_per_run: u64,
    pub seconds: Stats,
    /// GB/s (10^9 bytes) of update bytes folded, per run.
    pub gbps_stats: Stats,
    /// Median GB/s.
    pub gbps: f64,
    /// Peak resident memory of the whole process, the updates held in memory included.
    pub peak_rss_bytes: Option<u64>,
    /// Peak memory above what was resident before aggregation started: what aggregating
    /// itself took.
    pub aggregation_rss_bytes: Option<u64>,
    /// Size of one model (the running sum is one of these).
    pub model_bytes: u64,
    pub machine: Machine,
}

fn template(options: &AggregateOptions) -> anyhow::Result<Parameters> {
    Ok(match options.shape {
        Shape::Cnn => mnist_model("mnist-cnn")?,
        Shape::Mlp => mnist_model("mnist-2nn")?,
        Shape::Flat => Parameters::new(vec![NamedTensor::new(
            "w",
            vec![options.params],
            vec![0.0; options.params],
        )])?,
    })
}

/// A model of `template`'s shapes filled with values drawn from `seed` (clients' updates
/// differ, so nothing is folded from cache by accident).
fn random_like(template: &Parameters, seed: u64) -> Parameters {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tensors = template
        .tensors
        .iter()
        .map(|t| {
            let data = (0..t.data.len())
                .map(|_| rng.random_range(-0.1f32..0.1))
                .collect();
            NamedTensor::new(t.name.clone(), t.shape.clone(), data)
        })
        .collect();
    Parameters { tensors }
}

enum Updates {
    Decoded(Vec<ClientUpdate>),
    Encoded(Vec<EncodedBlob>),
}

pub fn run(options: &AggregateOptions) -> anyhow::Result<AggregateReport> {
    anyhow::ensure!(options.updates >= 1, "--updates must be at least 1");
    anyhow::ensure!(options.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(
        options.shape != Shape::Flat || options.params >= 1,
        "--params must be at least 1 for the flat shape"
    );
    let global = template(options)?;
    let params = global.num_params();
    let specs = global.specs();
    let decoded: Vec<Parameters> = (0..options.updates as u64)
        .into_par_iter()
        .map(|i| random_like(&global, i + 1))
        .collect();
    let update = |i: usize, parameters: Parameters| ClientUpdate {
        client_id: format!("c{i}"),
        num_examples: 10 + i as u64,
        parameters,
    };
    let updates = if options.from_wire {
        Updates::Encoded(decoded.into_par_iter().map(|p| p.encode()).collect())
    } else {
        Updates::Decoded(
            decoded
                .into_iter()
                .enumerate()
                .map(|(i, p)| update(i, p))
                .collect(),
        )
    };
    let mut strategy = FedAvg::new(FedAvgConfig::default());
    let before = rss_bytes();
    let reset = reset_peak_rss();
    let mut seconds = Vec::with_capacity(options.runs);
    let mut last = None;
    let global = Arc::new(global);
    for _ in 0..options.runs {
        let started = Instant::now();
        let mut aggregator = strategy.fit_aggregator(1, &global);
        match &updates {
            Updates::Decoded(list) => {
                for u in list {
                    aggregator.fold(u).map_err(anyhow::Error::msg)?;
                }
            }
            Updates::Encoded(list) => {
                for (i, blob) in list.iter().enumerate() {
                    let u = Parameters::from_wire(&blob.to_inline(), Some(&specs))
                        .context("decoding an update")?;
                    aggregator.fold(&update(i, u)).map_err(anyhow::Error::msg)?;
                }
            }
        }
        let model = aggregator
            .finish()
            .map_err(anyhow::Error::msg)?
            .parameters
            .context("no model out of the aggregator")?;
        seconds.push(started.elapsed().as_secs_f64());
        last = Some(model);
    }
    let peak = peak_rss_bytes();
    // The average of uniform draws is near zero; a wrong fold would not be.
    let model = last.context("no run")?;
    anyhow::ensure!(
        model
            .tensors
            .iter()
            .all(|t| t.data.iter().all(|v| v.abs() < 0.1)),
        "the aggregate is out of the updates' range: the fold is wrong"
    );
    let bytes_per_run = (options.updates * params * 4) as u64;
    let gbps_stats = Stats::of_rates(bytes_per_run as f64 / 1e9, &seconds).context("no runs")?;
    let seconds = Stats::of(&seconds).context("no runs")?;
    let shape = match options.shape {
        Shape::Cnn => "MNIST CNN shapes".to_string(),
        Shape::Mlp => "MNIST 2NN shapes".to_string(),
        Shape::Flat => "one flat tensor".to_string(),
    };
    Ok(AggregateReport {
        bench: "aggregate",
        workload: format!(
            "FedAvg of {} updates x {} params ({shape}, {} tensors){}",
            options.updates,
            params,
            global.tensors.len(),
            if options.from_wire {
                ", each from its safetensors blob: sha256 check + decode + fold"
            } else {
                ", updates in memory"
            }
        ),
        shape: options.shape,
        params,
        tensors: global.tensors.len(),
        updates: options.updates,
        from_wire: options.from_wire,
        bytes_per_run,
        seconds,
        gbps: gbps_stats.median,
        gbps_stats,
        peak_rss_bytes: peak,
        aggregation_rss_bytes: match (reset, peak, before) {
            (true, Some(p), Some(b)) => Some(p.saturating_sub(b)),
            _ => None,
        },
        model_bytes: (params * 4) as u64,
        machine: Machine::detect(),
    })
}

impl AggregateReport {
    pub fn human(&self) -> Vec<String> {
        let mut lines = header("aggregate", &self.workload, &self.machine);
        lines.push(format!(
            "time per aggregation ({} MB of updates): {}",
            self.bytes_per_run / 1_000_000,
            self.seconds.scaled(1e3).describe(1, " ms")
        ));
        lines.push(format!(
            "throughput: {}",
            self.gbps_stats.describe(1, " GB/s")
        ));
        if let Some(p) = self.peak_rss_bytes {
            lines.push(format!(
                "peak RSS: {} (updates held in memory included); aggregation itself: {} (one model is {})",
                human_bytes(p),
                self.aggregation_rss_bytes
                    .map_or_else(|| "unknown".into(), human_bytes),
                human_bytes(self.model_bytes)
            ));
        }
        lines
    }
}

/// Freshly initialised weights of an MNIST preset.
fn mnist_model(preset: &str) -> anyhow::Result<Parameters> {
    let spec = ModelSpec::preset(preset).ok_or_else(|| anyhow::anyhow!("no preset {preset}"))?;
    let io = ModelIo {
        kind: TaskKind::Classification,
        input: vec![1, 28, 28],
        outputs: 10,
    };
    Ok(initial_parameters(&spec, &io, 1)?)
}
