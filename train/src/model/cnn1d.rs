//! `cnn1d`: a 1-D convolutional network over multichannel windows `[channels, length]`, the
//! usual model for accelerometer, vibration and power traces. Convolutions ('same' padding),
//! each followed by the activation and a max-pool, then a global average over time and a small
//! fully connected head.

use burn::config::Config;
use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::nn::pool::{MaxPool1d, MaxPool1dConfig};
use burn::nn::{Linear, PaddingConfig1d};
use burn::prelude::*;

use super::{
    Activation, ModelError, ModelIo, Noise, check_dropout, check_sizes, dense, dense_forward,
    not_anomaly, windows_of,
};

/// Settings of the `cnn1d` family.
#[derive(Config, Debug, PartialEq)]
pub struct Cnn1dConfig {
    /// Output channels of each convolution.
    #[config(default = "vec![32, 64]")]
    pub channels: Vec<usize>,
    /// Odd kernel width of every convolution.
    #[config(default = 5)]
    pub kernel_size: usize,
    /// Max-pool width after each convolution (1: none).
    #[config(default = 2)]
    pub pool: usize,
    /// Widths of the fully connected layers after pooling over time.
    #[config(default = "vec![64]")]
    pub hidden: Vec<usize>,
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    /// Dropout after each hidden fully connected layer while training.
    #[config(default = 0.0)]
    pub dropout: f64,
}

#[derive(Module, Debug)]
pub struct Cnn1d {
    convs: Vec<Conv1d>,
    pool: Option<MaxPool1d>,
    fcs: Vec<Linear>,
    #[module(skip)]
    input: [usize; 2],
    #[module(skip)]
    activation: Activation,
    #[module(skip)]
    dropout: f64,
}

impl Cnn1dConfig {
    pub fn init(&self, io: &ModelIo, device: &Device) -> Result<Cnn1d, ModelError> {
        const FAMILY: &str = "cnn1d";
        let [channels, length] = windows_of(FAMILY, io)?;
        not_anomaly(FAMILY, io)?;
        if self.channels.is_empty() {
            return Err(ModelError::new(
                FAMILY,
                "channels needs at least one convolution",
            ));
        }
        check_sizes(FAMILY, "channels", &self.channels)?;
        check_sizes(FAMILY, "hidden", &self.hidden)?;
        check_dropout(FAMILY, self.dropout)?;
        if self.kernel_size.is_multiple_of(2) {
            return Err(ModelError::new(
                FAMILY,
                format!(
                    "kernel_size = {} must be odd ('same' padding)",
                    self.kernel_size
                ),
            ));
        }
        if self.pool == 0 {
            return Err(ModelError::new(FAMILY, "pool must be at least 1"));
        }
        let mut steps = length;
        for _ in &self.channels {
            steps /= self.pool;
        }
        if steps == 0 {
            return Err(ModelError::new(
                FAMILY,
                format!(
                    "a window of {length} readings is too short for {} pools of {}",
                    self.channels.len(),
                    self.pool
                ),
            ));
        }
        let mut c_in = channels;
        let convs = self
            .channels
            .iter()
            .map(|&c_out| {
                let conv = Conv1dConfig::new(c_in, c_out, self.kernel_size)
                    .with_padding(PaddingConfig1d::Same)
                    .init(device);
                c_in = c_out;
                conv
            })
            .collect();
        let mut widths = vec![c_in];
        widths.extend(&self.hidden);
        widths.push(io.outputs);
        Ok(Cnn1d {
            convs,
            pool: (self.pool > 1).then(|| MaxPool1dConfig::new(self.pool).init()),
            fcs: dense(&widths, device),
            input: [channels, length],
            activation: self.activation,
            dropout: self.dropout,
        })
    }
}

impl Cnn1d {
    pub fn forward(&self, x: Tensor<2>, noise: &mut Noise) -> Tensor<2> {
        let [batch, _] = x.dims();
        let [channels, length] = self.input;
        let mut x: Tensor<3> = x.reshape([batch, channels, length]);
        for conv in &self.convs {
            x = self.activation.apply(conv.forward(x));
            if let Some(pool) = &self.pool {
                x = pool.forward(x);
            }
        }
        // Global average over time: the head sees what was found, not where.
        let x: Tensor<2> = x.mean_dim(2).flatten(1, 2);
        dense_forward(&self.fcs, x, self.activation, self.dropout, noise)
    }
}
