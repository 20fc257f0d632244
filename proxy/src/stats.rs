//! Counters a proxy keeps about its traffic, read as a [`ProxyStatsSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;
use tokio::sync::Notify;

/// Live counters, shared by the dispatcher and every bridge.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub commands_published: AtomicU64,
    pub replies_received: AtomicU64,
    pub replies_duplicate: AtomicU64,
    pub replies_late: AtomicU64,
    pub replies_unknown: AtomicU64,
    pub replies_malformed: AtomicU64,
    pub replies_dropped: AtomicU64,
    pub status_malformed: AtomicU64,
    pub timeouts: AtomicU64,
    pub cancels: AtomicU64,
    pub bridges_open: AtomicU64,
    pub reconnects: AtomicU64,
    /// Woken whenever `bridges_open` changes, for [`crate::ProxyHandle::wait_for_bridges`].
    pub bridges_changed: Notify,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        ProxyStatsSnapshot {
            commands_published: self.commands_published.load(Relaxed),
            replies_received: self.replies_received.load(Relaxed),
            replies_duplicate: self.replies_duplicate.load(Relaxed),
            replies_late: self.replies_late.load(Relaxed),
            replies_unknown: self.replies_unknown.load(Relaxed),
            replies_malformed: self.replies_malformed.load(Relaxed),
            replies_dropped: self.replies_dropped.load(Relaxed),
            status_malformed: self.status_malformed.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            cancels: self.cancels.load(Relaxed),
            bridges_open: self.bridges_open.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
        }
    }

    /// Marks one bridge as joined until the returned guard drops, so that a bridge that ends
    /// by any path (error, panic, shutdown) leaves the gauge right.
    pub fn bridge_open(&self) -> OpenBridge<'_> {
        self.bridges_open.fetch_add(1, Relaxed);
        self.bridges_changed.notify_waiters();
        OpenBridge { stats: self }
    }
}

pub(crate) struct OpenBridge<'a> {
    stats: &'a Stats,
}

impl Drop for OpenBridge<'_> {
    fn drop(&mut self) {
        self.stats.bridges_open.fetch_sub(1, Relaxed);
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
}

impl ProxyStatsSnapshot {
    /// These counters and the devices the proxy knows, in the Prometheus text format (what
    /// `pollen proxy --http` serves at `/metrics`).
    pub fn render_prometheus(&self, devices: &[crate::DeviceRecord]) -> String {
        use pollen_proto::prometheus::{by_label, counter, gauge};
        let mut out = String::with_capacity(2048);
        counter(
            &mut out,
            "pollen_proxy_commands_published_total",
            "Commands (work and cancels) handed to the MQTT client.",
            self.commands_published,
        );
        counter(
            &mut out,
            "pollen_proxy_replies_received_total",
            "Messages received on device reply topics, well-formed or not.",
            self.replies_received,
        );
        by_label(
            &mut out,
            "counter",
            "pollen_proxy_replies_dropped_total",
            "Device replies dropped, by reason.",
            "reason",
            [
                ("duplicate", self.replies_duplicate),
                ("late", self.replies_late),
                ("unknown", self.replies_unknown),
                ("malformed", self.replies_malformed),
                ("inbox_full", self.replies_dropped),
            ],
        );
        counter(
            &mut out,
            "pollen_proxy_status_malformed_total",
            "Device status messages that did not decode or named another device.",
            self.status_malformed,
        );
        counter(
            &mut out,
            "pollen_proxy_timeouts_total",
            "Requests failed with TIMEOUT: the device missed the deadline.",
            self.timeouts,
        );
        counter(
            &mut out,
            "pollen_proxy_cancels_total",
            "Requests the coordinator cancelled while open.",
            self.cancels,
        );
        counter(
            &mut out,
            "pollen_proxy_mqtt_reconnects_total",
            "MQTT reconnections after the first connection.",
            self.reconnects,
        );
        gauge(
            &mut out,
            "pollen_proxy_bridges",
            "Devices bridged to the coordinator now (one Fleet stream each).",
            self.bridges_open,
        );
        let online = devices.iter().filter(|d| d.online).count();
        by_label(
            &mut out,
            "gauge",
            "pollen_proxy_devices",
            "Devices of the fleet known from their status messages, by state.",
            "state",
            [("online", online), ("offline", devices.len() - online)],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_counter_and_the_device_states() {
        let stats = ProxyStatsSnapshot {
            replies_late: 2,
            bridges_open: 3,
            ..Default::default()
        };
        let device = |id: &str, online| crate::DeviceRecord {
            device_id: id.into(),
            online,
            ..Default::default()
        };
        let text = stats.render_prometheus(&[device("a", true), device("b", false)]);
        for line in [
            "pollen_proxy_replies_dropped_total{reason=\"late\"} 2",
            "pollen_proxy_bridges 3",
            "pollen_proxy_devices{state=\"online\"} 1",
            "pollen_proxy_devices{state=\"offline\"} 1",
            "pollen_proxy_timeouts_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
