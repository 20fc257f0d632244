//! The Fleet client: holds a gRPC stream to the coordinator and answers its instructions with
//! a [`Client`] (the "direct" path for hosts that can hold a gRPC stream).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::Stream;
use pollen_proto::Parameters;
use pollen_proto::device::BlobGet;
use pollen_proto::fleet::{
    ClientMessage, EvaluateRes, Failure, FitRes, Join, ParametersRes, ServerMessage, StatisticsRes,
    TaskRef, Upload, Weights, client_message::Msg as ClientMsg, fleet_client::FleetClient,
    server_message::Msg as ServerMsg, weights::Body,
};
use pollen_proto::limits::MAX_GRPC_MESSAGE_BYTES;
use pollen_proto::scalar::ScalarMap;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientError, TaskBlob, Work};
use crate::task::TaskCache;
use crate::transfer::{self, TransferError};
use crate::update::UpdateEncoder;

#[derive(Debug, thiserror::Error)]
pub enum FleetClientError {
    #[error("cannot reach the coordinator at {endpoint}: {source}")]
    Transport {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("coordinator TLS: {0}")]
    Tls(#[from] pollen_proto::grpc_tls::TlsError),
    #[error("coordinator refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("stream ended with an error: {0}")]
    Stream(tonic::Status),
}

impl FleetClientError {
    /// A failure of the connection (worth another try), not a refusal by the coordinator.
    pub fn is_transient(&self) -> bool {
        match self {
            FleetClientError::Transport { .. } => true,
            FleetClientError::Refused(status) => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            FleetClientError::Stream(_) | FleetClientError::Tls(_) => false,
        }
    }
}

/// How the stream ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The coordinator sent `Stop`.
    Stopped { reason: String },
    /// The coordinator closed the stream.
    Closed,
    /// Our shutdown token fired.
    Shutdown,
}

/// Options of [`run_client`].
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// Limits how many clients of this process compute at once (one permit per core is
    /// typical for simulation); `None` means no limit.
    pub compute_slots: Option<Arc<Semaphore>>,
    pub agent_version: String,
    pub properties: ScalarMap,
    /// Tries to connect and join this many times (at least once), backing off between tries,
    /// while the failure is the connection's rather than the coordinator's refusal.
    pub connect_attempts: u32,
    /// Send inline weights without their SHA-256 (see `pollen_proto::blob::verify_inline`):
    /// for clients in the coordinator's own process, where hashing every update would be
    /// most of their work.
    pub skip_inline_digest: bool,
    /// Compress the stream with zstd both ways (inline weights); the coordinator answers in
    /// kind. Worth it on metered links for compressed codecs (f16, int8, top-k); f32 weights
    /// barely shrink.
    pub grpc_compression: bool,
    /// TLS to the coordinator (`https://` endpoints): its CA, and this client's certificate,
    /// whose common name must be the client id when the coordinator requires certificates.
    pub tls: pollen_proto::grpc_tls::ClientTls,
    /// A PEM CA to trust, besides the public roots, for the object store's HTTPS.
    pub object_store_ca: Option<std::path::PathBuf>,
}

/// Connects to `endpoint` (`http://host:port`), joins as `client_id` and serves instructions
/// until the coordinator stops it, closes the stream, or `shutdown` fires.
pub async fn run_client<C: Client>(
    endpoint: &str,
    client_id: &str,
    client: C,
    options: ClientOptions,
    shutdown: CancellationToken,
) -> Result<Exit, FleetClientError> {
    let join = join_message(client_id, &client, &options);
    let mut attempt = 1;
    let (inbound, tx) = loop {
        match open_stream(
            endpoint,
            join.clone(),
            options.grpc_compression,
            &options.tls,
        )
        .await
        {
            Ok(opened) => break opened,
            Err(e) if attempt < options.connect_attempts && e.is_transient() => {
                tracing::debug!(client = %client_id, attempt, "joining failed, retrying: {e}");
                let backoff = std::time::Duration::from_millis(100 * u64::from(attempt));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
                }
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    serve(inbound, tx, client, options, shutdown).await
}

/// Connects and opens the Join stream: the coordinator's messages, and where to send ours.
async fn open_stream(
    endpoint: &str,
    join: Join,
    compress: bool,
    tls: &pollen_proto::grpc_tls::ClientTls,
) -> Result<(tonic::Streaming<ServerMessage>, mpsc::Sender<ClientMessage>), FleetClientError> {
    let transport = |source| FleetClientError::Transport {
        endpoint: endpoint.to_string(),
        source,
    };
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(transport)?
        .tcp_nodelay(true);
    if let Some(config) = tls.config(endpoint)? {
        channel = channel.tls_config(config).map_err(transport)?;
    }
    let channel = channel
        .connect()
        .await
        .map_err(|source| FleetClientError::Transport {
            endpoint: endpoint.to_string(),
            source,
        })?;
    let mut grpc = FleetClient::new(channel)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    if compress {
        let zstd = tonic::codec::CompressionEncoding::Zstd;
        grpc = grpc.send_compressed(zstd).accept_compressed(zstd);
    }
    let (tx, rx) = mpsc::channel::<ClientMessage>(16);
    tx.send(ClientMessage {
        msg: Some(ClientMsg::Join(join)),
    })
    .await
    .expect("receiver is alive");
    let inbound = grpc
        .join(ReceiverStream::new(rx))
        .await
        .map_err(FleetClientError::Refused)?
        .into_inner();
    Ok((inbound, tx))
}

/// The `Join` a client sends first.
pub fn join_message<C: Client>(client_id: &str, client: &C, options: &ClientOptions) -> Join {
    Join {
        client_id: client_id.to_string(),
        agent_version: if options.agent_version.is_empty() {
            env!("CARGO_PKG_VERSION").to_string()
        } else {
            options.agent_version.clone()
        },
        num_examples: client.num_examples(),
        properties: options.properties.clone(),
        data: client.data_schema(),
    }
}

/// Answers the instructions arriving on `inbound` with `client`, sending replies on `tx`, until
/// the coordinator stops it, closes the stream, or `shutdown` fires. [`run_client`] runs it
/// over a gRPC stream; a coordinator in the same process can hand it its in-memory stream.
pub async fn serve<C: Client>(
    mut inbound: impl Stream<Item = Result<ServerMessage, tonic::Status>> + Unpin,
    tx: mpsc::Sender<ClientMessage>,
    client: C,
    options: ClientOptions,
    shutdown: CancellationToken,
) -> Result<Exit, FleetClientError> {
    let client = Arc::new(Mutex::new(client));
    let cancelled: Arc<Mutex<HashSet<u64>>> = Arc::default();
    // Only needed when the coordinator sends weights by reference (presigned URLs): built on
    // first use, so that thousands of simulated clients with inline weights hold none.
    let http = Arc::new(LazyHttp {
        client: Default::default(),
        ca: options.object_store_ca.clone(),
    });
    let tasks = Arc::new(TaskCache::default());
    let updates = Arc::new(UpdateEncoder::default());
    loop {
        let msg = tokio::select! {
            m = inbound.next() => m,
            _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
        };
        let msg = match msg {
            Some(Ok(ServerMessage { msg: Some(m) })) => m,
            Some(Ok(ServerMessage { msg: None })) => continue,
            None => return Ok(Exit::Closed),
            Some(Err(status)) => return Err(FleetClientError::Stream(status)),
        };
        match msg {
            ServerMsg::Welcome(_) => {}
            ServerMsg::Stop(stop) => {
                return Ok(Exit::Stopped {
                    reason: stop.reason,
                });
            }
            ServerMsg::Cancel(c) => {
                cancelled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(c.request_id);
            }
            work => {
                let (client, tx, cancelled) = (client.clone(), tx.clone(), cancelled.clone());
                let slots = options.compute_slots.clone();
                let (http, tasks, updates) = (http.clone(), tasks.clone(), updates.clone());
                let hash_inline = !options.skip_inline_digest;
                // Work runs in its own task so that Cancel and Stop are still read meanwhile.
                tokio::spawn(async move {
                    let ctx = Answering {
                        http: &http,
                        tasks: &tasks,
                        updates: &updates,
                        slots: slots.as_ref(),
                        hash_inline,
                    };
                    let Some((request_id, reply)) = ctx.answer(client, work).await else {
                        return;
                    };
                    if cancelled
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&request_id)
                    {
                        tracing::debug!(request_id, "result of cancelled work dropped");
                        return;
                    }
                    let _ = tx.send(reply).await;
                });
            }
        }
    }
}

/// The HTTP client for weight transfers, built on first use.
struct LazyHttp {
    client: std::sync::OnceLock<Result<reqwest::Client, String>>,
    /// The object store's private CA, if it has one.
    ca: Option<std::path::PathBuf>,
}

impl LazyHttp {
    fn get(&self) -> Result<&reqwest::Client, ClientError> {
        self.client
            .get_or_init(|| {
                let ca = self.ca.as_deref().map(transfer::read_ca).transpose()?;
                transfer::http_client(ca.as_deref()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| {
                ClientError::training(format!(
                    "cannot build the HTTP client for weight transfers: {e}"
                ))
            })
    }
}

fn failure(request_id: u64, round: u64, e: ClientError) -> ClientMessage {
    ClientMessage {
        msg: Some(ClientMsg::Failure(Failure {
            request_id,
            round,
            code: e.code as i32,
            message: e.message,
        })),
    }
}

/// The parameters wire weights stand for: inline bytes decoded, or a reference downloaded from
/// its presigned URL (size, digest and codec checked); and the blob's digest, which a delta
/// update names as its base.
async fn fetch(
    weights: Option<Weights>,
    http: &LazyHttp,
) -> Result<(Parameters, String), ClientError> {
    match weights.and_then(|w| w.body) {
        Some(Body::Reference(r)) => {
            if r.url.is_empty() {
                return Err(ClientError::bad_instruction(format!(
                    "weights by reference ({}) without a URL; this client holds no storage credentials",
                    r.location
                )));
            }
            let sha256 = r.sha256.clone();
            let get = BlobGet {
                url: r.url,
                sha256: r.sha256,
                size_bytes: r.size_bytes,
                codec: r.codec,
            };
            let parameters = transfer::download(http.get()?, &get)
                .await
                .map_err(ClientError::from)?;
            Ok((parameters, sha256))
        }
        body => {
            let sha256 = match &body {
                Some(Body::Inline(b)) => b.sha256.clone(),
                _ => String::new(),
            };
            let weights = Weights { body };
            let parameters =
                tokio::task::spawn_blocking(move || Parameters::from_wire(&weights, None))
                    .await
                    .map_err(|e| ClientError::training(format!("decoding task failed: {e}")))?
                    .map_err(ClientError::from)?;
            Ok((parameters, sha256))
        }
    }
}

/// Sends an encoded answer: inline, or uploaded to the presigned PUT the coordinator gave and
/// named by its key.
async fn deliver(
    blob: pollen_proto::blob::EncodedBlob,
    upload: Option<Upload>,
    http: &LazyHttp,
) -> Result<Weights, ClientError> {
    match upload {
        None => Ok(blob.to_inline()),
        Some(Upload { location, url }) => {
            transfer::upload(http.get()?, &url, blob.bytes.clone())
                .await
                .map_err(|e: TransferError| ClientError::from(e))?;
            Ok(blob.to_reference(location, ""))
        }
    }
}

/// Encodes `parameters` as plain f32 weights (initial parameters), off the async threads.
async fn encode_plain(
    parameters: Parameters,
    hash: bool,
) -> Result<pollen_proto::blob::EncodedBlob, ClientError> {
    tokio::task::spawn_blocking(move || {
        if hash {
            parameters.encode()
        } else {
            parameters.encode_unhashed()
        }
    })
    .await
    .map_err(|e| ClientError::training(format!("encoding task failed: {e}")))
}

/// What answering an instruction needs besides the client.
struct Answering<'a> {
    http: &'a LazyHttp,
    tasks: &'a TaskCache,
    updates: &'a Arc<UpdateEncoder>,
    /// Compute slots shared by this process's clients; held only while the client computes.
    slots: Option<&'a Arc<Semaphore>>,
    hash_inline: bool,
}

/// An instruction's task, config and ids, owned so that they can move to a blocking thread.
struct Owned {
    run_id: String,
    round: u64,
    task: Option<Arc<TaskBlob>>,
    config: ScalarMap,
}

impl Owned {
    fn work(&self) -> Work<'_> {
        Work {
            run_id: &self.run_id,
            round: self.round,
            task: self.task.as_deref(),
            config: &self.config,
        }
    }
}

impl Answering<'_> {
    async fn task(&self, task: Option<&TaskRef>) -> Result<Option<Arc<TaskBlob>>, ClientError> {
        self.tasks.resolve(task, || self.http.get().cloned()).await
    }

    /// Runs `f` on the client on a blocking thread, holding a compute slot if slots are
    /// limited; then waits out the client's answer delay (a simulated slow device's), without
    /// the slot.
    async fn compute<C: Client, T: Send + 'static>(
        &self,
        client: Arc<Mutex<C>>,
        f: impl FnOnce(&mut C) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, ClientError> {
        let permit = match self.slots {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ClientError::training("the compute slots were closed"))?,
            ),
            None => None,
        };
        let (out, delay) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut c = client.lock().unwrap_or_else(|e| e.into_inner());
            let out = f(&mut *c);
            (out, c.answer_delay())
        })
        .await
        .map_err(|e| ClientError::training(format!("client task failed: {e}")))?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        out
    }

    /// Runs one instruction on the client, returning its request id and the message to send.
    async fn answer<C: Client>(
        &self,
        client: Arc<Mutex<C>>,
        work: ServerMsg,
    ) -> Option<(u64, ClientMessage)> {
        match work {
            ServerMsg::GetParameters(ins) => {
                let result = async {
                    let owned = Owned {
                        run_id: ins.run_id,
                        round: 0,
                        task: self.task(ins.task.as_ref()).await?,
                        config: ins.config,
                    };
                    let p = self
                        .compute(client, move |c| c.get_parameters(&owned.work()))
                        .await?;
                    let hash = self.hash_inline || ins.upload.is_some();
                    deliver(encode_plain(p, hash).await?, ins.upload, self.http).await
                }
                .await;
                let msg = match result {
                    Ok(weights) => ClientMessage {
                        msg: Some(ClientMsg::Parameters(ParametersRes {
                            request_id: ins.request_id,
                            weights: Some(weights),
                        })),
                    },
                    Err(e) => failure(ins.request_id, 0, e),
                };
                Some((ins.request_id, msg))
            }
            ServerMsg::Fit(ins) => {
                let round = ins.round;
                let result = async {
                    let owned = Owned {
                        run_id: ins.run_id,
                        round,
                        task: self.task(ins.task.as_ref()).await?,
                        config: ins.config,
                    };
                    let (global, base_sha256) = fetch(ins.weights, self.http).await?;
                    // Blobs by reference always carry their digest.
                    let hash = self.hash_inline || ins.upload.is_some();
                    let updates = self.updates.clone();
                    let (blob, num_examples, metrics) = self
                        .compute(client, move |c| {
                            let fit = c.fit(&owned.work(), global.clone())?;
                            let blob = updates.encode(
                                &owned.run_id,
                                &owned.config,
                                fit.parameters,
                                &global,
                                &base_sha256,
                                hash,
                            )?;
                            Ok((blob, fit.num_examples, fit.metrics))
                        })
                        .await?;
                    let weights = deliver(blob, ins.upload, self.http).await?;
                    Ok::<_, ClientError>((weights, num_examples, metrics))
                }
                .await;
                let msg = match result {
                    Ok((weights, num_examples, metrics)) => ClientMessage {
                        msg: Some(ClientMsg::Fit(FitRes {
                            request_id: ins.request_id,
                            round,
                            weights: Some(weights),
                            num_examples,
                            metrics,
                        })),
                    },
                    Err(e) => failure(ins.request_id, round, e),
                };
                Some((ins.request_id, msg))
            }
            ServerMsg::Evaluate(ins) => {
                let round = ins.round;
                let result = async {
                    let owned = Owned {
                        run_id: ins.run_id,
                        round,
                        task: self.task(ins.task.as_ref()).await?,
                        config: ins.config,
                    };
                    let (global, _) = fetch(ins.weights, self.http).await?;
                    self.compute(client, move |c| c.evaluate(&owned.work(), global))
                        .await
                }
                .await;
                let msg = match result {
                    Ok(ev) => ClientMessage {
                        msg: Some(ClientMsg::Evaluate(EvaluateRes {
                            request_id: ins.request_id,
                            round,
                            loss: ev.loss,
                            num_examples: ev.num_examples,
                            metrics: ev.metrics,
                        })),
                    },
                    Err(e) => failure(ins.request_id, round, e),
                };
                Some((ins.request_id, msg))
            }
            ServerMsg::Statistics(ins) => {
                let result = async {
                    let owned = Owned {
                        run_id: ins.run_id,
                        round: 0,
                        task: self.task(ins.task.as_ref()).await?,
                        config: ins.config,
                    };
                    self.compute(client, move |c| c.statistics(&owned.work()))
                        .await
                }
                .await;
                let msg = match result {
                    Ok(statistics) => ClientMessage {
                        msg: Some(ClientMsg::Statistics(StatisticsRes {
                            request_id: ins.request_id,
                            statistics: Some(statistics),
                        })),
                    },
                    Err(e) => failure(ins.request_id, 0, e),
                };
                Some((ins.request_id, msg))
            }
            ServerMsg::Welcome(_) | ServerMsg::Stop(_) | ServerMsg::Cancel(_) => None,
        }
    }
}
