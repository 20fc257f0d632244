//! pollen-client: the edge side of Pollen's protocols, without any machine-learning code.
//!
//! A [`Client`] answers a coordinator's instructions (get parameters, fit, evaluate,
//! statistics) for the task each instruction names; this crate carries the instructions to it
//! and the answers back, either over a gRPC Fleet stream ([`run_client`]) or as an MQTT edge
//! agent ([`Agent`]) that receives commands from a proxy and moves weights and task manifests
//! through presigned object-storage URLs. What a client learns and from which data is
//! `pollen-train`'s business: embedding this crate pulls in no training framework.
//!
//! # Layout
//! - [`client`]: the `Client` trait, the [`Work`] an instruction is about, and its answers.
//! - [`task`]: task manifests resolved from their references and cached by digest.
//! - [`transfer`]: presigned-URL download (verified) and upload of blobs, shared by both paths.
//! - [`update`]: how an update leaves the device: local DP, then the codec the instruction asks
//!   for (f32, or f16/int8/top-k deltas with error feedback).
//! - [`fleet`]: the gRPC Fleet client loop.
//! - [`agent`]: the MQTT edge agent (session, heartbeats, command queue, outbox).

pub mod agent;
pub mod client;
pub mod fleet;
pub mod task;
pub mod transfer;
pub mod update;

pub use agent::{Agent, AgentError, AgentOptions, AgentStats};
pub use client::{Client, ClientError, ClientEvaluate, ClientFit, TaskBlob, Work};
pub use fleet::{ClientOptions, Exit, run_client};
