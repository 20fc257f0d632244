//! Crash resume over the real processes: `pollen coordinator` killed with SIGKILL in the middle
//! of a round while a `pollen proxy` and six simulated agents (`pollen fleet simulate`) keep
//! running, then `pollen coordinator --resume RUN` continuing the run from its records.
//! Needs Mosquitto on 127.0.0.1:1883 (`mosquitto -d`).

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    Killed, free_port, lines, metric, one_off_proxy, require_mosquitto, simulated_fleet, wait_for,
};

use serde_json::Value;

const DEVICES: u64 = 6;
/// Devices sampled per round (fraction_fit 0.5 of 6).
const SAMPLED: u64 = 3;
const ROUNDS: u64 = 5;
/// Short beats, so that the killed coordinator's run shows `interrupted` within a second.
const HEARTBEAT: &str = "300ms";

fn pollen(repo: &std::path::Path, runs: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pollen"));
    c.args(args)
        .arg("--runs-dir")
        .arg(runs)
        .current_dir(repo)
        .env("POLLEN_HEARTBEAT", HEARTBEAT);
    c
}

/// `pollen runs --json`: the one run in `runs`.
fn the_run(repo: &std::path::Path, runs: &std::path::Path) -> Value {
    let out = pollen(repo, runs, &["runs", "--json"])
        .output()
        .expect("pollen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut listed: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON run"))
        .collect();
    assert_eq!(listed.len(), 1, "{text}");
    listed.remove(0)
}

#[test]
fn a_coordinator_killed_mid_round_resumes_its_run_from_the_last_recorded_round() {
    require_mosquitto();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fleet = format!("resume-{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir().expect("tempdir");
    let runs = dir.path().join("runs");

    let _simulator = simulated_fleet(&repo, &fleet, DEVICES);

    // Half the devices per round: which half is the sampler's, so the resumed run must
    // continue its sequence.
    let spec = std::fs::read_to_string(repo.join("workflows/mnist-2nn.toml")).expect("spec");
    let spec_path = dir.path().join("half.toml");
    std::fs::write(
        &spec_path,
        spec.replace("fraction_fit = 0.1", "fraction_fit = 0.5")
            .replace(
                "min_available_clients = 2",
                &format!("min_available_clients = {DEVICES}"),
            ),
    )
    .expect("write spec");

    // The coordinator comes back on the same address, where the proxy's bridges rejoin.
    let listen = format!("127.0.0.1:{}", free_port());
    let start = |extra: &[&str]| {
        let mut args = vec![
            "coordinator",
            "--listen",
            &listen,
            "--json",
            "--wait-for-clients",
            "120s",
        ];
        args.extend_from_slice(extra);
        let mut child = pollen(&repo, &runs, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pollen coordinator starts");
        let rounds = lines(child.stdout.take().expect("piped"));
        let log = lines(child.stderr.take().expect("piped"));
        (child, rounds, log)
    };
    let spec_arg = spec_path.display().to_string();
    let (first, rounds, _log) = start(&["--config", &spec_arg, "--rounds", &ROUNDS.to_string()]);
    let first = Killed(first);

    // The proxy from a config file: a one-off session on the shared broker.
    let (_proxy, proxy_log) =
        one_off_proxy(dir.path(), &fleet, &listen, &["--http", "127.0.0.1:0"]);
    let metrics = wait_for(&proxy_log, "Prometheus metrics on", "pollen proxy");

    // Kill the coordinator once the proxy has carried a round's commands past round 2 to
    // the devices, which are then training: one command per sampled device per round.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = rounds
            .recv_timeout(Duration::from_secs(180))
            .expect("the first rounds");
        seen.push(serde_json::from_str::<Value>(&line).expect("a JSON round"));
    }
    let killed_in = loop {
        let published = metric(&metrics, "pollen_proxy_commands_published_total").unwrap_or(0);
        if published > 2 * SAMPLED {
            break published.div_ceil(SAMPLED);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    drop(first);
    assert!(killed_in < ROUNDS, "the run was too quick to kill mid-run");
    let run = the_run(&repo, &runs);
    let id = run["id"].as_str().expect("id").to_string();
    let recorded = run["last_round"].as_u64().expect("last round");
    assert_eq!(recorded, killed_in - 1, "{run}");

    // Its heartbeat stops: interrupted within three beats.
    let deadline = Instant::now() + Duration::from_secs(10);
    while the_run(&repo, &runs)["status"] != "interrupted" {
        assert!(
            Instant::now() < deadline,
            "the killed run never showed as interrupted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    eprintln!(
        "coordinator killed in round {killed_in}; run {id} interrupted after round {recorded}"
    );
    let resumed_at = Instant::now();
    let (mut second, resumed_rounds, log) = start(&["--resume", &id]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the resumed run did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "the resumed coordinator finished rounds {killed_in}..={ROUNDS} in {:?}",
        resumed_at.elapsed()
    );
    // The readers end at the pipes' end, after the last line.
    let log: Vec<String> = log.iter().collect();
    assert!(status.success(), "{}", log.join("\n"));
    // It continued from round `recorded`'s model, by digest.
    let checkpoint = runs
        .join(&id)
        .join(format!("models/round-{recorded:04}.safetensors"));
    let model =
        pollen_proto::Parameters::decode(&std::fs::read(&checkpoint).expect("checkpoint"), None)
            .expect("a checkpoint");
    let expected = format!(
        "resuming after round {recorded} from the model of round {recorded} (sha256 {})",
        model.encode().sha256
    );
    assert!(
        log.iter().any(|l| l.contains(&expected)),
        "{expected:?} not in {log:#?}"
    );

    // The interrupted round was redone, and every round is recorded once.
    let again: Vec<Value> = resumed_rounds
        .iter()
        .map(|l| serde_json::from_str(&l).expect("a JSON round"))
        .collect();
    assert_eq!(
        again
            .iter()
            .map(|r| r["round"].as_u64().expect("round"))
            .collect::<Vec<_>>(),
        (killed_in..=ROUNDS).collect::<Vec<_>>()
    );
    let run = the_run(&repo, &runs);
    assert_eq!(
        (run["status"].as_str(), run["last_round"].as_u64()),
        (Some("completed"), Some(ROUNDS)),
        "{run}"
    );
    let jsonl = std::fs::read_to_string(runs.join(&id).join("metrics.jsonl")).expect("metrics");
    let records: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
        .collect();
    assert_eq!(
        records
            .iter()
            .map(|r| r["round"].as_u64().expect("round"))
            .collect::<Vec<_>>(),
        (1..=ROUNDS).collect::<Vec<_>>()
    );
    // Each round folded each of its sampled devices' updates once: no update of the killed
    // attempt reached the resumed run.
    for r in &records {
        assert_eq!(r["status"], "ok", "{r}");
        let participants: std::collections::BTreeSet<&str> = r["participants"]
            .as_array()
            .expect("participants")
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        assert_eq!(r["succeeded"].as_u64(), Some(SAMPLED), "{r}");
        assert_eq!(participants.len() as u64, SAMPLED, "{r}");
    }
    let files: Vec<String> = std::fs::read_dir(runs.join(&id).join("models"))
        .expect("models")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files.len() as u64,
        ROUNDS + 1,
        "round 0 and every round: {files:?}"
    );
    assert!(
        records.last().expect("rounds")["accuracy"]
            .as_f64()
            .expect("accuracy")
            > 0.85,
        "{:?}",
        records.last()
    );
}
