//! `pollen fleet simulate` as a load test spreads a fleet: two processes, each half of the
//! devices, against the shared Mosquitto on 127.0.0.1:1883, and `pollen run` training over
//! all of them. Needs Mosquitto on 127.0.0.1:1883 (`mosquitto -d`).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Killed, require_mosquitto};

#[test]
fn two_simulator_processes_make_one_fleet_that_pollen_run_trains() {
    require_mosquitto();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fleet = format!("fsim-{:08x}", rand::random::<u32>());
    let mut shards = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel();
    for index in 0..2 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pollen"))
            .args([
                "fleet",
                "simulate",
                "--devices",
                "6",
                "--shard",
                &format!("{index}/2"),
                "--fleet",
                &fleet,
                "--broker",
                "mqtt://127.0.0.1:1883",
            ])
            .current_dir(&repo)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("pollen fleet simulate starts");
        let stdout = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        shards.push(Killed(child));
    }
    let mut reports: Vec<serde_json::Value> = (0..2)
        .map(|_| {
            let line = rx
                .recv_timeout(Duration::from_secs(180))
                .expect("each simulator reports its devices online");
            serde_json::from_str(&line).expect("one JSON report")
        })
        .collect();
    reports.sort_by_key(|r| r["shard"].as_str().map(str::to_string));
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r["shard"], format!("{i}/2"), "{r}");
        assert_eq!(r["agents"], 3, "{r}");
        assert!(r["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{r}");
        assert!(r["open_files"].as_u64().is_some_and(|n| n >= 3), "{r}");
    }

    // Every device of both processes trains in the round.
    let runs = tempfile::tempdir().expect("tempdir");
    let spec = std::fs::read_to_string(repo.join("workflows/mnist-2nn.toml")).expect("spec");
    let all = runs.path().join("all.toml");
    std::fs::write(
        &all,
        spec.replace("fraction_fit = 0.1", "fraction_fit = 1.0"),
    )
    .expect("w");
    let run = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args([
            "run",
            "--rounds",
            "1",
            "--fleet",
            &fleet,
            "--devices",
            "6",
            "--json",
        ])
        .arg(&all)
        .arg("--runs-dir")
        .arg(runs.path())
        .current_dir(&repo)
        .output()
        .expect("pollen run");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("6 devices selected"), "{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let round: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a round")).expect("JSON");
    assert_eq!(round["succeeded"], 6, "{stdout}");
    let participants: Vec<&str> = round["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    for k in 0..6 {
        assert!(
            participants.contains(&format!("sim-{k:06}").as_str()),
            "{participants:?}"
        );
    }
    assert!(
        round["accuracy"].as_f64().expect("accuracy") > 0.8,
        "{stdout}"
    );
}
