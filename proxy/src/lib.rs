//! pollen-proxy: one logical Fleet client per MQTT device, many per process.
//!
//! Devices speak MQTT and may vanish at any time; the coordinator runs synchronous rounds over
//! gRPC streams. A proxy process holds one MQTT connection for its whole fleet and one *bridge*
//! per selected online device. Each bridge joins the coordinator as that device (`Fleet.Join`
//! over a shared HTTP/2 channel), turns every instruction into an MQTT [`Command`] carrying
//! presigned URLs, and turns the device's asynchronous reply back into the answer the
//! coordinator expects — with deadlines, cancels, and duplicate/late/unknown replies dropped and
//! counted. Weights never travel over MQTT: an instruction carrying inline weights is refused.
//!
//! ```text
//! coordinator <--gRPC Fleet.Join (one stream per device, one shared Channel)--> bridge[d]
//!                                                                                  |  ^
//!                                   publish cmd (QoS 1)   mpsc (routed replies)    v  |
//! broker  <----------------- one MQTT connection ------------------>  dispatcher (EventLoop)
//!   pollen/<fleet>/<d>/cmd | pollen/<fleet>/+/reply | pollen/<fleet>/+/status (retained)
//! ```
//!
//! # Layout
//! - [`config`]: [`ProxyConfig`] (fleet, coordinator, broker, selection, timing).
//! - [`devices`]: [`DeviceRegistry`] (last status per device, online/stale), [`Selection`],
//!   and [`discover`] (a one-shot look at a fleet's retained statuses).
//! - `book`: `RequestBook`, one bridge's request bookkeeping without I/O (open and closed
//!   requests, reply matching, deadlines), unit-tested on its own.
//! - `bridge`: the per-device task driving a `RequestBook` between the gRPC stream and MQTT.
//! - `mqtt`: the proxy's MQTT connection and the dispatcher routing replies and statuses.
//! - `proxy`: [`Proxy::start`] and [`ProxyHandle`]: which devices get a bridge, and shutdown.
//! - [`shard`]: [`ProxyShard`], which devices of a fleet split statically across proxies are
//!   this one's.
//! - [`membership`]: automatic sharding, the live proxies of a fleet and which devices each
//!   owns, kept from the proxies' retained announcements and last-wills.
//! - `stats`: [`ProxyStatsSnapshot`], the proxy's counters.
//!
//! [`Command`]: pollen_proto::device::Command

mod book;
mod bridge;
pub mod config;
pub mod devices;
pub mod membership;
mod mqtt;
mod proxy;
pub mod shard;
mod stats;

pub use config::ProxyConfig;
pub use devices::{DataRequirement, DataView, DeviceRecord, DeviceRegistry, Selection, discover};
/// The checks every device message passes before the proxy acts on it (fuzzed in `fuzz/`).
pub use mqtt::{StatusUpdate, decode_proxy_status, decode_reply, decode_status};
pub use proxy::{Proxy, ProxyHandle};
pub use shard::ProxyShard;
pub use stats::ProxyStatsSnapshot;

/// Why a proxy (or a discovery) could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Id(#[from] pollen_proto::topics::TopicError),
    #[error(transparent)]
    Broker(#[from] pollen_proto::mqtt::BrokerError),
    #[error("cannot reach the MQTT broker at {url}: {source}; check that it runs and the url")]
    BrokerUnreachable {
        url: String,
        source: Box<rumqttc::ConnectionError>,
    },
    #[error("MQTT client: {0}")]
    Mqtt(String),
    #[error("coordinator endpoint {endpoint:?} is not usable: {reason}")]
    Coordinator { endpoint: String, reason: String },
    #[error("proxy config: {0}")]
    Config(String),
}

pub(crate) use pollen_proto::now_unix_ms;

/// `bytes` random bytes as lower-case hex.
pub(crate) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
