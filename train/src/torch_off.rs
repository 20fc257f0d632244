//! The LibTorch backend's shape in a build without the `torch` feature: a network that cannot be
//! built, so that `Task` dispatches to LibTorch without conditional code of its own and every
//! such path ends in an error saying how to get LibTorch. Its methods cannot be reached (`Net`
//! has no values).

use std::convert::Infallible;

use pollen_proto::Parameters;

use crate::data::LocalData;
use crate::manifest::{Scaling, TrainSpec};
use crate::metrics::Tally;
use crate::model::{ModelIo, ModelSpec};
use crate::trainer::{FitOutput, TrainError};

/// No network: this build has no LibTorch.
#[derive(Debug)]
pub struct Net(Infallible);

impl Net {
    pub fn new(_: &ModelSpec, _: &ModelIo, _: Option<&[u8]>) -> Result<Self, String> {
        Err(
            "this build has no LibTorch (build pollen-agent or pollen with --features torch)"
                .into(),
        )
    }
}

/// The LibTorch learner's fields, which nothing reads in a build without LibTorch.
#[allow(dead_code)]
pub struct TorchLearner<'a> {
    pub io: &'a ModelIo,
    pub targets: Option<&'a Scaling>,
}

impl TorchLearner<'_> {
    pub fn fit(
        &self,
        net: &mut Net,
        _: &Parameters,
        _: &LocalData,
        _: &TrainSpec,
        _: u64,
    ) -> Result<FitOutput, TrainError> {
        match net.0 {}
    }

    pub fn evaluate(
        &self,
        net: &mut Net,
        _: &Parameters,
        _: &LocalData,
        _: &[usize],
        _: usize,
    ) -> Result<(f64, Tally), TrainError> {
        match net.0 {}
    }
}

pub fn initial_parameters(net: &Net) -> Result<Parameters, TrainError> {
    match net.0 {}
}
