//! The agent's event loop: one future drives the `rumqttc` connection (reconnecting with
//! backoff) and forwards what matters; another owns the agent's state and reacts to broker
//! events, finished work and heartbeat ticks. Both run inside [`super::Agent::run`]'s future,
//! so dropping it (or aborting its task) closes the connection and the broker publishes the
//! last-will.
//!
//! The state side never awaits the MQTT client (it uses `try_publish`): the connection side
//! may be blocked forwarding an event to it, and the two waiting on each other would deadlock.
//! A reply the client could not take stays unsent in the outbox and is retried on the next
//! heartbeat.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pollen_proto::device::{Command, CommandKind, Reply, reply::Body};
use pollen_proto::fleet::FailureCode;
use pollen_proto::limits::MAX_MQTT_PAYLOAD_BYTES;
use pollen_proto::scalar::{self, ScalarMap};
use prost::Message;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::AgentStats;
use super::outbox::{self, Outbox};
use super::state::{Intake, Next, Scheduler};
use super::wire::{StatusInfo, encode_reply};
use super::work::{self, Done, Worker};

/// First pause after a failed connection attempt; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A reply without a deadline is kept this long for redelivery.
const KEEP_WITHOUT_DEADLINE_MS: u64 = 10 * 60 * 1000;

/// How long shutdown waits for the broker to take the offline status and the disconnect.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub use pollen_proto::now_unix_ms;

/// What the connection side forwards.
#[derive(Debug)]
pub enum NetEvent {
    Connected {
        session_present: bool,
    },
    Lost(String),
    Message {
        topic: String,
        payload: Bytes,
    },
    /// Our own DISCONNECT went out.
    Closed,
}

/// Polls the MQTT event loop until `stop` fires or our DISCONNECT is sent, forwarding
/// connection changes and incoming messages. On an error it waits (exponential backoff) and
/// polls again, which reconnects.
pub async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<NetEvent>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let polled = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            polled = eventloop.poll() => polled,
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = BACKOFF_MIN;
                NetEvent::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => NetEvent::Message {
                topic: publish.topic,
                payload: publish.payload,
            },
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                // The only subscription is the device's own command topic.
                tracing::error!(
                    "the broker refused this agent's subscription to its command topic: its ACL does not give this device's identity (certificate CN or username) that topic, so no work will arrive"
                );
                continue;
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = events.send(NetEvent::Closed).await;
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                if events.send(NetEvent::Lost(e.to_string())).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// The state side of the agent.
pub struct Runtime {
    pub info: StatusInfo,
    pub fleet: String,
    pub consent: Option<Arc<super::consent::Consent>>,
    pub heartbeat: Duration,
    pub mqtt: AsyncClient,
    pub cmd_topic: String,
    pub reply_topic: String,
    pub status_topic: String,
    pub scheduler: Scheduler,
    pub outbox: Outbox,
    pub handled_path: Option<PathBuf>,
    pub stats: Arc<AgentStats>,
    pub worker: Arc<Worker>,
    pub workers: JoinSet<Done>,
    /// The running command's request id, worker task and cancel token.
    pub running: Option<(String, tokio::task::Id, CancellationToken)>,
    pub connected: bool,
    pub subscribed: bool,
    pub connections: u64,
    pub commands_done: u64,
}

impl Runtime {
    pub async fn run(
        mut self,
        mut net: mpsc::Receiver<NetEvent>,
        mut progress: mpsc::Receiver<Reply>,
        shutdown: CancellationToken,
    ) {
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.start_next();
            // Biased: progress a worker sent before finishing is published before its final
            // reply, and work results are taken before new commands.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(update) = progress.recv() => {
                    if self.connected {
                        self.publish_reply(&update.request_id.clone(), encode_reply(update));
                    }
                }
                Some(joined) = self.workers.join_next_with_id(), if !self.workers.is_empty() => {
                    self.on_joined(joined);
                }
                event = net.recv() => match event {
                    Some(event) => self.on_net(event),
                    None => {
                        tracing::error!("the MQTT connection task ended unexpectedly");
                        break;
                    }
                },
                _ = heartbeat.tick() => self.on_tick(),
            }
        }
        self.shut_down(&mut net).await;
    }

    fn on_net(&mut self, event: NetEvent) {
        match event {
            NetEvent::Connected { session_present } => {
                self.connections += 1;
                if self.connections > 1 {
                    self.stats.reconnects.inc();
                    tracing::info!(session_present, "reconnected to the broker");
                } else {
                    tracing::info!(session_present, "connected to the broker");
                }
                self.connected = true;
                // A restarted broker may have forgotten the subscription: always renew it.
                self.subscribe();
                self.publish_status();
                for (id, payload) in self.outbox.all() {
                    self.publish_reply(&id, payload);
                }
            }
            NetEvent::Lost(error) => {
                if self.connected {
                    tracing::warn!("lost the broker connection: {error}");
                } else {
                    tracing::warn!("cannot reach the broker: {error}");
                }
                self.stats.connection_errors.inc();
                self.connected = false;
                self.subscribed = false;
            }
            NetEvent::Message { topic, payload } => self.on_message(&topic, &payload),
            NetEvent::Closed => {}
        }
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if topic != self.cmd_topic {
            tracing::debug!(
                topic,
                "ignoring a message on a topic this agent does not serve"
            );
            return;
        }
        self.stats.commands_received.inc();
        let command = match super::state::parse_command(payload) {
            Ok(command) => command,
            Err(e) => {
                self.stats.commands_malformed.inc();
                tracing::warn!(
                    topic,
                    bytes = payload.len(),
                    "ignoring a malformed command: {e}"
                );
                return;
            }
        };
        let kind = CommandKind::try_from(command.kind).map_or_else(
            |_| format!("UNKNOWN({})", command.kind),
            |k| k.as_str_name().into(),
        );
        tracing::info!(
            request_id = %command.request_id,
            kind,
            round = command.round,
            run_id = %command.run_id,
            "command"
        );
        let now = now_unix_ms();
        if let Some(why) = self.declined(&command) {
            self.stats.commands_declined.inc();
            tracing::info!(request_id = %command.request_id, "declined: {why}");
            let reply = work::failure(&self.info.device_id, &command, FailureCode::Declined, why);
            self.deliver(reply, command.deadline_unix_ms, now);
            return;
        }
        let request_id = command.request_id.clone();
        match self.scheduler.receive(command, now) {
            Intake::Queued => {}
            Intake::Duplicate => {
                self.stats.commands_duplicate.inc();
                tracing::info!(%request_id, "duplicate command ignored");
                if let Some(payload) = self.outbox.get(&request_id).cloned() {
                    self.publish_reply(&request_id, payload);
                }
            }
            Intake::Refused(command, e) => {
                let reply = work::failure(&self.info.device_id, &command, e.code, e.message);
                self.deliver(reply, command.deadline_unix_ms, now);
            }
            Intake::CancelledQueued => {
                self.stats.commands_cancelled.inc();
                tracing::info!(%request_id, "queued command cancelled");
            }
            Intake::CancelledRunning => {
                self.stats.commands_cancelled.inc();
                tracing::info!(%request_id, "running command cancelled");
                if let Some((_, _, cancel)) = self.running.take() {
                    cancel.cancel();
                }
            }
            Intake::CancelTooLate | Intake::CancelUnknown => {
                tracing::info!(%request_id, "cancel for a command that is not queued or running");
            }
        }
        self.save_handled();
    }

    /// Why the device owner's policy refuses `command`, if it does. Cancels are never refused:
    /// they only stop work.
    fn declined(&self, command: &Command) -> Option<String> {
        let consent = self.consent.as_ref()?;
        let action = match CommandKind::try_from(command.kind).ok()? {
            CommandKind::Fit => "fit",
            CommandKind::Evaluate => "evaluate",
            CommandKind::GetParameters => "get_parameters",
            CommandKind::Statistics => "statistics",
            CommandKind::Cancel | CommandKind::Unspecified => return None,
        };
        let status = self.info.status(true, ScalarMap::new());
        let ask = super::consent::Ask {
            fleet: &self.fleet,
            device: &self.info.device_id,
            action,
            run: &command.run_id,
            round: command.round,
            task: command.task.as_ref().map_or("", |t| t.sha256.as_str()),
            now: chrono::Local::now(),
            free_disk_bytes: status.free_disk_bytes,
            busy: self.running.is_some(),
        };
        match consent.decide(&ask) {
            super::consent::Verdict::Accept => None,
            super::consent::Verdict::Decline(why) => Some(why),
        }
    }

    /// Starts the next queued command if none runs; answers expired ones with `TIMEOUT`.
    fn start_next(&mut self) {
        let now = now_unix_ms();
        while let Some(next) = self.scheduler.next(now) {
            match next {
                Next::Expired(command) => {
                    self.stats.commands_expired.inc();
                    tracing::warn!(
                        request_id = %command.request_id,
                        deadline_unix_ms = command.deadline_unix_ms,
                        "deadline passed before the command could start; not working on it"
                    );
                    let message = format!(
                        "deadline {} (Unix ms) passed before the device could start; it was {} ms late",
                        command.deadline_unix_ms,
                        now.saturating_sub(command.deadline_unix_ms)
                    );
                    let reply = work::failure(
                        &self.info.device_id,
                        &command,
                        FailureCode::Timeout,
                        message,
                    );
                    self.deliver(reply, command.deadline_unix_ms, now);
                    self.save_handled();
                }
                Next::Start(command) => {
                    self.start(command);
                    return;
                }
            }
        }
    }

    fn start(&mut self, command: Command) {
        let cancel = CancellationToken::new();
        let request_id = command.request_id.clone();
        let handle = self
            .workers
            .spawn(self.worker.clone().execute(command, cancel.clone()));
        self.running = Some((request_id, handle.id(), cancel));
    }

    fn on_joined(&mut self, joined: Result<(tokio::task::Id, Done), tokio::task::JoinError>) {
        let done = match joined {
            Ok((_, done)) => done,
            Err(e) => {
                // The worker catches the client's panics; this is a bug in the agent itself.
                tracing::error!("a worker task failed: {e}");
                let Some((request_id, _, _)) = self.running.take_if(|(_, id, _)| *id == e.id())
                else {
                    return;
                };
                Done {
                    request_id,
                    kind: None,
                    reply: None,
                }
            }
        };
        let now = now_unix_ms();
        let Some(deadline) = self.scheduler.finish(&done.request_id, now) else {
            // Cancelled while it ran: its result is unwanted.
            return;
        };
        self.running = None;
        self.commands_done += 1;
        if let Some(reply) = done.reply {
            let counter = match (&reply.body, done.kind) {
                (Some(Body::Fit(_)), Some(CommandKind::Fit)) => Some(&self.stats.fits_done),
                (Some(Body::Fit(_)), _) => Some(&self.stats.parameters_done),
                (Some(Body::Evaluate(_)), _) => Some(&self.stats.evaluations_done),
                (Some(Body::Statistics(_)), _) => Some(&self.stats.statistics_done),
                _ => None,
            };
            if let Some(counter) = counter {
                counter.inc();
            }
            self.deliver(reply, deadline, now);
        }
        self.save_handled();
    }

    /// Puts a final reply in the outbox, then publishes it.
    fn deliver(&mut self, reply: Reply, deadline_unix_ms: u64, now: u64) {
        if matches!(reply.body, Some(Body::Failure(_))) {
            self.stats.failures_sent.inc();
        }
        let request_id = reply.request_id.clone();
        let payload = encode_reply(reply);
        let expires = if deadline_unix_ms == 0 {
            now + KEEP_WITHOUT_DEADLINE_MS
        } else {
            deadline_unix_ms
        };
        self.outbox.put(&request_id, payload.clone(), expires);
        self.publish_reply(&request_id, payload);
    }

    fn publish_reply(&mut self, request_id: &str, payload: Bytes) {
        if !self.connected {
            // Delivered from the outbox on the next connect.
            return;
        }
        debug_assert!(payload.len() <= MAX_MQTT_PAYLOAD_BYTES);
        match self
            .mqtt
            .try_publish(&self.reply_topic, QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => {
                self.stats.replies_published.inc();
                self.outbox.mark_sent(request_id);
            }
            Err(e) => tracing::warn!(request_id, "reply not handed to the MQTT client yet: {e}"),
        }
    }

    fn subscribe(&mut self) {
        match self.mqtt.try_subscribe(&self.cmd_topic, QoS::AtLeastOnce) {
            Ok(()) => self.subscribed = true,
            Err(e) => tracing::warn!("cannot subscribe yet (retried on the next heartbeat): {e}"),
        }
    }

    fn status(&self, online: bool) -> Bytes {
        let mut properties = ScalarMap::new();
        properties.insert("busy".into(), scalar::bool(self.running.is_some()));
        properties.insert("queued".into(), scalar::int(self.scheduler.queued() as i64));
        properties.insert(
            "commands_done".into(),
            scalar::int(self.commands_done as i64),
        );
        properties.insert("fleet".into(), scalar::string(self.info.fleet.clone()));
        let encoded = self.info.status(online, properties).encode_to_vec();
        debug_assert!(encoded.len() <= MAX_MQTT_PAYLOAD_BYTES);
        encoded.into()
    }

    fn publish_status(&mut self) {
        let payload = self.status(true);
        if let Err(e) = self
            .mqtt
            .try_publish(&self.status_topic, QoS::AtLeastOnce, true, payload)
        {
            tracing::debug!("status not published: {e}");
        }
    }

    fn on_tick(&mut self) {
        let now = now_unix_ms();
        self.outbox.expire(now);
        self.scheduler.expire(now);
        self.save_handled();
        if !self.connected {
            return;
        }
        if !self.subscribed {
            self.subscribe();
        }
        self.publish_status();
        for (id, payload) in self.outbox.unsent() {
            self.publish_reply(&id, payload);
        }
    }

    fn save_handled(&mut self) {
        if let (Some(path), Some(ids)) = (&self.handled_path, self.scheduler.take_changed()) {
            outbox::save_handled(path, ids);
        }
    }

    /// Stops work, says goodbye (retained offline status) and disconnects cleanly.
    async fn shut_down(mut self, net: &mut mpsc::Receiver<NetEvent>) {
        if let Some((request_id, _, cancel)) = self.running.take() {
            tracing::info!(%request_id, "shutting down: the running command is abandoned");
            cancel.cancel();
        }
        self.workers.abort_all();
        while self.workers.join_next().await.is_some() {}
        self.save_handled();
        if !self.connected {
            // The broker has published (or will publish) the last-will.
            return;
        }
        let offline = self.status(false);
        let sent = self
            .mqtt
            .try_publish(&self.status_topic, QoS::AtLeastOnce, true, offline)
            .and_then(|()| self.mqtt.try_disconnect());
        if let Err(e) = sent {
            tracing::warn!("cannot disconnect cleanly; the broker will publish the last-will: {e}");
            return;
        }
        let closed = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(event) = net.recv().await {
                if matches!(event, NetEvent::Closed | NetEvent::Lost(_)) {
                    break;
                }
            }
        })
        .await;
        if closed.is_err() {
            tracing::warn!("the broker did not take the disconnect in time");
        }
    }
}

/// Handled ids loaded from disk plus the ids of replies still in the outbox.
pub fn restore(scheduler: &mut Scheduler, outbox: &Outbox, handled: HashMap<String, u64>) {
    for (id, forget_at) in handled {
        scheduler.remember(id, forget_at);
    }
    for (id, expires) in outbox.request_ids() {
        if !scheduler.knows(id) {
            scheduler.remember(
                id.to_string(),
                expires.saturating_add(super::state::REMEMBER_MS),
            );
        }
    }
}
