//! The client registry: who is connected, and which requests are open.
//!
//! Every instruction sent to a client gets a fresh request id and an entry in `pending`; the
//! reply is routed to whoever awaits it by that id. Closing a request (answered, or cut off at
//! its deadline) moves it to `closed`, so a second reply is recognised as a duplicate or a late
//! reply and counted instead of reaching the round.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pollen_proto::fleet::{
    Cancel, ClientMessage, EvaluateRes, Failure, FitRes, ParametersRes, ServerMessage,
    StatisticsRes, client_message::Msg as ClientMsg, server_message::Msg as ServerMsg,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tonic::Status;

use crate::counters::Counters;
use crate::strategy::ClientInfo;

/// What a client sent back for one request.
#[derive(Debug)]
pub enum Reply {
    Parameters(ParametersRes),
    Fit(FitRes),
    Evaluate(EvaluateRes),
    Statistics(StatisticsRes),
    Failure(Failure),
}

/// Outbound half of a client's stream.
pub type ClientSender = mpsc::Sender<Result<ServerMessage, Status>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("client {0} is not connected")]
    NotConnected(String),
}

/// How a request ended, remembered to classify replies that arrive afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Answered,
    TimedOut,
}

struct Connected {
    info: ClientInfo,
    session: u64,
    tx: ClientSender,
    since_ms: u64,
    last_seen_ms: u64,
}

/// A client that was connected and left: kept so that dashboards can show it offline. Only
/// what they show is kept (not the client's properties, which a client may make large).
struct Departed {
    num_examples: u64,
    agent_version: String,
    /// When it left.
    last_seen_ms: u64,
}

/// Departed clients remembered at most; beyond this, new departures are not listed.
const MAX_DEPARTED: usize = 100_000;

/// A client as dashboards show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClientView {
    pub id: String,
    /// `training` (a request is open), `online` or `offline`.
    pub status: &'static str,
    pub examples: u64,
    pub agent_version: String,
    /// Unix ms of the current connection; `None` once offline.
    pub connected_since: Option<u64>,
    /// Unix ms of the last message from the client, of its connection, or (offline) of its
    /// disconnection.
    pub last_seen: u64,
}

struct Pending {
    client_id: String,
    round: u64,
    reply: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct Inner {
    clients: BTreeMap<String, Connected>,
    departed: BTreeMap<String, Departed>,
    pending: HashMap<u64, Pending>,
    closed: HashMap<u64, (Closed, u64)>,
}

/// Shared by the gRPC service (which registers clients and routes replies) and the round
/// driver (which sends requests and awaits replies).
pub struct Registry {
    inner: Mutex<Inner>,
    changed: Notify,
    /// Bumped at every connection and disconnection; watchers never miss a change.
    generation: watch::Sender<u64>,
    next_request: AtomicU64,
    next_session: AtomicU64,
    counters: Arc<Counters>,
}

impl Registry {
    pub fn new(counters: Arc<Counters>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            generation: watch::Sender::new(0),
            next_request: AtomicU64::new(1),
            next_session: AtomicU64::new(1),
            counters,
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this module; the data (maps of
        // handles) stays consistent either way, so keep serving rather than poison everyone.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a client. A client that reconnects under the same id replaces its old session:
    /// the old stream is told to stop and the old session's open requests fail as
    /// disconnected.
    pub fn register(&self, info: ClientInfo, tx: ClientSender) -> u64 {
        let session = self.next_session.fetch_add(1, Relaxed);
        let old = {
            let mut inner = self.lock();
            let id = info.id.clone();
            let now = pollen_proto::now_unix_ms();
            inner.departed.remove(&id);
            let old = inner.clients.insert(
                id.clone(),
                Connected {
                    info,
                    session,
                    tx,
                    since_ms: now,
                    last_seen_ms: now,
                },
            );
            if old.is_some() {
                inner.pending.retain(|_, p| p.client_id != id);
            }
            old
        };
        if let Some(old) = old {
            tracing::info!(client = %old.info.id, "client reconnected; replacing its old session");
            let _ = old.tx.try_send(Err(Status::aborted(
                "this client id connected again on another stream",
            )));
        }
        self.changed.notify_waiters();
        self.generation.send_modify(|g| *g += 1);
        session
    }

    /// Removes a client if `session` is still its current session; its open requests fail
    /// as disconnected (their reply channels are dropped).
    pub fn unregister(&self, client_id: &str, session: u64) {
        let removed = {
            let mut inner = self.lock();
            let current = inner.clients.get(client_id).map(|c| c.session);
            if current == Some(session) {
                if let Some(c) = inner.clients.remove(client_id)
                    && inner.departed.len() < MAX_DEPARTED
                {
                    let departed = Departed {
                        num_examples: c.info.num_examples,
                        agent_version: c.info.agent_version,
                        last_seen_ms: pollen_proto::now_unix_ms(),
                    };
                    inner.departed.insert(client_id.to_string(), departed);
                }
                inner.pending.retain(|_, p| p.client_id != client_id);
                true
            } else {
                false
            }
        };
        if removed {
            tracing::info!(client = %client_id, "client disconnected");
            self.changed.notify_waiters();
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Connected clients, sorted by id.
    pub fn available(&self) -> Vec<ClientInfo> {
        self.lock()
            .clients
            .values()
            .map(|c| c.info.clone())
            .collect()
    }

    /// Every client seen since this coordinator started: connected ones (training when a
    /// request to them is open) and departed ones, sorted by id.
    pub fn clients(&self) -> Vec<ClientView> {
        let inner = self.lock();
        let busy: std::collections::HashSet<&str> = inner
            .pending
            .values()
            .map(|p| p.client_id.as_str())
            .collect();
        let connected = inner.clients.values().map(|c| ClientView {
            id: c.info.id.clone(),
            status: if busy.contains(c.info.id.as_str()) {
                "training"
            } else {
                "online"
            },
            examples: c.info.num_examples,
            agent_version: c.info.agent_version.clone(),
            connected_since: Some(c.since_ms),
            last_seen: c.last_seen_ms,
        });
        let departed = inner.departed.iter().map(|(id, d)| ClientView {
            id: id.clone(),
            status: "offline",
            examples: d.num_examples,
            agent_version: d.agent_version.clone(),
            connected_since: None,
            last_seen: d.last_seen_ms,
        });
        let mut all: Vec<ClientView> = connected.chain(departed).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Watches connections and disconnections: the receiver sees a change whenever one
    /// happened since it last looked.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn len(&self) -> usize {
        self.lock().clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until at least `n` clients are connected; false if `timeout` passes first.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.len() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.len() >= n;
            }
        }
    }

    /// Sends one instruction built by `build(request_id)` and returns the id and a receiver
    /// for the reply. The receiver errors if the client disconnects first.
    pub async fn request(
        &self,
        client_id: &str,
        round: u64,
        build: impl FnOnce(u64) -> ServerMessage,
    ) -> Result<(u64, oneshot::Receiver<Reply>), RequestError> {
        let request_id = self.next_request.fetch_add(1, Relaxed);
        let (reply, rx) = oneshot::channel();
        let tx = {
            let mut inner = self.lock();
            let tx = inner
                .clients
                .get(client_id)
                .map(|c| c.tx.clone())
                .ok_or_else(|| RequestError::NotConnected(client_id.to_string()))?;
            inner.pending.insert(
                request_id,
                Pending {
                    client_id: client_id.to_string(),
                    round,
                    reply,
                },
            );
            tx
        };
        if tx.send(Ok(build(request_id))).await.is_err() {
            self.lock().pending.remove(&request_id);
            return Err(RequestError::NotConnected(client_id.to_string()));
        }
        Ok((request_id, rx))
    }

    /// Closes a request that got no reply in time and tells the client to drop the work.
    /// Returns false if the request had already been answered or dropped.
    pub fn time_out(&self, request_id: u64) -> bool {
        let (pending, tx) = {
            let mut inner = self.lock();
            let Some(p) = inner.pending.remove(&request_id) else {
                return false;
            };
            inner.closed.insert(request_id, (Closed::TimedOut, p.round));
            let tx = inner.clients.get(&p.client_id).map(|c| c.tx.clone());
            (p, tx)
        };
        if let Some(tx) = tx {
            let cancel = ServerMessage {
                msg: Some(ServerMsg::Cancel(Cancel {
                    request_id,
                    round: pending.round,
                })),
            };
            // Best effort: a full or closed stream means the client has bigger problems.
            let _ = tx.try_send(Ok(cancel));
        }
        true
    }

    /// Forgets closed requests from rounds before `round - 1`, bounding memory on long runs.
    pub fn forget_closed_before(&self, round: u64) {
        let keep_from = round.saturating_sub(1);
        self.lock().closed.retain(|_, (_, r)| *r >= keep_from);
    }

    /// Routes a reply from `client_id` to the request it answers, or counts and drops it.
    /// Returns false when the reply was dropped.
    pub fn route(&self, client_id: &str, msg: ClientMessage) -> bool {
        // One lock per message, on every reply's path: it also records when the client was
        // last heard from.
        let mut inner = self.lock();
        if let Some(c) = inner.clients.get_mut(client_id) {
            c.last_seen_ms = pollen_proto::now_unix_ms();
        }
        let (request_id, reply) = match msg.msg {
            Some(ClientMsg::Fit(r)) => (r.request_id, Reply::Fit(r)),
            Some(ClientMsg::Evaluate(r)) => (r.request_id, Reply::Evaluate(r)),
            Some(ClientMsg::Parameters(r)) => (r.request_id, Reply::Parameters(r)),
            Some(ClientMsg::Statistics(r)) => (r.request_id, Reply::Statistics(r)),
            Some(ClientMsg::Failure(r)) => (r.request_id, Reply::Failure(r)),
            Some(ClientMsg::Progress(p)) => {
                drop(inner);
                tracing::debug!(client = %client_id, request = p.request_id, fraction = p.fraction, "{}", p.message);
                return true;
            }
            Some(ClientMsg::Join(_)) | None => return false,
        };
        match inner.pending.get(&request_id) {
            Some(p) if p.client_id != client_id => {
                drop(inner);
                self.counters.replies_wrong_client.inc();
                tracing::warn!(client = %client_id, request = request_id, "reply to a request addressed to another client dropped");
                false
            }
            Some(_) => {
                let p = inner.pending.remove(&request_id).expect("checked above");
                inner.closed.insert(request_id, (Closed::Answered, p.round));
                drop(inner);
                // The awaiting side may have given up between the lookup and now; then the
                // reply is late.
                if p.reply.send(reply).is_err() {
                    self.counters.replies_late.inc();
                    return false;
                }
                true
            }
            None => {
                let closed = inner.closed.get(&request_id).copied();
                drop(inner);
                let (counter, what) = match closed {
                    Some((Closed::TimedOut, _)) => (&self.counters.replies_late, "late"),
                    Some((Closed::Answered, _)) => (&self.counters.replies_duplicate, "duplicate"),
                    None => (&self.counters.replies_unknown, "unknown-request"),
                };
                counter.inc();
                tracing::warn!(client = %client_id, request = request_id, "{what} reply dropped");
                false
            }
        }
    }

    /// Sends a message to every connected client (e.g. Stop at shutdown).
    /// Tells every client to stop and forgets them at once, as if each had disconnected: their
    /// streams close in their own time, and one that comes back joins anew. The next run on
    /// this registry then counts only clients that are really there, not sessions that are
    /// closing (a proxy's bridges rejoin after a run's stop).
    pub fn stop_all(&self, msg: ServerMessage) {
        let sessions: Vec<(String, u64, ClientSender)> = self
            .lock()
            .clients
            .iter()
            .map(|(id, c)| (id.clone(), c.session, c.tx.clone()))
            .collect();
        for (id, session, tx) in sessions {
            let _ = tx.try_send(Ok(msg.clone()));
            self.unregister(&id, session);
        }
    }
}
