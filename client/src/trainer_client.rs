//! [`TrainerClient`]: a [`Client`] that trains a burn model on local MNIST data.

use std::time::Instant;

use pollen_proto::Parameters;
use pollen_proto::scalar::{self, ScalarMap};

use crate::fleet::{Client, ClientError, ClientEvaluate, ClientFit};
use crate::model::{ModelKind, initial_parameters};
use crate::trainer::{self, LocalData, TrainConfig};

/// Defaults used when a fit instruction leaves a hyper-parameter out.
pub const DEFAULT_TRAIN: TrainConfig = TrainConfig {
    local_epochs: 1,
    batch_size: 10,
    learning_rate: 0.1,
};

/// Trains `model` on `train`, evaluates on `test` (when given, else on `train`).
pub struct TrainerClient {
    pub model: ModelKind,
    pub train: LocalData,
    pub test: Option<LocalData>,
    /// Mixed with the round number to order batches reproducibly.
    pub seed: u64,
}

fn read_usize(config: &ScalarMap, key: &str, default: usize) -> Result<usize, ClientError> {
    match config.get(key) {
        None => Ok(default),
        Some(v) => scalar::as_i64(v)
            .filter(|n| *n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                ClientError::bad_instruction(format!(
                    "config {key} = {v:?} must be a positive integer"
                ))
            }),
    }
}

/// Reads `local_epochs`, `batch_size` and `learning_rate` from a fit config.
pub fn train_config(config: &ScalarMap) -> Result<TrainConfig, ClientError> {
    let learning_rate = match config.get("learning_rate") {
        None => DEFAULT_TRAIN.learning_rate,
        Some(v) => scalar::as_f64(v)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| {
                ClientError::bad_instruction(format!(
                    "config learning_rate = {v:?} must be a positive number"
                ))
            })?,
    };
    Ok(TrainConfig {
        local_epochs: read_usize(config, "local_epochs", DEFAULT_TRAIN.local_epochs)?,
        batch_size: read_usize(config, "batch_size", DEFAULT_TRAIN.batch_size)?,
        learning_rate,
    })
}

impl Client for TrainerClient {
    fn num_examples(&self) -> u64 {
        self.train.len() as u64
    }

    fn get_parameters(&mut self, _config: &ScalarMap) -> Result<Parameters, ClientError> {
        initial_parameters(self.model, self.seed).map_err(|e| ClientError::training(e.to_string()))
    }

    fn fit(
        &mut self,
        round: u64,
        parameters: Parameters,
        config: &ScalarMap,
    ) -> Result<ClientFit, ClientError> {
        let cfg = train_config(config)?;
        let started = Instant::now();
        let seed = self.seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let out = trainer::fit(self.model, &parameters, &self.train, cfg, seed)
            .map_err(|e| ClientError::training(e.to_string()))?;
        let mut metrics = ScalarMap::new();
        metrics.insert("loss".into(), scalar::f64(out.loss));
        metrics.insert("steps".into(), scalar::int(out.steps as i64));
        metrics.insert(
            "train_seconds".into(),
            scalar::f64(started.elapsed().as_secs_f64()),
        );
        Ok(ClientFit {
            parameters: out.parameters,
            num_examples: out.num_examples,
            metrics,
        })
    }

    fn evaluate(
        &mut self,
        _round: u64,
        parameters: Parameters,
        config: &ScalarMap,
    ) -> Result<ClientEvaluate, ClientError> {
        let batch = read_usize(config, "batch_size", 500)?;
        let data = self.test.as_ref().unwrap_or(&self.train);
        let out = trainer::evaluate(self.model, &parameters, data, batch)
            .map_err(|e| ClientError::training(e.to_string()))?;
        let mut metrics = ScalarMap::new();
        metrics.insert("accuracy".into(), scalar::f64(out.accuracy));
        Ok(ClientEvaluate {
            loss: out.loss,
            num_examples: out.num_examples,
            metrics,
        })
    }
}
