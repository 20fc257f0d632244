//! `pollen serve` and its clients over real sockets: runs submitted with `pollen submit` queue
//! and run in turn over a proxy's six simulated agents (Mosquitto on 127.0.0.1:1883,
//! `mosquitto -d`); `pollen stop` and `pollen resume` act on them; `pollen runs` and
//! `pollen status` read them through the service; a service killed with SIGKILL takes its
//! queued and interrupted runs up again when it starts.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{
    Killed, free_port, lines, one_off_proxy, require_mosquitto, simulated_fleet, wait_for,
};

use serde_json::Value;

const DEVICES: u64 = 6;
const HEARTBEAT: &str = "300ms";

fn pollen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(args)
        .env("POLLEN_HEARTBEAT", HEARTBEAT)
        .output()
        .expect("pollen runs")
}

/// A client command that must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let out = pollen(args);
    assert!(
        out.status.success(),
        "pollen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The runs the service lists, by id.
fn runs(server: &str) -> Vec<Value> {
    ok(&["runs", "--json", "--server", server])
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON run"))
        .collect()
}

fn run_of(server: &str, id: &str) -> Value {
    runs(server)
        .into_iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("run {id} is not listed"))
}

/// Waits until run `id` satisfies `check`.
fn until(server: &str, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let run = run_of(server, id);
        if check(&run) {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} never {what}: {run}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `pollen serve` with these settings as flags, or as a settings file (`--config`);
/// the process and its HTTP endpoint.
fn serve(
    repo: &std::path::Path,
    runs: &std::path::Path,
    listen: &str,
    file: Option<&std::path::Path>,
) -> (Killed, String) {
    let runs = runs.display().to_string();
    let settings = [
        ("listen", listen),
        ("http", "127.0.0.1:0"),
        ("wait_for_clients", "120s"),
        ("runs_dir", runs.as_str()),
    ];
    let mut command = Command::new(env!("CARGO_BIN_EXE_pollen"));
    command.arg("serve");
    match file {
        Some(path) => {
            let toml: String = settings
                .iter()
                .map(|(k, v)| format!("{k} = \"{v}\"\n"))
                .collect();
            std::fs::write(path, toml).expect("write settings");
            command.arg("--config").arg(path);
        }
        None => {
            for (k, v) in settings {
                command.arg(format!("--{}", k.replace('_', "-"))).arg(v);
            }
        }
    }
    let mut child = command
        .current_dir(repo)
        .env("POLLEN_HEARTBEAT", HEARTBEAT)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pollen serve starts");
    let log = lines(child.stderr.take().expect("piped"));
    let shown = wait_for(&log, "Dashboard on http://", "pollen serve");
    let addr = shown.split_whitespace().next().expect("an address");
    let url = format!("http://{}", addr.trim_end_matches('/'));
    (Killed(child), url)
}

#[test]
fn runs_submitted_to_pollen_serve_queue_stop_resume_and_survive_a_killed_service() {
    require_mosquitto();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fleet = format!("serve-{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir().expect("tempdir");
    let runs_dir = dir.path().join("runs");

    let _simulator = simulated_fleet(&repo, &fleet, DEVICES);

    let listen = format!("127.0.0.1:{}", free_port());
    let (service, server) = serve(&repo, &runs_dir, &listen, None);
    let _proxy = one_off_proxy(dir.path(), &fleet, &listen, &[]);

    let spec = std::fs::read_to_string(repo.join("workflows/mnist-2nn.toml")).expect("spec");
    let write_spec = |name: &str, rounds: u64| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            spec.replace("name = \"mnist-2nn\"", &format!("name = \"{name}\""))
                .replace("rounds = 50", &format!("rounds = {rounds}"))
                .replace("fraction_fit = 0.1", "fraction_fit = 0.5")
                .replace(
                    "min_available_clients = 2",
                    &format!("min_available_clients = {DEVICES}"),
                ),
        )
        .expect("write spec");
        path.display().to_string()
    };
    let submit = |path: &str| -> String {
        let out = ok(&["submit", path, "--server", &server]);
        let (id, status) = out.trim().split_once(' ').expect("`ID STATUS`");
        assert_eq!(status, "queued", "{out}");
        id.to_string()
    };
    let a = submit(&write_spec("long", 4));
    let b = submit(&write_spec("short", 3));

    // One run at a time: the second waits while the first trains.
    until(&server, &a, "trained a round", |r| {
        r["status"] == "running" && r["last_round"].as_u64() >= Some(1)
    });
    assert_eq!(run_of(&server, &b)["status"], "queued");
    // Stopped mid-run: its rounds so far stay, and the next run starts.
    let stopped = ok(&["stop", &a, "--server", &server]);
    assert_eq!(stopped.trim(), format!("{a} stopping"));
    let a_stopped = until(&server, &a, "stopped", |r| r["status"] == "cancelled");
    let done_before = a_stopped["last_round"].as_u64().expect("last round");
    assert!(done_before < 4, "{a_stopped}");
    until(&server, &b, "started", |r| r["status"] == "running");
    assert_eq!(
        ok(&["resume", &a, "--server", &server]).trim(),
        format!("{a} queued")
    );
    assert_eq!(run_of(&server, &a)["status"], "queued");

    // The service dies with SIGKILL while the second run trains; started again, it takes up
    // the queued run and the interrupted one.
    until(&server, &b, "trained a round", |r| {
        r["last_round"].as_u64() >= Some(1)
    });
    drop(service);
    // The records say so once the dead service's heartbeat is three beats old.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = pollen(&[
            "runs",
            "--json",
            "--runs-dir",
            &runs_dir.display().to_string(),
        ]);
        let text = String::from_utf8_lossy(&listed.stdout);
        let b_now = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["id"] == b);
        if b_now.is_some_and(|r| r["status"] == "interrupted") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{b} never showed interrupted: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Started again from a settings file this time.
    let settings = dir.path().join("serve.toml");
    let (_service, server) = serve(&repo, &runs_dir, &listen, Some(&settings));
    for id in [&a, &b] {
        until(&server, id, "completed", |r| r["status"] == "completed");
    }

    // Every round of each run recorded once, in order, through both services.
    for (id, rounds) in [(&a, 4), (&b, 3)] {
        let status: Value =
            serde_json::from_str(&ok(&["status", id, "--json", "--server", &server]))
                .expect("status JSON");
        let numbers: Vec<u64> = status["rounds"]
            .as_array()
            .expect("rounds")
            .iter()
            .map(|r| r["round"].as_u64().expect("round"))
            .collect();
        assert_eq!(numbers, (1..=rounds).collect::<Vec<_>>(), "{status}");
        assert_eq!(status["run"]["last_round"], rounds, "{status}");
    }

    // What cannot be done is refused with the reason.
    let again = pollen(&["resume", &a, "--server", &server]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("409") && stderr.contains("completed"),
        "{stderr}"
    );
    let nothing = pollen(&["stop", "no-such-run", "--server", &server]);
    let stderr = String::from_utf8_lossy(&nothing.stderr);
    assert!(
        !nothing.status.success() && stderr.contains("404"),
        "{stderr}"
    );
    let elsewhere = dir.path().join("elsewhere.toml");
    std::fs::write(
        &elsewhere,
        std::fs::read_to_string(write_spec("other", 1))
            .expect("spec")
            .replace("fleet = \"default\"", "fleet = \"another-fleet\""),
    )
    .expect("write");
    let foreign = pollen(&[
        "submit",
        &elsewhere.display().to_string(),
        "--server",
        &server,
    ]);
    let stderr = String::from_utf8_lossy(&foreign.stderr);
    assert!(
        !foreign.status.success() && stderr.contains("400") && stderr.contains("another-fleet"),
        "{stderr}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "rounds = 0\n").expect("write");
    let refused = pollen(&["submit", &bad.display().to_string(), "--server", &server]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("400"),
        "{stderr}"
    );
}
