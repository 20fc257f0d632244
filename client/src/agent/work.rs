//! Working on one command: fetch the task manifest (cached by digest) and the global weights,
//! compute with the [`Client`] on a blocking thread (holding a compute slot), upload the
//! result, and build the reply.
//!
//! A cancelled command stops at the next step boundary; computation already handed to the
//! blocking thread runs to its end (it cannot be interrupted) and its result is dropped.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use pollen_proto::device::{
    BlobGet, Command, CommandKind, EvaluateReply, FitReply, Reply, reply::Body,
};
use pollen_proto::fleet::{Failure, FailureCode, Progress};
use pollen_proto::scalar::{self, ScalarMap};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::state;
use crate::client::{Client, ClientError, TaskBlob, Work};
use crate::task::TaskCache;
use crate::transfer::{self, TransferError};
use crate::update::UpdateEncoder;

/// How a command ended.
#[derive(Debug)]
pub struct Done {
    pub request_id: String,
    pub kind: Option<CommandKind>,
    /// `None` when the command was cancelled: nothing is uploaded or replied.
    pub reply: Option<Reply>,
}

/// Why work stopped early.
enum Halt {
    Cancelled,
    Failed(ClientError),
}

impl From<ClientError> for Halt {
    fn from(e: ClientError) -> Self {
        Halt::Failed(e)
    }
}

impl From<TransferError> for Halt {
    fn from(e: TransferError) -> Self {
        Halt::Failed(e.into())
    }
}

/// What every command's work needs; shared by the runtime and the worker tasks.
pub struct Worker {
    pub device_id: String,
    pub http: reqwest::Client,
    pub client: Arc<Mutex<Box<dyn Client>>>,
    /// Task manifests received, by digest.
    pub tasks: TaskCache,
    pub compute_slots: Option<Arc<Semaphore>>,
    pub num_examples: u64,
    /// Progress replies, published best effort by the runtime.
    pub progress: mpsc::Sender<Reply>,
    /// Encodes updates as instructions ask (codec, local DP), keeping top-k's residuals.
    pub updates: Arc<UpdateEncoder>,
}

/// `future`, unless `cancel` fires first.
async fn unless<T>(cancel: &CancellationToken, future: impl Future<Output = T>) -> Result<T, Halt> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(Halt::Cancelled),
        out = future => Ok(out),
    }
}

/// A reply carrying `body` for `command`.
pub fn reply(device_id: &str, command: &Command, body: Body) -> Reply {
    Reply {
        request_id: command.request_id.clone(),
        device_id: device_id.to_string(),
        round: command.round,
        body: Some(body),
    }
}

/// A failure reply.
pub fn failure(device_id: &str, command: &Command, code: FailureCode, message: String) -> Reply {
    reply(
        device_id,
        command,
        Body::Failure(Failure {
            // The MQTT reply names its command by `Reply::request_id`.
            request_id: 0,
            round: command.round,
            code: code as i32,
            message,
        }),
    )
}

impl Worker {
    /// Works on `command` to its end. Never panics on anything in the command.
    pub async fn execute(self: Arc<Self>, command: Command, cancel: CancellationToken) -> Done {
        let kind = state::kind(&command);
        let started = Instant::now();
        let outcome = match kind {
            Some(CommandKind::Fit) => self.fit(&command, &cancel).await,
            Some(CommandKind::Evaluate) => self.evaluate(&command, &cancel).await,
            Some(CommandKind::GetParameters) => self.get_parameters(&command, &cancel).await,
            Some(CommandKind::Statistics) => self.statistics(&command, &cancel).await,
            // The scheduler refuses these before they are queued.
            Some(CommandKind::Cancel | CommandKind::Unspecified) | None => Err(Halt::Failed(
                ClientError::bad_instruction(format!("command kind {} is not work", command.kind)),
            )),
        };
        // A cancel that lands after the last await still wins: its result is unwanted.
        let reply = match outcome {
            _ if cancel.is_cancelled() => None,
            Err(Halt::Cancelled) => None,
            Ok(body) => Some(reply(&self.device_id, &command, body)),
            Err(Halt::Failed(e)) => {
                tracing::warn!(
                    request_id = %command.request_id,
                    round = command.round,
                    code = e.code.as_str_name(),
                    "command failed: {}",
                    e.message
                );
                Some(failure(&self.device_id, &command, e.code, e.message))
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        match reply.as_ref().and_then(|r| r.body.as_ref()) {
            None => tracing::info!(request_id = %command.request_id, "cancelled; result dropped"),
            Some(Body::Fit(fit)) if kind == Some(CommandKind::Fit) => tracing::info!(
                request_id = %command.request_id,
                round = command.round,
                loss = fit.metrics.get("loss").and_then(scalar::as_f64).unwrap_or(f64::NAN),
                seconds = format!("{seconds:.2}"),
                num_examples = fit.num_examples,
                "fit done"
            ),
            Some(Body::Evaluate(evaluation)) => tracing::info!(
                request_id = %command.request_id,
                round = command.round,
                loss = evaluation.loss,
                seconds = format!("{seconds:.2}"),
                "evaluation done"
            ),
            Some(Body::Statistics(statistics)) => tracing::info!(
                request_id = %command.request_id,
                examples = statistics.num_examples,
                seconds = format!("{seconds:.2}"),
                "statistics done"
            ),
            Some(_) => {}
        }
        Done {
            request_id: command.request_id,
            kind,
            reply,
        }
    }

    fn progress(&self, command: &Command, fraction: f32, message: &str) {
        let update = reply(
            &self.device_id,
            command,
            Body::Progress(Progress {
                request_id: 0,
                round: command.round,
                fraction,
                message: message.to_string(),
            }),
        );
        // Progress is advisory: if the runtime is behind, skip this one.
        let _ = self.progress.try_send(update);
    }

    /// Downloads and decodes the command's global weights.
    async fn fetch(
        &self,
        command: &Command,
        cancel: &CancellationToken,
    ) -> Result<pollen_proto::Parameters, Halt> {
        // (The digest a delta update names as its base is the command's `sha256`.)
        let default = BlobGet::default();
        let get = command.global_weights.as_ref().unwrap_or(&default);
        let started = Instant::now();
        let parameters = unless(cancel, transfer::download(&self.http, get)).await??;
        log_transfer("global model downloaded", command, get.size_bytes, started);
        Ok(parameters)
    }

    /// The command's task manifest (cached by digest, else downloaded and verified).
    async fn task(
        &self,
        command: &Command,
        cancel: &CancellationToken,
    ) -> Result<Option<Arc<TaskBlob>>, Halt> {
        let http = self.http.clone();
        let resolve = self.tasks.resolve(command.task.as_ref(), move || Ok(http));
        Ok(unless(cancel, resolve).await??)
    }

    /// Runs `f` on the client on a blocking thread with the command's [`Work`], holding a
    /// compute slot if slots are limited. The slot and the client stay taken until `f`
    /// returns, even if the command is cancelled. Then waits out the client's answer delay (a
    /// simulated slow device's) without the slot, unless the command is cancelled.
    async fn compute<T: Send + 'static>(
        &self,
        command: &Command,
        task: Option<Arc<TaskBlob>>,
        cancel: &CancellationToken,
        f: impl FnOnce(&mut dyn Client, &Work<'_>) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, Halt> {
        let permit = match &self.compute_slots {
            Some(slots) => Some(
                unless(cancel, slots.clone().acquire_owned())
                    .await?
                    .map_err(|_| ClientError::training("the compute slots were closed"))?,
            ),
            None => None,
        };
        let client = self.client.clone();
        let (run_id, round, config) = (
            command.run_id.clone(),
            command.round,
            command.config.clone(),
        );
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut client = client.lock().unwrap_or_else(PoisonError::into_inner);
            let work = Work {
                run_id: &run_id,
                round,
                task: task.as_deref(),
                config: &config,
            };
            let out = f(client.as_mut(), &work);
            (out, client.answer_delay())
        });
        let joined = unless(cancel, job).await?;
        let (out, delay) =
            joined.map_err(|e| ClientError::training(format!("the client panicked: {e}")))?;
        if !delay.is_zero() {
            unless(cancel, tokio::time::sleep(delay)).await?;
        }
        Ok(out?)
    }

    async fn upload(
        &self,
        command: &Command,
        cancel: &CancellationToken,
        blob: &pollen_proto::blob::EncodedBlob,
    ) -> Result<(), Halt> {
        self.progress(command, 0.9, "uploading");
        let started = Instant::now();
        unless(
            cancel,
            transfer::upload(&self.http, &command.upload_url, blob.bytes.clone()),
        )
        .await??;
        log_transfer("update uploaded", command, blob.bytes.len() as u64, started);
        Ok(())
    }

    async fn fit(&self, command: &Command, cancel: &CancellationToken) -> Result<Body, Halt> {
        let task = self.task(command, cancel).await?;
        let parameters = self.fetch(command, cancel).await?;
        let base_sha256 = command
            .global_weights
            .as_ref()
            .map(|g| g.sha256.clone())
            .unwrap_or_default();
        self.progress(command, 0.1, "training");
        let updates = self.updates.clone();
        let (num_examples, metrics, blob) = self
            .compute(command, task, cancel, move |client, work| {
                let fit = client.fit(work, parameters.clone())?;
                let blob = updates.encode(
                    work.run_id,
                    work.config,
                    fit.parameters,
                    &parameters,
                    &base_sha256,
                    true,
                )?;
                Ok((fit.num_examples, fit.metrics, blob))
            })
            .await?;
        self.upload(command, cancel, &blob).await?;
        Ok(uploaded(blob, num_examples, metrics))
    }

    async fn evaluate(&self, command: &Command, cancel: &CancellationToken) -> Result<Body, Halt> {
        let task = self.task(command, cancel).await?;
        let parameters = self.fetch(command, cancel).await?;
        self.progress(command, 0.1, "evaluating");
        let evaluation = self
            .compute(command, task, cancel, move |client, work| {
                client.evaluate(work, parameters)
            })
            .await?;
        Ok(Body::Evaluate(EvaluateReply {
            loss: evaluation.loss,
            num_examples: evaluation.num_examples,
            metrics: evaluation.metrics,
        }))
    }

    async fn get_parameters(
        &self,
        command: &Command,
        cancel: &CancellationToken,
    ) -> Result<Body, Halt> {
        let task = self.task(command, cancel).await?;
        let blob = self
            .compute(command, task, cancel, move |client, work| {
                Ok(client.get_parameters(work)?.encode())
            })
            .await?;
        self.upload(command, cancel, &blob).await?;
        Ok(uploaded(blob, self.num_examples, ScalarMap::new()))
    }

    async fn statistics(
        &self,
        command: &Command,
        cancel: &CancellationToken,
    ) -> Result<Body, Halt> {
        let task = self.task(command, cancel).await?;
        let statistics = self
            .compute(command, task, cancel, move |client, work| {
                client.statistics(work)
            })
            .await?;
        Ok(Body::Statistics(statistics))
    }
}

/// One line per weight transfer: what a person watching a gateway's log waits on.
fn log_transfer(what: &str, command: &Command, bytes: u64, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        request_id = %command.request_id,
        round = command.round,
        bytes,
        seconds = format!("{seconds:.3}"),
        mb_per_s = format!("{:.1}", bytes as f64 / 1e6 / seconds.max(1e-9)),
        "{what}"
    );
}

/// The reply naming a blob the agent uploaded (fit and get-parameters answer alike).
fn uploaded(blob: pollen_proto::blob::EncodedBlob, num_examples: u64, metrics: ScalarMap) -> Body {
    Body::Fit(FitReply {
        size_bytes: blob.bytes.len() as u64,
        sha256: blob.sha256,
        codec: blob.codec as i32,
        num_examples,
        metrics,
    })
}
