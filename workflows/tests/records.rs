//! Run records as an operations team keeps them: the run table in PostgreSQL, read by
//! `pollen runs` and `pollen status`, and a coordinator killed mid-run leaving its run
//! `interrupted` rather than `running` forever. Needs PostgreSQL on 127.0.0.1:5432 (trust
//! authentication, as on this project's machines) or `POLLEN_TEST_POSTGRES`.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A database of its own on the test server, dropped at the end.
struct TestDatabase {
    admin: postgres::Client,
    name: String,
    url: String,
}

impl TestDatabase {
    fn create() -> Self {
        let server = std::env::var("POLLEN_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string());
        let mut admin = postgres::Client::connect(&format!("{server}/postgres"), postgres::NoTls)
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {server} ({e}); start it (pg_ctlcluster 15 main start, or service postgresql start) or set POLLEN_TEST_POSTGRES"
                )
            });
        let name = format!("pollen_cli_{:08x}", rand::random::<u32>());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create the test database");
        let url = format!("{server}/{name}");
        Self { admin, name, url }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = self.admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Kills the process when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const HEARTBEAT: &str = "300ms";

fn pollen(args: &[&str], runs: &std::path::Path, database: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(args)
        .arg("--runs-dir")
        .arg(runs)
        .env("POLLEN_DATABASE", database)
        .env("POLLEN_HEARTBEAT", HEARTBEAT)
        .output()
        .expect("pollen runs")
}

/// `pollen runs --json`, one object per run.
fn runs(runs_dir: &std::path::Path, database: &str) -> Vec<Value> {
    let out = pollen(&["runs", "--json"], runs_dir, database);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON run per line"))
        .collect()
}

fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> Option<Value>) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn runs_recorded_in_postgres_and_a_killed_coordinators_run_shows_interrupted() {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().expect("tempdir");

    // A short run completes, and only the database says so: no pollen.db in the runs
    // directory.
    let done = pollen(
        &[
            "simulate",
            "--transport",
            "in-process",
            "--rounds",
            "2",
            "--clients",
            "4",
            "--json",
        ],
        dir.path(),
        &db.url,
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(!dir.path().join("pollen.db").exists());
    let listed = runs(dir.path(), &db.url);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["status"], "completed");
    assert_eq!(listed[0]["last_round"], 2);

    // A coordinator killed with SIGKILL mid-run: its run is `running` while it lives and
    // `interrupted` once its heartbeat is three beats old.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args([
            "simulate",
            "--transport",
            "in-process",
            "--rounds",
            "1000",
            "--clients",
            "4",
            "--json",
            "--runs-dir",
        ])
        .arg(dir.path())
        .env("POLLEN_DATABASE", &db.url)
        .env("POLLEN_HEARTBEAT", HEARTBEAT)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pollen starts");
    let live = eventually(Duration::from_secs(120), "a live run with a round", || {
        runs(dir.path(), &db.url)
            .into_iter()
            .find(|r| r["status"] == "running" && r["last_round"].as_u64().is_some_and(|n| n >= 1))
    });
    let id = live["id"].as_str().expect("id").to_string();
    // Well past the lease while alive: still running.
    std::thread::sleep(Duration::from_secs(2));
    let still = runs(dir.path(), &db.url);
    assert!(
        still
            .iter()
            .any(|r| r["id"] == id && r["status"] == "running"),
        "{still:?}"
    );
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let _child = Killed(child);
    eventually(Duration::from_secs(10), "the run shows interrupted", || {
        runs(dir.path(), &db.url)
            .into_iter()
            .find(|r| r["id"] == id && r["status"] == "interrupted")
    });
    let status = pollen(&["status", &id], dir.path(), &db.url);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("interrupted"), "{text}");
    // The completed run is untouched.
    let listed = runs(dir.path(), &db.url);
    assert_eq!(
        listed.iter().filter(|r| r["status"] == "completed").count(),
        1,
        "{listed:?}"
    );
}
