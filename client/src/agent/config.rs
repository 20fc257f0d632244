//! The `pollen-agent` config file (TOML, MQTT mode) and its environment overrides.
//!
//! Every field has a default, so an empty file is valid except for `device_id`, which each
//! device must set (in the file, in `POLLEN_DEVICE_ID` or with `--device-id`). Errors name the
//! file (or variable) and the field at fault.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use pollen_proto::mqtt::{BrokerConfig, mqtt_options};
use pollen_proto::topics;
use serde::{Deserialize, Deserializer, Serialize};

use super::AgentOptions;
use crate::model::ModelKind;

pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_BROKER_URL: &str = "mqtt://127.0.0.1:1883";

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This device's id; required.
    pub device_id: String,
    pub fleet: String,
    #[serde(deserialize_with = "broker_with_defaults")]
    pub broker: BrokerConfig,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Outbox and handled request ids (relative paths are relative to the working directory).
    pub work_dir: PathBuf,
    pub model: ModelKind,
    /// Seed of the IID split; the same across the fleet so that shards are disjoint.
    pub seed: u64,
    pub data: DataConfig,
}

/// The device's local data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Folder with the MNIST IDX files.
    pub dir: PathBuf,
    /// This device's IID share of the training set.
    pub shard: Shard,
    /// How many examples of the test split local evaluation uses (the first ones).
    pub test_examples: usize,
}

/// An IID share of a data set: the `index`-th of `count` equal parts, written `INDEX/COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;

    /// Errors read well after the name of what was parsed: `--shard 5/3: INDEX must be below
    /// COUNT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (index, count) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} must look like INDEX/COUNT, e.g. 3/10"))?;
        let index: usize = index
            .trim()
            .parse()
            .map_err(|e| format!("{s}: index {index:?}: {e}"))?;
        let count: usize = count
            .trim()
            .parse()
            .map_err(|e| format!("{s}: count {count:?}: {e}"))?;
        if count == 0 || index >= count {
            return Err(format!("{s}: INDEX must be below COUNT"));
        }
        Ok(Shard { index, count })
    }
}

impl TryFrom<String> for Shard {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Shard> for String {
    fn from(s: Shard) -> String {
        s.to_string()
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            device_id: String::new(),
            fleet: "default".into(),
            broker: BrokerConfig::new(DEFAULT_BROKER_URL),
            heartbeat: DEFAULT_HEARTBEAT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            work_dir: "pollen-agent".into(),
            model: ModelKind::Mnist2nn,
            seed: 42,
            data: DataConfig::default(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: "data/mnist".into(),
            shard: Shard { index: 0, count: 1 },
            test_examples: 1000,
        }
    }
}

/// `[broker]` with every field defaulted (the shared [`BrokerConfig`] requires `url`).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct BrokerSection {
    url: String,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            url: DEFAULT_BROKER_URL.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

fn broker_with_defaults<'de, D: Deserializer<'de>>(d: D) -> Result<BrokerConfig, D::Error> {
    let s = BrokerSection::deserialize(d)?;
    Ok(BrokerConfig {
        url: s.url,
        ca_file: s.ca_file,
        cert_file: s.cert_file,
        key_file: s.key_file,
    })
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the agent config {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("{origin}: {field}: {reason}")]
    Invalid {
        origin: String,
        field: &'static str,
        reason: String,
    },
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
}

/// The commented default configuration; [`AgentConfig::default_toml`] returns it.
const DEFAULT_TOML: &str = r#"# pollen-agent configuration (MQTT mode). Every field is optional; the values shown are the
# defaults. Environment variables override the file: POLLEN_DEVICE_ID, POLLEN_FLEET,
# POLLEN_BROKER (the broker url), POLLEN_WORK_DIR, POLLEN_DATA_DIR, POLLEN_SHARD, POLLEN_MODEL.
# Relative paths are relative to the directory the agent is started in.

# This device's id: letters, digits, '_', '.' and '-'. Required: set it here, in
# POLLEN_DEVICE_ID, or with --device-id.
device_id = ""
# The fleet this device belongs to. The agent listens on pollen/<fleet>/<device_id>/cmd,
# answers on .../reply and keeps a retained status on .../status.
fleet = "default"
# How often the retained online status is republished.
heartbeat = "10s"
# MQTT keep-alive, whole seconds between 1s and 65535s. The broker declares the device offline
# (and publishes its last-will) after 1.5 times this without traffic.
keep_alive = "30s"
# Finished replies waiting for delivery and the ids of handled commands, kept across restarts.
work_dir = "pollen-agent"
# The model this device trains: mnist-2nn or mnist-cnn.
model = "mnist-2nn"
# Seed of the IID split; use the same one across the fleet so that shards are disjoint.
seed = 42

[broker]
# mqtt://host:port or mqtts://host:port; user:password@ may be given in the URL.
url = "mqtt://127.0.0.1:1883"
# mqtts only: the PEM CA that signed the broker's certificate, and the device's own client
# certificate and key (brokers such as AWS IoT Core authenticate devices by certificate).
# ca_file = "ca.pem"
# cert_file = "device.pem.crt"
# key_file = "device.pem.key"

[data]
# Folder with the MNIST IDX files.
dir = "data/mnist"
# This device's IID share of the training set, INDEX/COUNT (e.g. 3/10).
shard = "0/1"
# How many examples of the test split local evaluation uses.
test_examples = 1000
"#;

impl AgentConfig {
    /// The default configuration as commented TOML.
    pub fn default_toml() -> &'static str {
        DEFAULT_TOML
    }

    /// Parses a configuration; `origin` (a file name) prefixes errors. Does not validate.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_string(),
            source: Box::new(source),
        })
    }

    /// Reads and parses `path`. Does not validate (apply overrides first, then
    /// [`AgentConfig::validate`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Applies the `POLLEN_*` overrides that `var` (usually `std::env::var(..).ok()`) returns.
    /// Empty values count as unset.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        if let Some(v) = get("POLLEN_DEVICE_ID") {
            self.device_id = v;
        }
        if let Some(v) = get("POLLEN_FLEET") {
            self.fleet = v;
        }
        if let Some(v) = get("POLLEN_BROKER") {
            self.broker.url = v;
        }
        if let Some(v) = get("POLLEN_WORK_DIR") {
            self.work_dir = v.into();
        }
        if let Some(v) = get("POLLEN_DATA_DIR") {
            self.data.dir = v.into();
        }
        if let Some(v) = get("POLLEN_SHARD") {
            self.data.shard = v.parse().map_err(|reason| ConfigError::Env {
                var: "POLLEN_SHARD",
                value: v.clone(),
                reason,
            })?;
        }
        if let Some(v) = get("POLLEN_MODEL") {
            self.model = v.parse().map_err(|reason| ConfigError::Env {
                var: "POLLEN_MODEL",
                value: v.clone(),
                reason,
            })?;
        }
        Ok(())
    }

    /// Checks every field; `origin` (the file the config came from) prefixes errors.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            origin: origin.to_string(),
            field,
            reason,
        };
        if self.device_id.is_empty() {
            return Err(invalid(
                "device_id",
                "is not set; set it in the file, in POLLEN_DEVICE_ID or with --device-id".into(),
            ));
        }
        for (field, value) in [("device_id", &self.device_id), ("fleet", &self.fleet)] {
            topics::validate_id(field, value).map_err(|e| invalid(field, e.to_string()))?;
            if value.chars().count() > super::MAX_ID_CHARS {
                return Err(invalid(
                    field,
                    format!("is longer than {} characters", super::MAX_ID_CHARS),
                ));
            }
        }
        mqtt_options(&self.broker, "pollen-agent-config-check")
            .map_err(|e| invalid("broker", e.to_string()))?;
        if self.heartbeat.is_zero() {
            return Err(invalid("heartbeat", "must be longer than zero".into()));
        }
        if self.keep_alive < Duration::from_secs(1)
            || self.keep_alive > Duration::from_secs(u64::from(u16::MAX))
        {
            return Err(invalid(
                "keep_alive",
                format!(
                    "{} is outside 1s..65535s",
                    humantime_serde::re::humantime::format_duration(self.keep_alive)
                ),
            ));
        }
        if self.work_dir.as_os_str().is_empty() {
            return Err(invalid("work_dir", "is empty".into()));
        }
        if self.data.test_examples == 0 {
            return Err(invalid("data.test_examples", "must be at least 1".into()));
        }
        Ok(())
    }

    /// Agent options for this configuration (no compute-slot limit, no extra properties).
    pub fn agent_options(&self) -> AgentOptions {
        AgentOptions {
            heartbeat: self.heartbeat,
            keep_alive: self.keep_alive,
            work_dir: Some(self.work_dir.clone()),
            model: self.model.name().to_string(),
            ..AgentOptions::new(&self.device_id, &self.fleet, self.broker.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_default_toml_is_the_default_config() {
        let parsed =
            AgentConfig::from_toml(AgentConfig::default_toml(), "default").expect("parses");
        assert_eq!(parsed, AgentConfig::default());
        assert_eq!(
            AgentConfig::from_toml("", "empty").expect("parses"),
            AgentConfig::default()
        );
    }

    #[test]
    fn a_file_sets_fields_and_keeps_defaults_for_the_rest() {
        let cfg = AgentConfig::from_toml(
            r#"
            device_id = "gw-7"
            heartbeat = "2s"
            model = "mnist-cnn"
            [broker]
            ca_file = "ca.pem"
            [data]
            shard = "3/10"
            "#,
            "agent.toml",
        )
        .expect("parses");
        assert_eq!(cfg.device_id, "gw-7");
        assert_eq!(cfg.heartbeat, Duration::from_secs(2));
        assert_eq!(cfg.keep_alive, DEFAULT_KEEP_ALIVE);
        assert_eq!(cfg.model, ModelKind::MnistCnn);
        assert_eq!(cfg.broker.url, DEFAULT_BROKER_URL);
        assert_eq!(cfg.broker.ca_file, Some(PathBuf::from("ca.pem")));
        assert_eq!(
            cfg.data.shard,
            Shard {
                index: 3,
                count: 10
            }
        );
        assert_eq!(cfg.data.test_examples, 1000);
        // A CA file without mqtts:// is a mistake the validation names.
        let e = cfg
            .validate("agent.toml")
            .expect_err("ca without tls")
            .to_string();
        assert!(
            e.starts_with("agent.toml: broker: ") && e.contains("not mqtts"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named_with_the_file() {
        let e = AgentConfig::from_toml("devce_id = \"x\"", "agent.toml")
            .expect_err("typo")
            .to_string();
        assert!(
            e.starts_with("agent.toml: ") && e.contains("devce_id"),
            "{e}"
        );
        let e = AgentConfig::from_toml("[data]\nshard = \"5/3\"", "agent.toml")
            .expect_err("shard")
            .to_string();
        assert!(e.contains("5/3: INDEX must be below COUNT"), "{e}");
        let e = AgentConfig::from_toml("keep_alive = 30", "agent.toml")
            .expect_err("bare integer")
            .to_string();
        assert!(e.contains("keep_alive"), "{e}");
    }

    #[test]
    fn validation_names_the_field_at_fault() {
        let mut cfg = AgentConfig::default();
        let e = cfg.validate("a.toml").expect_err("no id").to_string();
        assert!(e.starts_with("a.toml: device_id: is not set"), "{e}");
        cfg.device_id = "gw/1".into();
        let e = cfg.validate("a.toml").expect_err("slash").to_string();
        assert!(e.contains("device_id") && e.contains("'/'"), "{e}");
        cfg.device_id = "gw-1".into();
        cfg.validate("a.toml").expect("valid");
        cfg.keep_alive = Duration::from_millis(500);
        let e = cfg.validate("a.toml").expect_err("keep-alive").to_string();
        assert!(e.contains("keep_alive: 500ms is outside"), "{e}");
        cfg.keep_alive = DEFAULT_KEEP_ALIVE;
        cfg.broker.url = "http://x".into();
        let e = cfg.validate("a.toml").expect_err("scheme").to_string();
        assert!(e.contains("broker") && e.contains("mqtt://"), "{e}");
    }

    #[test]
    fn environment_overrides_win_over_the_file() {
        let mut cfg = AgentConfig::from_toml("device_id = \"file\"", "a.toml").expect("parses");
        cfg.apply_env(env(&[
            ("POLLEN_DEVICE_ID", "env-dev"),
            ("POLLEN_FLEET", "f2"),
            ("POLLEN_BROKER", "mqtt://broker.example:1884"),
            ("POLLEN_WORK_DIR", "/var/lib/pollen"),
            ("POLLEN_DATA_DIR", "/data"),
            ("POLLEN_SHARD", "1/4"),
            ("POLLEN_MODEL", "mnist-cnn"),
            ("POLLEN_OTHER", "ignored"),
        ]))
        .expect("applies");
        assert_eq!(cfg.device_id, "env-dev");
        assert_eq!(cfg.fleet, "f2");
        assert_eq!(cfg.broker.url, "mqtt://broker.example:1884");
        assert_eq!(cfg.work_dir, PathBuf::from("/var/lib/pollen"));
        assert_eq!(cfg.data.dir, PathBuf::from("/data"));
        assert_eq!(cfg.data.shard, Shard { index: 1, count: 4 });
        assert_eq!(cfg.model, ModelKind::MnistCnn);
        // Empty values are unset.
        cfg.apply_env(env(&[("POLLEN_FLEET", "")]))
            .expect("applies");
        assert_eq!(cfg.fleet, "f2");
        let e = cfg
            .apply_env(env(&[("POLLEN_SHARD", "x")]))
            .expect_err("bad shard")
            .to_string();
        assert!(
            e.starts_with("environment variable POLLEN_SHARD=\"x\""),
            "{e}"
        );
        let e = cfg
            .apply_env(env(&[("POLLEN_MODEL", "gpt")]))
            .expect_err("bad model")
            .to_string();
        assert!(
            e.contains("POLLEN_MODEL") && e.contains("known models"),
            "{e}"
        );
    }

    #[test]
    fn shards_parse_and_print_as_index_over_count() {
        assert_eq!("2/5".parse::<Shard>(), Ok(Shard { index: 2, count: 5 }));
        assert_eq!(Shard { index: 2, count: 5 }.to_string(), "2/5");
        assert!("5/5".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
        assert!("three".parse::<Shard>().is_err());
    }

    #[test]
    fn agent_options_carry_the_config() {
        let mut cfg = AgentConfig {
            device_id: "gw-1".into(),
            ..AgentConfig::default()
        };
        cfg.keep_alive = Duration::from_secs(5);
        let o = cfg.agent_options();
        assert_eq!(o.device_id, "gw-1");
        assert_eq!(o.keep_alive, Duration::from_secs(5));
        assert_eq!(o.model, "mnist-2nn");
        assert_eq!(o.work_dir, Some(PathBuf::from("pollen-agent")));
        assert_eq!(o.mqtt_client_id(), "pollen-agent-default-gw-1");
    }
}
