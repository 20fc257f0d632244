//! The run database behind [`super::RunStore`]: one interface, two engines (SQLite in the runs
//! directory, the embedded default; PostgreSQL for a coordinator service whose state outlives
//! its machine), and the schema migrations both apply.

use super::RunRow;

/// A database error, naming the database (never its password).
#[derive(Debug, thiserror::Error)]
#[error("run database {database}: {message}")]
pub struct DbError {
    pub database: String,
    pub message: String,
}

/// A round as the database keeps it.
pub struct RoundRow<'a> {
    pub run_id: &'a str,
    pub round: u64,
    pub status: &'a str,
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub checkpoint: Option<&'a str>,
    /// The whole [`super::RoundRecord`] as JSON.
    pub record: &'a str,
}

/// A run's row as created.
pub struct NewRun<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub created_at: &'a str,
    pub seed: u64,
    pub num_rounds: u64,
    pub dir: &'a str,
    pub spec: &'a str,
    /// `running` (its coordinator starts it now) or `queued` (a service will).
    pub status: &'a str,
}

/// What [`super::RunStore`] needs of a database. Every method is one transaction.
pub trait RunDb: Send + Sync {
    /// Where it is, for messages (`sqlite:runs/pollen.db`, `postgres://host/db`).
    fn describe(&self) -> String;
    fn insert_run(&self, run: &NewRun<'_>) -> Result<(), DbError>;
    /// Runs, newest first, each with the time of its coordinator's last heartbeat (RFC 3339).
    fn list_runs(&self) -> Result<Vec<(RunRow, Option<String>)>, DbError>;
    /// One run, its heartbeat and its spec.
    fn run(&self, id: &str) -> Result<Option<(RunRow, Option<String>, String)>, DbError>;
    /// The latest evaluated accuracy and the best, of a run.
    fn accuracies(&self, id: &str) -> Result<(Option<f64>, Option<f64>), DbError>;
    /// The rounds' records (JSON), in round order.
    fn round_records(&self, id: &str) -> Result<Vec<String>, DbError>;
    /// Records a round (replacing a row of the same round) and advances the run's last round,
    /// atomically: a crash leaves both or neither.
    fn commit_round(&self, round: &RoundRow<'_>, now: &str) -> Result<(), DbError>;
    fn set_status(&self, id: &str, status: &str) -> Result<(), DbError>;
    /// Takes a run over for a new coordinator: sets it `running` with a heartbeat at `now`,
    /// only if its status and heartbeat are still `status` and `heartbeat` as read, so that of
    /// two coordinators resuming one run only one succeeds. Whether this one did.
    fn claim(
        &self,
        id: &str,
        status: &str,
        heartbeat: Option<&str>,
        now: &str,
    ) -> Result<bool, DbError>;
    /// The run's coordinator is alive at `now`.
    fn heartbeat(&self, id: &str, now: &str) -> Result<(), DbError>;
    /// The schema version the database is at.
    fn schema_version(&self) -> Result<u32, DbError>;
}

/// One schema change, in both dialects. Versions are applied in order, each in its own
/// transaction with the row that records it, so a database is always at exactly one version.
pub struct Migration {
    pub version: u32,
    pub what: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Every schema version. Version 1 is the schema before migrations existed (created with
/// `IF NOT EXISTS`, so an older `pollen.db` adopts it unchanged).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        what: "runs and rounds",
        sqlite: "CREATE TABLE IF NOT EXISTS runs (
                     id TEXT PRIMARY KEY,
                     name TEXT NOT NULL,
                     created_at TEXT NOT NULL,
                     status TEXT NOT NULL,
                     seed INTEGER NOT NULL,
                     num_rounds INTEGER NOT NULL,
                     last_round INTEGER NOT NULL DEFAULT 0,
                     dir TEXT NOT NULL,
                     spec TEXT NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS rounds (
                     run_id TEXT NOT NULL REFERENCES runs(id),
                     round INTEGER NOT NULL,
                     status TEXT NOT NULL,
                     accuracy REAL,
                     loss REAL,
                     checkpoint TEXT,
                     record TEXT NOT NULL,
                     PRIMARY KEY (run_id, round)
                 );",
        postgres: "CREATE TABLE IF NOT EXISTS runs (
                       id TEXT PRIMARY KEY,
                       name TEXT NOT NULL,
                       created_at TEXT NOT NULL,
                       status TEXT NOT NULL,
                       seed BIGINT NOT NULL,
                       num_rounds BIGINT NOT NULL,
                       last_round BIGINT NOT NULL DEFAULT 0,
                       dir TEXT NOT NULL,
                       spec TEXT NOT NULL
                   );
                   CREATE TABLE IF NOT EXISTS rounds (
                       run_id TEXT NOT NULL REFERENCES runs(id),
                       round BIGINT NOT NULL,
                       status TEXT NOT NULL,
                       accuracy DOUBLE PRECISION,
                       loss DOUBLE PRECISION,
                       checkpoint TEXT,
                       record TEXT NOT NULL,
                       PRIMARY KEY (run_id, round)
                   );",
    },
    Migration {
        version: 2,
        what: "coordinator heartbeats (runs whose coordinator died show as interrupted)",
        sqlite: "ALTER TABLE runs ADD COLUMN heartbeat_at TEXT;",
        postgres: "ALTER TABLE runs ADD COLUMN heartbeat_at TEXT;",
    },
];

/// The newest schema this build knows.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The error for a database that a newer Pollen migrated.
pub fn too_new(database: String, version: u32) -> DbError {
    DbError {
        database,
        message: format!(
            "its schema is at version {version}, newer than this pollen's {}: use a newer pollen",
            latest_version()
        ),
    }
}

/// The queries both engines run, written with `$N` placeholders (SQLite reads them as `?N`).
pub mod sql {
    pub const INSERT_RUN: &str = "INSERT INTO runs
        (id, name, created_at, status, seed, num_rounds, dir, spec, heartbeat_at)
        VALUES ($1, $2, $3, $8, $4, $5, $6, $7, $3)";
    pub const LIST_RUNS: &str =
        "SELECT id, name, created_at, status, seed, num_rounds, last_round, dir, heartbeat_at
         FROM runs ORDER BY created_at DESC, id DESC";
    pub const RUN: &str =
        "SELECT id, name, created_at, status, seed, num_rounds, last_round, dir, heartbeat_at, spec
         FROM runs WHERE id = $1";
    pub const ACCURACIES: &str = "SELECT
        (SELECT accuracy FROM rounds WHERE run_id = $1 AND accuracy IS NOT NULL
         ORDER BY round DESC LIMIT 1),
        (SELECT MAX(accuracy) FROM rounds WHERE run_id = $1)";
    pub const ROUND_RECORDS: &str = "SELECT record FROM rounds WHERE run_id = $1 ORDER BY round";
    pub const UPSERT_ROUND: &str =
        "INSERT INTO rounds (run_id, round, status, accuracy, loss, checkpoint, record)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (run_id, round) DO UPDATE SET status = excluded.status,
             accuracy = excluded.accuracy, loss = excluded.loss,
             checkpoint = excluded.checkpoint, record = excluded.record";
    pub const ADVANCE_RUN: &str = "UPDATE runs SET
        last_round = CASE WHEN last_round < $2 THEN $2 ELSE last_round END, heartbeat_at = $3
        WHERE id = $1";
    pub const SET_STATUS: &str = "UPDATE runs SET status = $2 WHERE id = $1";
    pub const HEARTBEAT: &str = "UPDATE runs SET heartbeat_at = $2 WHERE id = $1";
    pub const CLAIM: &str = "UPDATE runs SET status = 'running', heartbeat_at = $4
        WHERE id = $1 AND status = $2 AND heartbeat_at IS NOT DISTINCT FROM $3";
    pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
        version INTEGER PRIMARY KEY, what TEXT NOT NULL, applied_at TEXT NOT NULL)";
    pub const SCHEMA_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM schema_migrations";
    pub const RECORD_MIGRATION: &str =
        "INSERT INTO schema_migrations (version, what, applied_at) VALUES ($1, $2, $3)";
}
