//! Local training and evaluation with burn: minibatches in a seeded order, the task's loss (plus
//! FedProx's proximal term when `proximal_mu` > 0), the configured optimizer (SGD with momentum
//! and weight decay, Adam, AdamW) and optional gradient-norm clipping.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{
    AdamConfig, AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig,
    grad_clipping::GradientClippingConfig,
};
use burn::prelude::*;
use pollen_proto::Parameters;

use crate::data::LocalData;
use crate::epochs;
use crate::manifest::{OptimizerKind, Scaling, TaskKind, TrainSpec};
use crate::metrics::Tally;
use crate::model::{Model, ModelIo, ModelSpec, Noise, WeightsError, export, import};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("bad training config: {0}")]
    Config(String),
    #[error("{0}")]
    NoData(String),
    #[error("training diverged: loss became {0} (try a smaller learning rate)")]
    Diverged(f32),
}

/// What local training produced.
#[derive(Debug, Clone)]
pub struct FitOutput {
    pub parameters: Parameters,
    pub num_examples: u64,
    /// Mean training loss over the last local epoch.
    pub loss: f64,
    pub steps: usize,
    /// Local epochs done, fractional when the time budget stopped training mid-epoch.
    pub epochs: f64,
}

/// The global model's parameters as training started, detached and flattened, by parameter id:
/// FedProx's anchor. (Parameter ids survive optimizer steps, so the anchor finds each one.)
#[derive(Default)]
struct Anchor(HashMap<ParamId, Tensor<1>>);

impl ModuleVisitor for Anchor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let (n, device) = (value.shape().num_elements(), value.device());
        // Rebuilt from its values: a fresh leaf outside every tape, which `detach` alone is not
        // (the next backward pass would find the initial parameter's spent node).
        let data = value.reshape([n]).into_data();
        self.0.insert(param.id, Tensor::from_data(data, &device));
    }
}

/// `sum |w - anchor|^2` over every parameter, kept in the autodiff graph.
struct Proximal<'a> {
    anchor: &'a Anchor,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for Proximal<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(anchor) = self.anchor.0.get(&param.id) else {
            return;
        };
        let value = param.val();
        let n = value.shape().num_elements();
        let term = (value.reshape([n]) - anchor.clone()).powi_scalar(2).sum();
        self.sum = Some(match self.sum.take() {
            Some(sum) => sum + term,
            None => term,
        });
    }
}

/// What the trainer needs to know about the task.
pub struct Learner<'a> {
    pub model: &'a ModelSpec,
    pub io: &'a ModelIo,
    /// Target scaling (regression): the model predicts scaled targets.
    pub targets: Option<&'a Scaling>,
}

/// Outputs that cannot be read back from the backend (never expected on the CPU backend).
fn read_back(e: impl std::fmt::Debug) -> TrainError {
    TrainError::Config(format!("reading the model's outputs: {e:?}"))
}

fn optimizer(cfg: &TrainSpec) -> ModuleOptimizer {
    let clip = cfg
        .clip_grad_norm
        .map(|n| GradientClippingConfig::Norm(n as f32));
    let decay = (cfg.weight_decay > 0.0).then(|| WeightDecayConfig::new(cfg.weight_decay as f32));
    match cfg.optimizer {
        OptimizerKind::Sgd => SgdConfig::new()
            // PyTorch's SGD momentum: no dampening.
            .with_momentum((cfg.momentum > 0.0).then(|| {
                MomentumConfig::new()
                    .with_momentum(cfg.momentum)
                    .with_dampening(0.0)
            }))
            .with_weight_decay(decay)
            .with_gradient_clipping(clip)
            .init(),
        OptimizerKind::Adam => AdamConfig::new()
            .with_weight_decay(decay)
            .with_grad_clipping(clip)
            .init(),
        OptimizerKind::Adamw => AdamWConfig::new()
            .with_weight_decay(cfg.weight_decay as f32)
            .with_grad_clipping(clip)
            .init(),
    }
}

impl Learner<'_> {
    fn scale_target(&self, y: f32) -> f32 {
        self.targets.map_or(y, |s| s.standardize_target(y))
    }

    fn unscale_target(&self, y: f64) -> f64 {
        self.targets.map_or(y, |s| s.restore_target(y))
    }

    fn inputs(&self, data: &LocalData, idx: &[usize], device: &Device) -> Tensor<2> {
        let e = &data.examples;
        let width = e.width();
        let mut x = Vec::with_capacity(idx.len() * width);
        for &i in idx {
            x.extend_from_slice(e.example(i));
        }
        Tensor::from_data(TensorData::new(x, [idx.len(), width]), device)
    }

    fn loss(
        &self,
        model: &Model,
        data: &LocalData,
        idx: &[usize],
        noise: &mut Noise,
        device: &Device,
    ) -> Tensor<1> {
        let x = self.inputs(data, idx, device);
        let out = model.forward(x.clone(), noise);
        let e = &data.examples;
        match self.io.kind {
            TaskKind::Classification => {
                let labels = e.labels.as_deref().unwrap_or_default();
                let y: Vec<i64> = idx.iter().map(|&i| i64::from(labels[i])).collect();
                let y = Tensor::from_data(TensorData::new(y, [idx.len()]), device);
                CrossEntropyLossConfig::new().init(device).forward(out, y)
            }
            TaskKind::Regression => {
                let targets = e.targets.as_deref().unwrap_or_default();
                let y: Vec<f32> = idx.iter().map(|&i| self.scale_target(targets[i])).collect();
                let y = Tensor::<2>::from_data(TensorData::new(y, [idx.len(), 1]), device);
                (out - y).powi_scalar(2).mean()
            }
            TaskKind::Anomaly => (out - x).powi_scalar(2).mean(),
        }
    }

    /// Trains from `global` on `data`'s training examples. `seed` fixes the batch order and
    /// the dropout masks.
    pub fn fit(
        &self,
        global: &Parameters,
        data: &LocalData,
        cfg: &TrainSpec,
        seed: u64,
    ) -> Result<FitOutput, TrainError> {
        cfg.validate().map_err(TrainError::Config)?;
        let order = epochs::training_examples(self.io.kind, data)?;
        let device = Device::flex().autodiff();
        let mut model = self
            .model
            .init(self.io, &device)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        import(&mut model, global)?;
        let anchor = (cfg.proximal_mu > 0.0).then(|| {
            let mut anchor = Anchor::default();
            model.visit(&mut anchor);
            anchor
        });
        let mut optim = optimizer(cfg);
        let mut noise = Noise::training(seed ^ 0x5eed_d20f);
        // The optimizer takes the model by value; it lives here between steps.
        let mut slot = Some(model);
        let trained = epochs::run(order, cfg, seed, "burn", |batch| {
            let model = slot
                .take()
                .ok_or_else(|| TrainError::Config("the model was lost in a failed step".into()))?;
            let loss = self.loss(&model, data, batch, &mut noise, &device);
            // The reported loss is the task's; the proximal term only steers the gradient.
            let value = loss.clone().into_scalar::<f32>();
            if !value.is_finite() {
                return Ok(value);
            }
            let loss = match &anchor {
                Some(anchor) => {
                    let mut prox = Proximal { anchor, sum: None };
                    model.visit(&mut prox);
                    match prox.sum {
                        Some(sum) => loss + sum.mul_scalar(cfg.proximal_mu / 2.0),
                        None => loss,
                    }
                }
                None => loss,
            };
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            slot = Some(optim.step(cfg.learning_rate, model, grads));
            Ok(value)
        })?;
        let model = slot.ok_or_else(|| TrainError::Config("no model after training".into()))?;
        Ok(trained.output(export(&model)?))
    }

    /// Evaluates `params` on the examples `idx` of `data` in batches of `batch_size`: the mean
    /// loss and the task's tally.
    pub fn evaluate(
        &self,
        params: &Parameters,
        data: &LocalData,
        idx: &[usize],
        batch_size: usize,
    ) -> Result<(f64, Tally), TrainError> {
        let device = Device::flex();
        let mut model = self
            .model
            .init(self.io, &device)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        import(&mut model, params)?;
        let e = &data.examples;
        let mut tally = Tally::new(self.io.kind, self.io.outputs);
        let mut loss_sum = 0.0f64;
        let mut noise = Noise::evaluating();
        for batch in idx.chunks(batch_size.max(1)) {
            let x = self.inputs(data, batch, &device);
            let out = model.forward(x.clone(), &mut noise);
            match self.io.kind {
                TaskKind::Classification => {
                    let labels = e.labels.as_deref().unwrap_or_default();
                    let y: Vec<i64> = batch.iter().map(|&i| i64::from(labels[i])).collect();
                    let yt = Tensor::from_data(TensorData::new(y.clone(), [batch.len()]), &device);
                    let predicted = out
                        .clone()
                        .argmax(1)
                        .flatten::<1>(0, 1)
                        .into_data()
                        .try_into_vec_as::<i64>()
                        .map_err(read_back)?;
                    for (p, a) in predicted.iter().zip(&y) {
                        tally.class(*p as usize, *a as usize);
                    }
                    let loss = CrossEntropyLossConfig::new().init(&device).forward(out, yt);
                    loss_sum += f64::from(loss.into_scalar::<f32>()) * batch.len() as f64;
                }
                TaskKind::Regression => {
                    let targets = e.targets.as_deref().unwrap_or_default();
                    let predicted = out
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .map_err(read_back)?;
                    for (&p, &i) in predicted.iter().zip(batch) {
                        let scaled = self.scale_target(targets[i]);
                        loss_sum += f64::from((p - scaled) * (p - scaled));
                        tally.value(self.unscale_target(f64::from(p)), f64::from(targets[i]));
                    }
                }
                TaskKind::Anomaly => {
                    let scores = (out - x)
                        .powi_scalar(2)
                        .mean_dim(1)
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .map_err(read_back)?;
                    for (&s, &i) in scores.iter().zip(batch) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Examples, LocalData};
    use crate::manifest::TaskKind;
    use crate::model::{MlpConfig, initial_parameters};

    /// y = 2 x0 - x1 on 64 examples.
    fn line() -> LocalData {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..64 {
            let (a, b) = ((i % 8) as f32 / 4.0 - 1.0, (i / 8) as f32 / 4.0 - 1.0);
            x.extend([a, b]);
            y.push(2.0 * a - b);
        }
        LocalData {
            examples: Examples {
                shape: vec![2],
                x,
                labels: None,
                targets: Some(y),
                series: (0..64).collect(),
                position: (0..64).collect(),
                span: 1,
            },
            train: (0..64).collect(),
            holdout: (0..64).collect(),
        }
    }

    /// An MLP with one hidden layer of 8 that regresses one value on two.
    fn small_mlp() -> (ModelSpec, ModelIo) {
        let model = ModelSpec::Mlp(MlpConfig::new().with_hidden(vec![8]));
        let io = ModelIo {
            kind: TaskKind::Regression,
            input: vec![2],
            outputs: 1,
        };
        (model, io)
    }

    /// Plain SGD for `local_epochs` epochs of minibatches of 8.
    fn sgd(local_epochs: usize, learning_rate: f64) -> TrainSpec {
        TrainSpec {
            local_epochs,
            batch_size: 8,
            learning_rate,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.0,
            weight_decay: 0.0,
            clip_grad_norm: None,
            proximal_mu: 0.0,
            time_budget: None,
        }
    }

    #[test]
    fn every_optimizer_fits_a_line_and_the_same_seed_trains_the_same_model() {
        let (model, io) = small_mlp();
        let learner = Learner {
            model: &model,
            io: &io,
            targets: None,
        };
        let data = line();
        let start = initial_parameters(&model, &io, 1).expect("init");
        let (before, _) = learner
            .evaluate(&start, &data, &data.holdout, 64)
            .expect("eval");
        for (optimizer, lr, momentum, decay, clip) in [
            (OptimizerKind::Sgd, 0.05, 0.0, 0.0, None),
            (OptimizerKind::Sgd, 0.02, 0.9, 1e-4, Some(1.0)),
            (OptimizerKind::Adam, 0.01, 0.0, 1e-4, None),
            (OptimizerKind::Adamw, 0.01, 0.0, 1e-2, Some(5.0)),
        ] {
            let cfg = TrainSpec {
                local_epochs: 20,
                batch_size: 8,
                learning_rate: lr,
                optimizer,
                momentum,
                weight_decay: decay,
                clip_grad_norm: clip,
                proximal_mu: 0.0,
                time_budget: None,
            };
            let out = learner.fit(&start, &data, &cfg, 3).expect("fits");
            let (after, _) = learner
                .evaluate(&out.parameters, &data, &data.holdout, 64)
                .expect("eval");
            assert!(
                after < before / 10.0,
                "{optimizer:?}: MSE {before} -> {after}"
            );
            let again = learner.fit(&start, &data, &cfg, 3).expect("fits");
            assert_eq!(
                again.parameters, out.parameters,
                "{optimizer:?} is not reproducible"
            );
            assert_eq!(out.steps, 20 * 8);
        }
    }

    fn distance(a: &Parameters, b: &Parameters) -> f64 {
        a.tensors
            .iter()
            .zip(&b.tensors)
            .flat_map(|(x, y)| x.data.iter().zip(&y.data))
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn the_proximal_term_keeps_local_training_near_the_global_model() {
        let (model, io) = small_mlp();
        let learner = Learner {
            model: &model,
            io: &io,
            targets: None,
        };
        let data = line();
        let start = initial_parameters(&model, &io, 1).expect("init");
        let drift = |mu: f64| {
            let cfg = TrainSpec {
                proximal_mu: mu,
                ..sgd(10, 0.05)
            };
            let out = learner.fit(&start, &data, &cfg, 3).expect("fits");
            distance(&out.parameters, &start)
        };
        let (free, held) = (drift(0.0), drift(5.0));
        assert!(free > 0.0);
        assert!(
            held < 0.7 * free,
            "mu = 5 moved the model {held}, mu = 0 moved it {free}"
        );
    }

    #[test]
    fn a_spent_time_budget_sends_the_partial_work() {
        let (model, io) = small_mlp();
        let learner = Learner {
            model: &model,
            io: &io,
            targets: None,
        };
        let start = initial_parameters(&model, &io, 1).expect("init");
        let cfg = TrainSpec {
            time_budget: Some(std::time::Duration::from_nanos(1)),
            ..sgd(5, 0.05)
        };
        let out = learner.fit(&start, &line(), &cfg, 3).expect("fits");
        // One minibatch of 8 out of 64 examples, then the budget is gone.
        assert_eq!(out.steps, 1);
        assert!((out.epochs - 0.125).abs() < 1e-12, "{}", out.epochs);
        assert_ne!(out.parameters, start, "the partial work is sent");
        let full = learner
            .fit(
                &start,
                &line(),
                &TrainSpec {
                    time_budget: None,
                    ..cfg
                },
                3,
            )
            .expect("fits");
        assert_eq!((full.steps, full.epochs), (40, 5.0));
    }

    #[test]
    fn a_diverging_learning_rate_is_reported_not_returned() {
        let (model, io) = small_mlp();
        let learner = Learner {
            model: &model,
            io: &io,
            targets: None,
        };
        let cfg = TrainSpec {
            local_epochs: 50,
            batch_size: 64,
            learning_rate: 1e6,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.0,
            weight_decay: 0.0,
            clip_grad_norm: None,
            proximal_mu: 0.0,
            time_budget: None,
        };
        let start = initial_parameters(&model, &io, 1).expect("init");
        let e = learner.fit(&start, &line(), &cfg, 1).expect_err("diverges");
        assert!(e.to_string().contains("diverged"), "{e}");
    }
}
