//! The `pollen` binary as a user runs it.

use std::process::Command;

#[test]
fn simulate_json_prints_one_json_object_per_round_and_nothing_else() {
    let runs = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args([
            "simulate",
            "--rounds",
            "2",
            "--clients",
            "10",
            "--json",
            "--runs-dir",
        ])
        .arg(runs.path())
        .output()
        .expect("pollen runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
        assert_eq!(v["round"], i as u64 + 1);
        for key in [
            "accuracy",
            "loss",
            "sampled",
            "succeeded",
            "failed",
            "seconds",
        ] {
            assert!(
                v.get(key).is_some_and(|x| !x.is_null()),
                "{key} missing in {line}"
            );
        }
        assert_eq!(v["sampled"], 2); // max(floor(10 * 0.1), min_fit_clients = 2)
    }
    let acc = serde_json::from_str::<serde_json::Value>(lines[1]).expect("json")["accuracy"]
        .as_f64()
        .expect("number");
    assert!(
        acc > 0.85,
        "accuracy after 2 rounds of 2 x 6,000 examples: {acc}"
    );
    assert!(stderr.contains("records:"), "summary on stderr: {stderr}");

    // The same run, read back from the records by `pollen runs` and `pollen status`.
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(["runs", "--json", "--runs-dir"])
        .arg(runs.path())
        .output()
        .expect("pollen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["status"], "completed");
    assert_eq!(listed[0]["last_round"], 2);
    assert_eq!(listed[0]["accuracy"].as_f64(), Some(acc));
    let id = listed[0]["id"].as_str().expect("id").to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(["status", &id[..id.len() - 2], "--json", "--runs-dir"])
        .arg(runs.path())
        .output()
        .expect("pollen status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(status["run"]["id"], id.as_str());
    assert_eq!(status["rounds"].as_array().map(Vec::len), Some(2));
    assert_eq!(status["rounds"][1]["accuracy"].as_f64(), Some(acc));
    assert!(
        status["rounds"][1]["seconds"]
            .as_f64()
            .is_some_and(|t| t > 0.0)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(["status", "no-such-run", "--runs-dir"])
        .arg(runs.path())
        .output()
        .expect("pollen status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pollen runs"));
}

#[test]
fn a_bad_config_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    let spec =
        pollen_workflows::spec::DEFAULT_SPEC.replace("fraction_fit = 0.1", "fraction_fit = 2.0");
    std::fs::write(&path, spec).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(["simulate", "--config"])
        .arg(&path)
        .output()
        .expect("pollen runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("fraction_fit"),
        "{stderr}"
    );
}

#[test]
fn every_run_command_validates_its_overrides() {
    // Each would start a run (bind ports, wait for devices) if --rounds 0 slipped through.
    for args in [
        &["simulate", "--rounds", "0"][..],
        &["coordinator", "--rounds", "0", "--listen", "127.0.0.1:0"],
        &["run", "--rounds", "0", "--broker", "mqtt://127.0.0.1:1"],
        &["simulate", "--clients", "0"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
            .args(args)
            .output()
            .expect("pollen runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted: {stderr}");
        assert!(stderr.contains("invalid run"), "{args:?}: {stderr}");
    }
}

/// `pollen coordinator` and `pollen-agent` as separate processes, as the README runs them.
#[test]
fn a_coordinator_and_agents_in_separate_processes_complete_a_run() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let pollen = std::path::Path::new(env!("CARGO_BIN_EXE_pollen"));
    let agent = pollen.with_file_name("pollen-agent");
    assert!(
        agent.exists(),
        "{} is missing: cargo test --workspace builds it (pollen-client has binary tests); or cargo build --bin pollen-agent",
        agent.display()
    );
    let runs = tempfile::tempdir().expect("tempdir");
    let mut coordinator = Command::new(pollen)
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--rounds",
            "2",
            "--json",
            "--runs-dir",
        ])
        .arg(runs.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("coordinator starts");
    let mut stderr = BufReader::new(coordinator.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read the address line");
    let endpoint = line
        .trim()
        .strip_prefix("Fleet gRPC API on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    let agents: Vec<_> = (0..3)
        .map(|i| {
            Command::new(&agent)
                .args(["--coordinator", &endpoint, "--client-id"])
                .arg(format!("gw-{i}"))
                .args(["--shard", &format!("{i}/3"), "--data-dir"])
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist"))
                .stderr(Stdio::null())
                .spawn()
                .expect("agent starts")
        })
        .collect();
    let out = coordinator.wait_with_output().expect("coordinator ends");
    let rest: Vec<String> = stderr.lines().map_while(Result::ok).collect();
    assert!(out.status.success(), "coordinator failed: {rest:?}");
    let rounds: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        assert_eq!(r["status"], "ok");
        assert_eq!(r["succeeded"], 2);
    }
    assert!(rounds[1]["accuracy"].as_f64().expect("accuracy") > 0.9);
    // The coordinator told every agent to stop; they exit on their own.
    for mut a in agents {
        let status = a.wait().expect("agent exits");
        assert!(status.success());
    }
}

/// Kills and reaps the agent processes however the test ends.
struct Agents(Vec<std::process::Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for a in &mut self.0 {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

/// The device path as separate processes, as the README runs it with Mosquitto:
/// `pollen-agent` (MQTT mode) per device, `pollen devices`, then `pollen run`.
#[test]
fn pollen_run_trains_on_agent_processes_discovered_over_mosquitto() {
    use std::process::Stdio;

    let addr: std::net::SocketAddr = "127.0.0.1:1883".parse().expect("addr");
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).unwrap_or_else(
        |e| panic!("Mosquitto is not reachable on {addr} ({e}); start it with `mosquitto -d`"),
    );
    let pollen = std::path::Path::new(env!("CARGO_BIN_EXE_pollen"));
    let agent = pollen.with_file_name("pollen-agent");
    assert!(agent.exists(), "{} is missing", agent.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = format!("cli-{:08x}", rand::random::<u32>());
    let mut agents = Agents(
        (0..3)
            .map(|i| {
                let mut cmd = Command::new(&agent);
                if i == 0 {
                    // gw-0 also serves its Prometheus metrics, on a port it picks and logs.
                    cmd.args(["--metrics", "127.0.0.1:0"])
                        .stderr(Stdio::piped());
                } else {
                    cmd.stderr(Stdio::null());
                }
                cmd.env("POLLEN_DEVICE_ID", format!("gw-{i}"))
                    .env("POLLEN_FLEET", &fleet)
                    .env("POLLEN_BROKER", "mqtt://127.0.0.1:1883")
                    .env("POLLEN_SHARD", format!("{i}/3"))
                    .env("POLLEN_WORK_DIR", dir.path().join(format!("gw-{i}")))
                    .env(
                        "POLLEN_DATA_DIR",
                        concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist"),
                    )
                    .spawn()
                    .expect("agent starts")
            })
            .collect(),
    );
    let metrics_url = {
        use std::io::{BufRead, BufReader};
        let log = agents.0[0].stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(log).lines().map_while(Result::ok) {
                if let Some(at) = line.find("Prometheus metrics on http://") {
                    // Up to and including "/metrics": the log line may carry colour codes after.
                    let url = &line[at + "Prometheus metrics on ".len()..];
                    let end = url
                        .find("/metrics")
                        .map_or(url.len(), |i| i + "/metrics".len());
                    let _ = tx.send(url[..end].to_string());
                }
            }
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("pollen-agent --metrics logs its URL")
    };

    // The fleet as `pollen devices --json` sees it, once every agent has said it is online.
    let mut listed = Vec::new();
    for _ in 0..30 {
        let out = Command::new(pollen)
            .args(["devices", "--json", "--wait", "1s", "--fleet", &fleet])
            .output()
            .expect("pollen devices runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        listed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .filter(|d| d["online"] == true)
            .collect();
        if listed.len() == 3 {
            break;
        }
    }
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        listed.iter().all(|d| d["num_examples"] == 20_000),
        "{listed:?}"
    );

    let out = Command::new(pollen)
        .args([
            "run",
            "--fleet",
            &fleet,
            "--rounds",
            "2",
            "--json",
            "--runs-dir",
        ])
        .arg(dir.path().join("runs"))
        .output()
        .expect("pollen run runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("3 devices selected"), "{stderr}");
    let rounds: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(rounds.len(), 2, "{stderr}");
    for r in &rounds {
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["succeeded"], 2, "{r}");
    }
    assert!(rounds[1]["accuracy"].as_f64().expect("accuracy") > 0.9);
    // gw-0's own metrics count the fits the run records say it contributed.
    let contributed = rounds
        .iter()
        .filter(|r| {
            r["participants"]
                .as_array()
                .is_some_and(|p| p.iter().any(|id| id == "gw-0"))
        })
        .count() as u64;
    let metrics = http_get(&metrics_url);
    let fits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pollen_agent_commands_total{outcome=\"fit_done\"} "))
        .unwrap_or_else(|| panic!("no fit counter in\n{metrics}"))
        .parse()
        .expect("a count");
    assert_eq!(fits, contributed, "{metrics}");
    drop(agents);
}

/// GET over a plain TCP connection, for the tests that run without an async runtime.
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The README's "Train on your own data" as a user does it: inspect a CSV, split it into one
/// file per device, start a `pollen-agent` per file, and run the shipped spec on them with
/// `pollen run`; then a second run with another model on the same agents.
#[test]
fn agents_on_files_of_their_own_train_two_runs_of_different_models() {
    use std::process::Stdio;

    let addr: std::net::SocketAddr = "127.0.0.1:1883".parse().expect("addr");
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).unwrap_or_else(
        |e| panic!("Mosquitto is not reachable on {addr} ({e}); start it with `mosquitto -d`"),
    );
    let pollen = std::path::Path::new(env!("CARGO_BIN_EXE_pollen"));
    let agent = pollen.with_file_name("pollen-agent");
    assert!(agent.exists(), "{} is missing", agent.display());
    let checkout = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = checkout.join("data/basicmotions/basicmotions_train.csv");
    let dir = tempfile::tempdir().expect("tempdir");

    let out = Command::new(pollen)
        .args(["data", "inspect"])
        .arg(&data)
        .args(["--label", "activity"])
        .output()
        .expect("pollen data inspect runs");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains("4000 rows, 9 columns") && shown.contains("walking=1000"),
        "{shown}"
    );

    let out = Command::new(pollen)
        .args(["data", "split"])
        .arg(&data)
        .args(["--parts", "4", "--group", "recording", "--out"])
        .arg(dir.path().join("devices"))
        .output()
        .expect("pollen data split runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().expect("path").to_string())
        .collect();
    assert_eq!(files.len(), 4, "{files:?}");

    // A fifth device whose log has no gyroscope z column: it must not be selected.
    let misfit = dir.path().join("no-gyr-z.csv");
    let kept: String = std::fs::read_to_string(&files[0])
        .expect("split file")
        .lines()
        .map(|l| {
            let mut cells: Vec<&str> = l.split(',').collect();
            cells.remove(7);
            cells.join(",") + "\n"
        })
        .collect();
    std::fs::write(&misfit, kept).expect("write");
    let mut files = files;
    files.push(misfit.display().to_string());
    let fleet = format!("own-{:08x}", rand::random::<u32>());
    let _agents = Agents(
        files
            .iter()
            .enumerate()
            .map(|(i, file)| {
                Command::new(&agent)
                    .args(["--data", file])
                    .env("POLLEN_DEVICE_ID", format!("watch-{i}"))
                    .env("POLLEN_FLEET", &fleet)
                    .env("POLLEN_BROKER", "mqtt://127.0.0.1:1883")
                    .env("POLLEN_WORK_DIR", dir.path().join(format!("watch-{i}")))
                    .env_remove("POLLEN_SHARD")
                    .env_remove("POLLEN_DATA_DIR")
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("agent starts")
            })
            .collect(),
    );
    let mut listed = Vec::new();
    for _ in 0..30 {
        let out = Command::new(pollen)
            .args(["devices", "--json", "--wait", "1s", "--fleet", &fleet])
            .output()
            .expect("pollen devices runs");
        listed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .filter(|d| d["online"] == true)
            .collect();
        if listed.len() == 5 {
            break;
        }
    }
    assert_eq!(listed.len(), 5, "{listed:?}");
    for d in &listed {
        // Each device announces its own file: 10 recordings of 100 readings.
        assert_eq!(d["data"]["format"], "csv", "{d}");
        assert_eq!(d["data"]["rows"], 1000, "{d}");
        let columns = d["data"]["columns"].as_array().expect("columns").len();
        assert_eq!(
            columns,
            if d["device_id"] == "watch-4" { 8 } else { 9 },
            "{d}"
        );
    }

    let spec = checkout.join("workflows/basicmotions.toml");
    let gru = dir.path().join("basicmotions-gru.toml");
    let text = std::fs::read_to_string(&spec).expect("spec");
    let model_at = text.find("[model]").expect("[model]");
    let data_at = text.find("[data]").expect("[data]");
    std::fs::write(
        &gru,
        format!(
            "{}[model]\nfamily = \"rnn\"\ncell = \"gru\"\nhidden_size = [32]\n\n{}",
            &text[..model_at].replace("name = \"basicmotions\"", "name = \"basicmotions-gru\""),
            &text[data_at..].replace("learning_rate = 0.002", "learning_rate = 0.01")
        ),
    )
    .expect("spec");
    for (spec, rounds) in [(&spec, 8), (&gru, 8)] {
        let out = Command::new(pollen)
            .arg("run")
            .arg(spec)
            .args([
                "--fleet",
                &fleet,
                "--rounds",
                &rounds.to_string(),
                "--json",
                "--runs-dir",
            ])
            .arg(dir.path().join("runs"))
            .current_dir(&checkout)
            .output()
            .expect("pollen run runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("4 devices selected"), "{stderr}");
        assert!(
            stderr.contains("device watch-4 left out: its data has no column [\"gyr_z\"]"),
            "{stderr}"
        );
        let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        assert_eq!(records.len(), rounds, "{stderr}");
        for r in &records {
            assert_eq!(
                (r["status"].as_str(), r["failed"].as_u64()),
                (Some("ok"), Some(0)),
                "{r}"
            );
        }
        let last = &records[rounds - 1];
        assert_eq!(last["evaluation"], "centralized");
        let accuracy = last["metrics"]["accuracy"].as_f64().expect("accuracy");
        assert!(
            accuracy > 0.8,
            "{} after {rounds} rounds: {accuracy}",
            spec.display()
        );
    }
}

/// A spec's `[warm_start]` starts a run from an earlier run's last checkpoint (its accuracy
/// before round 1 is the earlier run's, not a fresh model's), and refuses another model's.
#[test]
fn a_warm_started_run_begins_from_the_earlier_runs_model() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let runs = tempfile::tempdir().expect("tempdir");
    let pollen = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pollen"))
            .args(args)
            .arg("--runs-dir")
            .arg(runs.path())
            .current_dir(&repo)
            .output()
            .expect("pollen runs")
    };
    let first = pollen(&[
        "simulate",
        "--transport",
        "in-process",
        "--rounds",
        "3",
        "--clients",
        "10",
        "--json",
    ]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let last: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&first.stdout)
            .lines()
            .last()
            .expect("rounds"),
    )
    .expect("JSON");
    let earlier = last["accuracy"].as_f64().expect("accuracy");
    let run_id = last["run_id"].as_str().expect("run id").to_string();

    let spec = std::fs::read_to_string(repo.join("workflows/mnist-2nn.toml")).expect("spec");
    let warm = runs.path().join("warm.toml");
    std::fs::write(&warm, format!("{spec}\n[warm_start]\nrun = \"{run_id}\"\n")).expect("write");
    let second = pollen(&[
        "simulate",
        "--config",
        warm.to_str().expect("utf-8"),
        "--transport",
        "in-process",
        "--rounds",
        "1",
        "--clients",
        "10",
    ]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{run_id}/models/round-0003.safetensors")),
        "{stderr}"
    );
    let before: f64 = stderr
        .split("before round 1, ")
        .nth(1)
        .and_then(|rest| rest.split("accuracy ").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy before round 1: {stderr}"));
    // The same model evaluated on the same holdout: the earlier run's final accuracy, where
    // fresh weights score about 0.1.
    assert!((before - earlier).abs() < 1e-3, "{before} vs {earlier}");

    let other = runs.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "{}\n[warm_start]\nrun = \"{run_id}\"\n",
            spec.replace("model = \"mnist-2nn\"", "model = \"mnist-cnn\"")
        ),
    )
    .expect("write");
    let refused = pollen(&[
        "simulate",
        "--config",
        other.to_str().expect("utf-8"),
        "--transport",
        "in-process",
        "--rounds",
        "1",
        "--clients",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("this run trains a"), "{stderr}");
}
