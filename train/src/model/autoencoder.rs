//! `autoencoder`: an MLP that squeezes the flattened example through a narrow code and
//! reconstructs it. Trained on normal data, its reconstruction error is the anomaly score.

use burn::config::Config;
use burn::nn::Linear;
use burn::prelude::*;

use super::{
    Activation, ModelError, ModelIo, Noise, check_dropout, check_sizes, dense, dense_forward,
};
use crate::manifest::TaskKind;

/// Settings of the `autoencoder` family.
#[derive(Config, Debug, PartialEq)]
pub struct AutoencoderConfig {
    /// Encoder widths, input side first; the last is the code. The decoder mirrors them.
    #[config(default = "vec![32, 8]")]
    pub hidden: Vec<usize>,
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    #[config(default = 0.0)]
    pub dropout: f64,
}

#[derive(Module, Debug)]
pub struct Autoencoder {
    encs: Vec<Linear>,
    decs: Vec<Linear>,
    #[module(skip)]
    activation: Activation,
    #[module(skip)]
    dropout: f64,
}

impl AutoencoderConfig {
    pub fn init(&self, io: &ModelIo, device: &Device) -> Result<Autoencoder, ModelError> {
        const FAMILY: &str = "autoencoder";
        if io.kind != TaskKind::Anomaly {
            return Err(ModelError::new(
                FAMILY,
                "an autoencoder serves task kind = \"anomaly\"",
            ));
        }
        if self.hidden.is_empty() {
            return Err(ModelError::new(
                FAMILY,
                "hidden needs at least the code width",
            ));
        }
        check_sizes(FAMILY, "hidden", &self.hidden)?;
        check_dropout(FAMILY, self.dropout)?;
        let mut widths = vec![io.input_len()];
        widths.extend(&self.hidden);
        let encs = dense(&widths, device);
        widths.reverse();
        let decs = dense(&widths, device);
        Ok(Autoencoder {
            encs,
            decs,
            activation: self.activation,
            dropout: self.dropout,
        })
    }
}

impl Autoencoder {
    pub fn forward(&self, mut x: Tensor<2>, noise: &mut Noise) -> Tensor<2> {
        // The code is activated too: the decoder reads it like any hidden layer.
        for fc in &self.encs {
            x = noise.dropout(self.activation.apply(fc.forward(x)), self.dropout);
        }
        dense_forward(&self.decs, x, self.activation, 0.0, noise)
    }
}
