//! The proxy process: which devices get a bridge, and the lifecycle of the whole thing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pollen_proto::device::Reply;
use rumqttc::AsyncClient;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::devices::{DeviceRecord, DeviceRegistry, Selection};
use crate::membership::Membership;
use crate::mqtt::StatusUpdate;
use crate::stats::{ProxyStatsSnapshot, Stats};
use crate::{ProxyConfig, ProxyError, bridge};

/// Replies buffered per bridge. A device has a few requests open and answers each once (plus
/// progress), so a full inbox means the bridge is stuck, not busy.
const INBOX_CAPACITY: usize = 64;
/// How long, after every bridge has ended, queued CANCELs may take to reach the broker.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

struct BridgeEntry {
    generation: u64,
    inbox: mpsc::Sender<Reply>,
    offline: CancellationToken,
}

#[derive(Default)]
struct Bridges {
    by_device: HashMap<String, BridgeEntry>,
    next_generation: u64,
}

/// State shared by the dispatcher, the bridges and the handle.
pub(crate) struct Shared {
    pub fleet: String,
    pub broker_url: String,
    pub selection: Selection,
    pub stats: Stats,
    /// Shared with the `/metrics` registry, which counts the devices online at each scrape.
    pub registry: Arc<Mutex<DeviceRegistry>>,
    bridges: Mutex<Bridges>,
    pub mqtt: AsyncClient,
    /// The live proxies sharing the fleet, when it is shared automatically.
    pub membership: Option<Mutex<Membership>>,
    pub proxy_id: String,
    /// One HTTP/2 connection multiplexes every bridge's Join stream.
    pub channel: tonic::transport::Channel,
    /// Random per process, so that command ids never repeat across proxy restarts.
    session: String,
    next_join: AtomicU64,
    tracker: TaskTracker,
    pub shutdown: CancellationToken,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked (every update is a single
    // insert or remove); keep the proxy serving rather than poison every device.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// A fresh command-id prefix for one Join session of one bridge.
    pub fn next_prefix(&self) -> String {
        format!("{}-{}", self.session, self.next_join.fetch_add(1, Relaxed))
    }

    /// The latest status of `device`, if it is still known.
    pub fn status_of(&self, device: &str) -> Option<pollen_proto::device::DeviceStatus> {
        lock(&self.registry).status(device).cloned()
    }

    /// Applies a status message and starts or stops the device's bridge accordingly.
    pub fn on_status(self: &Arc<Self>, device: &str, update: StatusUpdate, retained: bool) {
        let now = crate::now_unix_ms();
        let online = {
            let mut registry = lock(&self.registry);
            match update {
                StatusUpdate::Cleared => {
                    registry.remove(device);
                    false
                }
                StatusUpdate::Status(status) => {
                    registry.update(*status, retained, now);
                    registry.is_online(device, now)
                }
                StatusUpdate::Malformed => return,
            }
        };
        if online {
            self.start_bridge(device, now);
        } else {
            self.leave(device, "went offline");
        }
    }

    /// Whether this proxy bridges `device` now (always, unless the fleet is shared
    /// automatically; a static shard is part of the selection).
    pub fn owns(&self, device: &str, now: u64) -> bool {
        self.membership
            .as_ref()
            .is_none_or(|m| lock(m).owns_at(device, now))
    }

    /// Applies another proxy's announcement (`None`: cleared) and moves devices accordingly.
    pub fn on_proxy_status(
        self: &Arc<Self>,
        proxy_id: &str,
        status: Option<&pollen_proto::device::ProxyStatus>,
    ) {
        let Some(membership) = &self.membership else {
            return;
        };
        let now = crate::now_unix_ms();
        lock(membership).update(proxy_id, status, now);
        self.rebalance(now);
    }

    /// Records the broker connection's state for the membership.
    pub fn on_connection(&self, up: bool) {
        if let Some(membership) = &self.membership {
            let now = crate::now_unix_ms();
            let mut m = lock(membership);
            if up {
                m.connected(now)
            } else {
                m.disconnected(now)
            }
        }
    }

    /// This proxy's announcement: its topic and payload.
    pub fn announcement(&self, online: bool) -> Option<(String, Vec<u8>)> {
        let membership = self.membership.as_ref()?;
        let status =
            lock(membership).status(online, self.stats.bridges_open.get(), crate::now_unix_ms());
        Some((
            pollen_proto::topics::proxy_status(&self.fleet, &self.proxy_id),
            prost::Message::encode_to_vec(&status),
        ))
    }

    /// Under automatic sharding: closes the bridges of devices another live proxy owns now,
    /// and starts those of online devices that became this proxy's.
    fn rebalance(self: &Arc<Self>, now: u64) {
        let Some(membership) = &self.membership else {
            return;
        };
        let (moved, live) = {
            let m = lock(membership);
            let bridged: Vec<String> = lock(&self.bridges).by_device.keys().cloned().collect();
            let moved: Vec<(String, Option<String>)> = bridged
                .into_iter()
                .filter(|d| !m.owns_at(d, now))
                .map(|d| {
                    let owner = m.owner_at(&d, now);
                    (d, owner)
                })
                .collect();
            (moved, m.live_at(now).len())
        };
        self.stats.live_proxies.set(live as u64);
        for (device, owner) in moved {
            let why = match owner {
                Some(owner) => format!("is proxy {owner}'s now"),
                None => "has no live proxy: this one lost the broker".to_string(),
            };
            if self.leave(&device, &why) {
                self.stats.handed_off.inc();
            }
        }
        let candidates = lock(&self.registry).select_at(&self.selection, now);
        for record in candidates {
            self.start_bridge(&record.device_id, now);
        }
    }

    /// Hands a reply to its device's bridge without waiting: the dispatcher must keep polling
    /// the MQTT connection whatever one bridge does.
    pub fn route_reply(&self, device: &str, reply: Reply) {
        let inbox = lock(&self.bridges)
            .by_device
            .get(device)
            .map(|b| b.inbox.clone());
        let Some(inbox) = inbox else {
            self.stats.replies_unknown.inc();
            tracing::debug!(%device, request = %reply.request_id, "reply for a device without a bridge dropped");
            return;
        };
        match inbox.try_send(reply) {
            Ok(()) => {}
            Err(TrySendError::Full(reply)) => {
                self.stats.replies_dropped.inc();
                tracing::warn!(%device, request = %reply.request_id, "reply dropped: the bridge's inbox is full");
            }
            Err(TrySendError::Closed(_)) => {
                self.stats.replies_unknown.inc();
            }
        }
    }

    /// Starts a bridge for `device` if it passes the selection, has none yet, and there is
    /// room under `max_devices`.
    fn start_bridge(self: &Arc<Self>, device: &str, now: u64) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let admitted = lock(&self.registry)
            .get_at(device, now)
            .is_some_and(|r| self.selection.admits(&r));
        if !admitted {
            return;
        }
        let (generation, inbox, offline) = {
            // Ownership is decided and the bridge recorded under the membership lock (taken
            // before the bridges', as in `rebalance`), so that a rebalance cannot run between
            // the two and miss the new bridge.
            let membership = self.membership.as_ref().map(lock);
            if membership.as_ref().is_some_and(|m| !m.owns_at(device, now)) {
                return;
            }
            let mut bridges = lock(&self.bridges);
            let full = self
                .selection
                .max_devices
                .is_some_and(|max| bridges.by_device.len() >= max);
            if full || bridges.by_device.contains_key(device) {
                return;
            }
            bridges.next_generation += 1;
            let generation = bridges.next_generation;
            let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
            let offline = CancellationToken::new();
            bridges.by_device.insert(
                device.to_string(),
                BridgeEntry {
                    generation,
                    inbox: tx,
                    offline: offline.clone(),
                },
            );
            (generation, rx, offline)
        };
        tracing::info!(%device, "device online; starting its bridge");
        let ended = Ended {
            shared: self.clone(),
            device: device.to_string(),
            generation,
        };
        self.tracker.spawn(async move {
            bridge::run(&ended.shared, &ended.device, inbox, offline).await;
        });
    }

    /// Tells the bridge of `device`, if any, that the device is gone; whether it had one.
    fn leave(&self, device: &str, why: &str) -> bool {
        let entry = lock(&self.bridges).by_device.remove(device);
        if let Some(entry) = entry {
            tracing::info!(%device, "device {why}; its bridge leaves the coordinator");
            entry.offline.cancel();
            return true;
        }
        false
    }

    fn bridge_ended(&self, device: &str, generation: u64) {
        let mut bridges = lock(&self.bridges);
        if bridges
            .by_device
            .get(device)
            .is_some_and(|b| b.generation == generation)
        {
            bridges.by_device.remove(device);
        }
    }

    /// Retires bridges of devices that fell silent, and fills free places under
    /// `max_devices` with online devices seen earlier; under automatic sharding, also moves
    /// devices as proxies settle, fall silent or lose the broker.
    fn sweep(self: &Arc<Self>) {
        let now = crate::now_unix_ms();
        let stale = lock(&self.registry).stale_at(now);
        for device in stale {
            self.leave(&device, "missed its heartbeats");
        }
        if self.membership.is_some() {
            self.rebalance(now);
            return;
        }
        let candidates = lock(&self.registry).select_at(&self.selection, now);
        for record in candidates {
            self.start_bridge(&record.device_id, now);
        }
    }

    /// Publishes this proxy's announcement (retained), if it shares the fleet automatically.
    /// Waits for room in the MQTT client's queue, up to a heartbeat: a burst of commands
    /// must not cost heartbeats, because three missed ones make this proxy (and the others)
    /// count it as gone.
    async fn announce(&self, online: bool, within: Duration) {
        let Some((topic, payload)) = self.announcement(online) else {
            return;
        };
        let publish = self
            .mqtt
            .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload);
        match tokio::time::timeout(within, publish).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("proxy announcement not queued: {e}"),
            Err(_) => tracing::warn!("proxy announcement not queued within {within:?}"),
        }
    }
}

/// Forgets a bridge when its task ends, however it ends: a bridge that panicked must not
/// keep its device's place, or the device would never be bridged again.
struct Ended {
    shared: Arc<Shared>,
    device: String,
    generation: u64,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.shared.bridge_ended(&self.device, self.generation);
    }
}

/// Starts proxies.
pub struct Proxy;

impl Proxy {
    /// Validates `config`, starts the MQTT dispatcher and returns at once; bridges start as
    /// device statuses arrive. Neither the broker nor the coordinator needs to be up yet: the
    /// connection and every bridge retry with backoff. Everything stops when `shutdown` fires;
    /// await [`ProxyHandle::join`] then.
    pub async fn start(
        config: ProxyConfig,
        shutdown: CancellationToken,
    ) -> Result<ProxyHandle, ProxyError> {
        config.validate()?;
        let coordinator_error = |reason: String| ProxyError::Coordinator {
            endpoint: config.coordinator.clone(),
            reason,
        };
        let mut endpoint = tonic::transport::Endpoint::from_shared(config.coordinator.clone())
            .map_err(|e| coordinator_error(e.to_string()))?
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if let Some(tls) = config
            .coordinator_tls
            .config(&config.coordinator)
            .map_err(|e| coordinator_error(e.to_string()))?
        {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| coordinator_error(e.to_string()))?;
        }
        let channel = endpoint.connect_lazy();
        let (mqtt, eventloop) = crate::mqtt::connect(&config)?;
        let shared = Arc::new(Shared {
            fleet: config.fleet.clone(),
            broker_url: config.broker.redacted_url(),
            selection: config.selection.clone(),
            stats: Stats::default(),
            registry: Arc::new(Mutex::new(DeviceRegistry::new(config.stale_after))),
            bridges: Mutex::new(Bridges::default()),
            mqtt,
            membership: config
                .auto_shard
                .then(|| Mutex::new(Membership::new(config.proxy_id.clone(), config.heartbeat))),
            proxy_id: config.proxy_id.clone(),
            channel,
            session: crate::random_hex(6),
            next_join: AtomicU64::new(1),
            tracker: TaskTracker::new(),
            shutdown,
        });
        tracing::info!(
            fleet = %config.fleet,
            client_id = %config.client_id(),
            coordinator = %config.coordinator,
            broker = %config.broker.url,
            "proxy starting"
        );
        let stop = CancellationToken::new();
        let dispatcher = tokio::spawn(crate::mqtt::run_dispatcher(
            eventloop,
            shared.clone(),
            stop.clone(),
        ));
        let sweep_every =
            (config.stale_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let supervisor = tokio::spawn(supervise(
            shared.clone(),
            dispatcher,
            stop,
            sweep_every,
            config.heartbeat,
        ));
        Ok(ProxyHandle { shared, supervisor })
    }
}

/// Sweeps stale devices (and, sharing the fleet automatically, repeats the proxy's
/// announcement) until shutdown, then winds down in order: the announcement that this proxy
/// leaves, so that the others take its devices at once; bridges (they publish their
/// CANCELs); the MQTT connection.
async fn supervise(
    shared: Arc<Shared>,
    mut dispatcher: JoinHandle<()>,
    stop: CancellationToken,
    sweep_every: Duration,
    heartbeat: Duration,
) {
    let mut ticker = tokio::time::interval(sweep_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat = tokio::time::interval(heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => shared.sweep(),
            // The first tick is immediate; the dispatcher announces on connecting anyway.
            _ = beat.tick(), if shared.membership.is_some() => shared.announce(true, heartbeat).await,
            _ = shared.shutdown.cancelled() => break,
        }
    }
    shared.announce(false, DISCONNECT_GRACE).await;
    shared.tracker.close();
    shared.tracker.wait().await;
    let _ = shared.mqtt.try_disconnect();
    if tokio::time::timeout(DISCONNECT_GRACE, &mut dispatcher)
        .await
        .is_err()
    {
        stop.cancel();
        let _ = dispatcher.await;
    }
    tracing::info!(fleet = %shared.fleet, "proxy stopped");
}

/// A running proxy.
pub struct ProxyHandle {
    shared: Arc<Shared>,
    supervisor: JoinHandle<()>,
}

impl ProxyHandle {
    /// The proxy's counters now.
    pub fn stats(&self) -> ProxyStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Reads the proxy's counters at each call, for observers that outlive a borrow.
    pub fn stats_reader(&self) -> impl Fn() -> ProxyStatsSnapshot + Clone + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.stats.snapshot()
    }

    /// Every device the proxy has heard of, sorted by id.
    pub fn devices(&self) -> Vec<DeviceRecord> {
        lock(&self.shared.registry).records()
    }

    /// The proxy's Prometheus metrics, live, for `/metrics`.
    pub fn metrics_registry(&self) -> prometheus_client::registry::Registry {
        self.shared.stats.registry(self.shared.registry.clone())
    }

    /// Waits until at least `n` bridges are joined to the coordinator; false if `timeout`
    /// passes first.
    pub async fn wait_for_bridges(&self, n: usize, timeout: Duration) -> bool {
        let stats = &self.shared.stats;
        let enough = || stats.bridges_open.get() >= n as u64;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = stats.bridges_changed.notified();
            if enough() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return enough();
            }
        }
    }

    /// Waits for every task of the proxy to end. They end only after the shutdown token given
    /// to [`Proxy::start`] fires.
    pub async fn join(self) {
        if let Err(e) = self.supervisor.await {
            tracing::error!("proxy supervisor failed: {e}");
        }
    }
}
