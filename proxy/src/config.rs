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

impl ProxyConfig {
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
