//! The gRPC `Fleet` service: accepts client streams, registers clients, routes their replies.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use pollen_proto::fleet::{
    ClientMessage, Join, ServerMessage, Welcome, client_message::Msg as ClientMsg, fleet_server,
    server_message::Msg as ServerMsg,
};
use pollen_proto::limits::MAX_GRPC_MESSAGE_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::registry::Registry;
use crate::strategy::ClientInfo;

/// How long a new stream may take to send its `Join`.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbound messages buffered per client before senders wait.
const OUTBOUND_BUFFER: usize = 16;

/// The `Fleet` service over a shared [`Registry`].
#[derive(Clone)]
pub struct FleetService {
    registry: Arc<Registry>,
    /// Mutual TLS: every stream carries a verified client certificate, and its identity must
    /// be allowed the client id it joins with.
    require_identity: bool,
}

impl FleetService {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            require_identity: false,
        }
    }

    /// A service that checks every Join against its stream's client certificate.
    pub fn with_client_identities(mut self) -> Self {
        self.require_identity = true;
        self
    }

    /// Refuses a Join whose client id the stream's certificate does not name (a device may
    /// join only as itself; a proxy as any device it bridges).
    fn authorize(&self, peer: &str, identity: Option<&str>, client_id: &str) -> Result<(), Status> {
        if !self.require_identity {
            return Ok(());
        }
        let refuse = |message: String| {
            self.registry.counters().joins_refused.inc();
            tracing::warn!(%peer, client = %client_id, "join refused: {message}");
            Err(Status::permission_denied(message))
        };
        match identity {
            None => refuse(format!(
                "{peer}: no client certificate identity; cannot join as {client_id:?}"
            )),
            Some(name) if pollen_trust::identity::may_join_as(name, client_id) => Ok(()),
            Some(name) => refuse(format!(
                "{peer}: the client certificate names {name:?}, which may not join as {client_id:?}"
            )),
        }
    }

    /// The tonic server for this service, with Pollen's message-size limits. It reads zstd
    /// and answers in zstd only the clients that ask for it (`grpc-accept-encoding`), so a
    /// client chooses compression for both directions of its stream.
    pub fn into_server(self) -> fleet_server::FleetServer<Self> {
        fleet_server::FleetServer::new(self)
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
            .send_compressed(tonic::codec::CompressionEncoding::Zstd)
    }
}

/// Checks a client id: non-empty, at most 128 characters, no MQTT wildcards or separators.
pub fn validate_client_id(id: &str) -> Result<(), Status> {
    if id.len() > 128 {
        return Err(Status::invalid_argument(format!(
            "client id of {} bytes is longer than 128",
            id.len()
        )));
    }
    pollen_proto::topics::validate_id("client id", id)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

type JoinStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl fleet_server::Fleet for FleetService {
    type JoinStream = JoinStream;

    async fn join(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown peer".to_string(), |a| a.to_string());
        // The handshake verified the chain; what remains is the name it carries.
        let identity = request
            .peer_certs()
            .and_then(|certs| {
                certs
                    .first()
                    .map(|c| pollen_trust::identity::common_name(c))
            })
            .transpose()
            .map_err(|e| Status::unauthenticated(format!("{peer}: {e}")))?;
        let mut inbound = request.into_inner();
        let counters = self.registry.counters().clone();
        let first = match tokio::time::timeout(JOIN_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "{peer}: no Join within {JOIN_TIMEOUT:?} of opening the stream"
                )));
            }
            Ok(Err(status)) => {
                counters.messages_malformed.inc();
                tracing::warn!(%peer, "malformed first message: {}", status.message());
                return Err(Status::invalid_argument(format!(
                    "{peer}: first message could not be decoded: {}",
                    status.message()
                )));
            }
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed before Join")),
            Ok(Ok(Some(m))) => m,
        };
        let Some(ClientMsg::Join(join)) = first.msg else {
            counters.messages_malformed.inc();
            return Err(Status::failed_precondition(format!(
                "{peer}: the first message on a Fleet stream must be Join"
            )));
        };
        validate_client_id(&join.client_id)?;
        self.authorize(&peer, identity.as_deref(), &join.client_id)?;
        let outbound = self.attach(join, &peer, inbound).await?;
        Ok(Response::new(Box::pin(outbound)))
    }
}

impl FleetService {
    /// Joins a client that lives in this process: the same registration, routing and checks
    /// as a gRPC stream, over in-memory channels (no socket, no serialisation; weight blobs
    /// are shared `Bytes`). What a simulation with many local clients uses.
    pub async fn join_local(
        &self,
        join: Join,
        inbound: impl Stream<Item = Result<ClientMessage, Status>> + Send + Unpin + 'static,
    ) -> Result<ReceiverStream<Result<ServerMessage, Status>>, Status> {
        self.attach(join, "in-process", inbound).await
    }

    /// Registers a client that has sent its `Join` and routes what it sends next until its
    /// stream ends.
    async fn attach(
        &self,
        join: Join,
        peer: &str,
        mut inbound: impl Stream<Item = Result<ClientMessage, Status>> + Send + Unpin + 'static,
    ) -> Result<ReceiverStream<Result<ServerMessage, Status>>, Status> {
        let counters = self.registry.counters().clone();
        validate_client_id(&join.client_id)?;
        let client_id = join.client_id.clone();
        let info = ClientInfo {
            id: join.client_id,
            num_examples: join.num_examples,
            agent_version: join.agent_version,
            properties: join.properties,
            data: join.data,
        };

        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let welcome = ServerMessage {
            msg: Some(ServerMsg::Welcome(Welcome {
                coordinator_version: env!("CARGO_PKG_VERSION").into(),
                max_message_bytes: MAX_GRPC_MESSAGE_BYTES as u64,
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::internal("stream closed during Join"))?;
        let session = self.registry.register(info, tx.clone());
        tracing::info!(client = %client_id, %peer, "client joined");

        let registry = self.registry.clone();
        tokio::spawn(async move {
            loop {
                match inbound.next().await {
                    Some(Ok(msg)) => {
                        if msg.msg.is_none() || matches!(msg.msg, Some(ClientMsg::Join(_))) {
                            counters.messages_malformed.inc();
                            let _ = tx
                                .send(Err(Status::invalid_argument(format!(
                                    "client {client_id}: message with no body or a second Join"
                                ))))
                                .await;
                            break;
                        }
                        registry.route(&client_id, msg);
                    }
                    None => break,
                    Some(Err(status)) => {
                        // A message that does not decode ends this client's stream, never the
                        // coordinator; the client may reconnect and try again.
                        counters.messages_malformed.inc();
                        tracing::warn!(client = %client_id, "malformed message: {}", status.message());
                        let _ = tx
                            .send(Err(Status::invalid_argument(format!(
                                "client {client_id}: malformed message: {}",
                                status.message()
                            ))))
                            .await;
                        break;
                    }
                }
            }
            registry.unregister(&client_id, session);
        });

        Ok(ReceiverStream::new(rx))
    }
}
