//! pollen-workflows: the orchestration of training runs and the `pollen` CLI.
//!
//! # Layout
//! - [`spec`]: run specs (TOML), validated, saved with every run.
//! - [`task`]: a spec's task manifest, resolved against data or devices, fitted from federated
//!   statistics; server-side evaluation.
//! - [`torchscript`]: a TorchScript model's file and initial weights, on the coordinator's side.
//! - [`shares`]: a simulation's data split into one share per simulated device.
//! - [`central`]: the centralized baseline (`pollen central`): the same model trained on the
//!   union of the devices' training data.
//! - [`data`]: `pollen data inspect` and `pollen data split`, for getting a CSV file ready.
//! - [`device`]: simulated devices that fail, answer late, sleep, straggle or attack.
//! - [`simulate`]: coordinator + simulated clients in one process, over the device path
//!   (proxy, MQTT, S3) or direct gRPC.
//! - [`run`]: storage, strategy and driver wiring shared by every command; `pollen run` on a
//!   real fleet (discover, select, bridge, train).
//! - [`resume`]: crash resume, a run continued from its records by a new coordinator.
//! - [`serve`]: `pollen serve`, a long-lived coordinator running submitted runs in turn.
//! - [`broker`]: the embedded MQTT broker (rumqttd).
//! - [`cli`]: the `pollen` commands (arguments, handlers, output) and what the binaries'
//!   `main` does around a command (tracing, runtime, errors).
//! - `bin/pollen.rs`: the `pollen` CLI's parsing and dispatch.

pub mod broker;
pub mod central;
pub mod cli;
pub mod data;
pub mod device;
pub mod fleet_sim;
pub mod resume;
pub mod run;
pub mod serve;
pub mod shares;
pub mod simulate;
pub mod spec;
pub mod task;
pub mod torchscript;
pub mod warm;

pub use spec::RunSpec;
