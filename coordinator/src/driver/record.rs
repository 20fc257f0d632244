//! The end of a round (or of a FedBuff version), the same for both disciplines: evaluate the
//! new model (centralized, then federated), build the record from what the fit phase left,
//! write it with the checkpoint, and report it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use pollen_proto::Parameters;

use super::{DriverError, RoundDriver, lock};
use crate::counters::CountersSnapshot;
use crate::records::{AsyncRecord, FailureRecord, RoundRecord, RoundStatus};
use crate::strategy::{ClientFailure, FitSummary};

/// What a round's fit phase and aggregation came to, for its record.
pub(super) struct Closing {
    pub round: u64,
    pub status: RoundStatus,
    pub error: Option<String>,
    pub sampled: usize,
    pub results: Vec<FitSummary>,
    pub failures: Vec<ClientFailure>,
    pub stragglers: Vec<String>,
    /// How the fit phase closed (synchronous rounds).
    pub closure: Option<String>,
    pub train_metrics: BTreeMap<String, f64>,
    pub fit_seconds: f64,
    pub aggregate_seconds: f64,
    /// FedBuff versions: their staleness.
    pub asynchronous: Option<AsyncRecord>,
    /// The counters when the round started: the record carries what happened since.
    pub counters_before: CountersSnapshot,
    pub started: Instant,
}

impl RoundDriver {
    /// Evaluates `global` after the round, records the round and returns its record.
    pub(super) async fn close_round(
        &mut self,
        closing: Closing,
        global: &Arc<Parameters>,
    ) -> Result<RoundRecord, DriverError> {
        let round = closing.round;
        let eval_started = Instant::now();
        let central = self.evaluate_centralized(round, global).await?;
        let federated = match self.federated_evaluate(round, global).await {
            Err(DriverError::Store(e)) => {
                tracing::warn!("round {round}: federated evaluation skipped: {e}");
                None
            }
            other => other?,
        };
        let evaluate_seconds = eval_started.elapsed().as_secs_f64();
        // Federated evaluation samples too: the position after it is where the next round's
        // sampling starts.
        let rng_word_pos = u64::try_from(self.rng.get_word_pos()).ok();
        let evaluation = match (&central, &federated) {
            (Some(_), _) => Some("centralized".to_string()),
            (None, Some(_)) => Some("federated".to_string()),
            (None, None) => None,
        };
        let shown = central.as_ref().or(federated.as_ref());
        let delta = self
            .registry
            .counters()
            .snapshot()
            .since(&closing.counters_before);
        let privacy = lock(&self.strategy).privacy();
        let Closing {
            status,
            error,
            sampled,
            results,
            failures,
            stragglers,
            closure,
            train_metrics,
            fit_seconds,
            aggregate_seconds,
            asynchronous,
            started,
            ..
        } = closing;
        let mut record = RoundRecord {
            run_id: self.run_id.clone(),
            round,
            status,
            error,
            accuracy: shown.and_then(|e| e.metrics.get("accuracy").copied()),
            loss: shown.map(|e| e.loss),
            metrics: shown.map(|e| e.metrics.clone()).unwrap_or_default(),
            primary_metric: self.config.primary_metric.clone(),
            evaluation,
            sampled,
            succeeded: results.len(),
            failed: failures.len(),
            failures_by_reason: by_reason(&failures),
            rejections: by_rejection(&failures),
            stragglers,
            closure,
            train_loss: train_metrics.get("loss").copied(),
            train_metrics,
            federated_loss: federated.as_ref().map(|e| e.loss),
            federated_metrics: federated.map(|e| e.metrics).unwrap_or_default(),
            seconds: 0.0,
            fit_seconds,
            aggregate_seconds,
            evaluate_seconds,
            bytes_sent: 0,
            bytes_received: 0,
            late_replies: 0,
            rejected_updates: 0,
            participants: results.iter().map(|r| r.client_id.clone()).collect(),
            failures: failures
                .iter()
                .map(|f| FailureRecord {
                    client: f.client_id.clone(),
                    reason: f.reason.as_str().into(),
                    rejection: f.rejection.map(|r| r.as_str().to_string()),
                    message: f.message.clone(),
                })
                .collect(),
            privacy,
            asynchronous,
            rng_word_pos,
            finished_at: chrono::Utc::now().to_rfc3339(),
        }
        .with_counters(&delta);
        // Measured before writing, so that the records carry it too (the checkpoint write
        // itself is not part of the round's time).
        record.seconds = started.elapsed().as_secs_f64();
        self.record(&record, global).await?;
        Ok(record)
    }

    /// Writes the record (and, after a successful round, the checkpoint) and reports it.
    async fn record(
        &mut self,
        record: &RoundRecord,
        global: &Arc<Parameters>,
    ) -> Result<(), DriverError> {
        let round = record.round;
        if let Some(run) = self.run.clone() {
            let checkpoint = match record.status {
                RoundStatus::Ok => {
                    // The next round sends this encoding; encoding it now keeps that off the
                    // round's clock.
                    self.encode(global).await?;
                    Some((global.clone(), self.checkpoint_metadata(round)))
                }
                RoundStatus::Failed => None,
            };
            let rec = record.clone();
            tokio::task::spawn_blocking(move || {
                let bytes = checkpoint.map(|(model, meta)| model.encode_with_metadata(meta));
                run.record_round(&rec, bytes.as_deref())
            })
            .await?
            .map_err(|source| DriverError::Record { round, source })?;
        }
        if let Some(m) = &self.metrics {
            m.observe_round(record);
        }
        Ok(())
    }
}

impl RoundDriver {
    /// What a checkpoint's safetensors header says about it, for whoever loads it back (a
    /// PyTorch user: `python/pollen_models.py` rebuilds the module from the manifest).
    pub(super) fn checkpoint_metadata(&self, round: u64) -> HashMap<String, String> {
        let mut meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("pollen.run_id".to_string(), self.run_id.clone()),
            ("pollen.round".to_string(), round.to_string()),
        ]);
        if let Some(task) = &self.task {
            meta.insert("pollen.task_sha256".into(), task.sha256.clone());
            // Manifests are JSON; one that is not UTF-8 is left out rather than mangled.
            if let Ok(text) = std::str::from_utf8(&task.manifest) {
                meta.insert("pollen.manifest".into(), text.to_string());
            }
        }
        meta
    }
}

/// Failures counted by reason, as the records spell them.
fn by_reason(failures: &[ClientFailure]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for f in failures {
        *out.entry(f.reason.as_str().to_string()).or_insert(0) += 1;
    }
    out
}

/// Rejected answers counted by why.
fn by_rejection(failures: &[ClientFailure]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in failures.iter().filter_map(|f| f.rejection) {
        *out.entry(r.as_str().to_string()).or_insert(0) += 1;
    }
    out
}
