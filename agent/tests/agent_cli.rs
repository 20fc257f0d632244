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
        stderr.contains("--shard \"5/3\": the index must be below the count"),
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

/// The config file the Greengrass component's install step writes
/// (`deploy/greengrass/recipe.yaml`), with the component's variables filled in as Greengrass
/// would, passes `--check`; with a data file that is not there, the check fails naming it.
#[test]
fn the_greengrass_components_config_passes_the_check() {
    let recipe = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/greengrass/recipe.yaml"
    ))
    .expect("recipe");
    // The heredoc of the install script; YAML strips the block's indentation.
    let start = recipe.find("<<CONF\n").expect("heredoc") + "<<CONF\n".len();
    let body = &recipe[start..];
    let end = body.find("\n          CONF\n").expect("end of heredoc");
    let template: Vec<&str> = body[..end]
        .lines()
        .map(|l| l.strip_prefix("          ").unwrap_or(l))
        .collect();
    let template = template.join("\n");

    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("device.pem"), dir.path().join("device.key"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=thing-7", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs (Debian: apt-get install openssl)");
    assert!(status.status.success(), "{status:?}");

    let check = |data: &str| {
        let config = template
            .replace("{iot:thingName}", "thing-7")
            .replace("{work:path}", &dir.path().display().to_string())
            .replace("{configuration:/Fleet}", "pumps")
            .replace("{configuration:/Broker}", "mqtts://broker.example:8883")
            .replace("{configuration:/CaFile}", &cert.display().to_string())
            .replace("{configuration:/CertFile}", &cert.display().to_string())
            .replace("{configuration:/KeyFile}", &key.display().to_string())
            .replace("{configuration:/DataPath}", data);
        assert!(
            !config.contains('{'),
            "a variable the test does not know: {config}"
        );
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, config).expect("write");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pollen-agent"));
        for var in [
            "DEVICE_ID",
            "FLEET",
            "BROKER",
            "WORK_DIR",
            "DATA",
            "DATA_DIR",
            "SHARD",
        ] {
            cmd.env_remove(format!("POLLEN_{var}"));
        }
        cmd.arg("--config").arg(&path).arg("--check");
        cmd.output().expect("agent runs")
    };

    let ok = check(DATA);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        stdout.contains("ok: device thing-7 of fleet \"pumps\" on mqtts://broker.example:8883")
            && stdout.contains("mnist 60000 examples of shape [1, 28, 28]"),
        "{stdout}"
    );

    let missing = dir.path().join("missing.csv");
    let bad = check(&missing.display().to_string());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(stderr.contains("missing.csv"), "{stderr}");
}
