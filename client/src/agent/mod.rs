//! The MQTT edge agent: a device's side of the proxy <-> device contract.
//!
//! The agent keeps a persistent MQTT session (`pollen-agent-<fleet>-<device>`), listens on
//! `pollen/<fleet>/<device>/cmd`, works on one command at a time (download the global weights
//! from a presigned URL, train or evaluate with a [`Client`], upload the update to a presigned
//! URL) and answers on `.../reply`. It keeps a retained [`DeviceStatus`] on `.../status`
//! (heartbeat), whose last-will says `online = false`.
//!
//! Delivery is at least once: finished replies wait in an outbox (on disk when a work directory
//! is set) until their deadline and are republished after every reconnect; the proxy drops
//! duplicates and late ones. A command delivered twice is worked on once.
//!
//! # Layout
//! - `state`: the command state machine (queue, running, handled ids), without I/O.
//! - `work`: one command's work and its reply.
//! - `outbox`: replies kept for redelivery, and handled ids, persisted.
//! - `runtime`: the MQTT connection and the event loop that ties it all together.
//!
//! [`DeviceStatus`]: pollen_proto::device::DeviceStatus

pub mod consent;
/// The check every command payload passes before the agent acts on it (fuzzed in `fuzz/`).
pub use state::parse_command;
mod outbox;
mod runtime;
mod state;
mod wire;
mod work;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pollen_proto::limits::MAX_MQTT_PAYLOAD_BYTES;
use pollen_proto::mqtt::{BrokerConfig, BrokerError, mqtt_options};
use pollen_proto::scalar::ScalarMap;
use pollen_proto::topics::{self, TopicError};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;
use rumqttc::{LastWill, MqttOptions, QoS};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::task::TaskCache;
use crate::transfer;
use outbox::Outbox;
use runtime::Runtime;
use state::Scheduler;
use wire::StatusInfo;
use work::Worker;

/// Longest device or fleet id accepted: ids travel in every reply and status, which must stay
/// far below the MQTT payload limit.
pub const MAX_ID_CHARS: usize = 128;

/// How often an agent republishes its retained online status by default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// The default MQTT keep-alive.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// How one agent connects and what it reports.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// This device's id (`[A-Za-z0-9_.-]`, at most [`MAX_ID_CHARS`]).
    pub device_id: String,
    /// The fleet the device belongs to (same alphabet).
    pub fleet: String,
    pub broker: BrokerConfig,
    /// How often the retained online status is republished.
    pub heartbeat: Duration,
    /// MQTT keep-alive: whole seconds, at least 1 s.
    pub keep_alive: Duration,
    /// Where the outbox, the handled request ids and the task manifests received are
    /// persisted; `None` keeps them in memory.
    pub work_dir: Option<PathBuf>,
    /// A label reported in the status as the device's model (free-form; the task of each run
    /// decides what is trained).
    pub model: String,
    /// Limits how many agents of this process compute at once (simulation); `None`: no limit.
    pub compute_slots: Option<Arc<Semaphore>>,
    /// Extra properties reported in the status.
    pub properties: ScalarMap,
    /// The device owner's policy: instructions it does not permit are declined.
    pub consent: Option<Arc<consent::Consent>>,
    /// A PEM CA to trust, besides the public roots, for the object store's HTTPS.
    pub object_store_ca: Option<PathBuf>,
}

impl AgentOptions {
    /// Options with the defaults of the agent's config file for everything but the ids and the
    /// broker.
    pub fn new(
        device_id: impl Into<String>,
        fleet: impl Into<String>,
        broker: BrokerConfig,
    ) -> Self {
        Self {
            device_id: device_id.into(),
            fleet: fleet.into(),
            broker,
            heartbeat: DEFAULT_HEARTBEAT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            work_dir: None,
            model: String::new(),
            compute_slots: None,
            properties: ScalarMap::new(),
            consent: None,
            object_store_ca: None,
        }
    }

    /// The MQTT client id of this device's session.
    pub fn mqtt_client_id(&self) -> String {
        format!("pollen-agent-{}-{}", self.fleet, self.device_id)
    }
}

/// A command's outcome; variants are spelled as the exported label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Outcome {
    fit_done,
    evaluate_done,
    get_parameters_done,
    statistics_done,
    failed,
    declined,
    cancelled,
    expired,
    duplicate,
    malformed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

/// Counters of what an agent did, readable while it runs.
#[derive(Debug)]
pub struct AgentStats {
    /// Messages that arrived on the command topic, malformed ones included.
    pub commands_received: Counter,
    /// Payloads that were not a usable `Command` (ignored).
    pub commands_malformed: Counter,
    /// Redeliveries of a command already queued, running or handled.
    pub commands_duplicate: Counter,
    /// Commands cancelled while queued or running.
    pub commands_cancelled: Counter,
    /// Commands whose deadline passed before they could start.
    pub commands_expired: Counter,
    /// Commands the device owner's consent policy refused.
    pub commands_declined: Counter,
    pub fits_done: Counter,
    pub evaluations_done: Counter,
    pub parameters_done: Counter,
    pub statistics_done: Counter,
    /// Failure replies (any code).
    pub failures_sent: Counter,
    /// Replies handed to the MQTT client (progress and republications included).
    pub replies_published: Counter,
    /// Connections after the first.
    pub reconnects: Counter,
    /// Failed connection attempts and lost connections.
    pub connection_errors: Counter,
    /// The counters of commands by outcome are its members (a counter's clones share its
    /// value), all made up front so that every outcome is exported from the start, at 0 too.
    commands: Family<OutcomeLabels, Counter>,
}

impl Default for AgentStats {
    fn default() -> Self {
        let commands = Family::<OutcomeLabels, Counter>::default();
        let member = |outcome| commands.get_or_create_owned(&OutcomeLabels { outcome });
        Self {
            commands_received: Counter::default(),
            commands_malformed: member(Outcome::malformed),
            commands_duplicate: member(Outcome::duplicate),
            commands_cancelled: member(Outcome::cancelled),
            commands_expired: member(Outcome::expired),
            commands_declined: member(Outcome::declined),
            fits_done: member(Outcome::fit_done),
            evaluations_done: member(Outcome::evaluate_done),
            parameters_done: member(Outcome::get_parameters_done),
            statistics_done: member(Outcome::statistics_done),
            failures_sent: member(Outcome::failed),
            replies_published: Counter::default(),
            reconnects: Counter::default(),
            connection_errors: Counter::default(),
            commands,
        }
    }
}

/// A copy of [`AgentStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStatsSnapshot {
    pub commands_received: u64,
    pub commands_malformed: u64,
    pub commands_duplicate: u64,
    pub commands_cancelled: u64,
    pub commands_expired: u64,
    pub commands_declined: u64,
    pub fits_done: u64,
    pub evaluations_done: u64,
    pub parameters_done: u64,
    pub statistics_done: u64,
    pub failures_sent: u64,
    pub replies_published: u64,
    pub reconnects: u64,
    pub connection_errors: u64,
}

impl AgentStats {
    pub fn snapshot(&self) -> AgentStatsSnapshot {
        AgentStatsSnapshot {
            commands_received: self.commands_received.get(),
            commands_malformed: self.commands_malformed.get(),
            commands_duplicate: self.commands_duplicate.get(),
            commands_cancelled: self.commands_cancelled.get(),
            commands_expired: self.commands_expired.get(),
            commands_declined: self.commands_declined.get(),
            fits_done: self.fits_done.get(),
            evaluations_done: self.evaluations_done.get(),
            parameters_done: self.parameters_done.get(),
            statistics_done: self.statistics_done.get(),
            failures_sent: self.failures_sent.get(),
            replies_published: self.replies_published.get(),
            reconnects: self.reconnects.get(),
            connection_errors: self.connection_errors.get(),
        }
    }

    /// What `pollen-agent --metrics` serves at `/metrics`: these counters, still counting.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        registry.register(
            "pollen_agent_commands_received",
            "Messages on the command topic, malformed ones included",
            self.commands_received.clone(),
        );
        registry.register(
            "pollen_agent_commands",
            "Commands by outcome: work done by kind, failed, cancelled, expired, ignored",
            self.commands.clone(),
        );
        registry.register(
            "pollen_agent_replies_published",
            "Replies handed to the MQTT client (progress and republications included)",
            self.replies_published.clone(),
        );
        registry.register(
            "pollen_agent_mqtt_reconnects",
            "Broker connections after the first",
            self.reconnects.clone(),
        );
        registry.register(
            "pollen_agent_mqtt_connection_errors",
            "Failed connection attempts and lost connections",
            self.connection_errors.clone(),
        );
        registry
    }
}

/// Why an agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Id(#[from] TopicError),
    #[error("{what} {value:?} is {len} characters long; at most {MAX_ID_CHARS} are accepted")]
    IdTooLong {
        what: &'static str,
        value: String,
        len: usize,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{field} = {value:?}: {reason}")]
    Option {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("work_dir {path:?} cannot be used: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client for presigned URLs: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    ObjectStoreCa(String),
}

/// A device's edge agent. Build it with [`Agent::new`], then [`Agent::run`] it.
pub struct Agent {
    options: AgentOptions,
    mqtt: MqttOptions,
    client: Box<dyn Client>,
    info: StatusInfo,
    tasks: TaskCache,
    http: reqwest::Client,
    outbox: Outbox,
    scheduler: Scheduler,
    handled_path: Option<PathBuf>,
    stats: Arc<AgentStats>,
}

fn check_id(what: &'static str, value: &str) -> Result<(), AgentError> {
    topics::validate_id(what, value)?;
    let len = value.chars().count();
    if len > MAX_ID_CHARS {
        return Err(AgentError::IdTooLong {
            what,
            value: value.to_string(),
            len,
        });
    }
    Ok(())
}

impl Agent {
    /// Checks the options (ids, broker, durations, status size), prepares the work directory
    /// and loads what a previous run left in it.
    pub fn new(options: AgentOptions, client: impl Client) -> Result<Self, AgentError> {
        check_id("device id", &options.device_id)?;
        check_id("fleet", &options.fleet)?;
        let ca = options
            .object_store_ca
            .as_deref()
            .map(transfer::read_ca)
            .transpose()
            .map_err(AgentError::ObjectStoreCa)?;
        if options.heartbeat.is_zero() {
            return Err(AgentError::Option {
                field: "heartbeat",
                value: format!("{:?}", options.heartbeat),
                reason: "must be longer than zero",
            });
        }
        if options.keep_alive < Duration::from_secs(1)
            || options.keep_alive > Duration::from_secs(u64::from(u16::MAX))
        {
            return Err(AgentError::Option {
                field: "keep_alive",
                value: format!("{:?}", options.keep_alive),
                reason: "MQTT keep-alive must be between 1 s and 65535 s",
            });
        }
        let num_examples = client.num_examples();
        let mut info = StatusInfo {
            device_id: options.device_id.clone(),
            fleet: options.fleet.clone(),
            model: options.model.clone(),
            num_examples,
            data: client.data_schema(),
            work_dir: options.work_dir.clone(),
            properties: options.properties.clone(),
        };
        // The last-will is fixed at connect time; its timestamp is when the agent started.
        let mut will = info.status(false, ScalarMap::new()).encode_to_vec();
        if will.len() > MAX_MQTT_PAYLOAD_BYTES / 2
            && let Some(data) = info.data.as_mut()
            && !data.columns.is_empty()
        {
            // A very wide CSV: announce the shape of the data without the column names; the
            // task's columns are checked when a task arrives.
            data.columns.clear();
            data.columns_omitted = true;
            will = info.status(false, ScalarMap::new()).encode_to_vec();
        }
        if will.len() > MAX_MQTT_PAYLOAD_BYTES / 2 {
            return Err(AgentError::Option {
                field: "properties",
                value: format!("{} entries", options.properties.len()),
                reason: "the status would not fit comfortably in one MQTT payload; report fewer or shorter properties",
            });
        }

        let mut mqtt = mqtt_options(&options.broker, &options.mqtt_client_id())?;
        mqtt.set_clean_session(false);
        // Keep-alive is whole seconds on the wire.
        mqtt.set_keep_alive(Duration::from_secs(options.keep_alive.as_secs()));
        mqtt.set_last_will(LastWill::new(
            topics::status(&options.fleet, &options.device_id),
            will,
            QoS::AtLeastOnce,
            true,
        ));

        let now = runtime::now_unix_ms();
        let mut scheduler = Scheduler::default();
        let tasks = match &options.work_dir {
            None => TaskCache::default(),
            Some(dir) => TaskCache::with_dir(dir.join("tasks")),
        };
        let (outbox, handled_path) = match &options.work_dir {
            None => (Outbox::in_memory(), None),
            Some(dir) => {
                let work_dir_error = |source| AgentError::WorkDir {
                    path: dir.clone(),
                    source,
                };
                std::fs::create_dir_all(dir).map_err(work_dir_error)?;
                let outbox = Outbox::open(dir.join("outbox"), now).map_err(work_dir_error)?;
                let handled_path = dir.join("handled.json");
                let handled = outbox::load_handled(&handled_path, now);
                runtime::restore(&mut scheduler, &outbox, handled);
                if !outbox.is_empty() {
                    tracing::info!(
                        replies = outbox.len(),
                        "replies left by a previous run will be delivered"
                    );
                }
                (outbox, Some(handled_path))
            }
        };
        Ok(Self {
            http: transfer::http_client(ca.as_deref())?,
            options,
            mqtt,
            client: Box::new(client),
            info,
            tasks,
            outbox,
            scheduler,
            handled_path,
            stats: Arc::default(),
        })
    }

    /// Uses `http` for presigned URLs instead of the agent's own client, so that many agents
    /// simulated in one process share one connection pool.
    pub fn with_http_client(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// The agent's counters; they keep counting while [`Agent::run`] runs.
    pub fn stats(&self) -> Arc<AgentStats> {
        self.stats.clone()
    }

    /// Serves commands until `shutdown` fires, then publishes the retained offline status and
    /// disconnects. Connection problems are retried forever (with backoff), never returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let Agent {
            options,
            mqtt,
            client,
            info,
            tasks,
            http,
            outbox,
            scheduler,
            handled_path,
            stats,
        } = self;
        // Room for a reconnect's worth of outbox republications; beyond it `try_publish`
        // refuses and the outbox retries on the next heartbeat.
        let (mqtt_client, eventloop) = pollen_proto::mqtt::client(mqtt, 256);
        let (net_tx, net_rx) = mpsc::channel(256);
        let (progress_tx, progress_rx) = mpsc::channel(16);
        let stop_connection = CancellationToken::new();

        let fleet = options.fleet.clone();
        let device = options.device_id.clone();
        let num_examples = info.num_examples;
        let runtime = Runtime {
            consent: options.consent.clone(),
            fleet: fleet.clone(),
            info,
            heartbeat: options.heartbeat,
            mqtt: mqtt_client,
            cmd_topic: topics::command(&fleet, &device),
            reply_topic: topics::reply(&fleet, &device),
            status_topic: topics::status(&fleet, &device),
            scheduler,
            outbox,
            handled_path,
            stats,
            worker: Arc::new(Worker {
                device_id: device.clone(),
                http,
                client: Arc::new(Mutex::new(client)),
                tasks,
                compute_slots: options.compute_slots.clone(),
                num_examples,
                progress: progress_tx,
                updates: Default::default(),
            }),
            workers: JoinSet::new(),
            running: None,
            connected: false,
            subscribed: false,
            connections: 0,
            commands_done: 0,
        };
        let state_side = async {
            // However the state side ends, the connection side ends with it.
            let _stop = stop_connection.clone().drop_guard();
            runtime.run(net_rx, progress_rx, shutdown).await;
        };
        tokio::join!(
            runtime::drive(eventloop, net_tx, stop_connection.clone()),
            state_side
        );
        tracing::info!(device = %device, fleet = %fleet, "agent stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_metrics_count_commands_by_outcome() {
        let stats = AgentStats::default();
        stats.fits_done.inc_by(3);
        stats.commands_expired.inc();
        let text = pollen_proto::prometheus::encode(&stats.registry());
        for line in [
            "pollen_agent_commands_total{outcome=\"fit_done\"} 3",
            "pollen_agent_commands_total{outcome=\"expired\"} 1",
            "pollen_agent_commands_total{outcome=\"failed\"} 0",
            "pollen_agent_commands_total{outcome=\"get_parameters_done\"} 0",
            "pollen_agent_mqtt_reconnects_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let snapshot = stats.snapshot();
        assert_eq!((snapshot.fits_done, snapshot.commands_expired), (3, 1));
    }
}
