//! One device's bridge: a task that joins the coordinator as the device and carries
//! instructions to it over MQTT and its replies back, driving a [`RequestBook`].
//!
//! A bridge lives while its device is online and selected. It leaves the coordinator when the
//! device goes offline (failing open requests with `DEVICE_OFFLINE`) or the proxy shuts down;
//! when the coordinator ends the stream (`Stop`, end of a run, a restart) it joins again with
//! backoff, because the next run may start later.

use std::sync::Arc;
use std::time::Duration;

use pollen_proto::device::{Command, Reply};
use pollen_proto::fleet::{
    ClientMessage, FailureCode, Join, ServerMessage, client_message::Msg as ClientMsg,
    fleet_client::FleetClient, server_message::Msg as ServerMsg,
};
use pollen_proto::limits::MAX_GRPC_MESSAGE_BYTES;
use pollen_proto::{scalar, topics};
use prost::Message;
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use crate::book::{InstructionOutcome, ReplyOutcome, RequestBook};
use crate::proxy::Shared;

/// Messages to the coordinator buffered per bridge.
const OUTBOUND_BUFFER: usize = 16;
/// How long a leaving bridge waits for the coordinator to close its side of the stream.
const HANG_UP_GRACE: Duration = Duration::from_secs(2);
const REJOIN_START: Duration = Duration::from_secs(1);
/// Thousands of bridges retry against one coordinator; 30 s keeps that to a trickle.
const REJOIN_MAX: Duration = Duration::from_secs(30);

/// How one Join session ended.
enum SessionEnd {
    /// The device went offline: the bridge ends.
    Offline,
    /// The proxy is shutting down: the bridge ends.
    Shutdown,
    /// The coordinator sent `Stop`, asking for a rejoin after this long if `Some`.
    Stopped { rejoin_after: Option<Duration> },
    /// The stream could not be opened or ended; `welcomed` if it had been joined.
    Ended { welcomed: bool },
}

/// Runs the bridge of `device` until the device goes offline or the proxy shuts down.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    device: &str,
    inbox: mpsc::Receiver<Reply>,
    offline: CancellationToken,
) {
    let mut bridge = Bridge {
        shared,
        device,
        book: RequestBook::new(device, shared.next_prefix()),
        inbox,
        offline,
    };
    let mut backoff = REJOIN_START;
    let mut quiet = false;
    loop {
        let delay = match bridge.session(quiet).await {
            SessionEnd::Offline | SessionEnd::Shutdown => return,
            SessionEnd::Stopped {
                rejoin_after: Some(after),
            } => {
                quiet = false;
                backoff = REJOIN_START;
                after
            }
            SessionEnd::Stopped { rejoin_after: None } | SessionEnd::Ended { welcomed: true } => {
                quiet = false;
                backoff = REJOIN_START;
                jitter(backoff)
            }
            SessionEnd::Ended { welcomed: false } => {
                // Log the first failed attempt only: with the coordinator down, every bridge
                // of the process fails the same way on every retry.
                quiet = true;
                let delay = jitter(backoff);
                backoff = (backoff * 2).min(REJOIN_MAX);
                delay
            }
        };
        if !bridge.idle(delay).await {
            return;
        }
    }
}

/// Ends our half of a stream and waits, briefly, for the coordinator to close its half, so
/// that answers queued just before reach it instead of being cut off by a stream reset.
async fn hang_up(tx: mpsc::Sender<ClientMessage>, mut inbound: Streaming<ServerMessage>) {
    drop(tx);
    let drain = async { while let Ok(Some(_)) = inbound.message().await {} };
    let _ = tokio::time::timeout(HANG_UP_GRACE, drain).await;
}

/// Spreads retries so that the bridges of a process do not rejoin in lockstep.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.5..=1.0))
}

struct Bridge<'a> {
    shared: &'a Arc<Shared>,
    device: &'a str,
    book: RequestBook,
    inbox: mpsc::Receiver<Reply>,
    offline: CancellationToken,
}

impl Bridge<'_> {
    /// One Join session: open the stream, serve it, close what is open when it ends.
    async fn session(&mut self, quiet: bool) -> SessionEnd {
        let shared = self.shared;
        let Some(status) = shared.status_of(self.device) else {
            return SessionEnd::Offline;
        };
        self.book.set_prefix(shared.next_prefix());
        let mut properties = status.properties;
        properties.insert("model".into(), scalar::string(status.model));
        properties.insert(
            "free_disk_bytes".into(),
            scalar::int(i64::try_from(status.free_disk_bytes).unwrap_or(i64::MAX)),
        );
        properties.insert("transport".into(), scalar::string("mqtt"));
        let join = ClientMessage {
            msg: Some(ClientMsg::Join(Join {
                client_id: self.device.to_string(),
                agent_version: status.agent_version,
                num_examples: status.num_examples,
                properties,
                data: status.data,
            })),
        };
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        // A fresh channel always has room for its first message.
        let _ = tx.try_send(join);
        let mut grpc = FleetClient::new(shared.channel.clone())
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let opened = tokio::select! {
            r = grpc.join(ReceiverStream::new(rx)) => r,
            _ = self.offline.cancelled() => return SessionEnd::Offline,
            _ = shared.shutdown.cancelled() => return SessionEnd::Shutdown,
        };
        let mut inbound = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if quiet {
                    tracing::debug!(device = %self.device, "join refused: {}", status.message());
                } else {
                    tracing::warn!(device = %self.device, "cannot join the coordinator: {} ({:?}); retrying with backoff", status.message(), status.code());
                }
                return SessionEnd::Ended { welcomed: false };
            }
        };

        let mut joined = None;
        loop {
            let now = crate::now_unix_ms();
            let next_deadline = self.book.next_deadline();
            let until_deadline =
                Duration::from_millis(next_deadline.map_or(0, |d| d.saturating_sub(now)));
            tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => {
                    self.cancel_all().await;
                    return SessionEnd::Shutdown;
                }
                _ = self.offline.cancelled() => {
                    for closing in self.book.fail_all(FailureCode::DeviceOffline, "went offline") {
                        self.to_coordinator(&tx, closing.failure).await;
                        self.publish(closing.cancel).await;
                    }
                    hang_up(tx, inbound).await;
                    return SessionEnd::Offline;
                }
                _ = tokio::time::sleep(until_deadline), if next_deadline.is_some() => {
                    for closing in self.book.expire(crate::now_unix_ms()) {
                        shared.stats.timeouts.inc();
                        tracing::info!(device = %self.device, request = %closing.cancel.request_id, "deadline passed without an answer");
                        self.to_coordinator(&tx, closing.failure).await;
                        self.publish(closing.cancel).await;
                    }
                }
                reply = self.inbox.recv() => {
                    let Some(reply) = reply else {
                        // The dispatcher is gone: the proxy is stopping.
                        self.cancel_all().await;
                        return SessionEnd::Shutdown;
                    };
                    if let Some(msg) = self.on_reply(reply) {
                        self.to_coordinator(&tx, msg).await;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(ServerMessage { msg: Some(msg) })) => match msg {
                        ServerMsg::Welcome(_) => {
                            tracing::info!(device = %self.device, "joined the coordinator");
                            joined.get_or_insert_with(|| shared.stats.bridge_open());
                        }
                        ServerMsg::Stop(stop) => {
                            tracing::info!(device = %self.device, reason = %stop.reason, "coordinator sent Stop");
                            self.cancel_all().await;
                            let rejoin_after = stop
                                .reconnect
                                .then(|| Duration::from_millis(stop.reconnect_after_ms));
                            return SessionEnd::Stopped { rejoin_after };
                        }
                        work => match self.book.instruct(work) {
                            InstructionOutcome::Publish(command) => self.publish(command).await,
                            InstructionOutcome::Reject(failure) => {
                                if let Some(ClientMsg::Failure(f)) = &failure.msg {
                                    tracing::warn!(device = %self.device, request = f.request_id, "instruction refused: {}", f.message);
                                }
                                self.to_coordinator(&tx, failure).await;
                            }
                            InstructionOutcome::Cancel(cancel) => {
                                shared.stats.cancels.inc();
                                self.publish(cancel).await;
                            }
                            InstructionOutcome::Ignore => {}
                        },
                    },
                    Ok(Some(ServerMessage { msg: None })) => {}
                    Ok(None) => {
                        tracing::info!(device = %self.device, "coordinator closed the stream");
                        self.cancel_all().await;
                        return SessionEnd::Ended { welcomed: joined.is_some() };
                    }
                    Err(status) => {
                        tracing::warn!(device = %self.device, "coordinator stream ended: {} ({:?})", status.message(), status.code());
                        self.cancel_all().await;
                        return SessionEnd::Ended { welcomed: joined.is_some() };
                    }
                },
            }
        }
    }

    /// Waits `delay` between sessions, still draining replies (there is no one to forward
    /// them to: they are counted and dropped). False if the bridge should end.
    async fn idle(&mut self, delay: Duration) -> bool {
        let wake = tokio::time::sleep(delay);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => return true,
                _ = self.offline.cancelled() => return false,
                _ = self.shared.shutdown.cancelled() => return false,
                reply = self.inbox.recv() => match reply {
                    Some(reply) => {
                        // Every request was closed when the session ended, so nothing is
                        // forwarded here.
                        let _ = self.on_reply(reply);
                    }
                    None => return false,
                },
            }
        }
    }

    /// Matches a reply and counts what it was; returns what to forward to the coordinator.
    fn on_reply(&mut self, reply: Reply) -> Option<ClientMessage> {
        let stats = &self.shared.stats;
        let request = reply.request_id.clone();
        let (counter, what) = match self.book.on_reply(reply) {
            ReplyOutcome::Answer(msg) | ReplyOutcome::Progress(msg) => return Some(msg),
            ReplyOutcome::Duplicate => (&stats.replies_duplicate, "duplicate".to_string()),
            ReplyOutcome::Late => (&stats.replies_late, "late".to_string()),
            ReplyOutcome::Unknown => (&stats.replies_unknown, "unknown-request".to_string()),
            ReplyOutcome::Malformed(why) => {
                (&stats.replies_malformed, format!("malformed ({why})"))
            }
        };
        counter.inc();
        tracing::warn!(device = %self.device, %request, "{what} reply dropped");
        None
    }

    /// Closes every open request without answering (the coordinator stream is gone or
    /// stopping) and tells the device to drop the work.
    async fn cancel_all(&mut self) {
        for cancel in self.book.cancel_all() {
            self.publish(cancel).await;
        }
    }

    async fn publish(&self, command: Command) {
        let topic = topics::command(&self.shared.fleet, self.device);
        let payload = command.encode_to_vec();
        match self
            .shared
            .mqtt
            .publish_bytes(topic, QoS::AtLeastOnce, false, payload.into())
            .await
        {
            Ok(()) => {
                self.shared.stats.commands_published.inc();
            }
            // Only when the MQTT task is gone, i.e. the proxy is stopping.
            Err(e) => {
                tracing::warn!(device = %self.device, request = %command.request_id, "command not published: {e}")
            }
        }
    }

    /// Sends to the coordinator, giving up if the proxy stops while the stream is full.
    async fn to_coordinator(&self, tx: &mpsc::Sender<ClientMessage>, msg: ClientMessage) {
        tokio::select! {
            r = tx.send(msg) => if r.is_err() {
                tracing::debug!(device = %self.device, "coordinator stream closed before an answer could be sent");
            },
            _ = self.shared.shutdown.cancelled() => {}
        }
    }
}
