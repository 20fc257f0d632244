//! pollen-workflows: the orchestration of training runs and the `pollen` CLI.
//!
//! # Layout
//! - [`spec`]: run specs (TOML), validated, saved with every run.
//! - [`simulate`]: coordinator + simulated clients in one process, over the device path
//!   (proxy, MQTT, S3) or direct gRPC.
//! - [`run`]: storage, strategy and driver wiring shared by every command; `pollen run` on a
//!   real fleet (discover, select, bridge, train).
//! - [`broker`]: the embedded MQTT broker (rumqttd).
//! - [`bench`]: `pollen bench`, the whole-system benchmarks.
//! - `bin/pollen.rs`: the CLI (argument parsing, tracing, output).

pub mod bench;
pub mod broker;
pub mod run;
pub mod simulate;
pub mod spec;

pub use spec::RunSpec;
