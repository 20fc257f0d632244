//! `mlp`: a multilayer perceptron over the flattened example (tabular features, or a window or
//! image read as one vector). The MNIST 2NN preset is `hidden = [200, 200]`.

use burn::config::Config;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use super::{Activation, ModelError, ModelIo, Noise, check_dropout, check_sizes};
use crate::manifest::TaskKind;

/// Settings of the `mlp` family.
#[derive(Config, Debug, PartialEq)]
pub struct MlpConfig {
    /// Widths of the hidden layers, input side first.
    #[config(default = "vec![64, 64]")]
    pub hidden: Vec<usize>,
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    /// Dropout after each hidden layer while training.
    #[config(default = 0.0)]
    pub dropout: f64,
}

#[derive(Module, Debug)]
pub struct Mlp {
    fcs: Vec<Linear>,
    #[module(skip)]
    activation: Activation,
    #[module(skip)]
    dropout: f64,
}

impl MlpConfig {
    pub fn init(&self, io: &ModelIo, device: &Device) -> Result<Mlp, ModelError> {
        const FAMILY: &str = "mlp";
        if io.kind == TaskKind::Anomaly {
            return Err(ModelError::new(
                FAMILY,
                "anomaly detection trains family = \"autoencoder\"",
            ));
        }
        check_sizes(FAMILY, "hidden", &self.hidden)?;
        check_dropout(FAMILY, self.dropout)?;
        let mut widths = vec![io.input_len()];
        widths.extend(&self.hidden);
        widths.push(io.outputs);
        Ok(Mlp {
            fcs: widths
                .windows(2)
                .map(|w| LinearConfig::new(w[0], w[1]).init(device))
                .collect(),
            activation: self.activation,
            dropout: self.dropout,
        })
    }
}

impl Mlp {
    pub fn forward(&self, mut x: Tensor<2>, noise: &mut Noise) -> Tensor<2> {
        let last = self.fcs.len() - 1;
        for (i, fc) in self.fcs.iter().enumerate() {
            x = fc.forward(x);
            if i < last {
                x = noise.dropout(self.activation.apply(x), self.dropout);
            }
        }
        x
    }
}
