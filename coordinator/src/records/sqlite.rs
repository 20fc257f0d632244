//! The run database as a SQLite file in the runs directory: the embedded default, nothing to
//! run beside the coordinator.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::RunRow;
use super::db::{DbError, MIGRATIONS, NewRun, RoundRow, RunDb, latest_version, sql, too_new};

pub struct SqliteDb {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// `$N` placeholders as SQLite's positional `?N`.
fn q(sql: &str) -> String {
    sql.replace('$', "?")
}

/// A `runs` row selected as `id, name, created_at, status, seed, num_rounds, last_round, dir,
/// heartbeat_at`.
fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(RunRow, Option<String>)> {
    Ok((
        RunRow {
            id: r.get(0)?,
            name: r.get(1)?,
            created_at: r.get(2)?,
            status: r.get(3)?,
            seed: r.get::<_, i64>(4)? as u64,
            num_rounds: r.get::<_, i64>(5)? as u64,
            last_round: r.get::<_, i64>(6)? as u64,
            dir: r.get(7)?,
        },
        r.get(8)?,
    ))
}

impl SqliteDb {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = Self {
            path: path.to_path_buf(),
            conn: Mutex::new(Connection::open(path).map_err(|e| DbError {
                database: path.display().to_string(),
                message: e.to_string(),
            })?),
        };
        db.migrate()?;
        Ok(db)
    }

    fn err(&self) -> impl FnOnce(rusqlite::Error) -> DbError + '_ {
        move |e| DbError {
            database: self.describe(),
            message: e.to_string(),
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn migrate(&self) -> Result<(), DbError> {
        let mut conn = self.conn();
        // WAL + NORMAL: a round's record survives a process crash, and a commit costs no fsync
        // of the main database file on the round's critical path.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;",
        )
        .map_err(self.err())?;
        conn.execute(sql::MIGRATIONS_TABLE, [])
            .map_err(self.err())?;
        let version: u32 = conn
            .query_row(sql::SCHEMA_VERSION, [], |r| r.get(0))
            .map_err(self.err())?;
        if version > latest_version() {
            return Err(too_new(self.describe(), version));
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > version) {
            // IMMEDIATE: two processes opening one database migrate one after the other.
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(self.err())?;
            let now: u32 = tx
                .query_row(sql::SCHEMA_VERSION, [], |r| r.get(0))
                .map_err(self.err())?;
            if now >= m.version {
                continue;
            }
            tx.execute_batch(m.sqlite).map_err(self.err())?;
            tx.execute(
                &q(sql::RECORD_MIGRATION),
                params![m.version, m.what, chrono::Utc::now().to_rfc3339()],
            )
            .map_err(self.err())?;
            tx.commit().map_err(self.err())?;
        }
        Ok(())
    }
}

impl RunDb for SqliteDb {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn insert_run(&self, run: &NewRun<'_>) -> Result<(), DbError> {
        self.conn()
            .execute(
                &q(sql::INSERT_RUN),
                params![
                    run.id,
                    run.name,
                    run.created_at,
                    run.seed as i64,
                    run.num_rounds as i64,
                    run.dir,
                    run.spec,
                    run.status
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    fn list_runs(&self) -> Result<Vec<(RunRow, Option<String>)>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql::LIST_RUNS).map_err(self.err())?;
        let rows = stmt
            .query_map([], run_row)
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    fn run(&self, id: &str) -> Result<Option<(RunRow, Option<String>, String)>, DbError> {
        self.conn()
            .query_row(&q(sql::RUN), [id], |r| {
                let (row, beat) = run_row(r)?;
                Ok((row, beat, r.get(9)?))
            })
            .optional()
            .map_err(self.err())
    }

    fn accuracies(&self, id: &str) -> Result<(Option<f64>, Option<f64>), DbError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&q(sql::ACCURACIES))
            .map_err(self.err())?;
        stmt.query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())
    }

    fn round_records(&self, id: &str) -> Result<Vec<String>, DbError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&q(sql::ROUND_RECORDS))
            .map_err(self.err())?;
        let rows = stmt
            .query_map([id], |r| r.get(0))
            .map_err(self.err())?
            .collect::<Result<Vec<String>, _>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    fn commit_round(&self, round: &RoundRow<'_>, now: &str) -> Result<(), DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err())?;
        tx.execute(
            &q(sql::UPSERT_ROUND),
            params![
                round.run_id,
                round.round as i64,
                round.status,
                round.accuracy,
                round.loss,
                round.checkpoint,
                round.record
            ],
        )
        .map_err(self.err())?;
        tx.execute(
            &q(sql::ADVANCE_RUN),
            params![round.run_id, round.round as i64, now],
        )
        .map_err(self.err())?;
        tx.commit().map_err(self.err())
    }

    fn set_status(&self, id: &str, status: &str) -> Result<(), DbError> {
        self.conn()
            .execute(&q(sql::SET_STATUS), params![id, status])
            .map_err(self.err())?;
        Ok(())
    }

    fn claim(
        &self,
        id: &str,
        status: &str,
        heartbeat: Option<&str>,
        now: &str,
    ) -> Result<bool, DbError> {
        let changed = self
            .conn()
            .execute(&q(sql::CLAIM), params![id, status, heartbeat, now])
            .map_err(self.err())?;
        Ok(changed == 1)
    }

    fn heartbeat(&self, id: &str, now: &str) -> Result<(), DbError> {
        self.conn()
            .execute(&q(sql::HEARTBEAT), params![id, now])
            .map_err(self.err())?;
        Ok(())
    }

    fn schema_version(&self) -> Result<u32, DbError> {
        self.conn()
            .query_row(sql::SCHEMA_VERSION, [], |r| r.get(0))
            .map_err(self.err())
    }
}
