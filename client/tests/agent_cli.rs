//! `pollen-agent` as an operator runs it: bad arguments and an unreachable coordinator are
//! reported plainly, with a failing exit code.

use std::process::Command;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist");

#[test]
fn a_shard_outside_the_fleet_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-agent"))
        .args(["--client-id", "gw-1", "--shard", "5/3", "--data-dir", DATA])
        .output()
        .expect("agent runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--shard 5/3: INDEX must be below COUNT"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_coordinator_is_named_in_the_error() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-agent"))
        .args(["--client-id", "gw-1", "--shard", "0/10", "--data-dir", DATA])
        .args(["--coordinator", &endpoint])
        .output()
        .expect("agent runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot reach the coordinator at {endpoint}")),
        "{stderr}"
    );
}
