//! The `pollen` CLI's commands, behind a `bin/pollen.rs` that only parses and dispatches.
//!
//! - [`train`]: the commands that train (simulate, coordinator, run, central) and the spec
//!   and storage arguments they share.
//! - [`fleet`]: proxy and devices, the commands that talk to a fleet's broker.
//! - [`records`]: runs, status and dashboard, over the recorded runs.
//! - [`serve`]: `pollen serve` and its clients (submit, stop, resume); [`service_config`]:
//!   its settings file.
//! - [`data`]: data inspect and data split.
//! - [`report`]: how rounds, runs and devices are printed.

pub mod data;
pub mod fleet;
pub mod records;
pub mod report;
pub mod serve;
pub mod service_config;
pub mod train;

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Runs a parsed command: tracing to stderr (`RUST_LOG`; warnings by default, the embedded
/// broker's own logs off), a tokio runtime, and an error printed with its causes and a failing
/// exit code. The `pollen` and `pollen-bench` binaries share it.
pub fn main(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr closed under a supervisor) is lost;
        // reporting that on the same closed stderr would panic the task that logged.
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(command);
    if let Err(e) = &outcome {
        eprintln!("error: {e:#}");
    }
    // Dropping the runtime would wait for every blocking task (a training step, a device's
    // file read) however long it takes: a command that has finished, or failed, exits now.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// What a run says when Ctrl-C stops it.
const RUN_INTERRUPTED: &str = "interrupted: finishing the records of completed rounds";

/// A token cancelled at Ctrl-C, after printing `message`.
fn shutdown_on_ctrl_c(message: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("{message}");
            t.cancel();
        }
    });
    token
}
