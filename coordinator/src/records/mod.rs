//! Run records: a directory per run and a database of runs and rounds: SQLite in the runs
//! directory (the embedded default) or PostgreSQL ([`Database`]), behind one interface
//! ([`db::RunDb`]) with versioned schema migrations.
//!
//! A running run's coordinator beats a heartbeat into its row; a `running` run whose
//! heartbeat is older than the lease is shown as `interrupted` (its coordinator died).
//!
//! ```text
//! runs/
//!   pollen.db                      runs and rounds (SQLite), unless in PostgreSQL
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
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::counters::CountersSnapshot;

pub mod db;
mod postgres;
mod sqlite;

use db::{NewRun, RoundRow, RunDb};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("run record could not be serialized: {0}")]
    Json(#[from] serde_json::Error),
    #[error("run {run}: {reason}")]
    Resume { run: String, reason: String },
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
    /// Where the client sampler's random stream stood after this round (ChaCha8 word
    /// position), so that a resumed run samples as an uninterrupted one would. Committed with
    /// the round, so that the two cannot disagree after a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng_word_pos: Option<u64>,
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

/// Where the run table lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Database {
    /// `pollen.db` in the runs directory.
    #[default]
    Sqlite,
    /// `postgres://user:password@host:port/database`.
    Postgres(String),
}

impl Database {
    /// `None` or `sqlite`: the file in the runs directory; `postgres://...`: that database.
    pub fn parse(url: Option<&str>) -> Result<Self, String> {
        match url {
            None | Some("" | "sqlite") => Ok(Self::Sqlite),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Self::Postgres(u.to_string()))
            }
            Some(u) => Err(format!(
                "database {:?}: give postgres://user:password@host:port/database, or leave it out for SQLite in the runs directory",
                postgres::redact(u)
            )),
        }
    }
}

/// How a running run shows that its coordinator is alive.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// How often the coordinator beats.
    pub every: Duration,
    /// A `running` run with no beat for this long is `interrupted`.
    pub lease: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::beating_every(Duration::from_secs(10))
    }
}

impl Liveness {
    /// Beats every `every`; three missed beats make a run interrupted.
    pub fn beating_every(every: Duration) -> Self {
        Self {
            every,
            lease: every * 3,
        }
    }

    /// `POLLEN_HEARTBEAT` (e.g. `10s`, the default), which the coordinator and whoever
    /// reads the records must agree on.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("POLLEN_HEARTBEAT") {
            Ok(v) if !v.is_empty() => match humantime::parse_duration(&v) {
                Ok(d) if !d.is_zero() => Ok(Self::beating_every(d)),
                _ => Err(format!(
                    "POLLEN_HEARTBEAT={v:?}: give a duration longer than zero, e.g. 10s"
                )),
            },
            _ => Ok(Self::default()),
        }
    }
}

/// The runs directory and its database.
pub struct RunStore {
    root: PathBuf,
    db: Arc<dyn RunDb>,
    liveness: Liveness,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

impl RunStore {
    /// Opens (creating if needed) `root` and `root/pollen.db`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Arc<Self>, RecordError> {
        Self::open_with(root, &Database::Sqlite, Liveness::default())
    }

    /// Opens `root` with the run table in `database`, migrating its schema to this build's.
    pub fn open_with(
        root: impl Into<PathBuf>,
        database: &Database,
        liveness: Liveness,
    ) -> Result<Arc<Self>, RecordError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io(&root))?;
        let db: Arc<dyn RunDb> = match database {
            Database::Sqlite => Arc::new(sqlite::SqliteDb::open(&root.join("pollen.db"))?),
            Database::Postgres(url) => Arc::new(postgres::PostgresDb::open(url)?),
        };
        Ok(Arc::new(Self { root, db, liveness }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The database, for messages (no password).
    pub fn database(&self) -> String {
        self.db.describe()
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<u32, RecordError> {
        Ok(self.db.schema_version()?)
    }

    /// `running` becomes `interrupted` when the heartbeat is older than the lease.
    fn shown(&self, (mut row, beat): (RunRow, Option<String>)) -> RunRow {
        if row.status == "running" {
            let alive = beat
                .and_then(|b| chrono::DateTime::parse_from_rfc3339(&b).ok())
                .is_some_and(|b| {
                    let age = chrono::Utc::now().signed_duration_since(b);
                    age.to_std().unwrap_or_default() <= self.liveness.lease
                });
            if !alive {
                row.status = "interrupted".into();
            }
        }
        row
    }

    /// Creates a run: its directory, its spec file and its row. The id is
    /// `<name>-<UTC yyyymmdd-hhmmss>-<4 hex>`. Until the handle is dropped, a thread beats the
    /// run's heartbeat.
    pub fn create_run(
        self: &Arc<Self>,
        name: &str,
        spec_toml: &str,
        seed: u64,
        num_rounds: u64,
    ) -> Result<RunHandle, RecordError> {
        let (id, dir) = self.insert(name, spec_toml, seed, num_rounds, "running")?;
        let metrics_path = dir.join("metrics.jsonl");
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io(&metrics_path))?;
        let beating = heartbeat(self.db.clone(), id.clone(), self.liveness.every);
        Ok(RunHandle {
            id,
            dir,
            store: self.clone(),
            metrics: Mutex::new(metrics),
            _beating: beating,
        })
    }

    /// Records a run that a coordinator service will start when its turn comes (status
    /// `queued`; [`Self::reopen_run`] starts it); its id.
    pub fn queue_run(
        &self,
        name: &str,
        spec_toml: &str,
        seed: u64,
        num_rounds: u64,
    ) -> Result<String, RecordError> {
        Ok(self.insert(name, spec_toml, seed, num_rounds, "queued")?.0)
    }

    fn insert(
        &self,
        name: &str,
        spec_toml: &str,
        seed: u64,
        num_rounds: u64,
        status: &str,
    ) -> Result<(String, PathBuf), RecordError> {
        let now = chrono::Utc::now();
        let suffix: u16 = rand::random();
        let id = format!("{name}-{}-{suffix:04x}", now.format("%Y%m%d-%H%M%S"));
        let dir = self.root.join(&id);
        let models = dir.join("models");
        fs::create_dir_all(&models).map_err(io(&models))?;
        let spec_path = dir.join("spec.toml");
        fs::write(&spec_path, spec_toml).map_err(io(&spec_path))?;
        self.db.insert_run(&NewRun {
            id: &id,
            name,
            created_at: &now.to_rfc3339(),
            seed,
            num_rounds,
            dir: &dir.display().to_string(),
            spec: spec_toml,
            status,
        })?;
        Ok((id, dir))
    }

    /// Marks a run that no coordinator holds (queued, interrupted, stopped, failed) with
    /// `status`, if it still shows as `expected`; whether it did. The change is a claim (a
    /// compare-and-set on the status and heartbeat as read), so it loses to a coordinator
    /// taking the run at the same time.
    pub fn settle(&self, id: &str, expected: &str, status: &str) -> Result<bool, RecordError> {
        let Some((row, beat, _)) = self.db.run(id)? else {
            return Ok(false);
        };
        let raw = row.status.clone();
        let shown = self.shown((row, beat.clone())).status;
        if shown != expected || shown == "running" {
            return Ok(false);
        }
        if !self.db.claim(id, &raw, beat.as_deref(), &now())? {
            return Ok(false);
        }
        self.db.set_status(id, status)?;
        Ok(true)
    }

    /// Reopens run `id` to continue it in this process after its coordinator died (or the
    /// run was stopped or failed): takes it over in the database (`running`, heartbeat now;
    /// refused while its coordinator still beats, once completed, or if another coordinator
    /// claimed it first), and makes its directory agree with the database, which alone is
    /// committed atomically: `metrics.jsonl` is rewritten from the recorded rounds (a crash
    /// may have left a line of the interrupted round, or half of one) and checkpoints of
    /// rounds after the last recorded one are removed.
    pub fn reopen_run(
        self: &Arc<Self>,
        id: &str,
        from: &[&str],
    ) -> Result<ReopenedRun, RecordError> {
        let refuse = |reason: String| RecordError::Resume {
            run: id.to_string(),
            reason,
        };
        let Some((row, beat, spec)) = self.db.run(id)? else {
            return Err(refuse(format!("no such run in {}", self.db.describe())));
        };
        let status = row.status.clone();
        match self.shown((row.clone(), beat.clone())).status.as_str() {
            "completed" => return Err(refuse("it is completed; nothing to resume".into())),
            "running" => {
                return Err(refuse(format!(
                    "its coordinator is alive (a heartbeat within the last {:?}); stop it first, or wait until the run shows as interrupted",
                    self.liveness.lease
                )));
            }
            shown if !from.contains(&shown) => {
                return Err(refuse(format!(
                    "it is {shown}; only a run that is {} is taken up here",
                    from.join(" or ")
                )));
            }
            _ => {}
        }
        let rounds = self.rounds(id)?;
        if let Some((i, r)) = rounds
            .iter()
            .enumerate()
            .find(|(i, r)| r.round != *i as u64 + 1)
        {
            return Err(refuse(format!(
                "its recorded rounds are not consecutive from 1 (record {} is round {})",
                i + 1,
                r.round
            )));
        }
        if !self.db.claim(id, &status, beat.as_deref(), &now())? {
            return Err(refuse(
                "another coordinator took it over at the same time".into(),
            ));
        }
        let dir = self.root.join(id);
        let metrics = match Self::align_files(&dir, &rounds) {
            Ok(metrics) => metrics,
            Err(e) => {
                // Handed back as it was, rather than left `running` for nobody.
                let _ = self.db.set_status(id, &status);
                return Err(e);
            }
        };
        let beating = heartbeat(self.db.clone(), id.to_string(), self.liveness.every);
        Ok(ReopenedRun {
            handle: RunHandle {
                id: id.to_string(),
                dir,
                store: self.clone(),
                metrics: Mutex::new(metrics),
                _beating: beating,
            },
            spec,
            num_rounds: row.num_rounds,
            rounds,
        })
    }

    /// Makes a reopened run's directory agree with its recorded `rounds`: checkpoints of later
    /// rounds and temporary files removed, `metrics.jsonl` rewritten; the latter opened for
    /// appending.
    fn align_files(dir: &Path, rounds: &[RoundRecord]) -> Result<File, RecordError> {
        let completed = rounds.len() as u64;
        let models = dir.join("models");
        fs::create_dir_all(&models).map_err(io(&models))?;
        for entry in fs::read_dir(&models).map_err(io(&models))? {
            let path = entry.map_err(io(&models))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let after = name
                .strip_prefix("round-")
                .and_then(|n| n.strip_suffix(".safetensors"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > completed);
            if after || name.ends_with(".tmp") {
                fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        let metrics_path = dir.join("metrics.jsonl");
        let mut text = String::new();
        for r in rounds {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        let tmp = dir.join(".metrics.jsonl.tmp");
        fs::write(&tmp, text).map_err(io(&tmp))?;
        fs::rename(&tmp, &metrics_path).map_err(io(&metrics_path))?;
        OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(io(&metrics_path))
    }

    /// All runs, newest first.
    pub fn list_runs(&self) -> Result<Vec<RunRow>, RecordError> {
        Ok(self
            .db
            .list_runs()?
            .into_iter()
            .map(|r| self.shown(r))
            .collect())
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
        let (accuracy, best_accuracy) = self.db.accuracies(&run.id)?;
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
        Ok(self
            .db
            .run(run_id)?
            .map(|(row, beat, spec)| (self.shown((row, beat)), spec)))
    }

    /// The recorded rounds of a run, in order.
    pub fn rounds(&self, run_id: &str) -> Result<Vec<RoundRecord>, RecordError> {
        self.db
            .round_records(run_id)?
            .iter()
            .map(|j| serde_json::from_str(j).map_err(RecordError::from))
            .collect()
    }

    /// The status of a run, if it exists.
    pub fn run_status(&self, run_id: &str) -> Result<Option<String>, RecordError> {
        Ok(self.run(run_id)?.map(|(row, _)| row.status))
    }
}

/// Beats `id`'s heartbeat every `every` on a thread of its own until the returned sender is
/// dropped. A failed beat is logged: the run goes on, and shows as interrupted if beats keep
/// failing.
fn heartbeat(db: Arc<dyn RunDb>, id: String, every: Duration) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("pollen-heartbeat".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                if let Err(e) = db.heartbeat(&id, &now()) {
                    tracing::warn!("run {id}: heartbeat not recorded: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no heartbeat thread: {e}");
    }
    tx
}

/// A run reopened to be continued ([`RunStore::reopen_run`]).
pub struct ReopenedRun {
    pub handle: RunHandle,
    /// The spec it was created with (TOML, command-line overrides applied).
    pub spec: String,
    pub num_rounds: u64,
    /// Its recorded rounds, `1..=k`.
    pub rounds: Vec<RoundRecord>,
}

/// An open run: appends round records and checkpoints.
pub struct RunHandle {
    id: String,
    dir: PathBuf,
    store: Arc<RunStore>,
    metrics: Mutex<File>,
    /// Dropping it stops the heartbeat.
    _beating: std::sync::mpsc::Sender<()>,
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
            Some(bytes) => Some(self.write_checkpoint(record.round, bytes)?),
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
        self.store.db.commit_round(
            &RoundRow {
                run_id: &self.id,
                round: record.round,
                status,
                accuracy: record.accuracy,
                loss: record.loss,
                checkpoint: checkpoint.as_deref(),
                record: &line,
            },
            &now(),
        )?;
        Ok(())
    }

    /// Writes the checkpoint of `round` (0: the initial model) atomically; its path.
    pub fn write_checkpoint(&self, round: u64, bytes: &[u8]) -> Result<String, RecordError> {
        let path = self.checkpoint_path(round);
        let tmp = path.with_extension("safetensors.tmp");
        fs::write(&tmp, bytes).map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(path.display().to_string())
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
        self.store.db.set_status(&self.id, status)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
