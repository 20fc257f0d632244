//! The run database in PostgreSQL (`--database postgres://...`): the state of a coordinator
//! service that must outlive its machine, shared by whoever reads the records.
//!
//! The `postgres` client is synchronous and drives its own small runtime, which must not run
//! on a thread of the coordinator's tokio runtime; so one thread of its own owns the
//! connection and runs the queries sent to it, and callers block on the answer as they do on
//! SQLite. A lost connection is opened again on the next query.

use std::sync::Mutex;
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use postgres::{Client, NoTls};

use super::RunRow;
use super::db::{DbError, MIGRATIONS, NewRun, RoundRow, RunDb, latest_version, sql, too_new};

type Job = Box<dyn FnOnce(Result<&mut Client, String>) + Send>;

pub struct PostgresDb {
    /// The URL without its password.
    name: String,
    jobs: Mutex<Sender<Job>>,
}

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Any lock id both processes agree on: migrations take it, so two coordinators starting on
/// one database migrate one after the other.
const MIGRATION_LOCK: i64 = 0x706f_6c6c_656e;

/// `url` without the password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "postgres://(unparsable URL)".into(),
    }
}

fn run_row(r: &postgres::Row) -> (RunRow, Option<String>) {
    (
        RunRow {
            id: r.get(0),
            name: r.get(1),
            created_at: r.get(2),
            status: r.get(3),
            seed: r.get::<_, i64>(4) as u64,
            num_rounds: r.get::<_, i64>(5) as u64,
            last_round: r.get::<_, i64>(6) as u64,
            dir: r.get(7),
        },
        r.get(8),
    )
}

impl PostgresDb {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and brings the schema
    /// up to date.
    pub fn open(url: &str) -> Result<Self, DbError> {
        let name = redact(url);
        let mut config: postgres::Config = url.parse().map_err(|e| DbError {
            database: name.clone(),
            message: format!("not a PostgreSQL URL: {e}"),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("pollen-postgres".into())
            .spawn(move || {
                let mut client: Option<Client> = None;
                for job in rx {
                    if client.as_ref().is_none_or(Client::is_closed) {
                        client = None;
                        match config.connect(NoTls) {
                            Ok(c) => client = Some(c),
                            Err(e) => {
                                job(Err(format!("cannot connect: {e}")));
                                continue;
                            }
                        }
                    }
                    if let Some(c) = client.as_mut() {
                        job(Ok(c));
                    }
                }
            })
            .map_err(|e| DbError {
                database: name.clone(),
                message: format!("cannot start its connection thread: {e}"),
            })?;
        let db = Self {
            name,
            jobs: Mutex::new(tx),
        };
        db.migrate()?;
        Ok(db)
    }

    /// Runs `f` on the connection's thread and waits for its answer.
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<R, postgres::Error> + Send + 'static,
    ) -> Result<R, DbError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |client| {
            let _ = tx.send(match client {
                Ok(c) => f(c).map_err(|e| match e.as_db_error() {
                    Some(db) => format!("{}: {}", db.code().code(), db.message()),
                    None => e.to_string(),
                }),
                Err(e) => Err(e),
            });
        });
        let error = |message: String| DbError {
            database: self.name.clone(),
            message,
        };
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| error("its connection thread has stopped".into()))?;
        rx.recv()
            .map_err(|_| error("its connection thread has stopped".into()))?
            .map_err(error)
    }

    fn migrate(&self) -> Result<(), DbError> {
        let version = self.call(|c| {
            c.batch_execute(sql::MIGRATIONS_TABLE)?;
            let v: i32 = c.query_one(sql::SCHEMA_VERSION, &[])?.get(0);
            Ok(v as u32)
        })?;
        if version > latest_version() {
            return Err(too_new(self.name.clone(), version));
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > version) {
            let (v, what, ddl) = (m.version as i32, m.what, m.postgres);
            self.call(move |c| {
                let mut tx = c.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
                let now: i32 = tx.query_one(sql::SCHEMA_VERSION, &[])?.get(0);
                if now >= v {
                    return tx.commit();
                }
                tx.batch_execute(ddl)?;
                tx.execute(
                    sql::RECORD_MIGRATION,
                    &[&v, &what, &chrono::Utc::now().to_rfc3339()],
                )?;
                tx.commit()
            })?;
        }
        Ok(())
    }
}

impl RunDb for PostgresDb {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn insert_run(&self, run: &NewRun<'_>) -> Result<(), DbError> {
        let (id, name, created_at, dir, spec, status) = (
            run.id.to_string(),
            run.name.to_string(),
            run.created_at.to_string(),
            run.dir.to_string(),
            run.spec.to_string(),
            run.status.to_string(),
        );
        let (seed, rounds) = (run.seed as i64, run.num_rounds as i64);
        self.call(move |c| {
            c.execute(
                sql::INSERT_RUN,
                &[
                    &id,
                    &name,
                    &created_at,
                    &seed,
                    &rounds,
                    &dir,
                    &spec,
                    &status,
                ],
            )
            .map(|_| ())
        })
    }

    fn list_runs(&self) -> Result<Vec<(RunRow, Option<String>)>, DbError> {
        self.call(|c| Ok(c.query(sql::LIST_RUNS, &[])?.iter().map(run_row).collect()))
    }

    fn run(&self, id: &str) -> Result<Option<(RunRow, Option<String>, String)>, DbError> {
        let id = id.to_string();
        self.call(move |c| {
            Ok(c.query_opt(sql::RUN, &[&id])?.map(|r| {
                let (row, beat) = run_row(&r);
                (row, beat, r.get(9))
            }))
        })
    }

    fn accuracies(&self, id: &str) -> Result<(Option<f64>, Option<f64>), DbError> {
        let id = id.to_string();
        self.call(move |c| {
            let r = c.query_one(sql::ACCURACIES, &[&id])?;
            Ok((r.get(0), r.get(1)))
        })
    }

    fn round_records(&self, id: &str) -> Result<Vec<String>, DbError> {
        let id = id.to_string();
        self.call(move |c| {
            Ok(c.query(sql::ROUND_RECORDS, &[&id])?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }

    fn commit_round(&self, round: &RoundRow<'_>, now: &str) -> Result<(), DbError> {
        let (run_id, status, checkpoint, record, now) = (
            round.run_id.to_string(),
            round.status.to_string(),
            round.checkpoint.map(str::to_string),
            round.record.to_string(),
            now.to_string(),
        );
        let (number, accuracy, loss) = (round.round as i64, round.accuracy, round.loss);
        self.call(move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                sql::UPSERT_ROUND,
                &[
                    &run_id,
                    &number,
                    &status,
                    &accuracy,
                    &loss,
                    &checkpoint,
                    &record,
                ],
            )?;
            tx.execute(sql::ADVANCE_RUN, &[&run_id, &number, &now])?;
            tx.commit()
        })
    }

    fn set_status(&self, id: &str, status: &str) -> Result<(), DbError> {
        let (id, status) = (id.to_string(), status.to_string());
        self.call(move |c| c.execute(sql::SET_STATUS, &[&id, &status]).map(|_| ()))
    }

    fn claim(
        &self,
        id: &str,
        status: &str,
        heartbeat: Option<&str>,
        now: &str,
    ) -> Result<bool, DbError> {
        let (id, status, now) = (id.to_string(), status.to_string(), now.to_string());
        let heartbeat = heartbeat.map(str::to_string);
        self.call(move |c| {
            c.execute(sql::CLAIM, &[&id, &status, &heartbeat, &now])
                .map(|n| n == 1)
        })
    }

    fn heartbeat(&self, id: &str, now: &str) -> Result<(), DbError> {
        let (id, now) = (id.to_string(), now.to_string());
        self.call(move |c| c.execute(sql::HEARTBEAT, &[&id, &now]).map(|_| ()))
    }

    fn schema_version(&self) -> Result<u32, DbError> {
        self.call(|c| {
            let v: i32 = c.query_one(sql::SCHEMA_VERSION, &[])?.get(0);
            Ok(v as u32)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            super::redact("postgres://pollen:s3cret@db.example:5432/runs"),
            "postgres://pollen:***@db.example:5432/runs"
        );
        assert_eq!(
            super::redact("postgres://db.example/runs"),
            "postgres://db.example/runs"
        );
    }
}
