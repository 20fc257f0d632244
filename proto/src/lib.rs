//! pollen-proto: the contract between Pollen's coordinator, proxies and devices.
//!
//! Only types and codecs live here, no I/O policy: whoever sends or stores a blob decides how.
//!
//! # Layout
//! - [`fleet`]: generated gRPC `Fleet` service and messages (coordinator <-> Fleet clients).
//! - [`device`]: generated MQTT payloads (proxy <-> edge agent).
//! - [`topics`]: the MQTT topic scheme.
//! - [`blob`]: the weight-blob format (safetensors of named f32 tensors + SHA-256) and
//!   [`blob::Parameters`], the model-agnostic weights every component exchanges.
//! - [`codec`]: compressed weight codecs: models in f16 or int8 (per-channel scales), and
//!   updates as deltas against the model their sender was given (f16, int8, top-k with error
//!   feedback); [`codec::decode`] reads every codec.
//! - [`part`]: [`Part`], one of `count` parts written `INDEX/COUNT` (data shares, proxy
//!   shards).
//! - [`scalar`]: conversions between wire [`fleet::Scalar`] maps and Rust values.
//! - [`stats`]: per-channel moments as devices accumulate and coordinators combine them
//!   (federated statistics).
//! - [`grpc_tls`]: TLS (mutual where a client presents a certificate) for the `Fleet` link.
//! - `mqtt` (feature `mqtt`): broker URLs (`mqtt://`, `mqtts://` + X.509 files) to `rumqttc`
//!   options with Pollen's packet limits.
//! - [`prometheus`]: encoding a component's metrics registry in the OpenMetrics text format,
//!   and (feature `metrics-http`) serving it at `/metrics`.
//! - [`limits`]: message-size limits chosen deliberately (tonic defaults to 4 MiB).

pub mod blob;
pub mod codec;
pub mod grpc_tls;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod part;
pub mod prometheus;
pub mod scalar;
pub mod stats;
pub mod topics;

/// Generated code, nested as the protobuf packages are (`pollen.fleet.v1`, ...) so that
/// cross-package references resolve.
pub mod generated {
    #![allow(clippy::all, missing_docs)]
    pub mod pollen {
        pub mod fleet {
            pub mod v1 {
                tonic::include_proto!("pollen.fleet.v1");
            }
        }
        pub mod device {
            pub mod v1 {
                tonic::include_proto!("pollen.device.v1");
            }
        }
    }
}

/// MQTT payloads, from `proto/pollen/device.proto`.
pub use generated::pollen::device::v1 as device;
/// gRPC `Fleet` service and messages, from `proto/pollen/fleet.proto`.
pub use generated::pollen::fleet::v1 as fleet;

/// Message-size limits shared by servers and clients.
pub mod limits {
    /// Largest gRPC message either side encodes or decodes: 64 MiB.
    ///
    /// Inline weights of the MNIST CNN are 6.65 MB; tonic's default (4 MiB) would cut them off.
    /// 64 MiB leaves room for models an order of magnitude larger while still bounding what one
    /// misbehaving peer can make the coordinator buffer. Larger models go by reference.
    pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

    /// Largest MQTT payload Pollen publishes. AWS IoT Core caps payloads at 128 KiB; Pollen's
    /// commands and replies are a few hundred bytes, so 16 KiB is a generous ceiling that also
    /// survives Mosquitto's `message_size_limit` settings seen in the field.
    pub const MAX_MQTT_PAYLOAD_BYTES: usize = 16 * 1024;
}

pub use blob::{BlobError, NamedTensor, Parameters, TensorSpec};
pub use codec::UpdateCodec;
pub use part::Part;

/// `at` in Unix milliseconds (0 before 1970). Deadlines and timestamps on the wire are
/// wall-clock Unix milliseconds, so every component converts the same way.
pub fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Now, in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    unix_ms(std::time::SystemTime::now())
}
