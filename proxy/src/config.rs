//! What a proxy process needs to know: its fleet, the coordinator, the broker, which devices to
//! bridge, and its timing.

use std::time::Duration;

use pollen_proto::grpc_tls::ClientTls;
use pollen_proto::mqtt::BrokerConfig;
use serde::{Deserialize, Serialize};

use crate::ProxyError;
use crate::devices::{DEFAULT_STALE_AFTER, Selection};

/// MQTT keep-alive of the proxy's connection unless configured.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Announcement interval of an auto-sharded proxy unless configured: a proxy whose host
/// vanishes without a last-will loses its devices to the others within three of these.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Configuration of one proxy process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The fleet whose devices this proxy bridges (`pollen/<fleet>/...`).
    pub fleet: String,
    /// Distinguishes proxies of one fleet; part of the MQTT client id, so two proxies with the
    /// same id would take each other's session over.
    #[serde(default = "default_proxy_id")]
    pub proxy_id: String,
    /// gRPC endpoint of the coordinator, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// TLS to an `https://` coordinator: its CA and this proxy's certificate
    /// (`pollen-proxy.<id>`, which may join for any device it bridges).
    #[serde(default, skip_serializing_if = "ClientTls::is_empty")]
    pub coordinator_tls: ClientTls,
    pub broker: BrokerConfig,
    #[serde(default)]
    pub selection: Selection,
    /// A device not heard from for this long counts as offline.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// MQTT keep-alive: zero (off) or whole seconds from 1 s to 65535 s.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Keep the MQTT session (subscriptions, queued replies) across reconnects and restarts.
    /// One-off proxies (`pollen run`, simulations) turn it off, so that they leave no session
    /// behind on the broker queueing messages for nobody.
    #[serde(default = "default_true")]
    pub persistent_session: bool,
    /// Share the fleet with the other live proxies that set it: they announce themselves on
    /// the broker and split the devices by rendezvous hashing over their ids, taking over a
    /// dead proxy's devices (`--shard auto`; see `membership`). Excludes `selection.shard`.
    #[serde(default)]
    pub auto_shard: bool,
    /// How often an auto-sharded proxy repeats its announcement; the others count it as gone
    /// after three missed.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
}

fn default_true() -> bool {
    true
}

fn default_proxy_id() -> String {
    "proxy-0".into()
}

fn default_stale_after() -> Duration {
    DEFAULT_STALE_AFTER
}

fn default_keep_alive() -> Duration {
    DEFAULT_KEEP_ALIVE
}

fn default_heartbeat() -> Duration {
    DEFAULT_HEARTBEAT
}

/// The commented default configuration; [`ProxyConfig::default_toml`] returns it.
const DEFAULT_TOML: &str = r#"# pollen proxy configuration (`pollen proxy --config proxy.toml`). The values shown are the
# defaults; flags given on the command line override the file. Durations are humantime
# ("500ms", "30s", "2m"). Relative paths are relative to the directory the proxy starts in.

# The fleet whose devices this proxy bridges: it reads pollen/<fleet>/+/status and +/reply and
# writes pollen/<fleet>/<device>/cmd.
fleet = "default"
# Names this proxy among the fleet's proxies: part of its MQTT client id
# (pollen-proxy-<fleet>-<proxy_id>) and, under auto_shard, of its announcement. Give each proxy
# of a fleet its own.
proxy_id = "proxy-0"
# The coordinator's Fleet gRPC endpoint (https:// with [coordinator_tls]).
coordinator = "http://127.0.0.1:50051"
# A device not heard from for this long counts as offline and its bridge leaves.
stale_after = "30s"
# MQTT keep-alive, 0 (off) or whole seconds from 1s to 65535s. The broker publishes the proxy's
# last-will 1.5 times this after its host goes silent.
keep_alive = "30s"
# Keep the MQTT session (subscriptions, replies queued while away) across restarts.
persistent_session = true
# Share the fleet with every other live proxy that sets it: the proxies announce themselves on
# pollen/<fleet>/pollen-proxy.<proxy_id>/proxy (retained, last-will offline) and split the
# devices by rendezvous hashing over their ids; a dead proxy's devices move to the others about
# a second after its connection drops, and at most 3 heartbeats (+1s) after it falls silent.
auto_shard = false
# How often an auto-sharded proxy repeats its announcement.
heartbeat = "5s"

[broker]
# mqtt://host:port or mqtts://host:port; user:password@ may be given in the URL.
url = "mqtt://127.0.0.1:1883"
# mqtts: the PEM CA of the broker's certificate, and the proxy's client certificate and key
# (`pollen fleet provision` writes proxies/<proxy_id>.pem and .key).
# ca_file = "ca.pem"
# cert_file = "proxies/proxy-0.pem"
# key_file = "proxies/proxy-0.key"

# [coordinator_tls]
# For an https:// coordinator: the CA of its certificate and this proxy's client certificate.
# ca_file = "ca.pem"
# cert_file = "proxies/proxy-0.pem"
# key_file = "proxies/proxy-0.key"

[selection]
# Which online devices get a bridge. Only these ids, when given:
# devices = ["gw-0001", "gw-0002"]
# Skip devices announcing fewer local examples.
min_examples = 0
# At most this many bridges:
# max_devices = 1000
# A static share of the fleet, "INDEX/COUNT" (run COUNT proxies, indexes 0..COUNT); excludes
# auto_shard:
# shard = "0/3"
"#;

impl ProxyConfig {
    /// The commented default configuration (`pollen proxy --print-default-config`).
    pub fn default_toml() -> &'static str {
        DEFAULT_TOML
    }

    /// Reads and parses a configuration file; does not validate (apply overrides first).
    pub fn load(path: &std::path::Path) -> Result<Self, ProxyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProxyError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ProxyError::Config(format!("{}: {e}", path.display())))
    }

    /// A config with defaults for everything but the fleet, the coordinator and the broker.
    pub fn new(
        fleet: impl Into<String>,
        coordinator: impl Into<String>,
        broker: BrokerConfig,
    ) -> Self {
        Self {
            fleet: fleet.into(),
            proxy_id: default_proxy_id(),
            coordinator: coordinator.into(),
            coordinator_tls: ClientTls::default(),
            broker,
            selection: Selection::default(),
            stale_after: DEFAULT_STALE_AFTER,
            keep_alive: DEFAULT_KEEP_ALIVE,
            persistent_session: true,
            auto_shard: false,
            heartbeat: DEFAULT_HEARTBEAT,
        }
    }

    /// The MQTT client id of this proxy: stable across restarts, so its persistent session
    /// (subscriptions and replies queued while it was away) is resumed.
    pub fn client_id(&self) -> String {
        format!("pollen-proxy-{}-{}", self.fleet, self.proxy_id)
    }

    /// Checks everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ProxyError> {
        pollen_proto::topics::validate_id("fleet", &self.fleet)?;
        pollen_proto::topics::validate_id("proxy_id", &self.proxy_id)?;
        if self.keep_alive != Duration::ZERO
            && (self.keep_alive < Duration::from_secs(1)
                || self.keep_alive > Duration::from_secs(u64::from(u16::MAX)))
        {
            return Err(ProxyError::Config(format!(
                "keep_alive {:?} is out of range; use 0 (off) or 1 s to 65535 s",
                self.keep_alive
            )));
        }
        if self.stale_after.is_zero() {
            return Err(ProxyError::Config(
                "stale_after is 0; use a few heartbeat intervals, e.g. 30s".into(),
            ));
        }
        if self.selection.max_devices == Some(0) {
            return Err(ProxyError::Config(
                "selection.max_devices is 0; leave it unset for no limit".into(),
            ));
        }
        if let Some(shard) = &self.selection.shard
            && shard.index >= shard.count
        {
            return Err(ProxyError::Config(format!(
                "selection.shard {shard}: the index must be below the count"
            )));
        }
        if self.auto_shard && self.selection.shard.is_some() {
            return Err(ProxyError::Config(
                "auto_shard and selection.shard both set; shard automatically or statically, not both".into(),
            ));
        }
        if self.heartbeat < Duration::from_millis(100) {
            return Err(ProxyError::Config(format!(
                "heartbeat {:?} is too short; use 100ms or more, e.g. 5s",
                self.heartbeat
            )));
        }
        pollen_proto::mqtt::parse_url(&self.broker.url)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ProxyConfig {
        ProxyConfig::new(
            "fleet-a",
            "http://127.0.0.1:50051",
            BrokerConfig::new("mqtt://127.0.0.1:1883"),
        )
    }

    #[test]
    fn defaults_validate_and_name_the_client() {
        let c = config();
        c.validate().expect("valid");
        assert_eq!(c.client_id(), "pollen-proxy-fleet-a-proxy-0");
        assert_eq!(c.stale_after, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let mut c = config();
        c.fleet = "a/b".into();
        assert!(c.validate().unwrap_err().to_string().contains("fleet"));
        let mut c = config();
        c.keep_alive = Duration::from_millis(500);
        assert!(c.validate().unwrap_err().to_string().contains("keep_alive"));
        let mut c = config();
        c.broker.url = "http://x".into();
        assert!(c.validate().unwrap_err().to_string().contains("scheme"));
        let mut c = config();
        c.auto_shard = true;
        c.selection.shard = Some("0/2".parse().expect("shard"));
        assert!(c.validate().unwrap_err().to_string().contains("auto_shard"));
    }

    #[test]
    fn the_printed_default_config_is_the_default() {
        let printed: ProxyConfig = toml::from_str(ProxyConfig::default_toml()).expect("parses");
        printed.validate().expect("valid");
        assert_eq!(
            printed,
            ProxyConfig::new(
                "default",
                "http://127.0.0.1:50051",
                BrokerConfig::new("mqtt://127.0.0.1:1883")
            )
        );
    }

    #[test]
    fn a_misspelt_field_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, "fleet = \"f\"\ncoordinator = \"http://c:1\"\nhaertbeat = \"1s\"\n[broker]\nurl = \"mqtt://b\"\n").expect("write");
        let e = ProxyConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("haertbeat") && e.contains("proxy.toml"), "{e}");
    }

    #[test]
    fn a_toml_like_config_fills_defaults() {
        let c: ProxyConfig = serde_json::from_value(serde_json::json!({
            "fleet": "f",
            "coordinator": "http://c:1",
            "broker": {"url": "mqtt://b"},
            "stale_after": "45s",
            "selection": {"min_examples": 10}
        }))
        .expect("parses");
        assert_eq!(c.proxy_id, "proxy-0");
        assert_eq!(c.stale_after, Duration::from_secs(45));
        assert_eq!(c.keep_alive, DEFAULT_KEEP_ALIVE);
        assert_eq!(c.selection.min_examples, 10);
    }
}
