//! Run records: a directory per run and an embedded SQLite database of runs and rounds.
//!
//! ```text
//! runs/
//!   pollen.db                      runs and rounds (SQLite), for listing and resuming
//!   <run-id>/
//!     spec.toml                    the run spec exactly as used, seed included
//!     metrics.jsonl                one RoundRecord per line
//!     models/round-0001.safetensors  the global model after each round (PyTorch layout)
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::counters::CountersSnapshot;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run database {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("run record could not be serialized: {0}")]
    Json(#[from] serde_json::Error),
}

/// Whether a round produced a new global model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundStatus {
    Ok,
    Failed,
}

/// One client's failure in a round, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub client: String,
    pub reason: String,
    /// Why a `rejected` answer was refused (`digest`, `shape`, `non_finite`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<String>,
    pub message: String,
}

/// What an asynchronous (FedBuff) model version was made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AsyncRecord {
    /// Mean and largest staleness (model versions between the one an update was trained on
    /// and the one it was folded into) of the updates in this version.
    pub mean_staleness: f64,
    pub max_staleness: u64,
    /// Updates dropped since the previous version because they were staler than the limit.
    pub dropped_stale: usize,
    /// Devices training when this version was published.
    pub in_flight: usize,
}

/// Everything recorded about one round; also what `pollen simulate --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub run_id: String,
    pub round: u64,
    pub status: RoundStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Test accuracy of the global model after this round (centralized evaluation if the run
    /// has one, else the federated evaluation), if evaluated.
    pub accuracy: Option<f64>,
    /// Test loss matching `accuracy`.
    pub loss: Option<f64>,
    /// Every metric of the evaluation `accuracy` and `loss` come from (centralized if the run
    /// has one, else federated): what a task reports, such as macro-F1, RMSE or ROC AUC.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The key of `metrics` the run is judged by (`accuracy`, `rmse`, `auc`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_metric: Option<String>,
    /// Where `metrics` come from: `centralized` or `federated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<String>,
    pub sampled: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub failures_by_reason: BTreeMap<String, usize>,
    /// Rejected answers by why they were refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejections: BTreeMap<String, usize>,
    /// Clients still training when the round closed on its target (`close_after`); their
    /// results were dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stragglers: Vec<String>,
    /// How the fit phase ended: `all_answered`, `target` or `deadline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure: Option<String>,
    /// Example-weighted mean of the clients' training loss.
    pub train_loss: Option<f64>,
    pub train_metrics: BTreeMap<String, f64>,
    pub federated_loss: Option<f64>,
    pub federated_metrics: BTreeMap<String, f64>,
    /// Wall time of the whole round: fit, aggregation, evaluation and recording.
    pub seconds: f64,
    pub fit_seconds: f64,
    pub aggregate_seconds: f64,
    pub evaluate_seconds: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub late_replies: u64,
    pub rejected_updates: u64,
    pub participants: Vec<String>,
    pub failures: Vec<FailureRecord>,
    /// Differential privacy spent up to this round, for runs with DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::strategy::PrivacySpent>,
    /// FedBuff runs: staleness of this version's updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<AsyncRecord>,
    pub finished_at: String,
}

impl RoundRecord {
    /// Copies the counters that happened during the round.
    pub fn with_counters(mut self, delta: &CountersSnapshot) -> Self {
        self.bytes_sent = delta.bytes_sent;
        self.bytes_received = delta.bytes_received;
        self.late_replies = delta.replies_late;
        self.rejected_updates = delta.updates_rejected;
        self
    }
}

/// A row of the runs table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub status: String,
    pub seed: u64,
    pub num_rounds: u64,
    pub last_round: u64,
    pub dir: String,
}

/// A run with its latest and best accuracy: what run lists show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOverview {
    #[serde(flatten)]
    pub run: RunRow,
    /// Accuracy after the last evaluated round.
    pub accuracy: Option<f64>,
    pub best_accuracy: Option<f64>,
    /// The metric the run is judged by, its value after the last round that has it, and its
    /// best value (the highest, or the lowest for errors and losses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<f64>,
}

/// Whether smaller values of a metric are better (errors and losses).
pub fn lower_is_better(metric: &str) -> bool {
    matches!(metric, "rmse" | "mae" | "loss" | "mean_score") || metric.ends_with("loss")
}

/// The runs directory and its database.
pub struct RunStore {
    root: PathBuf,
    db_path: PathBuf,
    db: Mutex<Connection>,
}

/// A `runs` row selected as `id, name, created_at, status, seed, num_rounds, last_round, dir`.
fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        name: r.get(1)?,
        created_at: r.get(2)?,
        status: r.get(3)?,
        seed: r.get::<_, i64>(4)? as u64,
        num_rounds: r.get::<_, i64>(5)? as u64,
        last_round: r.get::<_, i64>(6)? as u64,
        dir: r.get(7)?,
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl RunStore {
    /// Opens (creating if needed) `root` and `root/pollen.db`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Arc<Self>, RecordError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io(&root))?;
        let db_path = root.join("pollen.db");
        let db_err = |source| RecordError::Db {
            path: db_path.clone(),
            source,
        };
        let conn = Connection::open(&db_path).map_err(db_err)?;
        // WAL + NORMAL: a round's record survives a process crash, and a commit costs no fsync
        // of the main database file on the round's critical path.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS runs (
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
        )
        .map_err(db_err)?;
        Ok(Arc::new(Self {
            root,
            db_path,
            db: Mutex::new(conn),
        }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn db_err(&self) -> impl FnOnce(rusqlite::Error) -> RecordError + '_ {
        move |source| RecordError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    /// Creates a run: its directory, its spec file and its row. The id is
    /// `<name>-<UTC yyyymmdd-hhmmss>-<4 hex>`.
    pub fn create_run(
        self: &Arc<Self>,
        name: &str,
        spec_toml: &str,
        seed: u64,
        num_rounds: u64,
    ) -> Result<RunHandle, RecordError> {
        let now = chrono::Utc::now();
        let suffix: u16 = rand::random();
        let id = format!("{name}-{}-{suffix:04x}", now.format("%Y%m%d-%H%M%S"));
        let dir = self.root.join(&id);
        let models = dir.join("models");
        fs::create_dir_all(&models).map_err(io(&models))?;
        let spec_path = dir.join("spec.toml");
        fs::write(&spec_path, spec_toml).map_err(io(&spec_path))?;
        let metrics_path = dir.join("metrics.jsonl");
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io(&metrics_path))?;
        self.db()
            .execute(
                "INSERT INTO runs (id, name, created_at, status, seed, num_rounds, dir, spec)
                 VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7)",
                params![
                    id,
                    name,
                    now.to_rfc3339(),
                    seed as i64,
                    num_rounds as i64,
                    dir.display().to_string(),
                    spec_toml
                ],
            )
            .map_err(self.db_err())?;
        Ok(RunHandle {
            id,
            dir,
            store: self.clone(),
            metrics: Mutex::new(metrics),
        })
    }

    /// All runs, newest first.
    pub fn list_runs(&self) -> Result<Vec<RunRow>, RecordError> {
        let db = self.db();
        let mut stmt = db
            .prepare(
                "SELECT id, name, created_at, status, seed, num_rounds, last_round, dir
                 FROM runs ORDER BY created_at DESC, id DESC",
            )
            .map_err(self.db_err())?;
        let rows = stmt
            .query_map([], run_row)
            .map_err(self.db_err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db_err())?;
        Ok(rows)
    }

    /// All runs with their latest and best accuracy, newest first.
    pub fn overviews(&self) -> Result<Vec<RunOverview>, RecordError> {
        self.list_runs()?
            .into_iter()
            .map(|run| self.overview(run))
            .collect()
    }

    /// `run` with its latest and best accuracy.
    pub fn overview(&self, run: RunRow) -> Result<RunOverview, RecordError> {
        let db = self.db();
        let mut stmt = db
            .prepare_cached(
                "SELECT (SELECT accuracy FROM rounds WHERE run_id = ?1 AND accuracy IS NOT NULL
                         ORDER BY round DESC LIMIT 1),
                        (SELECT MAX(accuracy) FROM rounds WHERE run_id = ?1)",
            )
            .map_err(self.db_err())?;
        let (accuracy, best_accuracy) = stmt
            .query_row([&run.id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.db_err())?;
        drop(stmt);
        drop(db);
        let rounds = self.rounds(&run.id)?;
        let metric = rounds.iter().rev().find_map(|r| r.primary_metric.clone());
        let values: Vec<f64> = match &metric {
            Some(m) => rounds
                .iter()
                .filter_map(|r| r.metrics.get(m).copied())
                .collect(),
            None => Vec::new(),
        };
        let best = metric.as_deref().and_then(|m| {
            let lower = lower_is_better(m);
            values
                .iter()
                .copied()
                .reduce(|a, b| if (b < a) == lower { b } else { a })
        });
        Ok(RunOverview {
            run,
            accuracy,
            best_accuracy,
            value: values.last().copied(),
            best,
            metric,
        })
    }

    /// One run's row and its spec (TOML), if it exists.
    pub fn run(&self, run_id: &str) -> Result<Option<(RunRow, String)>, RecordError> {
        self.db()
            .query_row(
                "SELECT id, name, created_at, status, seed, num_rounds, last_round, dir, spec
                 FROM runs WHERE id = ?1",
                [run_id],
                |r| Ok((run_row(r)?, r.get(8)?)),
            )
            .optional()
            .map_err(self.db_err())
    }

    /// The recorded rounds of a run, in order.
    pub fn rounds(&self, run_id: &str) -> Result<Vec<RoundRecord>, RecordError> {
        let db = self.db();
        let mut stmt = db
            .prepare("SELECT record FROM rounds WHERE run_id = ?1 ORDER BY round")
            .map_err(self.db_err())?;
        let json: Vec<String> = stmt
            .query_map([run_id], |r| r.get(0))
            .map_err(self.db_err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db_err())?;
        json.iter()
            .map(|j| serde_json::from_str(j).map_err(RecordError::from))
            .collect()
    }

    /// The status of a run, if it exists.
    pub fn run_status(&self, run_id: &str) -> Result<Option<String>, RecordError> {
        self.db()
            .query_row("SELECT status FROM runs WHERE id = ?1", [run_id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.db_err())
    }
}

/// An open run: appends round records and checkpoints.
pub struct RunHandle {
    id: String,
    dir: PathBuf,
    store: Arc<RunStore>,
    metrics: Mutex<File>,
}

impl RunHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the checkpoint written after `round`.
    pub fn checkpoint_path(&self, round: u64) -> PathBuf {
        self.dir
            .join("models")
            .join(format!("round-{round:04}.safetensors"))
    }

    /// Writes the round's checkpoint (when given), its metrics line and its database row, in
    /// that order, so that a recorded round always has its model on disk.
    pub fn record_round(
        &self,
        record: &RoundRecord,
        checkpoint: Option<&[u8]>,
    ) -> Result<(), RecordError> {
        let checkpoint = match checkpoint {
            Some(bytes) => {
                let path = self.checkpoint_path(record.round);
                let tmp = path.with_extension("safetensors.tmp");
                fs::write(&tmp, bytes).map_err(io(&tmp))?;
                fs::rename(&tmp, &path).map_err(io(&path))?;
                Some(path.display().to_string())
            }
            None => None,
        };
        let line = serde_json::to_string(record)?;
        {
            let mut f = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
            let path = self.dir.join("metrics.jsonl");
            writeln!(f, "{line}").map_err(io(&path))?;
            f.flush().map_err(io(&path))?;
        }
        let status = match record.status {
            RoundStatus::Ok => "ok",
            RoundStatus::Failed => "failed",
        };
        let db = self.store.db();
        db.execute(
            "INSERT OR REPLACE INTO rounds (run_id, round, status, accuracy, loss, checkpoint, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                self.id,
                record.round as i64,
                status,
                record.accuracy,
                record.loss,
                checkpoint,
                line
            ],
        )
        .map_err(self.store.db_err())?;
        db.execute(
            "UPDATE runs SET last_round = MAX(last_round, ?2) WHERE id = ?1",
            params![self.id, record.round as i64],
        )
        .map_err(self.store.db_err())?;
        Ok(())
    }

    /// Writes `name` into the run's directory (the task manifest, statistics, partitions),
    /// replacing it atomically.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), RecordError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, bytes).map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(())
    }

    /// Marks the run finished (`completed`, `failed`, `cancelled`).
    pub fn finish(&self, status: &str) -> Result<(), RecordError> {
        self.store
            .db()
            .execute(
                "UPDATE runs SET status = ?2 WHERE id = ?1",
                params![self.id, status],
            )
            .map_err(self.store.db_err())?;
        Ok(())
    }
}
