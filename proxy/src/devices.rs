//! Which devices exist and which are alive: the [`DeviceRegistry`] fed by retained status and
//! heartbeat messages, the [`Selection`] of devices a run uses, and [`discover`], a one-shot
//! look at a fleet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use pollen_proto::device::DeviceStatus;
use pollen_proto::fleet::{DataSchema, Scalar, scalar::Value};
use pollen_proto::mqtt::BrokerConfig;
use rumqttc::{Event, Packet, QoS};
use serde::{Deserialize, Serialize};

use crate::ProxyError;
use crate::mqtt::{StatusUpdate, decode_status};
use crate::shard::ProxyShard;

/// Agents send a heartbeat every 10 s; a device missing three in a row counts as offline.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30);

/// What is known about one device, as the CLI shows it (`pollen devices --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceRecord {
    pub device_id: String,
    /// Online by its last status, and heard from within the staleness window.
    pub online: bool,
    /// When its last status was published (retained) or received (live), Unix milliseconds.
    pub last_seen_unix_ms: u64,
    pub agent_version: String,
    pub num_examples: u64,
    pub model: String,
    pub free_disk_bytes: u64,
    pub properties: BTreeMap<String, serde_json::Value>,
    /// What the device's local data looks like, as it announces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<DataView>,
}

/// A device's data schema, as `pollen devices --json` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataView {
    pub format: String,
    pub rows: u64,
    /// CSV: the header; empty when the device left it out (`columns_omitted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub columns_omitted: bool,
    /// Arrays: the shape of one example.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub example_shape: Vec<u64>,
}

impl From<&DataSchema> for DataView {
    fn from(s: &DataSchema) -> Self {
        Self {
            format: s.format.clone(),
            rows: s.rows,
            columns: s.columns.clone(),
            columns_omitted: s.columns_omitted,
            example_shape: s.example_shape.clone(),
        }
    }
}

impl DataView {
    /// One line for a device table: `csv 1200x8`, `npy 500x[3, 32]`.
    pub fn summary(&self) -> String {
        if self.example_shape.is_empty() {
            let cols = if self.columns_omitted {
                "?".to_string()
            } else {
                self.columns.len().to_string()
            };
            format!("{} {}x{cols}", self.format, self.rows)
        } else {
            format!("{} {}x{:?}", self.format, self.rows, self.example_shape)
        }
    }
}

/// What a run's task needs of a device's data, checked against the schema devices announce.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataRequirement {
    /// Tabular devices must have every one of these columns.
    pub columns: Vec<String>,
    /// Array devices must hold this many values per example.
    pub example_values: Option<u64>,
}

impl DataRequirement {
    /// Whether data announced as `data` fits; the error says why not.
    pub fn check(&self, data: Option<&DataView>) -> Result<(), String> {
        if self.columns.is_empty() && self.example_values.is_none() {
            return Ok(());
        }
        let Some(data) = data else {
            return Err("announces no data schema".into());
        };
        if data.example_shape.is_empty() {
            if self.columns.is_empty() {
                return Err(format!("holds {} data; the task reads arrays", data.format));
            }
            if data.columns_omitted {
                // Too wide to announce: the device checks the columns when the task arrives.
                return Ok(());
            }
            let missing: Vec<&String> = self
                .columns
                .iter()
                .filter(|c| !data.columns.contains(c))
                .collect();
            if !missing.is_empty() {
                return Err(format!("has no column {missing:?}"));
            }
            return Ok(());
        }
        match self.example_values {
            None => Err(format!(
                "holds {} arrays; the task reads CSV columns",
                data.format
            )),
            Some(want) => {
                let have: u64 = data.example_shape.iter().product();
                if have == want {
                    Ok(())
                } else {
                    Err(format!(
                        "examples have shape {:?} ({have} values); the task's input has {want}",
                        data.example_shape
                    ))
                }
            }
        }
    }
}

/// Which devices a run uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selection {
    /// Only these devices, when given.
    pub devices: Option<BTreeSet<String>>,
    /// Skip devices with fewer local examples.
    pub min_examples: u64,
    /// At most this many devices.
    pub max_devices: Option<usize>,
    /// Only devices whose announced data fits the run's task.
    pub data: Option<DataRequirement>,
    /// Only the devices this proxy's shard owns, when the fleet is split across proxies.
    pub shard: Option<ProxyShard>,
}

impl Selection {
    /// Whether `record` passes the filters (online, listed, enough examples, data that
    /// fits); ignores `max_devices`.
    pub fn admits(&self, record: &DeviceRecord) -> bool {
        self.check(record).is_ok()
    }

    /// [`Self::admits`], saying why not.
    pub fn check(&self, record: &DeviceRecord) -> Result<(), String> {
        if !record.online {
            return Err("is offline".into());
        }
        if record.num_examples < self.min_examples {
            return Err(format!(
                "has {} examples, fewer than {}",
                record.num_examples, self.min_examples
            ));
        }
        if let Some(list) = &self.devices
            && !list.contains(&record.device_id)
        {
            return Err("is not in the device list".into());
        }
        if let Some(shard) = &self.shard
            && !crate::shard::owns(*shard, &record.device_id)
        {
            return Err(format!(
                "belongs to proxy shard {}/{}, not {shard}",
                crate::shard::owner(&record.device_id, shard.count),
                shard.count
            ));
        }
        match &self.data {
            Some(requirement) => requirement.check(record.data.as_ref()),
            None => Ok(()),
        }
    }

    /// The admitted records, most recently seen first (ties by id), up to `max_devices`.
    pub fn pick(&self, records: impl IntoIterator<Item = DeviceRecord>) -> Vec<DeviceRecord> {
        let mut picked: Vec<DeviceRecord> =
            records.into_iter().filter(|r| self.admits(r)).collect();
        picked.sort_by(|a, b| {
            b.last_seen_unix_ms
                .cmp(&a.last_seen_unix_ms)
                .then_with(|| a.device_id.cmp(&b.device_id))
        });
        if let Some(max) = self.max_devices {
            picked.truncate(max);
        }
        picked
    }
}

#[derive(Debug, Clone)]
struct Entry {
    status: DeviceStatus,
    last_seen_unix_ms: u64,
}

/// The last status of every device of a fleet, and when it was seen.
#[derive(Debug)]
pub struct DeviceRegistry {
    stale_after_ms: u64,
    devices: HashMap<String, Entry>,
}

impl DeviceRegistry {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after_ms: u64::try_from(stale_after.as_millis()).unwrap_or(u64::MAX),
            devices: HashMap::new(),
        }
    }

    /// Records a status of `device_id` received at `now_unix_ms`. A retained status was
    /// published earlier, possibly long ago: it counts as seen at the device's own timestamp
    /// (never later than now), so that a device that died without its last-will does not look
    /// alive to whoever subscribes later.
    pub fn update(&mut self, status: DeviceStatus, retained: bool, now_unix_ms: u64) {
        let last_seen_unix_ms = if retained && status.timestamp_unix_ms > 0 {
            status.timestamp_unix_ms.min(now_unix_ms)
        } else {
            now_unix_ms
        };
        self.devices.insert(
            status.device_id.clone(),
            Entry {
                status,
                last_seen_unix_ms,
            },
        );
    }

    /// Forgets a device (its retained status was cleared). True if it was known.
    pub fn remove(&mut self, device_id: &str) -> bool {
        self.devices.remove(device_id).is_some()
    }

    /// Online by its last status and not stale at `now_unix_ms`.
    pub fn is_online(&self, device_id: &str, now_unix_ms: u64) -> bool {
        self.devices
            .get(device_id)
            .is_some_and(|e| self.alive(e, now_unix_ms))
    }

    /// The last status of a device.
    pub fn status(&self, device_id: &str) -> Option<&DeviceStatus> {
        self.devices.get(device_id).map(|e| &e.status)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// How many devices are online at `now_unix_ms`.
    pub fn online_at(&self, now_unix_ms: u64) -> usize {
        self.devices
            .values()
            .filter(|e| self.alive(e, now_unix_ms))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Every known device at `now_unix_ms`, sorted by id.
    pub fn records_at(&self, now_unix_ms: u64) -> Vec<DeviceRecord> {
        let mut records: Vec<DeviceRecord> = self
            .devices
            .values()
            .map(|e| self.record(e, now_unix_ms))
            .collect();
        records.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        records
    }

    /// Every known device now, sorted by id.
    pub fn records(&self) -> Vec<DeviceRecord> {
        self.records_at(crate::now_unix_ms())
    }

    /// The record of one device at `now_unix_ms`.
    pub fn get_at(&self, device_id: &str, now_unix_ms: u64) -> Option<DeviceRecord> {
        self.devices
            .get(device_id)
            .map(|e| self.record(e, now_unix_ms))
    }

    /// The online devices meeting `selection` at `now_unix_ms`, most recently seen first, up
    /// to `max_devices`.
    pub fn select_at(&self, selection: &Selection, now_unix_ms: u64) -> Vec<DeviceRecord> {
        selection.pick(self.devices.values().map(|e| self.record(e, now_unix_ms)))
    }

    /// [`Self::select_at`] now.
    pub fn select(&self, selection: &Selection) -> Vec<DeviceRecord> {
        self.select_at(selection, crate::now_unix_ms())
    }

    /// Devices that were online by their last status but whose last sign of life is older
    /// than the staleness window at `now_unix_ms`.
    pub fn stale_at(&self, now_unix_ms: u64) -> Vec<String> {
        let mut stale: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, e)| e.status.online && !self.alive(e, now_unix_ms))
            .map(|(id, _)| id.clone())
            .collect();
        stale.sort();
        stale
    }

    fn alive(&self, e: &Entry, now_unix_ms: u64) -> bool {
        e.status.online && now_unix_ms.saturating_sub(e.last_seen_unix_ms) <= self.stale_after_ms
    }

    fn record(&self, e: &Entry, now_unix_ms: u64) -> DeviceRecord {
        let s = &e.status;
        DeviceRecord {
            device_id: s.device_id.clone(),
            online: self.alive(e, now_unix_ms),
            last_seen_unix_ms: e.last_seen_unix_ms,
            agent_version: s.agent_version.clone(),
            num_examples: s.num_examples,
            model: s.model.clone(),
            free_disk_bytes: s.free_disk_bytes,
            properties: s
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), scalar_to_json(v)))
                .collect(),
            data: s.data.as_ref().map(DataView::from),
        }
    }
}

/// A wire scalar as JSON; bytes become a lower-case hex string, non-finite numbers `null`.
fn scalar_to_json(s: &Scalar) -> serde_json::Value {
    use serde_json::Value as Json;
    match &s.value {
        None => Json::Null,
        Some(Value::Double(v)) => serde_json::Number::from_f64(*v).map_or(Json::Null, Json::Number),
        Some(Value::Int(v)) => Json::from(*v),
        Some(Value::String(v)) => Json::from(v.as_str()),
        Some(Value::Bool(v)) => Json::from(*v),
        Some(Value::Bytes(v)) => {
            Json::from(v.iter().map(|b| format!("{b:02x}")).collect::<String>())
        }
    }
}

/// Connects to `broker` with a clean session, reads the retained statuses of `fleet` for
/// `wait` after connecting, and returns every device seen (online or not), sorted by id.
pub async fn discover(
    broker: &BrokerConfig,
    fleet: &str,
    wait: Duration,
) -> Result<Vec<DeviceRecord>, ProxyError> {
    pollen_proto::topics::validate_id("fleet", fleet)?;
    let client_id = format!("pollen-discover-{}", crate::random_hex(8));
    let mut options = pollen_proto::mqtt::mqtt_options(broker, &client_id)?;
    options.set_clean_session(true);
    let (client, mut eventloop) = pollen_proto::mqtt::client(options, 16);
    let filter = pollen_proto::topics::all_status(fleet);
    let mut registry = DeviceRegistry::new(DEFAULT_STALE_AFTER);

    // Connecting is bounded by rumqttc's own connection timeout.
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(source) => {
                return Err(ProxyError::BrokerUnreachable {
                    url: broker.redacted_url(),
                    source: Box::new(source),
                });
            }
        }
    }
    client
        .subscribe(filter.as_str(), QoS::AtLeastOnce)
        .await
        .map_err(|e| ProxyError::Mqtt(e.to_string()))?;
    let collect = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some((_, device, "status")) = pollen_proto::topics::parse(&p.topic) else {
                        continue;
                    };
                    match decode_status(&p.topic, device, &p.payload) {
                        StatusUpdate::Cleared => {
                            registry.remove(device);
                        }
                        StatusUpdate::Status(status) => {
                            registry.update(*status, p.retain, crate::now_unix_ms());
                        }
                        StatusUpdate::Malformed => {}
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(broker = %broker.redacted_url(), "connection lost while discovering: {e}");
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(wait, collect).await;
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out so the broker does not log an unclean close; bounded because
    // the connection may already be gone.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(registry.records())
}

#[cfg(test)]
mod tests {
    use pollen_proto::scalar;

    use super::*;

    fn status(id: &str, online: bool, num_examples: u64) -> DeviceStatus {
        DeviceStatus {
            device_id: id.into(),
            online,
            agent_version: "0.1.0".into(),
            num_examples,
            model: "mnist-2nn".into(),
            free_disk_bytes: 1 << 30,
            timestamp_unix_ms: 0,
            properties: [("site".to_string(), scalar::string("lab"))].into(),
            data: Some(DataSchema {
                format: "csv".into(),
                columns: vec!["t".into(), "vibration".into(), "state".into()],
                rows: num_examples,
                ..Default::default()
            }),
        }
    }

    fn registry() -> DeviceRegistry {
        let mut r = DeviceRegistry::new(Duration::from_secs(30));
        r.update(status("a", true, 600), false, 1_000);
        r.update(status("b", true, 50), false, 3_000);
        r.update(status("c", true, 600), false, 2_000);
        r.update(status("d", false, 600), false, 4_000);
        r
    }

    fn ids(records: &[DeviceRecord]) -> Vec<&str> {
        records.iter().map(|r| r.device_id.as_str()).collect()
    }

    #[test]
    fn selection_returns_online_devices_newest_first() {
        let r = registry();
        let all = r.select_at(&Selection::default(), 5_000);
        assert_eq!(ids(&all), ["b", "c", "a"]);
        assert_eq!(all[0].properties["site"], serde_json::json!("lab"));
    }

    #[test]
    fn selection_applies_the_list_the_minimum_and_the_maximum() {
        let r = registry();
        let enough = Selection {
            min_examples: 100,
            ..Selection::default()
        };
        assert_eq!(ids(&r.select_at(&enough, 5_000)), ["c", "a"]);
        let listed = Selection {
            devices: Some(["a".to_string(), "b".into(), "d".into()].into()),
            ..Selection::default()
        };
        assert_eq!(ids(&r.select_at(&listed, 5_000)), ["b", "a"]);
        let two = Selection {
            max_devices: Some(2),
            ..Selection::default()
        };
        assert_eq!(ids(&r.select_at(&two, 5_000)), ["b", "c"]);
    }

    #[test]
    fn a_device_not_heard_from_within_the_window_is_offline() {
        let r = registry();
        // 30.5 s after "a" was last seen, 29.5 s after "c".
        let later = 31_500;
        assert!(!r.is_online("a", later));
        assert!(r.is_online("b", later));
        assert_eq!(r.stale_at(later), ["a"]);
        assert!(!r.get_at("a", later).expect("known").online);
        assert_eq!(ids(&r.select_at(&Selection::default(), later)), ["b", "c"]);
    }

    #[test]
    fn a_last_will_makes_a_device_offline_and_a_cleared_status_forgets_it() {
        let mut r = registry();
        r.update(status("a", false, 600), false, 5_000);
        assert!(!r.is_online("a", 5_000));
        assert!(r.stale_at(5_000).is_empty(), "offline is not stale");
        assert!(r.remove("c"));
        assert!(!r.remove("c"));
        assert_eq!(
            ids(&r.records_at(5_000)),
            ["a", "b", "d"],
            "records keep offline devices"
        );
        assert_eq!(ids(&r.select_at(&Selection::default(), 5_000)), ["b"]);
    }

    #[test]
    fn a_retained_status_counts_as_seen_when_the_device_published_it() {
        let mut r = DeviceRegistry::new(Duration::from_secs(30));
        let mut old = status("old", true, 1);
        old.timestamp_unix_ms = 1_000;
        r.update(old, true, 100_000);
        let mut skewed = status("ahead", true, 1);
        skewed.timestamp_unix_ms = 500_000;
        r.update(skewed, true, 100_000);
        assert!(!r.is_online("old", 100_000));
        let ahead = r.get_at("ahead", 100_000).expect("known");
        assert_eq!(ahead.last_seen_unix_ms, 100_000, "never later than now");
    }

    #[test]
    fn records_serialize_as_plain_json() {
        let r = registry();
        let json = serde_json::to_value(r.get_at("a", 1_000).expect("known")).expect("json");
        assert_eq!(json["device_id"], "a");
        assert_eq!(json["online"], true);
        assert_eq!(json["num_examples"], 600);
        assert_eq!(json["properties"]["site"], "lab");
    }

    #[test]
    fn devices_whose_data_does_not_fit_the_task_are_not_selected() {
        let r = registry();
        let fits = DataRequirement {
            columns: vec!["vibration".into(), "state".into()],
            example_values: None,
        };
        let selection = Selection {
            data: Some(fits),
            ..Selection::default()
        };
        assert!(!r.select_at(&selection, 1_000).is_empty());
        let missing = Selection {
            data: Some(DataRequirement {
                columns: vec!["temperature".into()],
                example_values: None,
            }),
            ..Selection::default()
        };
        assert!(r.select_at(&missing, 1_000).is_empty());
        let record = r.get_at("a", 1_000).expect("a");
        let why = missing.check(&record).expect_err("no temperature");
        assert!(why.contains("temperature"), "{why}");
        let arrays = DataRequirement {
            columns: Vec::new(),
            example_values: Some(784),
        };
        assert!(
            arrays
                .check(record.data.as_ref())
                .expect_err("csv")
                .contains("arrays")
        );
        assert!(fits_nothing().check(None).is_ok());
    }

    fn fits_nothing() -> DataRequirement {
        DataRequirement::default()
    }
}
