//! What a local fit does around each library's optimizer step, shared by burn's trainer and
//! LibTorch's so that both train on the same examples in the same order, stop at the same time
//! budget, refuse the same divergence and report alike: which examples train, the seeded batch
//! order, the loss bookkeeping, the time budget (partial work is sent) and the log lines.

use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::data::LocalData;
use crate::manifest::{TaskKind, TrainSpec};
use pollen_proto::Parameters;

use crate::trainer::{FitOutput, TrainError};

/// The examples training uses: every training example, but only the normal ones for anomaly
/// detection when labels say which they are.
pub(crate) fn training_examples(
    kind: TaskKind,
    data: &LocalData,
) -> Result<Vec<usize>, TrainError> {
    let order: Vec<usize> = match (kind, &data.examples.labels) {
        (TaskKind::Anomaly, Some(labels)) => data
            .train
            .iter()
            .copied()
            .filter(|&i| labels[i] == 0)
            .collect(),
        _ => data.train.clone(),
    };
    if order.is_empty() {
        return Err(TrainError::NoData(format!(
            "no training examples ({} examples, {} held out for evaluation)",
            data.examples.len(),
            data.holdout.len()
        )));
    }
    Ok(order)
}

/// What the epochs did, for the fit's output.
pub(crate) struct Trained {
    pub num_examples: u64,
    /// Mean task loss over the last (possibly partial) epoch.
    pub loss: f64,
    pub steps: usize,
    /// Fractional when the time budget stopped training mid-epoch.
    pub epochs: f64,
}

impl Trained {
    /// The fit's output, with the weights training ended on.
    pub fn output(self, parameters: Parameters) -> FitOutput {
        FitOutput {
            parameters,
            num_examples: self.num_examples,
            loss: self.loss,
            steps: self.steps,
            epochs: self.epochs,
        }
    }
}

/// Runs `cfg.local_epochs` epochs over `order`, shuffled by `seed`, in minibatches of
/// `cfg.batch_size`; `step` trains on one batch and returns its task loss (before any
/// proximal term). `library` names who trained in the log lines.
pub(crate) fn run(
    mut order: Vec<usize>,
    cfg: &TrainSpec,
    seed: u64,
    library: &'static str,
    mut step: impl FnMut(&[usize]) -> Result<f32, TrainError>,
) -> Result<Trained, TrainError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut loss_sum, mut seen, mut steps, mut epochs) = (0.0f64, 0usize, 0usize, 0.0f64);
    let fit_started = Instant::now();
    'epochs: for epoch in 1..=cfg.local_epochs {
        let started = Instant::now();
        order.shuffle(&mut rng);
        (loss_sum, seen) = (0.0, 0);
        for batch in order.chunks(cfg.batch_size) {
            let value = step(batch)?;
            if !value.is_finite() {
                return Err(TrainError::Diverged(value));
            }
            loss_sum += f64::from(value) * batch.len() as f64;
            seen += batch.len();
            steps += 1;
            if cfg.time_budget.is_some_and(|b| fit_started.elapsed() >= b) {
                epochs += seen as f64 / order.len() as f64;
                tracing::info!(
                    epoch,
                    examples = seen,
                    library,
                    "time budget spent; sending the partial work"
                );
                break 'epochs;
            }
        }
        epochs += 1.0;
        tracing::info!(
            epoch,
            epochs = cfg.local_epochs,
            loss = format!("{:.4}", loss_sum / seen.max(1) as f64),
            examples = seen,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            library,
            "local epoch done"
        );
    }
    Ok(Trained {
        num_examples: order.len() as u64,
        loss: loss_sum / seen.max(1) as f64,
        steps,
        epochs,
    })
}
