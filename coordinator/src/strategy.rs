//! The `Strategy` contract, after Flower's: a strategy decides who trains, with what config, and
//! how results become the next global model. Strategies are pure (no sockets, no async), so a
//! round's logic is testable without a network.

use std::collections::{BTreeMap, HashMap};

use pollen_proto::fleet::{DataSchema, Scalar};
use pollen_proto::{Parameters, scalar::ScalarMap};
use rand::RngCore;

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
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::ClientError => "client_error",
            FailureReason::Rejected => "rejected",
            FailureReason::Disconnected => "disconnected",
            FailureReason::ProtocolError => "protocol_error",
        }
    }
}

/// A failure is data: it reaches aggregation alongside the results.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFailure {
    pub client_id: String,
    pub reason: FailureReason,
    pub message: String,
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

/// Folds fit updates into a running aggregate as they arrive, so memory stays O(model) however
/// many clients answer.
pub trait FitAggregator: Send {
    /// Folds one validated update. An error leaves the aggregate as it was before the call.
    fn fold(&mut self, update: &Parameters, num_examples: u64) -> Result<(), String>;
    /// How many updates were folded.
    fn count(&self) -> usize;
    /// The aggregate, or `None` when nothing was folded (or all weights were zero).
    fn finish(self: Box<Self>) -> Option<Parameters>;
}

/// A federated-learning strategy. The round driver calls, per round:
/// `configure_fit` -> (fold each result into `fit_aggregator`) -> `aggregate_fit` ->
/// `evaluate` (centralized) -> `configure_evaluate` -> `aggregate_evaluate`.
pub trait Strategy: Send {
    /// The initial global model. `None` means: ask one connected client for its parameters.
    fn initialize_parameters(&mut self) -> Option<Parameters>;

    /// How many clients must be connected before a round may start.
    fn min_available_clients(&self) -> usize;

    /// Chooses this round's fit clients and their config from the connected clients. An empty
    /// list means the round cannot run (too few clients); the driver records it as failed.
    fn configure_fit(
        &mut self,
        round: u64,
        available: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction>;

    /// A fresh streaming aggregator for this round's updates, shaped like `global`.
    fn fit_aggregator(&mut self, round: u64, global: &Parameters) -> Box<dyn FitAggregator>;

    /// Turns the folded updates, the results' bookkeeping and the failures into the next global
    /// model. `Ok(None)` keeps the current model (nothing to aggregate); an error fails the round
    /// and also keeps the current model. The returned map holds aggregated fit metrics (e.g. the
    /// example-weighted training loss).
    fn aggregate_fit(
        &mut self,
        round: u64,
        aggregator: Box<dyn FitAggregator>,
        results: &[FitSummary],
        failures: &[ClientFailure],
    ) -> Result<(Option<Parameters>, BTreeMap<String, f64>), StrategyError>;

    /// Chooses clients for federated evaluation; empty means no federated evaluation.
    fn configure_evaluate(
        &mut self,
        round: u64,
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
}
