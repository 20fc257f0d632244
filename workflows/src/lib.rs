//! pollen-workflows: the orchestration of training runs and the `pollen` CLI.
//!
//! # Layout
//! - [`spec`]: run specs (TOML), validated, saved with every run.
//! - [`simulate`]: coordinator + simulated clients in one process over loopback gRPC.
//! - `bin/pollen.rs`: the CLI (argument parsing, tracing, output).

pub mod simulate;
pub mod spec;

pub use spec::RunSpec;
