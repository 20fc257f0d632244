//! Local training and evaluation with burn: plain minibatch SGD, as in McMahan et al.

use std::sync::Arc;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use pollen_proto::Parameters;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::mnist::{IMAGE_PIXELS, MnistSplit};
use crate::model::{Classifier, Mnist2nn, MnistCnn, ModelKind, WeightsError, export, import};

/// Local-training hyper-parameters (Flower's fit config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    pub local_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("bad training config: {0}")]
    Config(String),
    #[error("this client holds no training examples")]
    NoData,
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
}

/// Loss and accuracy of a model on a set of examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOutput {
    pub loss: f64,
    pub accuracy: f64,
    pub num_examples: u64,
}

/// A client's local data: a view (indices) into a shared split.
#[derive(Debug, Clone)]
pub struct LocalData {
    pub split: Arc<MnistSplit>,
    pub indices: Vec<usize>,
}

impl LocalData {
    /// Every example of the split.
    pub fn all(split: Arc<MnistSplit>) -> Self {
        let indices = (0..split.len()).collect();
        Self { split, indices }
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    fn batch(&self, idx: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let mut pixels = Vec::with_capacity(idx.len() * IMAGE_PIXELS);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            let j = self.indices[i];
            pixels.extend_from_slice(self.split.image(j));
            labels.push(self.split.labels[j] as i64);
        }
        let x = Tensor::from_data(TensorData::new(pixels, [idx.len(), IMAGE_PIXELS]), device);
        let y = Tensor::from_data(TensorData::new(labels, [idx.len()]), device);
        (x, y)
    }
}

/// Trains `kind` from `global` on `data`. `seed` fixes the batch order.
pub fn fit(
    kind: ModelKind,
    global: &Parameters,
    data: &LocalData,
    config: TrainConfig,
    seed: u64,
) -> Result<FitOutput, TrainError> {
    match kind {
        ModelKind::Mnist2nn => fit_model::<Mnist2nn>(global, data, config, seed),
        ModelKind::MnistCnn => fit_model::<MnistCnn>(global, data, config, seed),
    }
}

/// Evaluates `params` on `data` in batches of `batch_size`.
pub fn evaluate(
    kind: ModelKind,
    params: &Parameters,
    data: &LocalData,
    batch_size: usize,
) -> Result<EvalOutput, TrainError> {
    match kind {
        ModelKind::Mnist2nn => evaluate_model::<Mnist2nn>(params, data, batch_size),
        ModelKind::MnistCnn => evaluate_model::<MnistCnn>(params, data, batch_size),
    }
}

fn check(config: &TrainConfig) -> Result<(), TrainError> {
    if config.local_epochs == 0 {
        return Err(TrainError::Config("local_epochs must be at least 1".into()));
    }
    if config.batch_size == 0 {
        return Err(TrainError::Config("batch_size must be at least 1".into()));
    }
    if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
        return Err(TrainError::Config(format!(
            "learning_rate = {} must be a positive number",
            config.learning_rate
        )));
    }
    Ok(())
}

fn fit_model<M: Classifier>(
    global: &Parameters,
    data: &LocalData,
    config: TrainConfig,
    seed: u64,
) -> Result<FitOutput, TrainError> {
    check(&config)?;
    if data.is_empty() {
        return Err(TrainError::NoData);
    }
    let device = Device::flex().autodiff();
    let mut model = M::new(&device);
    import(&mut model, global)?;
    let mut optim = SgdConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let (mut loss_sum, mut seen, mut steps) = (0.0f64, 0usize, 0usize);
    for epoch in 1..=config.local_epochs {
        let started = std::time::Instant::now();
        order.shuffle(&mut rng);
        (loss_sum, seen) = (0.0, 0);
        for batch in order.chunks(config.batch_size) {
            let (x, y) = data.batch(batch, &device);
            let logits = model.forward(x);
            let loss = loss_fn.forward(logits, y);
            let value = loss.clone().into_scalar::<f32>();
            if !value.is_finite() {
                return Err(TrainError::Diverged(value));
            }
            loss_sum += value as f64 * batch.len() as f64;
            seen += batch.len();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(config.learning_rate, model, grads);
            steps += 1;
        }
        tracing::info!(
            epoch,
            epochs = config.local_epochs,
            loss = format!("{:.4}", loss_sum / seen.max(1) as f64),
            examples = seen,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "local epoch done"
        );
    }
    Ok(FitOutput {
        parameters: export(&model)?,
        num_examples: data.len() as u64,
        loss: loss_sum / seen.max(1) as f64,
        steps,
    })
}

fn evaluate_model<M: Classifier>(
    params: &Parameters,
    data: &LocalData,
    batch_size: usize,
) -> Result<EvalOutput, TrainError> {
    if data.is_empty() {
        return Err(TrainError::NoData);
    }
    let device = Device::flex();
    let mut model = M::new(&device);
    import(&mut model, params)?;
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let order: Vec<usize> = (0..data.len()).collect();
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    for batch in order.chunks(batch_size.max(1)) {
        let (x, y) = data.batch(batch, &device);
        let logits = model.forward(x);
        let predicted = logits.clone().argmax(1).flatten::<1>(0, 1);
        correct += predicted.equal(y.clone()).int().sum().into_scalar::<i64>() as usize;
        loss_sum += loss_fn.forward(logits, y).into_scalar::<f32>() as f64 * batch.len() as f64;
    }
    Ok(EvalOutput {
        loss: loss_sum / data.len() as f64,
        accuracy: correct as f64 / data.len() as f64,
        num_examples: data.len() as u64,
    })
}
