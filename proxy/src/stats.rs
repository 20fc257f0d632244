//! Counters a proxy keeps about its traffic, read as a [`ProxyStatsSnapshot`] and exported at
//! `/metrics` through [`Stats::registry`].

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::Notify;

use crate::devices::DeviceRegistry;

/// Why a device reply was dropped; variants are spelled as the exported label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum DropReason {
    duplicate,
    late,
    unknown,
    malformed,
    inbox_full,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: DropReason,
}

/// Live counters, shared by the dispatcher and every bridge.
#[derive(Debug)]
pub(crate) struct Stats {
    pub commands_published: Counter,
    pub replies_received: Counter,
    pub replies_duplicate: Counter,
    pub replies_late: Counter,
    pub replies_unknown: Counter,
    pub replies_malformed: Counter,
    pub replies_dropped: Counter,
    pub status_malformed: Counter,
    pub timeouts: Counter,
    pub cancels: Counter,
    pub bridges_open: Gauge<u64, AtomicU64>,
    pub reconnects: Counter,
    pub subscriptions_refused: Counter,
    pub handed_off: Counter,
    pub live_proxies: Gauge<u64, AtomicU64>,
    /// Woken whenever `bridges_open` changes, for [`crate::ProxyHandle::wait_for_bridges`].
    pub bridges_changed: Notify,
    /// `replies_duplicate` to `replies_dropped` are its members (a counter's clones share its
    /// value), all made up front so that every reason is exported from the start, at 0 too.
    dropped_by_reason: Family<DropLabels, Counter>,
}

impl Default for Stats {
    fn default() -> Self {
        let dropped_by_reason = Family::<DropLabels, Counter>::default();
        let member = |reason| dropped_by_reason.get_or_create_owned(&DropLabels { reason });
        Self {
            commands_published: Counter::default(),
            replies_received: Counter::default(),
            replies_duplicate: member(DropReason::duplicate),
            replies_late: member(DropReason::late),
            replies_unknown: member(DropReason::unknown),
            replies_malformed: member(DropReason::malformed),
            replies_dropped: member(DropReason::inbox_full),
            status_malformed: Counter::default(),
            timeouts: Counter::default(),
            cancels: Counter::default(),
            bridges_open: Gauge::default(),
            reconnects: Counter::default(),
            subscriptions_refused: Counter::default(),
            handed_off: Counter::default(),
            live_proxies: Gauge::default(),
            bridges_changed: Notify::new(),
            dropped_by_reason,
        }
    }
}

impl Stats {
    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        ProxyStatsSnapshot {
            commands_published: self.commands_published.get(),
            replies_received: self.replies_received.get(),
            replies_duplicate: self.replies_duplicate.get(),
            replies_late: self.replies_late.get(),
            replies_unknown: self.replies_unknown.get(),
            replies_malformed: self.replies_malformed.get(),
            replies_dropped: self.replies_dropped.get(),
            status_malformed: self.status_malformed.get(),
            timeouts: self.timeouts.get(),
            cancels: self.cancels.get(),
            bridges_open: self.bridges_open.get(),
            reconnects: self.reconnects.get(),
            subscriptions_refused: self.subscriptions_refused.get(),
            handed_off: self.handed_off.get(),
            live_proxies: self.live_proxies.get(),
        }
    }

    /// Marks one bridge as joined until the returned guard drops, so that a bridge that ends
    /// by any path (error, panic, shutdown) leaves the gauge right.
    pub fn bridge_open(&self) -> OpenBridge<'_> {
        self.bridges_open.inc();
        self.bridges_changed.notify_waiters();
        OpenBridge { stats: self }
    }

    /// What `pollen proxy --http` serves at `/metrics`: these counters, and the devices of
    /// `devices` by state, read at each scrape.
    pub fn registry(&self, devices: Arc<Mutex<DeviceRegistry>>) -> Registry {
        let mut registry = Registry::default();
        for (name, help, counter) in [
            (
                "pollen_proxy_commands_published",
                "Commands (work and cancels) handed to the MQTT client",
                &self.commands_published,
            ),
            (
                "pollen_proxy_replies_received",
                "Messages received on device reply topics, well-formed or not",
                &self.replies_received,
            ),
            (
                "pollen_proxy_status_malformed",
                "Device status messages that did not decode or named another device",
                &self.status_malformed,
            ),
            (
                "pollen_proxy_timeouts",
                "Requests failed with TIMEOUT: the device missed the deadline",
                &self.timeouts,
            ),
            (
                "pollen_proxy_cancels",
                "Requests the coordinator cancelled while open",
                &self.cancels,
            ),
            (
                "pollen_proxy_mqtt_reconnects",
                "MQTT reconnections after the first connection",
                &self.reconnects,
            ),
            (
                "pollen_proxy_subscriptions_refused",
                "Topic filters the broker refused to subscribe the proxy to (its ACL)",
                &self.subscriptions_refused,
            ),
            (
                "pollen_proxy_devices_handed_off",
                "Bridges closed because another live proxy of the fleet owns the device now",
                &self.handed_off,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "pollen_proxy_replies_dropped",
            "Device replies dropped, by reason",
            self.dropped_by_reason.clone(),
        );
        registry.register(
            "pollen_proxy_bridges",
            "Devices bridged to the coordinator now (one Fleet stream each)",
            self.bridges_open.clone(),
        );
        registry.register(
            "pollen_proxy_live_proxies",
            "Live proxies sharing the fleet, this one included (auto sharding; 0 otherwise)",
            self.live_proxies.clone(),
        );
        registry.register_collector(Box::new(DevicesCollector(devices)));
        registry
    }
}

/// The devices by state, counted at each scrape: whether a device is online depends on when
/// it was last heard from.
struct DevicesCollector(Arc<Mutex<DeviceRegistry>>);

impl std::fmt::Debug for DevicesCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicesCollector").finish_non_exhaustive()
    }
}

impl Collector for DevicesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let (known, online) = {
            let devices = crate::proxy::lock(&self.0);
            (devices.len(), devices.online_at(crate::now_unix_ms()))
        };
        let mut family = encoder.encode_descriptor(
            "pollen_proxy_devices",
            "Devices of the fleet known from their status messages, by state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [("online", online), ("offline", known - online)] {
            family
                .encode_family(&[("state", state)])?
                .encode_gauge(&n)?;
        }
        Ok(())
    }
}

pub(crate) struct OpenBridge<'a> {
    stats: &'a Stats,
}

impl Drop for OpenBridge<'_> {
    fn drop(&mut self) {
        self.stats.bridges_open.dec();
        self.stats.bridges_changed.notify_waiters();
    }
}

/// The proxy's counters at one instant. All are totals since start except `bridges_open`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStatsSnapshot {
    /// Commands (work and cancels) handed to the MQTT client.
    pub commands_published: u64,
    /// Messages received on reply topics, well-formed or not.
    pub replies_received: u64,
    /// Second answers to a request that had already been answered; dropped.
    pub replies_duplicate: u64,
    /// Answers to a request that had timed out or been cancelled; dropped.
    pub replies_late: u64,
    /// Answers to a request id this proxy does not remember, or for a device it does not
    /// bridge; dropped.
    pub replies_unknown: u64,
    /// Replies that did not decode, named another device, or did not fit their request.
    pub replies_malformed: u64,
    /// Replies dropped because their bridge's inbox was full (a bridge stuck on its
    /// coordinator stream); the request then times out.
    pub replies_dropped: u64,
    /// Status messages that did not decode or named another device.
    pub status_malformed: u64,
    /// Requests failed with `TIMEOUT` because the device missed the deadline.
    pub timeouts: u64,
    /// Requests the coordinator cancelled while they were open.
    pub cancels: u64,
    /// Bridges currently joined to the coordinator.
    pub bridges_open: u64,
    /// MQTT reconnections after the first connection.
    pub reconnects: u64,
    /// Topic filters the broker refused (SUBACK failure): its ACL does not let the proxy's
    /// identity read replies or statuses, so none will arrive.
    pub subscriptions_refused: u64,
    /// Bridges closed because another live proxy owns their device now (auto sharding).
    pub handed_off: u64,
    /// Live proxies sharing the fleet, this one included (auto sharding; 0 otherwise).
    pub live_proxies: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_proto::device::DeviceStatus;

    #[test]
    fn the_exposition_names_every_counter_and_the_device_states() {
        let stats = Stats::default();
        stats.replies_late.inc_by(2);
        let _bridges = [stats.bridge_open(), stats.bridge_open()];
        let mut devices = DeviceRegistry::new(std::time::Duration::from_secs(30));
        let now = crate::now_unix_ms();
        for (id, online) in [("a", true), ("b", false)] {
            let status = DeviceStatus {
                device_id: id.into(),
                online,
                ..Default::default()
            };
            devices.update(status, false, now);
        }
        let text = pollen_proto::prometheus::encode(&stats.registry(Arc::new(Mutex::new(devices))));
        for line in [
            "pollen_proxy_replies_dropped_total{reason=\"late\"} 2",
            "pollen_proxy_replies_dropped_total{reason=\"inbox_full\"} 0",
            "pollen_proxy_bridges 2",
            "pollen_proxy_devices{state=\"online\"} 1",
            "pollen_proxy_devices{state=\"offline\"} 1",
            "pollen_proxy_timeouts_total 0",
            "pollen_proxy_commands_published_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(stats.snapshot().replies_late, 2);
    }
}
