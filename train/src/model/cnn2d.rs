//! `cnn2d`: a 2-D convolutional network over images `[channels, height, width]`: convolutions
//! ('same' padding), each followed by the activation and a max-pool, flattened into fully
//! connected layers. The defaults are McMahan et al.'s MNIST CNN (the `mnist-cnn` preset).

use burn::config::Config;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::prelude::*;

use super::{
    Activation, ModelError, ModelIo, Noise, check_dropout, check_sizes, dense, dense_forward,
    not_anomaly,
};

/// Settings of the `cnn2d` family.
#[derive(Config, Debug, PartialEq)]
pub struct Cnn2dConfig {
    /// Output channels of each convolution.
    #[config(default = "vec![32, 64]")]
    pub channels: Vec<usize>,
    /// Odd, square kernel of every convolution.
    #[config(default = 5)]
    pub kernel_size: usize,
    /// Square max-pool after each convolution (1: none).
    #[config(default = 2)]
    pub pool: usize,
    /// Widths of the fully connected layers after flattening.
    #[config(default = "vec![512]")]
    pub hidden: Vec<usize>,
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    #[config(default = 0.0)]
    pub dropout: f64,
}

#[derive(Module, Debug)]
pub struct Cnn2d {
    convs: Vec<Conv2d>,
    pool: Option<MaxPool2d>,
    fcs: Vec<Linear>,
    #[module(skip)]
    input: [usize; 3],
    #[module(skip)]
    activation: Activation,
    #[module(skip)]
    dropout: f64,
}

impl Cnn2dConfig {
    pub fn init(&self, io: &ModelIo, device: &Device) -> Result<Cnn2d, ModelError> {
        const FAMILY: &str = "cnn2d";
        let &[channels, height, width] = io.input.as_slice() else {
            return Err(ModelError::new(
                FAMILY,
                format!(
                    "needs images [channels, height, width]; the input is {:?} (set task.shape)",
                    io.input
                ),
            ));
        };
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
        if self.kernel_size.is_multiple_of(2) || self.pool == 0 {
            return Err(ModelError::new(
                FAMILY,
                format!(
                    "kernel_size = {} must be odd and pool = {} at least 1",
                    self.kernel_size, self.pool
                ),
            ));
        }
        let (mut h, mut w) = (height, width);
        for _ in &self.channels {
            (h, w) = (h / self.pool, w / self.pool);
        }
        if h == 0 || w == 0 {
            return Err(ModelError::new(
                FAMILY,
                format!("{height}x{width} images are too small for the pools"),
            ));
        }
        let mut c_in = channels;
        let convs = self
            .channels
            .iter()
            .map(|&c_out| {
                let conv = Conv2dConfig::new([c_in, c_out], [self.kernel_size, self.kernel_size])
                    .with_padding(PaddingConfig2d::Same)
                    .init(device);
                c_in = c_out;
                conv
            })
            .collect();
        let mut widths = vec![c_in * h * w];
        widths.extend(&self.hidden);
        widths.push(io.outputs);
        Ok(Cnn2d {
            convs,
            pool: (self.pool > 1).then(|| MaxPool2dConfig::new([self.pool, self.pool]).init()),
            fcs: dense(&widths, device),
            input: [channels, height, width],
            activation: self.activation,
            dropout: self.dropout,
        })
    }
}

impl Cnn2d {
    pub fn forward(&self, x: Tensor<2>, noise: &mut Noise) -> Tensor<2> {
        let [batch, _] = x.dims();
        let [c, h, w] = self.input;
        let mut x: Tensor<4> = x.reshape([batch, c, h, w]);
        for conv in &self.convs {
            x = self.activation.apply(conv.forward(x));
            if let Some(pool) = &self.pool {
                x = pool.forward(x);
            }
        }
        let x: Tensor<2> = x.flatten(1, 3);
        dense_forward(&self.fcs, x, self.activation, self.dropout, noise)
    }
}
