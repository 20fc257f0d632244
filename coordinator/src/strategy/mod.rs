//! The `Strategy` contract, after Flower's: a strategy decides who trains, with what config, and
//! how results become the next global model. Strategies are pure (no sockets, no async), so a
//! round's logic is testable without a network.
//!
//! # Layout
//! - this file: the contract and the data it exchanges with the round driver.
//! - [`fedavg`]: FedAvg, the base every built-in strategy is assembled from: Flower's sampling,
//!   an aggregation rule, an optional server optimizer, norm bounding and central DP.
//! - [`robust`]: coordinate-wise median, trimmed mean, Krum, Multi-Krum and Bulyan.
//! - [`server_opt`]: FedAvgM's server momentum and the FedOpt family (FedAdam, FedYogi,
//!   FedAdagrad).
//! - [`config`]: the `[strategy]` table of a run spec, by Flower's names, and what it builds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use pollen_proto::fleet::{DataSchema, Scalar};
use pollen_proto::{Parameters, scalar::ScalarMap};
use rand::RngCore;

pub mod aggregate;
pub mod config;
pub mod fedavg;
pub mod robust;
pub mod server_opt;
#[cfg(test)]
mod tests;

/// A connected client, as the strategy sees it when sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientInfo {
    pub id: String,
    pub num_examples: u64,
    pub agent_version: String,
    pub properties: HashMap<String, Scalar>,
    /// What the client's local data looks like, if it says.
    pub data: Option<DataSchema>,
}

/// What one sampled client is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Instruction {
    pub client_id: String,
    pub config: ScalarMap,
}

/// Why a sampled client contributed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// No answer before the round's deadline.
    Timeout,
    /// The client reported a failure (training error, bad instruction, ...).
    ClientError,
    /// The client answered, but its update failed validation (shape, NaN/Inf, digest, codec).
    Rejected,
    /// The client's stream ended while the request was open.
    Disconnected,
    /// The client answered with the wrong kind of message for the request.
    ProtocolError,
    /// The device owner's policy refused the instruction: not an error of the device.
    Declined,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::ClientError => "client_error",
            FailureReason::Rejected => "rejected",
            FailureReason::Disconnected => "disconnected",
            FailureReason::ProtocolError => "protocol_error",
            FailureReason::Declined => "declined",
        }
    }
}

/// Why an answer was refused: what a reader of the records needs to tell a corrupt device from
/// a hostile one. Only failures with [`FailureReason::Rejected`] carry one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    /// The answer names another round than the instruction's.
    WrongRound,
    /// `num_examples` is 0: the update would weigh nothing.
    NoExamples,
    /// `num_examples` is above what the client announced for its data.
    TooManyExamples,
    /// A fit answer without weights.
    NoWeights,
    /// Weights by reference where none may be (no object storage, no upload asked for), or a
    /// reference to another object key than the one this request allowed.
    ForeignObject,
    /// The object is larger than an update of this model can be, or its size is not the one
    /// the answer gave.
    Size,
    /// The object could not be read from storage.
    Unreadable,
    /// SHA-256 of the bytes is not the one the answer gave.
    Digest,
    /// A codec this coordinator does not read, or one the run did not ask for.
    Codec,
    /// Not a blob of the codec it claims (container, dtype, index layout).
    Malformed,
    /// Tensor names or shapes are not the model's.
    Shape,
    /// A NaN or an infinity in the weights, or an evaluation loss that is not finite.
    NonFinite,
    /// A delta computed against another model than the one this request sent.
    Base,
    /// The strategy's aggregator refused it.
    Aggregation,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::WrongRound => "wrong_round",
            Rejection::NoExamples => "no_examples",
            Rejection::TooManyExamples => "too_many_examples",
            Rejection::NoWeights => "no_weights",
            Rejection::ForeignObject => "foreign_object",
            Rejection::Size => "size",
            Rejection::Unreadable => "unreadable",
            Rejection::Digest => "digest",
            Rejection::Codec => "codec",
            Rejection::Malformed => "malformed",
            Rejection::Shape => "shape",
            Rejection::NonFinite => "non_finite",
            Rejection::Base => "base",
            Rejection::Aggregation => "aggregation",
        }
    }

    /// The rejection a blob error stands for.
    pub fn of_blob(e: &pollen_proto::BlobError) -> Self {
        use pollen_proto::BlobError as B;
        match e {
            B::DigestMismatch { .. } => Rejection::Digest,
            B::UnsupportedCodec(_)
            | B::UnknownCodec(_)
            | B::CodecMismatch { .. }
            | B::MissingMetadata { .. }
            | B::BadFraction(_) => Rejection::Codec,
            B::Malformed(_)
            | B::Dtype { .. }
            | B::Length { .. }
            | B::BadScale { .. }
            | B::IndexOutOfRange { .. }
            | B::IndexNotIncreasing { .. }
            | B::TopKShape { .. }
            | B::ReservedName { .. }
            | B::Unrepresentable { .. } => Rejection::Malformed,
            B::Shape { .. } | B::Missing { .. } | B::Unexpected { .. } | B::Layout { .. } => {
                Rejection::Shape
            }
            B::NonFinite { .. } | B::NonFiniteResult { .. } => Rejection::NonFinite,
            B::BaseMismatch { .. } | B::MissingBase { .. } => Rejection::Base,
            B::Empty => Rejection::NoWeights,
            B::NoStore { .. } => Rejection::ForeignObject,
        }
    }
}

/// A failure is data: it reaches aggregation alongside the results.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFailure {
    pub client_id: String,
    pub reason: FailureReason,
    /// Why the answer was refused, for [`FailureReason::Rejected`].
    pub rejection: Option<Rejection>,
    pub message: String,
}

impl ClientFailure {
    pub fn new(client_id: &str, reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            client_id: client_id.to_string(),
            reason,
            rejection: None,
            message: message.into(),
        }
    }

    /// An answer that arrived and was refused.
    pub fn rejected(client_id: &str, rejection: Rejection, message: impl Into<String>) -> Self {
        Self {
            client_id: client_id.to_string(),
            reason: FailureReason::Rejected,
            rejection: Some(rejection),
            message: message.into(),
        }
    }
}

/// One client's validated update, as a strategy's aggregator receives it: robust rules need to
/// know who sent what (Krum scores clients), and buffering ones keep the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    pub client_id: String,
    pub num_examples: u64,
    /// The client's model after local training (absolute weights, whatever the wire codec).
    pub parameters: Parameters,
}

/// A fit result once its weights have been folded: what remains is the bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct FitSummary {
    pub client_id: String,
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// A federated-evaluation result from one client.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateSummary {
    pub client_id: String,
    pub loss: f64,
    pub num_examples: u64,
    pub metrics: BTreeMap<String, f64>,
}

/// A loss and metrics (e.g. `accuracy`), centralized or aggregated across clients.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    pub loss: f64,
    pub metrics: BTreeMap<String, f64>,
}

/// Why a strategy could not produce a new global model this round.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StrategyError {
    #[error("round {round}: {got} fit results, fewer than min_fit_clients = {min}")]
    Quorum { round: u64, got: usize, min: usize },
    #[error("round {round}: {failures} client failures and accept_failures = false")]
    FailuresNotAccepted { round: u64, failures: usize },
    #[error("round {round}: aggregation failed: {message}")]
    Aggregation { round: u64, message: String },
}

/// What an aggregator made of the updates it was given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Folded {
    /// The aggregate model, or `None` when nothing was folded (or all weights were zero).
    pub parameters: Option<Parameters>,
    /// Updates folded.
    pub count: usize,
    /// Of those, how many were scaled down to the norm bound (norm bounding, central DP).
    pub clipped: usize,
}

/// Folds fit updates into an aggregate as they arrive. Mean rules keep a running sum, so memory
/// stays O(model) however many clients answer; robust rules (median, Krum, ...) must see every
/// update and keep them until [`FitAggregator::finish`].
pub trait FitAggregator: Send {
    /// Folds one validated update. An error leaves the aggregate as it was before the call.
    fn fold(&mut self, update: &ClientUpdate) -> Result<(), String>;
    /// How many updates were folded.
    fn count(&self) -> usize;
    /// The aggregate. An error (too few updates for the rule, say) fails the round.
    fn finish(self: Box<Self>) -> Result<Folded, String>;
}

/// Differential privacy spent so far, as the accountant reports it after a round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrivacySpent {
    /// `central` (noise added at aggregation) or `local` (noise added on each device).
    pub mechanism: String,
    pub epsilon: f64,
    pub delta: f64,
    /// Noise standard deviation over the clipping norm.
    pub noise_multiplier: f64,
    /// The clipping norm used this round (it moves with adaptive clipping).
    pub clipping_norm: f64,
    /// Rounds (or, for local DP, the most participations of any one device) composed.
    pub steps: u64,
}

/// A federated-learning strategy. The round driver calls, per round:
/// `configure_fit` -> (fold each result into `fit_aggregator`) -> `aggregate_fit` ->
/// `evaluate` (centralized) -> `configure_evaluate` -> `aggregate_evaluate`.
pub trait Strategy: Send {
    /// The initial global model. `None` means: ask one connected client for its parameters.
    fn initialize_parameters(&mut self) -> Option<Parameters>;

    /// How many clients must be connected before a round may start.
    fn min_available_clients(&self) -> usize;

    /// Chooses this round's fit clients and their config from the connected clients, knowing
    /// the current global model (as Flower's does). An empty list means the round cannot run
    /// (too few clients); the driver records it as failed.
    fn configure_fit(
        &mut self,
        round: u64,
        global: &Parameters,
        available: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction>;

    /// The config of one fit instruction for `round` when the driver, not the strategy, picks
    /// the client (FedBuff keeps devices training and asks idle ones itself).
    fn fit_config(&mut self, round: u64) -> ScalarMap;

    /// A fresh aggregator for this round's updates of `global`.
    fn fit_aggregator(&mut self, round: u64, global: &Arc<Parameters>) -> Box<dyn FitAggregator>;

    /// Turns the folded updates, the results' bookkeeping and the failures into the next global
    /// model. `Ok(None)` keeps the current model (nothing to aggregate); an error fails the round
    /// and also keeps the current model. The returned map holds aggregated fit metrics (e.g. the
    /// example-weighted training loss).
    fn aggregate_fit(
        &mut self,
        round: u64,
        global: &Parameters,
        aggregator: Box<dyn FitAggregator>,
        results: &[FitSummary],
        failures: &[ClientFailure],
    ) -> Result<(Option<Parameters>, BTreeMap<String, f64>), StrategyError>;

    /// Chooses clients for federated evaluation; empty means no federated evaluation.
    fn configure_evaluate(
        &mut self,
        round: u64,
        global: &Parameters,
        available: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction>;

    /// Aggregates federated evaluation; `None` when there is nothing to aggregate.
    fn aggregate_evaluate(
        &mut self,
        round: u64,
        results: &[EvaluateSummary],
        failures: &[ClientFailure],
    ) -> Option<Evaluation>;

    /// Centralized evaluation of the global model on the server side; `None` when the strategy
    /// has no evaluation function. Round 0 evaluates the initial model.
    fn evaluate(&mut self, round: u64, parameters: &Parameters) -> Option<Evaluation>;

    /// The privacy spent up to the last aggregated round; `None` for strategies without
    /// differential privacy.
    fn privacy(&self) -> Option<PrivacySpent> {
        None
    }
}
