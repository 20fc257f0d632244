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

#[test]
fn the_default_config_is_printed_and_parses_back() {
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-agent"))
        .arg("--print-default-config")
        .output()
        .expect("agent runs");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let parsed = pollen_agent::AgentConfig::from_toml(&text, "printed").expect("parses");
    assert_eq!(parsed, pollen_agent::AgentConfig::default());
}

#[test]
fn mqtt_mode_without_a_device_id_says_how_to_set_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-agent"))
        .env_remove("POLLEN_DEVICE_ID")
        .env_remove("POLLEN_AGENT_CONFIG")
        .env_remove("POLLEN_COORDINATOR")
        .env_remove("POLLEN_CLIENT_ID")
        .output()
        .expect("agent runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("device_id: is not set") && stderr.contains("--device-id"),
        "{stderr}"
    );
}

#[test]
fn a_config_file_error_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "device_id = \"gw-1\"\nheartbeat = \"0s\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-agent"))
        .arg("--config")
        .arg(&path)
        .env_remove("POLLEN_COORDINATOR")
        .env_remove("POLLEN_CLIENT_ID")
        .output()
        .expect("agent runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: heartbeat: must be longer than zero",
            path.display()
        )),
        "{stderr}"
    );
}

#[test]
fn metrics_in_direct_mode_are_refused_rather_than_ignored() {
    let out = Command::new(env!("CARGO_BIN_EXE_pollen-agent"))
        .args(["--client-id", "gw-1", "--metrics", "127.0.0.1:0"])
        .output()
        .expect("agent runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--metrics"), "{stderr}");
}

#[test]
fn a_broken_data_file_stops_the_agent_at_start_naming_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text, expected) in [
        ("empty.csv", "", "empty.csv: the file is empty"),
        (
            "ragged.csv",
            "t,temp\n1,20.5\n2\n",
            "ragged.csv: line 3: has 1 fields where the header has 2",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_pollen-agent"))
            .args(["--device-id", "gw-1", "--broker", "mqtt://127.0.0.1:1"])
            .arg("--data")
            .arg(&path)
            .env_remove("POLLEN_AGENT_CONFIG")
            .env_remove("POLLEN_CLIENT_ID")
            .env_remove("POLLEN_COORDINATOR")
            .env("POLLEN_WORK_DIR", dir.path().join("work"))
            .output()
            .expect("agent runs");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}
