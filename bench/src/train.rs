//! `pollen-bench train`: local training throughput (samples/s) of one client, for each model,
//! batch size and training library asked for: one local epoch over `examples` MNIST images, as
//! a device does for a fit command (weights imported, trained, exported). `--pytorch PYTHON`
//! measures the same epochs in PyTorch itself (`bench/python/train_speed.py`, the modules of
//! `python/pollen_models.py`) in the same run, for the three-way table of docs/BENCHMARKS.md.

use std::time::Instant;

use anyhow::Context;
use pollen_train::data::Raw;
use pollen_train::data::arrays::{MnistSplit, read_mnist};
use pollen_train::{Backend, ModelSpec, Task, TrainSpec};
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
    /// Libraries that train: burn, and LibTorch in builds with the `torch` feature.
    pub backends: Vec<Backend>,
    /// Intra-op threads of LibTorch and PyTorch (burn's rayon pool: `RAYON_NUM_THREADS`).
    pub threads: usize,
    /// A Python with torch: also measure PyTorch itself.
    pub pytorch: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TrainResult {
    pub model: String,
    /// `burn`, `libtorch` or `pytorch`.
    pub library: String,
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
    anyhow::ensure!(options.threads >= 1, "--threads must be at least 1");
    #[cfg(feature = "torch")]
    pollen_train::torch::set_threads(options.threads);
    let mut results = Vec::new();
    for name in &options.models {
        for &backend in &options.backends {
            results.extend(measure(options, &raw, name, backend)?);
        }
        if let Some(python) = &options.pytorch {
            results.extend(pytorch(options, python, name)?);
        }
    }
    Ok(TrainReport {
        bench: "train",
        workload: format!(
            "one local epoch over {} MNIST images (E=1, SGD lr 0.05), weights in and out; LibTorch and PyTorch on {} threads",
            options.examples, options.threads
        ),
        examples: options.examples,
        results,
        machine: Machine::detect(),
    })
}

/// Epochs of `name` trained by `backend`, for each batch size.
fn measure(
    options: &TrainOptions,
    raw: &Raw,
    name: &str,
    backend: Backend,
) -> anyhow::Result<Vec<TrainResult>> {
    let mut results = Vec::new();
    {
        let mut spec = RunSpec::default_spec();
        spec.model = ModelSpec::preset(name).with_context(|| format!("unknown model {name:?}"))?;
        let task = Task::new(pollen_workflows::task::resolve_with_data(&spec, raw)?)?
            .with_backend(backend);
        task.engine()?;
        let data = task.prepare(raw)?;
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
                model: name.to_string(),
                library: backend.as_str().to_string(),
                batch_size,
                samples_per_second: Stats::of_rates(options.examples as f64, &seconds)
                    .context("no runs")?,
                seconds_per_epoch: Stats::of(&seconds).context("no runs")?,
            });
        }
    }
    Ok(results)
}

/// The same epochs in PyTorch: `bench/python/train_speed.py` prints the seconds of each.
fn pytorch(options: &TrainOptions, python: &str, name: &str) -> anyhow::Result<Vec<TrainResult>> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/train_speed.py");
    let batch_sizes: Vec<String> = options.batch_sizes.iter().map(|b| b.to_string()).collect();
    let out = std::process::Command::new(python)
        .arg(&script)
        .args([
            "--model",
            name,
            "--data",
            &options.data_dir.display().to_string(),
        ])
        .args(["--examples", &options.examples.to_string()])
        .args(["--runs", &options.runs.to_string()])
        .args(["--threads", &options.threads.to_string()])
        .args(["--batch-sizes", &batch_sizes.join(",")])
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{python} {} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    #[derive(serde::Deserialize)]
    struct Row {
        batch_size: usize,
        seconds: Vec<f64>,
    }
    let rows: Vec<Row> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} printed no rows", script.display()))?;
    rows.into_iter()
        .map(|r| {
            Ok(TrainResult {
                model: name.to_string(),
                library: "pytorch".into(),
                batch_size: r.batch_size,
                samples_per_second: Stats::of_rates(options.examples as f64, &r.seconds)
                    .context("no runs")?,
                seconds_per_epoch: Stats::of(&r.seconds).context("no runs")?,
            })
        })
        .collect()
}

impl TrainReport {
    pub fn human(&self) -> Vec<String> {
        let mut lines = header("train", &self.workload, &self.machine);
        for r in &self.results {
            lines.push(format!(
                "{} B={} {}: samples/s {}",
                r.model,
                r.batch_size,
                r.library,
                r.samples_per_second.describe(0, "")
            ));
        }
        lines
    }
}
