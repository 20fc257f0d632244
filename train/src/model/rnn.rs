//! `rnn`: a small recurrent network over windows `[channels, length]`: stacked GRU or LSTM
//! layers read the window one reading at a time; the last hidden state goes through a fully
//! connected head.

use burn::config::Config;
use burn::nn::Linear;
use burn::nn::gru::{Gru, GruConfig};
use burn::nn::lstm::{Lstm, LstmConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    Activation, ModelError, ModelIo, Noise, check_dropout, check_sizes, dense, dense_forward,
    not_anomaly, windows_of,
};

/// The recurrent cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cell {
    #[default]
    Gru,
    Lstm,
}

/// Settings of the `rnn` family.
#[derive(Config, Debug, PartialEq)]
pub struct RnnConfig {
    #[config(default = "Cell::Gru")]
    pub cell: Cell,
    /// Hidden size of each stacked recurrent layer.
    #[config(default = "vec![32]")]
    pub hidden_size: Vec<usize>,
    /// Widths of the fully connected layers on the last hidden state.
    #[config(default = "vec![]")]
    pub hidden: Vec<usize>,
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    /// Dropout on the last hidden state and after each hidden fully connected layer.
    #[config(default = 0.0)]
    pub dropout: f64,
}

// A model holds a few of these, so the size difference costs nothing; burn's `Module` is not
// implemented for `Box`, so the variants cannot be boxed anyway.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Recurrent {
    Gru(Gru),
    Lstm(Lstm),
}

impl Recurrent {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Recurrent::Gru(g) => g.forward(x, None),
            Recurrent::Lstm(l) => l.forward(x, None).0,
        }
    }
}

#[derive(Module, Debug)]
pub struct Rnn {
    rnns: Vec<Recurrent>,
    fcs: Vec<Linear>,
    #[module(skip)]
    input: [usize; 2],
    #[module(skip)]
    activation: Activation,
    #[module(skip)]
    dropout: f64,
}

impl RnnConfig {
    pub fn init(&self, io: &ModelIo, device: &Device) -> Result<Rnn, ModelError> {
        const FAMILY: &str = "rnn";
        let [channels, length] = windows_of(FAMILY, io)?;
        not_anomaly(FAMILY, io)?;
        if self.hidden_size.is_empty() {
            return Err(ModelError::new(
                FAMILY,
                "hidden_size needs at least one layer",
            ));
        }
        check_sizes(FAMILY, "hidden_size", &self.hidden_size)?;
        check_sizes(FAMILY, "hidden", &self.hidden)?;
        check_dropout(FAMILY, self.dropout)?;
        let mut d_in = channels;
        let rnns = self
            .hidden_size
            .iter()
            .map(|&d_hidden| {
                let layer = match self.cell {
                    Cell::Gru => Recurrent::Gru(GruConfig::new(d_in, d_hidden, true).init(device)),
                    Cell::Lstm => {
                        Recurrent::Lstm(LstmConfig::new(d_in, d_hidden, true).init(device))
                    }
                };
                d_in = d_hidden;
                layer
            })
            .collect();
        let mut widths = vec![d_in];
        widths.extend(&self.hidden);
        widths.push(io.outputs);
        Ok(Rnn {
            rnns,
            fcs: dense(&widths, device),
            input: [channels, length],
            activation: self.activation,
            dropout: self.dropout,
        })
    }
}

impl Rnn {
    pub fn forward(&self, x: Tensor<2>, noise: &mut Noise) -> Tensor<2> {
        let [batch, _] = x.dims();
        let [channels, length] = self.input;
        // Examples are channel-major; a recurrent layer reads [batch, time, channels].
        let mut x: Tensor<3> = x.reshape([batch, channels, length]).swap_dims(1, 2);
        for rnn in &self.rnns {
            x = rnn.forward(x);
        }
        let [_, _, hidden] = x.dims();
        let x: Tensor<2> = x.narrow(1, length - 1, 1).reshape([batch, hidden]);
        let x = noise.dropout(x, self.dropout);
        dense_forward(&self.fcs, x, self.activation, self.dropout, noise)
    }
}
