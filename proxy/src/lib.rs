//! pollen-proxy: one logical Fleet client per MQTT device.
//!
//! For each device it will hold the device's gRPC stream to the coordinator, turn each
//! instruction into an MQTT command (request id, round, presigned GET/PUT URLs, config,
//! deadline) and wait for the device's asynchronous reply. The payloads and topics it speaks are
//! already defined in `pollen_proto::device` and `pollen_proto::topics`; the bridge itself comes
//! with the device-path work (see docs/ARCHITECTURE.md).
//!
//! # Layout
//! Nothing yet beyond this description: the crate exists so the workspace has its final shape.

/// The MQTT topic a bridge for `device` in `fleet` publishes commands on.
pub fn command_topic(fleet: &str, device: &str) -> String {
    pollen_proto::topics::command(fleet, device)
}
