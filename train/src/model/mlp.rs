//! `mlp`: a multilayer perceptron over the flattened example (tabular features, or a window or
//! image read as one vector). The MNIST 2NN preset is `hidden = [200, 200]`.

use burn::config::Config;
use burn::nn::Linear;
use burn::prelude::*;

use super::{
    Activation, ModelError, ModelIo, Noise, check_dropout, check_sizes, dense, dense_forward,
    not_anomaly,
};

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
        not_anomaly(FAMILY, io)?;
        check_sizes(FAMILY, "hidden", &self.hidden)?;
        check_dropout(FAMILY, self.dropout)?;
        let mut widths = vec![io.input_len()];
        widths.extend(&self.hidden);
        widths.push(io.outputs);
        Ok(Mlp {
            fcs: dense(&widths, device),
            activation: self.activation,
            dropout: self.dropout,
        })
    }
}

impl Mlp {
    pub fn forward(&self, x: Tensor<2>, noise: &mut Noise) -> Tensor<2> {
        dense_forward(&self.fcs, x, self.activation, self.dropout, noise)
    }
}
