//! The run store's behaviour, the same on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

fn record(run_id: &str, round: u64, accuracy: f64) -> RoundRecord {
    RoundRecord {
        run_id: run_id.into(),
        round,
        status: RoundStatus::Ok,
        error: None,
        accuracy: Some(accuracy),
        loss: Some(1.0 - accuracy),
        metrics: BTreeMap::from([("accuracy".to_string(), accuracy)]),
        primary_metric: Some("accuracy".into()),
        evaluation: Some("centralized".into()),
        sampled: 2,
        succeeded: 2,
        failed: 0,
        failures_by_reason: BTreeMap::new(),
        rejections: BTreeMap::new(),
        stragglers: Vec::new(),
        closure: None,
        train_loss: None,
        train_metrics: BTreeMap::new(),
        federated_loss: None,
        federated_metrics: BTreeMap::new(),
        seconds: 0.1,
        fit_seconds: 0.1,
        aggregate_seconds: 0.0,
        evaluate_seconds: 0.0,
        bytes_sent: 0,
        bytes_received: 0,
        late_replies: 0,
        rejected_updates: 0,
        participants: vec!["a".into(), "b".into()],
        failures: Vec::new(),
        privacy: None,
        asynchronous: None,
        rng_word_pos: None,
        finished_at: now(),
    }
}

const QUICK: Liveness = Liveness {
    every: Duration::from_millis(50),
    lease: Duration::from_millis(400),
};

/// Everything a user of the records relies on, with the runs directory at `root` and the
/// run table in `database`; `make_newer` moves the database's schema past this build's.
fn exercise(root: &Path, database: &Database, make_newer: impl FnOnce()) {
    let store = RunStore::open_with(root, database, QUICK).expect("opens");
    assert_eq!(
        store.schema_version().expect("version"),
        db::latest_version()
    );

    let run = store.create_run("mnist", "rounds = 3", 7, 3).expect("run");
    let checkpoint = b"weights".as_slice();
    run.record_round(&record(run.id(), 1, 0.5), Some(checkpoint))
        .expect("round 1");
    run.record_round(&record(run.id(), 2, 0.9), Some(checkpoint))
        .expect("round 2");
    // A round recorded again (redone) replaces its row: never two rows for one round.
    run.record_round(&record(run.id(), 2, 0.7), Some(checkpoint))
        .expect("round 2 again");
    let rounds = store.rounds(run.id()).expect("rounds");
    assert_eq!(rounds.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(rounds[1].accuracy, Some(0.7));
    assert!(run.checkpoint_path(2).exists());

    let (row, spec) = store.run(run.id()).expect("query").expect("exists");
    assert_eq!(
        (row.status.as_str(), row.last_round, row.seed, spec.as_str()),
        ("running", 2, 7, "rounds = 3")
    );
    let overview = store.overview(row).expect("overview");
    assert_eq!(
        (overview.accuracy, overview.best_accuracy, overview.best),
        (Some(0.7), Some(0.7), Some(0.7))
    );

    // A live coordinator keeps its run `running` past the lease.
    std::thread::sleep(QUICK.lease * 2);
    assert_eq!(
        store.run_status(run.id()).expect("status").as_deref(),
        Some("running")
    );
    run.finish("completed").expect("finish");
    assert_eq!(
        store.run_status(run.id()).expect("status").as_deref(),
        Some("completed")
    );

    // A coordinator that dies (no finish, no more beats) leaves an interrupted run.
    let dying = store.create_run("mnist", "rounds = 3", 8, 3).expect("run");
    let dying_id = dying.id().to_string();
    drop(dying);
    std::thread::sleep(QUICK.lease + Duration::from_millis(300));
    let listed = store.list_runs().expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].id, dying_id, "newest first");
    assert_eq!(listed[0].status, "interrupted");
    assert_eq!(listed[1].status, "completed");
    assert_eq!(store.run_status("no-such-run").expect("status"), None);

    // Resuming: refused for a completed run, for a run whose coordinator still beats, and
    // for a run no one recorded.
    const RESUMABLE: &[&str] = &["interrupted", "cancelled", "failed"];
    let refused = |id: &str| match store.reopen_run(id, RESUMABLE) {
        Ok(_) => panic!("reopening {id} must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(refused(run.id()).contains("completed"));
    assert!(refused("no-such-run").contains("no such run"));
    let crashed = store.create_run("mnist", "rounds = 4", 9, 4).expect("run");
    crashed
        .record_round(&record(crashed.id(), 1, 0.5), Some(checkpoint))
        .expect("round 1");
    let crashed_id = crashed.id().to_string();
    assert!(refused(&crashed_id).contains("alive"));
    // What a SIGKILL in round 2 may leave: its checkpoint written, half its metrics line.
    std::fs::write(crashed.checkpoint_path(2), b"weights of round 2").expect("write");
    {
        let path = crashed.dir().join("metrics.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"run_id\":\"half a").expect("write");
    }
    let dir = crashed.dir().to_path_buf();
    drop(crashed);
    std::thread::sleep(QUICK.lease + Duration::from_millis(300));
    let reopened = store
        .reopen_run(&crashed_id, RESUMABLE)
        .expect("an interrupted run reopens");
    assert_eq!(
        (reopened.num_rounds, reopened.spec.as_str()),
        (4, "rounds = 4")
    );
    assert_eq!(
        reopened.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        [1]
    );
    assert!(dir.join("models/round-0001.safetensors").exists());
    assert!(!dir.join("models/round-0002.safetensors").exists());
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("read");
    assert_eq!(lines.lines().count(), 1, "{lines}");
    // It is running again at once, so a second coordinator cannot take it too.
    assert_eq!(
        store.run_status(&crashed_id).expect("status").as_deref(),
        Some("running")
    );
    assert!(refused(&crashed_id).contains("alive"));
    reopened
        .handle
        .record_round(&record(&crashed_id, 2, 0.8), Some(checkpoint))
        .expect("round 2, redone");
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("read");
    assert_eq!(lines.lines().count(), 2, "{lines}");
    reopened.handle.finish("completed").expect("finish");
    // A service's queue: a queued run is listed as queued (no heartbeat makes it
    // interrupted), starts by being reopened, and a queued run can be settled as cancelled.
    let queued = store
        .queue_run("mnist", "rounds = 2", 3, 2)
        .expect("queued");
    std::thread::sleep(QUICK.lease + Duration::from_millis(100));
    assert_eq!(
        store.run_status(&queued).expect("status").as_deref(),
        Some("queued")
    );
    assert!(
        refused(&queued).contains("it is queued"),
        "a service's run, not a resumable one"
    );
    let started = store
        .reopen_run(&queued, &["queued", "interrupted"])
        .expect("a queued run starts");
    assert!(started.rounds.is_empty());
    assert_eq!(
        store.run_status(&queued).expect("status").as_deref(),
        Some("running")
    );
    assert!(
        !store
            .settle(&queued, "queued", "cancelled")
            .expect("settle"),
        "it runs now"
    );
    drop(started);
    let later = store
        .queue_run("mnist", "rounds = 2", 4, 2)
        .expect("queued");
    assert!(store.settle(&later, "queued", "cancelled").expect("settle"));
    assert_eq!(
        store.run_status(&later).expect("status").as_deref(),
        Some("cancelled")
    );
    // Claims compare the status and heartbeat as read: a stale read claims nothing.
    assert!(
        !store
            .db
            .claim(
                &crashed_id,
                "running",
                Some("1970-01-01T00:00:00+00:00"),
                &now()
            )
            .expect("claim")
    );

    // Opening again migrates nothing and finds everything.
    drop(store);
    let again = RunStore::open_with(root, database, QUICK).expect("reopens");
    assert_eq!(again.list_runs().expect("list").len(), 5);
    drop(again);

    make_newer();
    let Err(e) = RunStore::open_with(root, database, QUICK) else {
        panic!("a database from a newer pollen must be refused");
    };
    assert!(e.to_string().contains("newer than this pollen"), "{e}");
}

#[test]
fn the_run_store_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_file = dir.path().join("pollen.db");
    exercise(dir.path(), &Database::Sqlite, || {
        let conn = rusqlite::Connection::open(&db_file).expect("open");
        conn.execute(
            "INSERT INTO schema_migrations (version, what, applied_at) VALUES (99, 'x', 'now')",
            [],
        )
        .expect("insert");
    });
}

/// A database an old pollen (before migrations) wrote is adopted, its runs kept.
#[test]
fn an_old_sqlite_database_is_migrated_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rusqlite::Connection::open(dir.path().join("pollen.db")).expect("open");
    conn.execute_batch(db::MIGRATIONS[0].sqlite)
        .expect("old schema");
    conn.execute(
        "INSERT INTO runs (id, name, created_at, status, seed, num_rounds, dir, spec)
         VALUES ('old-1', 'old', '2026-01-01T00:00:00+00:00', 'completed', 1, 2, 'd', 's')",
        [],
    )
    .expect("old run");
    drop(conn);
    let store = RunStore::open(dir.path()).expect("migrates");
    assert_eq!(
        store.schema_version().expect("version"),
        db::latest_version()
    );
    let runs = store.list_runs().expect("list");
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].id.as_str(), runs[0].status.as_str()),
        ("old-1", "completed")
    );
}

/// The PostgreSQL server the tests use: `POLLEN_TEST_POSTGRES`, else the machine's own.
fn postgres_server() -> String {
    std::env::var("POLLEN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A database of its own on the test server, dropped at the end.
struct TestDatabase {
    admin: ::postgres::Client,
    name: String,
    url: String,
}

impl TestDatabase {
    fn create() -> Self {
        let server = postgres_server();
        let mut admin = ::postgres::Client::connect(&format!("{server}/postgres"), ::postgres::NoTls)
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {server} ({e}); start it (pg_ctlcluster 15 main start, or service postgresql start) or set POLLEN_TEST_POSTGRES"
                )
            });
        let name = format!("pollen_test_{:08x}", rand::random::<u32>());
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

#[test]
fn the_run_store_on_postgres() {
    let test = TestDatabase::create();
    let url = test.url.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    exercise(dir.path(), &Database::Postgres(url.clone()), || {
        let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
        c.batch_execute(
            "INSERT INTO schema_migrations (version, what, applied_at) VALUES (99, 'x', 'now')",
        )
        .expect("insert");
    });
    drop(test);
}

#[test]
fn database_urls_are_checked() {
    assert_eq!(Database::parse(None), Ok(Database::Sqlite));
    assert_eq!(Database::parse(Some("sqlite")), Ok(Database::Sqlite));
    assert!(matches!(
        Database::parse(Some("postgres://h/db")),
        Ok(Database::Postgres(_))
    ));
    let e = Database::parse(Some("mysql://u:secret@h/db")).expect_err("unsupported");
    assert!(!e.contains("secret"), "{e}");
}
