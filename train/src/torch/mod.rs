//! Local training and evaluation with LibTorch (feature `torch`), the same contract as the burn
//! trainer (`crate::trainer`): minibatches in the same seeded order, the task's loss (plus
//! FedProx's proximal term), SGD with momentum and weight decay, Adam or AdamW, per-parameter
//! gradient clipping, the time budget, divergence checks, and evaluation into the same
//! exactly-aggregable tallies.
//!
//! A TorchScript module takes a batch shaped `[batch, *task.shape]` (MNIST: `[batch, 1, 28,
//! 28]`) and returns logits `[batch, classes]` (classification), `[batch, 1]` or `[batch]`
//! (regression), or a reconstruction of the input (anomaly detection); anything else fails
//! the instruction naming the shape. Buffers that are not parameters (batch-norm statistics)
//! stay on the device: they are not averaged, as in FedBN, and the module is kept between the
//! rounds of a run for them.
//!
//! LibTorch runs on `threads` threads (1 by default: on a busy 2-core machine, more made its
//! OpenMP barriers spin against the other work, up to 70x slower; `POLLEN_TORCH_THREADS`).
//!
//! # Layout
//! - this file: the training and evaluation loops.
//! - `net`: the TorchScript module and the built-in families on LibTorch.

pub mod net;

use std::sync::Once;

use pollen_proto::Parameters;
use tch::{COptimizer, Kind, Reduction, Tensor};

use crate::data::LocalData;
use crate::epochs;
use crate::manifest::{OptimizerKind, Scaling, TaskKind, TrainSpec};
use crate::metrics::Tally;
use crate::model::ModelIo;
use crate::trainer::{FitOutput, TrainError};
pub use net::Net;

static THREADS: Once = Once::new();

/// Sets LibTorch's intra-op threads once per process, from `POLLEN_TORCH_THREADS` (default 1),
/// unless [`set_threads`] came first.
fn init_threads() {
    THREADS.call_once(|| {
        let n = std::env::var("POLLEN_TORCH_THREADS")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|n| *n >= 1)
            .unwrap_or(1);
        tch::set_num_threads(n);
    });
}

/// Runs LibTorch on `n` intra-op threads from now on (benchmarks compare libraries at equal
/// threads).
pub fn set_threads(n: usize) {
    THREADS.call_once(|| {});
    tch::set_num_threads(n.max(1) as i32);
}

fn torch(e: tch::TchError) -> TrainError {
    TrainError::Config(net::short(&e))
}

/// What the LibTorch trainer needs to know about the task.
pub struct TorchLearner<'a> {
    pub io: &'a ModelIo,
    /// Target scaling (regression): the model predicts scaled targets.
    pub targets: Option<&'a Scaling>,
}

impl TorchLearner<'_> {
    fn scale_target(&self, y: f32) -> f32 {
        self.targets.map_or(y, |s| s.standardize_target(y))
    }

    fn unscale_target(&self, y: f64) -> f64 {
        self.targets.map_or(y, |s| s.restore_target(y))
    }

    fn inputs(data: &LocalData, idx: &[usize]) -> Result<Tensor, TrainError> {
        let e = &data.examples;
        let width = e.width();
        let mut x = Vec::with_capacity(idx.len() * width);
        for &i in idx {
            x.extend_from_slice(e.example(i));
        }
        Tensor::f_of_slice(&x)
            .and_then(|t| t.f_reshape(&[idx.len() as i64, width as i64]))
            .map_err(torch)
    }

    /// The network's output for a batch, checked against what the task needs.
    fn output(&self, net: &Net, x: &Tensor, batch: usize) -> Result<Tensor, TrainError> {
        let out = net.forward(x, batch as i64).map_err(TrainError::Config)?;
        let size = out.size();
        let b = batch as i64;
        let fits = match self.io.kind {
            TaskKind::Classification => size == [b, self.io.outputs as i64],
            TaskKind::Regression => size == [b, 1] || size == [b],
            TaskKind::Anomaly => {
                size.first() == Some(&b)
                    && size.iter().skip(1).product::<i64>() == self.io.input_len() as i64
            }
        };
        if !fits {
            let want = match self.io.kind {
                TaskKind::Classification => {
                    format!("[{b}, {}] (one logit per class)", self.io.outputs)
                }
                TaskKind::Regression => format!("[{b}, 1] or [{b}]"),
                TaskKind::Anomaly => {
                    format!("[{b}, ...] with {} values per example", self.io.input_len())
                }
            };
            return Err(TrainError::Config(format!(
                "the model's output is shaped {size:?}, the task needs {want}"
            )));
        }
        out.f_reshape(&[b, -1]).map_err(torch)
    }

    /// The task's loss on a batch (the graph kept for `backward`).
    fn loss(&self, net: &Net, data: &LocalData, idx: &[usize]) -> Result<Tensor, TrainError> {
        let x = Self::inputs(data, idx)?;
        let out = self.output(net, &x, idx.len())?;
        let e = &data.examples;
        match self.io.kind {
            TaskKind::Classification => {
                let labels = e.labels.as_deref().unwrap_or_default();
                let y: Vec<i64> = idx.iter().map(|&i| i64::from(labels[i])).collect();
                let y = Tensor::f_of_slice(&y).map_err(torch)?;
                out.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0)
                    .map_err(torch)
            }
            TaskKind::Regression => {
                let targets = e.targets.as_deref().unwrap_or_default();
                let y: Vec<f32> = idx.iter().map(|&i| self.scale_target(targets[i])).collect();
                let y = Tensor::f_of_slice(&y)
                    .and_then(|t| t.f_reshape(&[idx.len() as i64, 1]))
                    .map_err(torch)?;
                out.f_mse_loss(&y, Reduction::Mean).map_err(torch)
            }
            TaskKind::Anomaly => out.f_mse_loss(&x, Reduction::Mean).map_err(torch),
        }
    }

    fn optimizer(cfg: &TrainSpec, params: &[(String, Tensor)]) -> Result<COptimizer, TrainError> {
        let lr = cfg.learning_rate;
        let mut opt = match cfg.optimizer {
            // PyTorch's SGD: momentum without dampening, L2 weight decay.
            OptimizerKind::Sgd => COptimizer::sgd(lr, cfg.momentum, 0.0, cfg.weight_decay, false),
            OptimizerKind::Adam => COptimizer::adam(lr, 0.9, 0.999, cfg.weight_decay, 1e-8, false),
            OptimizerKind::Adamw => {
                COptimizer::adamw(lr, 0.9, 0.999, cfg.weight_decay, 1e-8, false)
            }
        }
        .map_err(torch)?;
        for (_, t) in params {
            opt.add_parameters(t, 0).map_err(torch)?;
        }
        Ok(opt)
    }

    /// Trains `net` from `global` on `data`'s training examples. `seed` fixes the batch order
    /// (the burn trainer's order for the same seed).
    pub fn fit(
        &self,
        net: &mut Net,
        global: &Parameters,
        data: &LocalData,
        cfg: &TrainSpec,
        seed: u64,
    ) -> Result<FitOutput, TrainError> {
        cfg.validate().map_err(TrainError::Config)?;
        init_threads();
        let order = epochs::training_examples(self.io.kind, data)?;
        net.load(global).map_err(TrainError::Config)?;
        net.set_train(true).map_err(TrainError::Config)?;
        tch::manual_seed(seed as i64);
        let params = net.parameters().map_err(TrainError::Config)?;
        let anchor = if cfg.proximal_mu > 0.0 {
            // Real copies: a detached view would follow the parameters as they are updated.
            let copies = tch::no_grad(|| {
                params
                    .iter()
                    .map(|(_, t)| {
                        let mut c = t.f_zeros_like()?;
                        c.f_copy_(t)?;
                        Ok(c)
                    })
                    .collect::<Result<Vec<_>, tch::TchError>>()
            })
            .map_err(torch)?;
            Some(copies)
        } else {
            None
        };
        let opt = Self::optimizer(cfg, &params)?;
        let trained = epochs::run(order, cfg, seed, "libtorch", |batch| {
            let loss = self.loss(net, data, batch)?;
            // The reported loss is the task's; the proximal term only steers the gradient.
            let value = loss.f_double_value(&[]).map_err(torch)? as f32;
            if !value.is_finite() {
                return Ok(value);
            }
            let loss = match &anchor {
                Some(anchor) => loss
                    .f_add(&proximal(&params, anchor, cfg.proximal_mu)?)
                    .map_err(torch)?,
                None => loss,
            };
            opt.zero_grad().map_err(torch)?;
            loss.f_backward().map_err(torch)?;
            if let Some(clip) = cfg.clip_grad_norm {
                clip_each(&params, clip)?;
            }
            opt.step().map_err(torch)?;
            Ok(value)
        })?;
        Ok(trained.output(net.export().map_err(TrainError::Config)?))
    }

    /// Evaluates `params` on the examples `idx`: the mean loss and the task's tally.
    pub fn evaluate(
        &self,
        net: &mut Net,
        params: &Parameters,
        data: &LocalData,
        idx: &[usize],
        batch_size: usize,
    ) -> Result<(f64, Tally), TrainError> {
        init_threads();
        net.load(params).map_err(TrainError::Config)?;
        net.set_train(false).map_err(TrainError::Config)?;
        let _no_grad = tch::no_grad_guard();
        let e = &data.examples;
        let mut tally = Tally::new(self.io.kind, self.io.outputs);
        let mut loss_sum = 0.0f64;
        for batch in idx.chunks(batch_size.max(1)) {
            let x = Self::inputs(data, batch)?;
            let out = self.output(net, &x, batch.len())?;
            match self.io.kind {
                TaskKind::Classification => {
                    let labels = e.labels.as_deref().unwrap_or_default();
                    let y: Vec<i64> = batch.iter().map(|&i| i64::from(labels[i])).collect();
                    let yt = Tensor::f_of_slice(&y).map_err(torch)?;
                    let predicted = values_i64(&out.f_argmax(1i64, false).map_err(torch)?)?;
                    for (p, a) in predicted.iter().zip(&y) {
                        tally.class(*p as usize, *a as usize);
                    }
                    let loss = out
                        .f_cross_entropy_loss::<Tensor>(&yt, None, Reduction::Mean, -100, 0.0)
                        .and_then(|l| l.f_double_value(&[]))
                        .map_err(torch)?;
                    loss_sum += loss * batch.len() as f64;
                }
                TaskKind::Regression => {
                    let targets = e.targets.as_deref().unwrap_or_default();
                    for (&p, &i) in values_f32(&out)?.iter().zip(batch) {
                        let scaled = self.scale_target(targets[i]);
                        loss_sum += f64::from((p - scaled) * (p - scaled));
                        tally.value(self.unscale_target(f64::from(p)), f64::from(targets[i]));
                    }
                }
                TaskKind::Anomaly => {
                    let scores = out
                        .f_sub(&x)
                        .and_then(|d| d.f_square())
                        .and_then(|d| d.f_mean_dim(Some([1i64].as_slice()), false, Kind::Float))
                        .map_err(torch)?;
                    for (&s, &i) in values_f32(&scores)?.iter().zip(batch) {
                        let anomalous = e.labels.as_ref().is_some_and(|l| l[i] != 0);
                        loss_sum += f64::from(s);
                        tally.score(f64::from(s), anomalous);
                    }
                }
            }
        }
        Ok((loss_sum / idx.len().max(1) as f64, tally))
    }
}

/// FedProx's term `mu / 2 * ||w - w_global||^2` over every parameter.
fn proximal(params: &[(String, Tensor)], anchor: &[Tensor], mu: f64) -> Result<Tensor, TrainError> {
    let mut sum = Tensor::f_zeros(&[], (Kind::Float, tch::Device::Cpu)).map_err(torch)?;
    for ((_, p), a) in params.iter().zip(anchor) {
        let d = p
            .f_sub(a)
            .and_then(|d| d.f_square())
            .and_then(|d| d.f_sum(Kind::Float))
            .map_err(torch)?;
        sum = sum.f_add(&d).map_err(torch)?;
    }
    sum.f_mul_scalar(mu / 2.0).map_err(torch)
}

/// Clips each parameter's gradient to L2 norm `clip` (burn's per-parameter clipping).
fn clip_each(params: &[(String, Tensor)], clip: f64) -> Result<(), TrainError> {
    tch::no_grad(|| {
        for (_, p) in params {
            let mut g = p.f_grad().map_err(torch)?;
            if !g.defined() {
                continue;
            }
            let norm = g
                .f_norm()
                .and_then(|n| n.f_double_value(&[]))
                .map_err(torch)?;
            if norm > clip {
                // In place; the returned handle is the same gradient.
                let _ = g.f_mul_scalar_(clip / norm).map_err(torch)?;
            }
        }
        Ok(())
    })
}

fn values_f32(t: &Tensor) -> Result<Vec<f32>, TrainError> {
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.f_to_kind(Kind::Float)
        .and_then(|t| t.f_copy_data(&mut v, n))
        .map_err(torch)?;
    Ok(v)
}

fn values_i64(t: &Tensor) -> Result<Vec<i64>, TrainError> {
    let n = t.numel();
    let mut v = vec![0i64; n];
    t.f_to_kind(Kind::Int64)
        .and_then(|t| t.f_copy_data(&mut v, n))
        .map_err(torch)?;
    Ok(v)
}

/// The initial weights a network comes with: a TorchScript module's own.
pub fn initial_parameters(net: &Net) -> Result<Parameters, TrainError> {
    net.export().map_err(TrainError::Config)
}

#[cfg(test)]
mod tests;
