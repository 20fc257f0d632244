//! The fan-out: instructions to clients, each answer awaited until its deadline in a task of its
//! own, then read from object storage, verified and decoded off the async threads. A
//! synchronous round sends one batch and waits for it; FedBuff keeps a number of requests in
//! flight and sends another as each one ends. Neither decides here what an answer is worth:
//! the round's state machine (or FedBuff's buffer) does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pollen_proto::blob::EncodedBlob;
use pollen_proto::fleet::{
    EvaluateIns, FailureCode, FitIns, ServerMessage, TaskRef, Upload, Weights,
    server_message::Msg as ServerMsg, weights::Body,
};
use pollen_proto::{Parameters, TensorSpec, scalar};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::registry::{Registry, Reply};
use crate::storage::{BlobStore, StoreError};
use crate::strategy::{ClientFailure, ClientUpdate, FailureReason, Rejection};

/// The global model as this fan-out's instructions carry it: encoded once, written to the
/// store once (with a presigned GET every device shares), or inline.
#[derive(Clone)]
pub(crate) struct Global {
    pub parameters: Arc<Parameters>,
    pub blob: EncodedBlob,
    pub weights: Weights,
    pub specs: Arc<Vec<TensorSpec>>,
}

/// One fit instruction to send.
pub(crate) struct FitRequest {
    pub client_id: String,
    pub config: scalar::ScalarMap,
    /// Examples the client announced when it joined: the most an honest update can claim.
    pub announced_examples: u64,
    /// The only object key the answer may name (weights by reference).
    pub upload: Option<Upload>,
}

/// A validated update, with what the records keep about it.
pub(crate) struct Received {
    pub update: ClientUpdate,
    pub metrics: BTreeMap<String, f64>,
    /// Bytes of the blob as it travelled.
    pub bytes: u64,
}

/// How one request ended, decided in its own task.
pub(crate) enum Outcome {
    Update(Received),
    Failed(ClientFailure),
}

/// What a request's task returns.
pub(crate) struct Answer {
    pub client_id: String,
    /// When the client's answer reached the coordinator (`None`: it never did).
    pub arrived_at: Option<Instant>,
    /// The round (or model version) the request was for.
    pub round: u64,
    pub outcome: Outcome,
}

/// Sends instructions over the registry and starts one task per open request.
#[derive(Clone)]
pub(crate) struct FanOut {
    pub registry: Arc<Registry>,
    pub store: Option<Arc<dyn BlobStore>>,
    pub run_id: String,
    /// Deadline of every request.
    pub timeout: Duration,
    /// Lifetime of presigned URLs.
    pub presign_ttl: Duration,
}

impl FanOut {
    /// One upload key and presigned PUT per client (weights by reference), signed before
    /// anything is sent, so that a signing error leaves no request open.
    pub async fn uploads(
        &self,
        round: u64,
        clients: &[String],
    ) -> Result<Vec<Option<Upload>>, StoreError> {
        let mut out = Vec::with_capacity(clients.len());
        for client in clients {
            out.push(match &self.store {
                Some(store) => {
                    let key = store.keys().update(&self.run_id, round, client);
                    let url = store.presign_put(&key, self.presign_ttl).await?;
                    Some(Upload { location: key, url })
                }
                None => None,
            });
        }
        Ok(out)
    }

    /// Sends the instruction `build(request_id, deadline_unix_ms)` carrying `global` to
    /// `client_id`, counting the model's bytes. Returns the request id, the receiver of its
    /// answer and its deadline; a client that cannot be reached is a `disconnected` failure.
    async fn request(
        &self,
        round: u64,
        client_id: &str,
        global: &Global,
        build: impl FnOnce(u64, u64) -> ServerMsg,
    ) -> Result<(u64, oneshot::Receiver<Reply>, Instant), ClientFailure> {
        let deadline = Instant::now() + self.timeout;
        let deadline_unix_ms = pollen_proto::unix_ms(SystemTime::now() + self.timeout);
        let (request_id, rx) = self
            .registry
            .request(client_id, round, |request_id| ServerMessage {
                msg: Some(build(request_id, deadline_unix_ms)),
            })
            .await
            .map_err(|e| {
                ClientFailure::new(client_id, FailureReason::Disconnected, e.to_string())
            })?;
        self.registry
            .counters()
            .bytes_sent
            .inc_by(global.blob.bytes.len() as u64);
        Ok((request_id, rx, deadline))
    }

    /// Sends a fit instruction and starts the task awaiting its answer in `tasks`. A client
    /// that cannot be reached is a `disconnected` failure, returned at once.
    pub async fn send_fit(
        &self,
        round: u64,
        request: FitRequest,
        global: &Global,
        task: Option<TaskRef>,
        tasks: &mut JoinSet<Answer>,
    ) -> Result<u64, ClientFailure> {
        let FitRequest {
            client_id,
            config,
            announced_examples,
            upload,
        } = request;
        let location = upload.as_ref().map(|u| u.location.clone());
        let (weights, run_id) = (Some(global.weights.clone()), self.run_id.clone());
        let build = move |request_id, deadline_unix_ms| {
            ServerMsg::Fit(FitIns {
                request_id,
                round,
                weights,
                config,
                deadline_unix_ms,
                upload,
                run_id,
                task,
            })
        };
        let (request_id, rx, deadline) = self.request(round, &client_id, global, build).await?;
        // An update is the global model's shapes again; anything much larger is not one.
        let limit = 2 * global.blob.bytes.len() as u64 + 64 * 1024;
        let check = Check {
            round,
            specs: global.specs.clone(),
            limit,
            announced_examples,
            upload_location: location,
            base: Some((global.parameters.clone(), global.blob.sha256.clone())),
        };
        let (registry, store) = (self.registry.clone(), self.store.clone());
        tasks.spawn(async move {
            let (arrived_at, outcome) = await_fit(
                &registry, store, &client_id, request_id, rx, deadline, check,
            )
            .await;
            Answer {
                client_id,
                arrived_at,
                round,
                outcome,
            }
        });
        Ok(request_id)
    }

    /// Sends an evaluate instruction; the answer comes back as the task's result.
    pub async fn send_evaluate(
        &self,
        round: u64,
        client_id: String,
        config: scalar::ScalarMap,
        global: &Global,
        task: Option<TaskRef>,
        tasks: &mut JoinSet<Result<crate::strategy::EvaluateSummary, ClientFailure>>,
    ) -> Result<(), ClientFailure> {
        let (weights, run_id) = (Some(global.weights.clone()), self.run_id.clone());
        let build = move |request_id, deadline_unix_ms| {
            ServerMsg::Evaluate(EvaluateIns {
                request_id,
                round,
                weights,
                config,
                deadline_unix_ms,
                run_id,
                task,
            })
        };
        let (request_id, rx, deadline) = self.request(round, &client_id, global, build).await?;
        let registry = self.registry.clone();
        tasks.spawn(async move {
            match await_reply(&registry, request_id, rx, deadline).await {
                Err((reason, message)) => Err(ClientFailure::new(&client_id, reason, message)),
                Ok(Reply::Evaluate(r)) if r.loss.is_finite() => {
                    Ok(crate::strategy::EvaluateSummary {
                        client_id,
                        loss: r.loss,
                        num_examples: r.num_examples,
                        metrics: numeric(&r.metrics),
                    })
                }
                Ok(Reply::Evaluate(r)) => Err(ClientFailure::rejected(
                    &client_id,
                    Rejection::NonFinite,
                    format!("evaluation loss {} is not finite", r.loss),
                )),
                Ok(other) => Err(unexpected(&client_id, other)),
            }
        });
        Ok(())
    }
}

pub(crate) fn numeric(map: &scalar::ScalarMap) -> BTreeMap<String, f64> {
    scalar::numeric_entries(map)
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// The failure an answer of the wrong kind stands for.
pub(crate) fn unexpected(client_id: &str, reply: Reply) -> ClientFailure {
    match reply {
        Reply::Failure(f) => {
            let code = FailureCode::try_from(f.code).unwrap_or(FailureCode::Unspecified);
            // A proxy reports its device's deadline and disappearance; they are the same
            // failures as a direct client's, whoever noticed them first.
            let reason = match code {
                FailureCode::Timeout => FailureReason::Timeout,
                FailureCode::DeviceOffline => FailureReason::Disconnected,
                FailureCode::Declined => FailureReason::Declined,
                _ => FailureReason::ClientError,
            };
            ClientFailure::new(client_id, reason, format!("{code:?}: {}", f.message))
        }
        other => ClientFailure::new(
            client_id,
            FailureReason::ProtocolError,
            format!("unexpected reply {other:?}"),
        ),
    }
}

/// Waits for one reply until the deadline; on timeout the request is closed (so a later reply
/// counts as late) and the client is told to cancel.
pub(crate) async fn await_reply(
    registry: &Registry,
    request_id: u64,
    rx: oneshot::Receiver<Reply>,
    deadline: Instant,
) -> Result<Reply, (FailureReason, String)> {
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(_)) => Err((
            FailureReason::Disconnected,
            "client disconnected before answering".into(),
        )),
        Err(_) => {
            registry.time_out(request_id);
            Err((
                FailureReason::Timeout,
                "no answer before the round deadline".into(),
            ))
        }
    }
}

/// What a fit answer must satisfy.
struct Check {
    round: u64,
    specs: Arc<Vec<TensorSpec>>,
    /// Largest blob that can be an update of this model.
    limit: u64,
    announced_examples: u64,
    upload_location: Option<String>,
    /// The model a delta update is a change of (the coordinator's own f32 model, whatever
    /// codec it was sent in) and the digest of the blob it was sent as, which a delta names.
    base: Option<(Arc<Parameters>, String)>,
}

async fn await_fit(
    registry: &Registry,
    store: Option<Arc<dyn BlobStore>>,
    client_id: &str,
    request_id: u64,
    rx: oneshot::Receiver<Reply>,
    deadline: Instant,
    check: Check,
) -> (Option<Instant>, Outcome) {
    let key = check.upload_location.clone();
    let (arrived_at, outcome) = match await_reply(registry, request_id, rx, deadline).await {
        Err((reason, message)) => (
            None,
            Outcome::Failed(ClientFailure::new(client_id, reason, message)),
        ),
        Ok(reply) => {
            let arrived = Instant::now();
            (
                Some(arrived),
                fit_outcome(registry, store.as_deref(), client_id, reply, check).await,
            )
        }
    };
    // Folded, rejected or abandoned, the update's object is not needed any more. (An upload
    // that lands after this, from a device past its deadline, stays until the run's objects are
    // removed.)
    if let (Some(store), Some(key)) = (store, key) {
        tokio::spawn(async move {
            if let Err(e) = store.delete(&key).await {
                tracing::debug!("could not delete an update object: {e}");
            }
        });
    }
    (arrived_at, outcome)
}

async fn fit_outcome(
    registry: &Registry,
    store: Option<&dyn BlobStore>,
    client_id: &str,
    reply: Reply,
    check: Check,
) -> Outcome {
    let res = match reply {
        Reply::Fit(res) => res,
        other => return Outcome::Failed(unexpected(client_id, other)),
    };
    let round = check.round;
    let reject = |rejection: Rejection, message: String| {
        registry.counters().updates_rejected.inc();
        let message = format!("client {client_id}, round {round}: {message}");
        tracing::warn!(reason = rejection.as_str(), "update rejected: {message}");
        Outcome::Failed(ClientFailure::rejected(client_id, rejection, message))
    };
    if res.round != round {
        return reject(
            Rejection::WrongRound,
            format!("reply names round {}", res.round),
        );
    }
    if res.num_examples == 0 {
        return reject(Rejection::NoExamples, "num_examples is 0".into());
    }
    // FedAvg weighs an update by its examples: a claim above what the client announced for its
    // data would let it outweigh the others. A client that announced none has none to claim
    // (announcing 0 must not lift the cap).
    if res.num_examples > check.announced_examples {
        return reject(
            Rejection::TooManyExamples,
            format!(
                "num_examples = {} is more than the {} examples it announced",
                res.num_examples, check.announced_examples
            ),
        );
    }
    let Some(weights) = res.weights else {
        return reject(Rejection::NoWeights, "fit result carries no weights".into());
    };
    let resolved = resolve_weights(
        weights,
        check.upload_location.as_deref(),
        store,
        Some(check.specs),
        check.limit,
        check.base,
    )
    .await;
    match resolved {
        Ok((parameters, bytes)) => Outcome::Update(Received {
            update: ClientUpdate {
                client_id: client_id.to_string(),
                num_examples: res.num_examples,
                parameters,
            },
            metrics: numeric(&res.metrics),
            bytes,
        }),
        Err((rejection, message)) => reject(rejection, message),
    }
}

/// Turns wire weights into parameters: inline bytes as they are, references by reading the one
/// object key this request allowed. Digest, size, codec, shapes and finiteness are all checked;
/// the byte work runs off the async threads. Returns the parameters and the blob size.
pub(crate) async fn resolve_weights(
    weights: Weights,
    expected_location: Option<&str>,
    store: Option<&dyn BlobStore>,
    specs: Option<Arc<Vec<TensorSpec>>>,
    limit: u64,
    base: Option<(Arc<Parameters>, String)>,
) -> Result<(Parameters, u64), (Rejection, String)> {
    let decode = |bytes: bytes::Bytes, sha256: String, codec: i32, inline: bool| async move {
        let size = bytes.len() as u64;
        tokio::task::spawn_blocking(move || {
            if inline {
                pollen_proto::blob::verify_inline(&bytes, &sha256, codec)?;
            } else {
                pollen_proto::blob::verify(&bytes, &sha256, codec)?;
            }
            let codec = pollen_proto::blob::known_codec(codec)?;
            let base = base.as_ref().map(|(p, sha)| (p.as_ref(), sha.as_str()));
            pollen_proto::codec::decode(&bytes, codec, specs.as_deref().map(|s| s.as_slice()), base)
        })
        .await
        .map_err(|e| (Rejection::Malformed, format!("decoding task failed: {e}")))?
        .map(|p| (p, size))
        .map_err(|e| (Rejection::of_blob(&e), e.to_string()))
    };
    match weights.body {
        None => Err((
            Rejection::NoWeights,
            pollen_proto::BlobError::Empty.to_string(),
        )),
        Some(Body::Inline(b)) => decode(b.data, b.sha256, b.codec, true).await,
        Some(Body::Reference(r)) => {
            let Some(store) = store else {
                return Err((
                    Rejection::ForeignObject,
                    format!(
                        "weights by reference ({:?}) but this coordinator has no object storage",
                        r.location
                    ),
                ));
            };
            let Some(expected) = expected_location else {
                return Err((
                    Rejection::ForeignObject,
                    format!(
                        "weights by reference ({:?}) where none was asked for",
                        r.location
                    ),
                ));
            };
            if r.location != expected {
                return Err((
                    Rejection::ForeignObject,
                    format!(
                        "answer names object {:?}, but this request's upload key is {expected:?}",
                        r.location
                    ),
                ));
            }
            let bytes = store
                .get(&r.location, limit.min(r.size_bytes.max(1)))
                .await
                .map_err(|e| match e {
                    StoreError::TooLarge { .. } => (Rejection::Size, e.to_string()),
                    other => (Rejection::Unreadable, other.to_string()),
                })?;
            if bytes.len() as u64 != r.size_bytes {
                return Err((
                    Rejection::Size,
                    format!(
                        "object {:?} is {} bytes, the answer says {}",
                        r.location,
                        bytes.len(),
                        r.size_bytes
                    ),
                ));
            }
            decode(bytes, r.sha256, r.codec, false).await
        }
    }
}
