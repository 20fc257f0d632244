//! `pollen-bench train`: local training throughput (samples/s) of one client, for each model
//! and batch size asked for: one local epoch over `examples` MNIST images, as a device does
//! for a fit command (weights imported, trained, exported).

use std::time::Instant;

use anyhow::Context;
use pollen_train::data::Raw;
use pollen_train::data::arrays::{MnistSplit, read_mnist};
use pollen_train::{ModelSpec, Task, TrainSpec};
use serde::Serialize;

use crate::{Machine, Stats, header};
use pollen_workflows::spec::RunSpec;

#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Model presets (`mnist-2nn`, `mnist-cnn`).
    pub models: Vec<String>,
    pub batch_sizes: Vec<usize>,
    /// Examples in the local epoch (600 = one client's share of MNIST over 100 clients).
    pub examples: usize,
    pub runs: usize,
    pub data_dir: std::path::PathBuf,
}

#[derive(Debug, Serialize)]
pub struct TrainResult {
    pub model: String,
    pub batch_size: usize,
    pub samples_per_second: Stats,
    pub seconds_per_epoch: Stats,
}

#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub bench: &'static str,
    pub workload: String,
    pub examples: usize,
    pub results: Vec<TrainResult>,
    pub machine: Machine,
}

pub fn run(options: &TrainOptions) -> anyhow::Result<TrainReport> {
    anyhow::ensure!(options.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(options.examples >= 1, "--examples must be at least 1");
    anyhow::ensure!(
        options.examples <= 60_000,
        "--examples {} exceeds the 60000 training images",
        options.examples
    );
    let raw = Raw::Arrays(
        read_mnist(
            &options.data_dir,
            MnistSplit::Train,
            Some((0..options.examples).collect()),
        )
        .with_context(|| format!("loading MNIST from {}", options.data_dir.display()))?,
    );
    let mut results = Vec::new();
    for name in &options.models {
        let mut spec = RunSpec::default_spec();
        spec.model = ModelSpec::preset(name).with_context(|| format!("unknown model {name:?}"))?;
        let task = Task::new(pollen_workflows::task::resolve_with_data(&spec, &raw)?)?;
        let data = task.prepare(&raw)?;
        let global = task.initial_parameters()?;
        for &batch_size in &options.batch_sizes {
            anyhow::ensure!(batch_size >= 1, "batch sizes must be at least 1");
            let config = TrainSpec {
                local_epochs: 1,
                batch_size,
                learning_rate: 0.05,
                ..spec.train.clone()
            };
            // One untimed epoch first: the backend allocates and tunes on first use.
            task.fit(&data, &global, &config, 0)?;
            let mut seconds = Vec::with_capacity(options.runs);
            for run in 0..options.runs {
                let started = Instant::now();
                let out = task.fit(&data, &global, &config, run as u64 + 1)?;
                seconds.push(started.elapsed().as_secs_f64());
                anyhow::ensure!(
                    out.num_examples as usize == options.examples && out.loss.is_finite(),
                    "training returned {} examples, loss {}",
                    out.num_examples,
                    out.loss
                );
            }
            results.push(TrainResult {
                model: name.clone(),
                batch_size,
                samples_per_second: Stats::of_rates(options.examples as f64, &seconds)
                    .context("no runs")?,
                seconds_per_epoch: Stats::of(&seconds).context("no runs")?,
            });
        }
    }
    Ok(TrainReport {
        bench: "train",
        workload: format!(
            "one local epoch over {} MNIST images (E=1, SGD lr 0.05), weights in and out",
            options.examples
        ),
        examples: options.examples,
        results,
        machine: Machine::detect(),
    })
}

impl TrainReport {
    pub fn human(&self) -> Vec<String> {
        let mut lines = header("train", &self.workload, &self.machine);
        for r in &self.results {
            lines.push(format!(
                "{} B={}: samples/s {}",
                r.model,
                r.batch_size,
                r.samples_per_second.describe(0, "")
            ));
        }
        lines
    }
}
