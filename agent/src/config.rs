//! The `pollen-agent` config file (TOML, MQTT mode) and its environment overrides.
//!
//! Every field has a default, so an empty file is valid except for `device_id`, which each
//! device must set (in the file, in `POLLEN_DEVICE_ID` or with `--device-id`). Errors name the
//! file (or variable) and the field at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pollen_client::AgentOptions;
use pollen_client::agent::consent::{Attribute, Consent, ConsentError};
use pollen_client::agent::{DEFAULT_HEARTBEAT, DEFAULT_KEEP_ALIVE, MAX_ID_CHARS};
use pollen_proto::mqtt::{BrokerConfig, mqtt_options};
use pollen_proto::topics;
use pollen_train::{Backend, DataSource, Shard};
use serde::{Deserialize, Deserializer, Serialize};

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
    /// Outbox, handled request ids and task manifests (relative paths are relative to the
    /// working directory).
    pub work_dir: PathBuf,
    /// The device's own data; which columns, windows and labels a run uses comes with the
    /// run's task.
    #[serde(deserialize_with = "data_with_defaults")]
    pub data: DataSource,
    /// Which library trains: `auto`, `burn` or `libtorch` (agents built with `--features
    /// torch`).
    pub backend: Backend,
    /// The device owner's policy over the instructions this agent accepts.
    pub consent: ConsentSection,
    pub storage: StorageSection,
}

/// `[storage]`: how the agent reaches the object store behind the presigned URLs it is sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// A PEM CA trusted besides the public roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// `[consent]`: a Cedar policy file, and the attributes it may read as `context.device.*`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsentSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PathBuf>,
    pub attributes: std::collections::BTreeMap<String, Attribute>,
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
            data: DataSource::new("data/mnist"),
            backend: Backend::Auto,
            consent: ConsentSection::default(),
            storage: StorageSection::default(),
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

/// `[data]` with every field defaulted (a run spec's data source requires `path`).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DataSection {
    #[serde(alias = "dir")]
    path: PathBuf,
    format: Option<pollen_train::Format>,
    labels: Option<PathBuf>,
    shard: Option<Shard>,
    seed: u64,
}

impl Default for DataSection {
    fn default() -> Self {
        let d = AgentConfig::default().data;
        Self {
            path: d.path,
            format: d.format,
            labels: d.labels,
            shard: d.shard,
            seed: d.seed,
        }
    }
}

fn data_with_defaults<'de, D: Deserializer<'de>>(d: D) -> Result<DataSource, D::Error> {
    let s = DataSection::deserialize(d)?;
    Ok(DataSource {
        path: s.path,
        format: s.format,
        labels: s.labels,
        shard: s.shard,
        seed: s.seed,
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
# POLLEN_BROKER (the broker url), POLLEN_BROKER_CA, POLLEN_BROKER_CERT, POLLEN_BROKER_KEY (the
# [broker] files), POLLEN_STORAGE_CA, POLLEN_WORK_DIR, POLLEN_DATA (the data path; POLLEN_DATA_DIR is the same),
# POLLEN_SHARD, POLLEN_BACKEND. Relative paths are relative to the directory the agent is
# started in.

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
# Finished replies waiting for delivery, the ids of handled commands and the task manifests
# received, kept across restarts.
work_dir = "pollen-agent"
# Which library trains: "burn" (pure Rust, in every build), "libtorch" (LibTorch through tch,
# in agents built with --features torch), or "auto": LibTorch for TorchScript models and, when
# it is compiled in, for the convolutional families, where its kernels are faster; burn
# otherwise. A TorchScript model needs LibTorch.
backend = "auto"

[broker]
# mqtt://host:port or mqtts://host:port; user:password@ may be given in the URL.
url = "mqtt://127.0.0.1:1883"
# mqtts only: the PEM CA that signed the broker's certificate, and the device's own client
# certificate and key (brokers such as AWS IoT Core authenticate devices by certificate).
# ca_file = "ca.pem"
# cert_file = "device.pem.crt"
# key_file = "device.pem.key"

[storage]
# Weights and task files move over the presigned URLs the proxy sends; the device never holds
# storage credentials. For an object store whose HTTPS certificate a private CA signed (the
# coordinator's embedded S3 server with the fleet's certificates, an on-premises MinIO): that
# CA (PEM), trusted besides the public roots.
# ca_file = "ca.pem"

[data]
# This device's own data: a CSV file with a header (.csv, or gzip-compressed .csv.gz), a .npy
# array of features ([examples, ...]), or a folder of MNIST IDX files. Which columns are
# features, labels, targets, times and series, and how windows are cut, comes with each run's
# task: the same agent serves runs with different models. The agent reads the file at start
# and again when it changes.
path = "data/mnist"
# csv, npy or mnist; guessed from the path when left out.
# format = "csv"
# npy: the labels (or regression targets), one per example.
# labels = "labels.npy"
# Arrays only: use this IID share of the examples, INDEX/COUNT (e.g. 3/10), for demos on one
# shared data set. Give each device a CSV file of its own instead (`pollen data split`).
# shard = "0/4"
# Seed of the share's split; the same across the fleet so that shares are disjoint.
seed = 42

[consent]
# The device owner's say over what this device does: a Cedar policy file. Every instruction
# (fit, evaluate, get_parameters, statistics) from fleet F to this device D is the request
# principal Pollen::Fleet::"F", action Pollen::Action::"fit" (...), resource
# Pollen::Device::"D", with context.run, .round, .task (manifest digest), .hour, .minute,
# .weekday (1 = Monday), .free_disk_bytes, .busy and .device (the attributes below). What no
# policy permits is declined: the proxy and coordinator record it as `declined`, not as an
# error. No policy: every instruction is accepted. Example (deploy/consent/afternoons.cedar):
#   permit(principal, action, resource) when { context.hour >= 14 && context.hour < 17 };
# policy = "consent.cedar"

[consent.attributes]
# Facts about this device that the policy may read as context.device.NAME (bool, integer or
# string), e.g.:
# on_mains = true
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
        if let Some(v) = get("POLLEN_BROKER_CA") {
            self.broker.ca_file = Some(v.into());
        }
        if let Some(v) = get("POLLEN_BROKER_CERT") {
            self.broker.cert_file = Some(v.into());
        }
        if let Some(v) = get("POLLEN_BROKER_KEY") {
            self.broker.key_file = Some(v.into());
        }
        if let Some(v) = get("POLLEN_STORAGE_CA") {
            self.storage.ca_file = Some(v.into());
        }
        if let Some(v) = get("POLLEN_WORK_DIR") {
            self.work_dir = v.into();
        }
        if let Some(v) = get("POLLEN_DATA").or_else(|| get("POLLEN_DATA_DIR")) {
            self.data.path = v.into();
        }
        if let Some(v) = get("POLLEN_BACKEND") {
            self.backend = Backend::parse(&v).map_err(|reason| ConfigError::Env {
                var: "POLLEN_BACKEND",
                value: v.clone(),
                reason,
            })?;
        }
        if let Some(v) = get("POLLEN_SHARD") {
            self.data.shard = Some(v.parse::<Shard>().map_err(|reason| ConfigError::Env {
                var: "POLLEN_SHARD",
                value: v.clone(),
                reason,
            })?);
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
            if value.chars().count() > MAX_ID_CHARS {
                return Err(invalid(
                    field,
                    format!("is longer than {MAX_ID_CHARS} characters"),
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
        if self.data.path.as_os_str().is_empty() {
            return Err(invalid("data.path", "is empty".into()));
        }
        Backend::parse(self.backend.as_str()).map_err(|e| invalid("backend", e))?;
        Ok(())
    }

    /// The consent policy, read and parsed, if the config names one.
    pub fn consent(&self) -> Result<Option<std::sync::Arc<Consent>>, ConsentError> {
        self.consent
            .policy
            .as_deref()
            .map(|path| {
                Consent::load(path, self.consent.attributes.clone()).map(std::sync::Arc::new)
            })
            .transpose()
    }

    /// Agent options for this configuration (no compute-slot limit, no extra properties).
    pub fn agent_options(&self) -> AgentOptions {
        AgentOptions {
            heartbeat: self.heartbeat,
            keep_alive: self.keep_alive,
            work_dir: Some(self.work_dir.clone()),
            object_store_ca: self.storage.ca_file.clone(),
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
    fn the_shipped_consent_policy_loads_from_a_config_and_decides() {
        use chrono::TimeZone;
        use pollen_client::agent::consent::{Ask, Verdict};
        let policy =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/consent/afternoons.cedar");
        let cfg = AgentConfig::from_toml(
            &format!(
                "device_id = \"gw-1\"\n[consent]\npolicy = {:?}\n[consent.attributes]\non_mains = true\n",
                policy.display().to_string()
            ),
            "a.toml",
        )
        .expect("parses");
        let consent = cfg.consent().expect("policy loads").expect("configured");
        let at = |hour| Ask {
            fleet: "utility",
            device: "gw-1",
            action: "fit",
            run: "r",
            round: 1,
            task: "",
            now: chrono::Local
                .with_ymd_and_hms(2026, 12, 7, hour, 0, 0)
                .single()
                .expect("a local time"),
            free_disk_bytes: 10_000_000_000,
            busy: false,
        };
        assert_eq!(consent.decide(&at(15)), Verdict::Accept);
        assert!(matches!(consent.decide(&at(18)), Verdict::Decline(_)));
        let missing = AgentConfig::from_toml(
            "device_id = \"gw-1\"\n[consent]\npolicy = \"/nonexistent.cedar\"\n",
            "a.toml",
        )
        .expect("parses");
        let err = missing.consent().expect_err("no file").to_string();
        assert!(err.contains("/nonexistent.cedar"), "{err}");
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
        assert_eq!(cfg.broker.url, DEFAULT_BROKER_URL);
        assert_eq!(cfg.broker.ca_file, Some(PathBuf::from("ca.pem")));
        assert_eq!(
            cfg.data.shard,
            Some(Shard {
                index: 3,
                count: 10
            })
        );
        assert_eq!(cfg.data.path, PathBuf::from("data/mnist"));
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
        assert!(
            e.contains("\"5/3\": the index must be below the count"),
            "{e}"
        );
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
            ("POLLEN_BROKER_CA", "pki/ca.pem"),
            ("POLLEN_BROKER_CERT", "pki/devices/env-dev.pem"),
            ("POLLEN_BROKER_KEY", "pki/devices/env-dev.key"),
            ("POLLEN_STORAGE_CA", "pki/ca.pem"),
            ("POLLEN_OTHER", "ignored"),
        ]))
        .expect("applies");
        assert_eq!(cfg.device_id, "env-dev");
        assert_eq!(cfg.broker.ca_file, Some(PathBuf::from("pki/ca.pem")));
        assert_eq!(cfg.storage.ca_file, Some(PathBuf::from("pki/ca.pem")));
        assert_eq!(
            (
                cfg.broker.cert_file.as_deref(),
                cfg.broker.key_file.as_deref()
            ),
            (
                Some(Path::new("pki/devices/env-dev.pem")),
                Some(Path::new("pki/devices/env-dev.key"))
            )
        );
        assert_eq!(cfg.fleet, "f2");
        assert_eq!(cfg.broker.url, "mqtt://broker.example:1884");
        assert_eq!(cfg.work_dir, PathBuf::from("/var/lib/pollen"));
        assert_eq!(cfg.data.path, PathBuf::from("/data"));
        assert_eq!(cfg.data.shard, Some(Shard { index: 1, count: 4 }));
        // POLLEN_DATA names a file as well as a folder, and wins over the older name.
        cfg.apply_env(env(&[
            ("POLLEN_DATA", "/data/vib.csv"),
            ("POLLEN_DATA_DIR", "/x"),
        ]))
        .expect("applies");
        assert_eq!(cfg.data.path, PathBuf::from("/data/vib.csv"));
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
        assert_eq!(o.work_dir, Some(PathBuf::from("pollen-agent")));
        assert_eq!(o.mqtt_client_id(), "pollen-agent-default-gw-1");
    }
}
