//! `pollen-bench mnist`: the default run (`pollen simulate` without a spec: MNIST 2NN, 100
//! IID clients, C=0.1, E=1, B=10, lr 0.1), timed per round and until the global model first
//! reaches the target test accuracy (McMahan et al.'s 97%). The run stops at the target.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use pollen_proto::mqtt::BrokerConfig;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{Machine, Stats, header, human_bytes, peak_rss_bytes};
use pollen_workflows::simulate::{SimulateOptions, Transport, simulate};
use pollen_workflows::spec::RunSpec;

#[derive(Debug, Clone)]
pub struct MnistOptions {
    pub transport: Transport,
    pub broker: Option<BrokerConfig>,
    /// Give up after this many rounds.
    pub max_rounds: u64,
    pub target: f64,
}

#[derive(Debug, Serialize)]
pub struct MnistReport {
    pub bench: &'static str,
    pub workload: String,
    pub transport: &'static str,
    pub round_seconds: Stats,
    pub median_round_seconds: f64,
    pub target_accuracy: f64,
    /// The first round whose global model reached the target; `None` if none did.
    pub target_round: Option<u64>,
    /// Sum of the round times up to and including `target_round`.
    pub rounds_seconds_to_target: Option<f64>,
    /// Wall time from the command's start (MNIST loading and the fleet's start-up included)
    /// to the end of `target_round`.
    pub wall_seconds_to_target: Option<f64>,
    pub final_accuracy: Option<f64>,
    pub rounds_run: usize,
    pub peak_rss_bytes: Option<u64>,
    pub machine: Machine,
}

pub async fn run(options: &MnistOptions) -> anyhow::Result<MnistReport> {
    let started = Instant::now();
    let mut spec = RunSpec::default_spec();
    spec.rounds = options.max_rounds;
    // Records and objects of this run only; removed when the benchmark ends, however it ends.
    let runs_dir = tempfile::Builder::new()
        .prefix("pollen-bench-mnist-")
        .tempdir()
        .context("creating a scratch folder for the run")?;
    let sim_options = SimulateOptions {
        transport: options.transport,
        broker: options.broker.clone(),
        ..SimulateOptions::new(runs_dir.path())
    };
    let stop = CancellationToken::new();
    let reached: Arc<Mutex<Option<(u64, f64)>>> = Arc::default();
    let on_round = {
        let (stop, reached, target) = (stop.clone(), reached.clone(), options.target);
        move |r: &pollen_coordinator::RoundRecord| {
            let mut reached = reached.lock().unwrap_or_else(|e| e.into_inner());
            if reached.is_none() && r.accuracy.is_some_and(|a| a >= target) {
                *reached = Some((r.round, started.elapsed().as_secs_f64()));
                stop.cancel();
            }
        }
    };
    let sim = simulate(&spec, &sim_options, stop, on_round).await;
    let peak_rss_bytes = peak_rss_bytes();
    let sim = sim.context("running the simulation")?;
    let rounds = &sim.summary.rounds;
    let seconds: Vec<f64> = rounds.iter().map(|r| r.seconds).collect();
    let round_seconds = Stats::of(&seconds).context("no rounds ran")?;
    let reached = *reached.lock().unwrap_or_else(|e| e.into_inner());
    let target_round = reached.map(|(r, _)| r);
    Ok(MnistReport {
        bench: "mnist",
        workload: format!(
            "default simulation: MNIST 2NN, {} IID clients, C={}, E={}, B={}, lr {}, over {}",
            spec.data.clients.unwrap_or(0),
            spec.strategy.fraction_fit,
            spec.train.local_epochs,
            spec.train.batch_size,
            spec.train.learning_rate,
            match options.transport {
                Transport::Device => "the device path (proxy + MQTT + S3 + agents)",
                Transport::Grpc => "direct gRPC",
                Transport::InProcess => "in-process clients",
            }
        ),
        transport: options.transport.name(),
        median_round_seconds: round_seconds.median,
        round_seconds,
        target_accuracy: options.target,
        target_round,
        rounds_seconds_to_target: target_round.map(|t| {
            rounds
                .iter()
                .filter(|r| r.round <= t)
                .map(|r| r.seconds)
                .sum()
        }),
        wall_seconds_to_target: reached.map(|(_, s)| s),
        final_accuracy: rounds.iter().rev().find_map(|r| r.accuracy),
        rounds_run: rounds.len(),
        peak_rss_bytes,
        machine: Machine::detect(),
    })
}

impl MnistReport {
    pub fn human(&self) -> Vec<String> {
        let mut lines = header("mnist", &self.workload, &self.machine);
        lines.push(format!(
            "seconds per round: {}",
            self.round_seconds.describe(3, " s")
        ));
        lines.push(match (self.target_round, self.wall_seconds_to_target) {
            (Some(r), Some(wall)) => format!(
                "{:.0}% test accuracy first at round {r}: {:.1} s of rounds, {wall:.1} s wall time from start",
                self.target_accuracy * 100.0,
                self.rounds_seconds_to_target.unwrap_or(0.0)
            ),
            _ => format!(
                "{:.0}% not reached in {} rounds (last accuracy {:?})",
                self.target_accuracy * 100.0,
                self.rounds_run,
                self.final_accuracy
            ),
        });
        if let Some(p) = self.peak_rss_bytes {
            lines.push(format!("peak RSS: {}", human_bytes(p)));
        }
        lines
    }
}
