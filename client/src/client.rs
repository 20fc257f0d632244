//! The [`Client`] contract (Flower's `NumPyClient`, with the task made explicit): what a
//! federated client does with each instruction, whatever carries the instruction to it.

use bytes::Bytes;
use pollen_proto::fleet::{DataSchema, FailureCode, Statistics};
use pollen_proto::scalar::ScalarMap;
use pollen_proto::{BlobError, Parameters};

/// A task manifest as it arrived, its digest verified. The framework never looks inside: the
/// client that trains decides what the document means (see `pollen-train`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskBlob {
    /// Lower-case hex SHA-256 of `bytes`.
    pub sha256: String,
    pub bytes: Bytes,
    /// The files the manifest names by digest (a TorchScript model), verified too.
    pub files: Vec<std::sync::Arc<TaskFileBlob>>,
}

/// A file a task needs besides its manifest, its digest verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFileBlob {
    /// Lower-case hex SHA-256 of `bytes`.
    pub sha256: String,
    pub bytes: Bytes,
}

impl TaskBlob {
    /// The file named by `sha256` (either case), if the instruction brought it.
    pub fn file(&self, sha256: &str) -> Option<&TaskFileBlob> {
        self.files
            .iter()
            .map(|f| f.as_ref())
            .find(|f| f.sha256.eq_ignore_ascii_case(sha256))
    }
}

/// What an instruction is about, besides the weights.
#[derive(Debug, Clone, Copy)]
pub struct Work<'a> {
    pub run_id: &'a str,
    /// The round (0 for get-parameters and statistics).
    pub round: u64,
    /// The run's task manifest; `None` when the coordinator sent none (a client that serves a
    /// single fixed task, or a benchmark).
    pub task: Option<&'a TaskBlob>,
    /// Flower's per-instruction config (`local_epochs`, `learning_rate`, ...).
    pub config: &'a ScalarMap,
}

/// Local training produced this.
#[derive(Debug, Clone)]
pub struct ClientFit {
    pub parameters: Parameters,
    pub num_examples: u64,
    pub metrics: ScalarMap,
}

/// Local evaluation produced this.
#[derive(Debug, Clone)]
pub struct ClientEvaluate {
    pub loss: f64,
    pub num_examples: u64,
    pub metrics: ScalarMap,
}

/// Why a client could not do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    pub code: FailureCode,
    pub message: String,
}

impl ClientError {
    pub fn training(message: impl Into<String>) -> Self {
        Self {
            code: FailureCode::TrainingError,
            message: message.into(),
        }
    }

    pub fn bad_instruction(message: impl Into<String>) -> Self {
        Self {
            code: FailureCode::BadInstruction,
            message: message.into(),
        }
    }

    /// The local data does not fit the task (schema, shape or labels).
    pub fn data_mismatch(message: impl Into<String>) -> Self {
        Self {
            code: FailureCode::DataMismatch,
            message: message.into(),
        }
    }
}

impl From<BlobError> for ClientError {
    fn from(e: BlobError) -> Self {
        ClientError::bad_instruction(format!("global weights: {e}"))
    }
}

/// A federated client. Methods block: the fleet client and the edge agent run them on a
/// blocking thread, one at a time per client.
pub trait Client: Send + 'static {
    /// Local examples (sent with `Join` and in a device's status). Before any task arrives this
    /// is what the client can say: rows of its data, not yet windows.
    fn num_examples(&self) -> u64;

    /// What the local data looks like, announced with `Join` and in a device's status so that
    /// runs can select clients whose data fits their task. `None`: the client does not say.
    fn data_schema(&self) -> Option<DataSchema> {
        None
    }

    /// The client's initial weights for `work.task` (Flower asks one client for them when the
    /// strategy has none).
    fn get_parameters(&mut self, work: &Work<'_>) -> Result<Parameters, ClientError>;

    /// Trains from `parameters` on local data; the answer's weights must have the same names
    /// and shapes.
    fn fit(&mut self, work: &Work<'_>, parameters: Parameters) -> Result<ClientFit, ClientError>;

    /// Evaluates `parameters` on the local holdout.
    fn evaluate(
        &mut self,
        work: &Work<'_>,
        parameters: Parameters,
    ) -> Result<ClientEvaluate, ClientError>;

    /// How long to hold the answer just computed before sending it. Real clients answer at
    /// once (the default); simulated devices return their simulated slowness (hardware, link,
    /// time asleep) here, which the runtime waits out without holding a compute slot, so that
    /// a simulated fleet's timing can be studied on a few cores.
    fn answer_delay(&mut self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Federated statistics of the local training data under `work.task`'s input schema. The
    /// default refuses: a client that holds no data set has none to describe.
    fn statistics(&mut self, work: &Work<'_>) -> Result<Statistics, ClientError> {
        let _ = work;
        Err(ClientError::bad_instruction(
            "this client computes no federated statistics",
        ))
    }
}
