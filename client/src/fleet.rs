//! The Fleet client: holds a gRPC stream to the coordinator and answers its instructions with
//! a [`Client`] (the "direct" path for hosts that can hold a gRPC stream).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use pollen_proto::fleet::{
    ClientMessage, EvaluateRes, Failure, FailureCode, FitRes, Join, ParametersRes, ServerMessage,
    client_message::Msg as ClientMsg, fleet_client::FleetClient, server_message::Msg as ServerMsg,
};
use pollen_proto::limits::MAX_GRPC_MESSAGE_BYTES;
use pollen_proto::scalar::ScalarMap;
use pollen_proto::{BlobError, Parameters};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

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
}

impl From<BlobError> for ClientError {
    fn from(e: BlobError) -> Self {
        ClientError::bad_instruction(format!("global weights: {e}"))
    }
}

/// A federated client (Flower's `NumPyClient`). Methods block: they run on a blocking thread.
pub trait Client: Send + 'static {
    /// Examples available for local training (sent with `Join`).
    fn num_examples(&self) -> u64;
    fn get_parameters(&mut self, config: &ScalarMap) -> Result<Parameters, ClientError>;
    fn fit(
        &mut self,
        round: u64,
        parameters: Parameters,
        config: &ScalarMap,
    ) -> Result<ClientFit, ClientError>;
    fn evaluate(
        &mut self,
        round: u64,
        parameters: Parameters,
        config: &ScalarMap,
    ) -> Result<ClientEvaluate, ClientError>;
}

#[derive(Debug, thiserror::Error)]
pub enum FleetClientError {
    #[error("cannot reach the coordinator at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("coordinator refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("stream ended with an error: {0}")]
    Stream(tonic::Status),
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
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|source| FleetClientError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|source| FleetClientError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?;
    let mut grpc = FleetClient::new(channel)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<ClientMessage>(16);
    let join = ClientMessage {
        msg: Some(ClientMsg::Join(Join {
            client_id: client_id.to_string(),
            agent_version: if options.agent_version.is_empty() {
                env!("CARGO_PKG_VERSION").to_string()
            } else {
                options.agent_version.clone()
            },
            num_examples: client.num_examples(),
            properties: options.properties.clone(),
        })),
    };
    tx.send(join).await.expect("receiver is alive");
    let mut inbound = grpc
        .join(ReceiverStream::new(rx))
        .await
        .map_err(FleetClientError::Refused)?
        .into_inner();

    let client = Arc::new(Mutex::new(client));
    let cancelled: Arc<Mutex<HashSet<u64>>> = Arc::default();
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
        };
        let msg = match msg {
            Ok(Some(ServerMessage { msg: Some(m) })) => m,
            Ok(Some(ServerMessage { msg: None })) => continue,
            Ok(None) => return Ok(Exit::Closed),
            Err(status) => return Err(FleetClientError::Stream(status)),
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
                // Work runs in its own task so that Cancel and Stop are still read meanwhile.
                tokio::spawn(async move {
                    let _permit = match &slots {
                        Some(s) => Some(s.clone().acquire_owned().await),
                        None => None,
                    };
                    let reply = tokio::task::spawn_blocking(move || {
                        let mut c = client.lock().unwrap_or_else(|e| e.into_inner());
                        answer(&mut *c, work)
                    })
                    .await;
                    let Ok(Some((request_id, reply))) = reply else {
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

/// Runs one instruction on the client, returning its request id and the message to send.
fn answer<C: Client + ?Sized>(client: &mut C, work: ServerMsg) -> Option<(u64, ClientMessage)> {
    match work {
        ServerMsg::GetParameters(ins) => {
            let msg = match client.get_parameters(&ins.config) {
                Ok(p) => ClientMessage {
                    msg: Some(ClientMsg::Parameters(ParametersRes {
                        request_id: ins.request_id,
                        weights: Some(p.encode().to_inline()),
                    })),
                },
                Err(e) => failure(ins.request_id, 0, e),
            };
            Some((ins.request_id, msg))
        }
        ServerMsg::Fit(ins) => {
            let result = Parameters::from_wire(&ins.weights.unwrap_or_default(), None)
                .map_err(ClientError::from)
                .and_then(|p| client.fit(ins.round, p, &ins.config));
            let msg = match result {
                Ok(fit) => ClientMessage {
                    msg: Some(ClientMsg::Fit(FitRes {
                        request_id: ins.request_id,
                        round: ins.round,
                        weights: Some(fit.parameters.encode().to_inline()),
                        num_examples: fit.num_examples,
                        metrics: fit.metrics,
                    })),
                },
                Err(e) => failure(ins.request_id, ins.round, e),
            };
            Some((ins.request_id, msg))
        }
        ServerMsg::Evaluate(ins) => {
            let result = Parameters::from_wire(&ins.weights.unwrap_or_default(), None)
                .map_err(ClientError::from)
                .and_then(|p| client.evaluate(ins.round, p, &ins.config));
            let msg = match result {
                Ok(ev) => ClientMessage {
                    msg: Some(ClientMsg::Evaluate(EvaluateRes {
                        request_id: ins.request_id,
                        round: ins.round,
                        loss: ev.loss,
                        num_examples: ev.num_examples,
                        metrics: ev.metrics,
                    })),
                },
                Err(e) => failure(ins.request_id, ins.round, e),
            };
            Some((ins.request_id, msg))
        }
        ServerMsg::Welcome(_) | ServerMsg::Stop(_) | ServerMsg::Cancel(_) => None,
    }
}
