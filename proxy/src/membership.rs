//! Automatic sharding (`--shard auto`): the live proxies of a fleet split its devices among
//! themselves by rendezvous hashing over their ids, with no coordinator of their own.
//!
//! Each proxy announces itself with a retained [`ProxyStatus`] on
//! `pollen/<fleet>/pollen-proxy.<id>/proxy`, repeats it every heartbeat, and leaves an
//! offline status as its MQTT last-will. Every proxy reads every announcement, so all of them
//! compute the same live set and the same owner for each device. When a proxy dies the broker
//! publishes its will (at once when its connection drops; after 1.5 keep-alives when its host
//! vanishes), and a proxy that misses three heartbeats counts as gone even if no will arrives;
//! its devices then hash to the survivors. Adding or removing a proxy moves only that proxy's
//! devices.
//!
//! A proxy bridges nothing until it has settled after (re)connecting: until its own
//! announcement has come back to it through its subscription (the broker delivers it after the
//! retained announcements of the proxies already there, however many retained device statuses
//! arrive first on a large fleet), and then for another settle period, in which proxies that
//! started at about the same time are heard. A proxy that loses the broker gives its devices up
//! at once (the broker hands them to the others with its last-will), and so does one whose
//! own heartbeats stop coming back (a half-open connection). This module is the pure bookkeeping; the proxy
//! (`proxy.rs`, `mqtt.rs`) feeds it messages and acts on what changed.

use std::collections::BTreeMap;
use std::time::Duration;

use pollen_proto::device::ProxyStatus;

/// How long a proxy listens, after its own announcement came back, before it claims devices.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Settled anyway this long after connecting, should the broker never echo the announcement.
pub const SETTLE_AT_MOST: Duration = Duration::from_secs(30);
/// Heartbeats a proxy may miss before the others count it as gone.
pub const MISSED_HEARTBEATS: u64 = 3;

#[derive(Debug, Clone)]
struct Peer {
    heartbeat_ms: u64,
    last_seen_unix_ms: u64,
}

/// The live proxies of a fleet as this proxy sees them, and which devices are its own.
#[derive(Debug)]
pub struct Membership {
    me: String,
    heartbeat_ms: u64,
    peers: BTreeMap<String, Peer>,
    /// When this proxy last connected to the broker, while connected.
    connected_since: Option<u64>,
    /// When its own announcement first came back since it connected.
    echoed_at: Option<u64>,
    /// When one of its announcements last came back: the broker still hears it.
    last_echo: Option<u64>,
}

impl Membership {
    pub fn new(me: impl Into<String>, heartbeat: Duration) -> Self {
        Self {
            me: me.into(),
            heartbeat_ms: millis(heartbeat).max(1),
            peers: BTreeMap::new(),
            connected_since: None,
            echoed_at: None,
            last_echo: None,
        }
    }

    /// This proxy's own announcement.
    pub fn status(&self, online: bool, bridges: u64, now_unix_ms: u64) -> ProxyStatus {
        ProxyStatus {
            proxy_id: self.me.clone(),
            online,
            heartbeat_ms: self.heartbeat_ms,
            timestamp_unix_ms: now_unix_ms,
            bridges,
        }
    }

    pub fn connected(&mut self, now_unix_ms: u64) {
        self.connected_since = Some(now_unix_ms);
        self.echoed_at = None;
        self.last_echo = None;
    }

    pub fn disconnected(&mut self, _now_unix_ms: u64) {
        self.connected_since = None;
    }

    /// Applies a proxy's status (`None`: its retained status was cleared). Our own
    /// announcement coming back marks the start of the settle period.
    pub fn update(&mut self, proxy_id: &str, status: Option<&ProxyStatus>, now_unix_ms: u64) {
        if proxy_id == self.me {
            // Only this connection's announcement: a retained one of an earlier life of this
            // proxy is older than the connection.
            if let Some(since) = self.connected_since
                && status.is_some_and(|s| s.online && s.timestamp_unix_ms >= since)
            {
                self.echoed_at.get_or_insert(now_unix_ms);
                self.last_echo = Some(now_unix_ms);
            }
            return;
        }
        match status {
            Some(s) if s.online => {
                self.peers.insert(
                    proxy_id.to_string(),
                    Peer {
                        heartbeat_ms: s.heartbeat_ms.max(1),
                        last_seen_unix_ms: now_unix_ms,
                    },
                );
            }
            _ => {
                self.peers.remove(proxy_id);
            }
        }
    }

    /// Whether this proxy may bridge at all: connected, settled since it connected, and still
    /// heard by the broker (its heartbeats come back). A proxy that lost the broker is not:
    /// the broker has published its last-will (or will, once it notices), so the others are
    /// taking its devices, and it could no longer tell them apart from a silent fleet. On a
    /// half-open connection its heartbeats stop coming back, which tells it the same within
    /// three heartbeats.
    pub fn active_at(&self, now_unix_ms: u64) -> bool {
        let Some(since) = self.connected_since else {
            return false;
        };
        match (self.echoed_at, self.last_echo) {
            (Some(first), Some(last)) => {
                now_unix_ms.saturating_sub(first) >= millis(SETTLE)
                    && now_unix_ms.saturating_sub(last) < self.window(self.heartbeat_ms)
            }
            // A broker that never echoes: settled on time alone.
            _ => now_unix_ms.saturating_sub(since) >= millis(SETTLE_AT_MOST),
        }
    }

    /// The live proxies, this one included when active, sorted by id.
    pub fn live_at(&self, now_unix_ms: u64) -> Vec<&str> {
        let mut live: Vec<&str> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                now_unix_ms.saturating_sub(p.last_seen_unix_ms) < self.window(p.heartbeat_ms)
            })
            .map(|(id, _)| id.as_str())
            .collect();
        if self.active_at(now_unix_ms) {
            live.push(&self.me);
            live.sort_unstable();
        }
        live
    }

    /// The live proxy that owns `device_id`, if any is live.
    pub fn owner_at(&self, device_id: &str, now_unix_ms: u64) -> Option<String> {
        owner(device_id, &self.live_at(now_unix_ms)).map(str::to_string)
    }

    /// Whether this proxy bridges `device_id` now.
    pub fn owns_at(&self, device_id: &str, now_unix_ms: u64) -> bool {
        self.active_at(now_unix_ms)
            && owner(device_id, &self.live_at(now_unix_ms)) == Some(self.me.as_str())
    }

    fn window(&self, heartbeat_ms: u64) -> u64 {
        heartbeat_ms.saturating_mul(MISSED_HEARTBEATS)
    }
}

/// The proxy among `live` that owns `device_id`: the highest rendezvous weight (ties, which
/// need equal 64-bit hashes, by id).
pub fn owner<'a>(device_id: &str, live: &[&'a str]) -> Option<&'a str> {
    live.iter()
        .copied()
        .max_by_key(|proxy| (crate::shard::weight(device_id, proxy.as_bytes()), *proxy))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEARTBEAT: Duration = Duration::from_secs(5);

    fn online(id: &str) -> ProxyStatus {
        online_at(id, 0)
    }

    fn online_at(id: &str, timestamp_unix_ms: u64) -> ProxyStatus {
        ProxyStatus {
            proxy_id: id.into(),
            online: true,
            heartbeat_ms: 5_000,
            timestamp_unix_ms,
            ..ProxyStatus::default()
        }
    }

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("gw-{i:04}")).collect()
    }

    /// Three proxies that have heard each other, as of t = 10 s.
    fn trio() -> Vec<Membership> {
        ["p0", "p1", "p2"]
            .iter()
            .map(|me| {
                let mut m = Membership::new(*me, HEARTBEAT);
                m.connected(0);
                m.update(me, Some(&online(me)), 0);
                for other in ["p0", "p1", "p2"] {
                    m.update(other, Some(&online(other)), 10_000);
                }
                m
            })
            .collect()
    }

    #[test]
    fn proxies_that_agree_on_the_live_set_bridge_every_device_exactly_once() {
        let trio = trio();
        let mut sizes = [0usize; 3];
        for d in devices(3000) {
            let owners: Vec<usize> = (0..3).filter(|&i| trio[i].owns_at(&d, 10_000)).collect();
            assert_eq!(owners.len(), 1, "{d}: {owners:?}");
            sizes[owners[0]] += 1;
        }
        // 1000 each in expectation; the binomial sd is ~26.
        assert!(
            sizes.iter().all(|&s| (880..=1120).contains(&s)),
            "{sizes:?}"
        );
    }

    #[test]
    fn a_dead_proxys_devices_go_to_the_survivors_and_no_others_move() {
        let mut trio = trio();
        let before: Vec<Option<String>> = devices(2000)
            .iter()
            .map(|d| trio[0].owner_at(d, 10_000))
            .collect();
        // p1's last-will reaches the others.
        let will = ProxyStatus {
            online: false,
            ..online("p1")
        };
        for m in [0, 2] {
            trio[m].update("p1", Some(&will), 11_000);
        }
        for (d, was) in devices(2000).iter().zip(before) {
            let owners: Vec<&str> = [0, 2]
                .into_iter()
                .filter(|&i| trio[i].owns_at(d, 11_000))
                .map(|i| ["p0", "p1", "p2"][i])
                .collect();
            assert_eq!(owners.len(), 1, "{d}: {owners:?}");
            if was.as_deref() != Some("p1") {
                assert_eq!(Some(owners[0]), was.as_deref(), "{d} moved needlessly");
            }
        }
    }

    #[test]
    fn a_silent_proxy_counts_as_gone_after_three_missed_heartbeats() {
        let mut m = Membership::new("p0", HEARTBEAT);
        m.connected(0);
        m.update("p0", Some(&online("p0")), 0);
        m.update("p1", Some(&online("p1")), 10_000);
        // Its own heartbeats keep coming back; p1's stop.
        m.update("p0", Some(&online_at("p0", 20_000)), 20_000);
        assert_eq!(m.live_at(24_999), ["p0", "p1"]);
        assert_eq!(m.live_at(25_000), ["p0"]);
        // A heartbeat brings it back.
        m.update("p1", Some(&online("p1")), 26_000);
        assert_eq!(m.live_at(26_000), ["p0", "p1"]);
        // So does a cleared retained status remove it.
        m.update("p1", None, 27_000);
        assert_eq!(m.live_at(27_000), ["p0"]);
    }

    #[test]
    fn a_proxy_claims_nothing_until_settled_and_gives_up_when_cut_off() {
        let mut m = Membership::new("p0", HEARTBEAT);
        assert!(!m.owns_at("gw-1", 0), "not yet connected");
        m.connected(1_000);
        // A retained announcement of its previous life is not this connection's.
        m.update("p0", Some(&online_at("p0", 500)), 1_100);
        assert!(
            !m.owns_at("gw-1", 10_000),
            "its announcement has not come back"
        );
        // It comes back behind a flood of retained device statuses, then the settle period.
        m.update("p0", Some(&online_at("p0", 1_000)), 10_000);
        assert!(!m.owns_at("gw-1", 11_999), "still settling");
        assert!(m.owns_at("gw-1", 12_000), "alone, it owns everything");
        // Its own announcements do not make it a peer of itself.
        assert_eq!(m.live_at(12_000), ["p0"]);
        // Its heartbeats keep it active; when they stop coming back, it is cut off.
        m.update("p0", Some(&online_at("p0", 20_000)), 20_000);
        assert!(m.owns_at("gw-1", 34_999));
        assert!(
            !m.owns_at("gw-1", 35_000),
            "three heartbeats without an echo"
        );
        m.update("p0", Some(&online_at("p0", 35_500)), 35_500);
        assert!(m.owns_at("gw-1", 35_500));
        // Losing the broker gives the devices up at once: the will hands them over.
        m.disconnected(36_000);
        assert!(!m.owns_at("gw-1", 36_000));
        m.connected(40_000);
        m.update("p0", Some(&online_at("p0", 40_000)), 40_100);
        assert!(
            !m.owns_at("gw-1", 41_000),
            "settling again after reconnecting"
        );
        assert!(m.owns_at("gw-1", 42_100));
        // A broker that never echoes: settled at the latest 30 s after connecting.
        let mut silent = Membership::new("p9", HEARTBEAT);
        silent.connected(0);
        assert!(!silent.owns_at("gw-1", 29_999));
        assert!(silent.owns_at("gw-1", 30_000));
    }
}
