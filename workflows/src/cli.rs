//! What the `main` of the `pollen` and `pollen-bench` binaries does around their command.

use std::future::Future;
use std::process::ExitCode;

/// Runs a parsed command: tracing to stderr (`RUST_LOG`; warnings by default, the embedded
/// broker's own logs off), a tokio runtime, and an error printed with its causes and a failing
/// exit code.
pub fn main(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
    match rt.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
