//! The asynchronous discipline (FedBuff): keep `concurrency` devices training, each on the
//! newest model version when it was asked; fold every answer into the [`Buffer`] as it arrives;
//! publish, evaluate and record a new version every `buffer_size` updates. Each version is a
//! record (its `round` is the version number), so the records, the dashboard and the notebooks
//! read a FedBuff run as they read a synchronous one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pollen_proto::Parameters;
use rand::seq::index::sample;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::fanout::{Answer, FitRequest, Outcome, Received};
use super::record::Closing;
use super::{DriverError, RoundDriver, lock};
use crate::fedbuff::{Buffer, FedBuffConfig, Take};
use crate::records::{AsyncRecord, RoundRecord, RoundStatus};
use crate::strategy::{ClientFailure, FitSummary, Rejection};

/// How often the fleet is looked at again for idle devices when nothing else happens (a device
/// that joined, a store that came back).
const TOP_UP_EVERY: Duration = Duration::from_secs(1);

/// What happened since the last version was published.
#[derive(Default)]
struct Since {
    dispatched: usize,
    results: Vec<FitSummary>,
    failures: Vec<ClientFailure>,
}

impl RoundDriver {
    /// Runs FedBuff until `num_rounds` versions are published or `shutdown` fires. Returns the
    /// versions' records, the last model and whether it was stopped.
    pub(super) async fn run_fedbuff(
        &mut self,
        config: FedBuffConfig,
        initial: Arc<Parameters>,
        shutdown: &CancellationToken,
    ) -> Result<(Vec<RoundRecord>, Arc<Parameters>, bool), DriverError> {
        let mut buffer = Buffer::new(config, initial);
        let fanout = self.fanout();
        let mut task = self.task_ref().await?;
        let mut wire = self.global(buffer.global()).await?;
        // Presigned URLs expire; devices asked long after a version was published (a slow
        // fleet, few updates) get fresh ones.
        let mut minted = Instant::now();
        let mut tasks: JoinSet<Answer> = JoinSet::new();
        let mut in_flight: HashMap<String, u64> = HashMap::new();
        let mut changed = self.registry.watch();
        let mut rounds = Vec::new();
        let mut since = Since::default();
        let mut started = Instant::now();
        let mut before = self.registry.counters().snapshot();
        let mut cancelled = false;
        while (rounds.len() as u64) < self.config.num_rounds {
            if minted.elapsed() >= self.presign_ttl() / 2 {
                task = self.task_ref().await?;
                wire = self.global(buffer.global()).await?;
                minted = Instant::now();
            }
            self.top_up(
                &fanout,
                &mut buffer,
                &wire,
                &task,
                &mut tasks,
                &mut in_flight,
            )
            .await
            .map(|n| since.dispatched += n)
            .unwrap_or_else(|e| tracing::warn!("fedbuff: no device asked this time: {e}"));
            let joined = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    cancelled = true;
                    break;
                }
                joined = tasks.join_next(), if !tasks.is_empty() => joined,
                _ = changed.changed() => continue,
                () = tokio::time::sleep(TOP_UP_EVERY) => continue,
            };
            let Some(joined) = joined else { continue };
            let answer = joined?;
            in_flight.remove(&answer.client_id);
            let trained_on = answer.round;
            let Received {
                update,
                metrics,
                bytes,
            } = match answer.outcome {
                Outcome::Failed(f) => {
                    since.failures.push(f);
                    continue;
                }
                Outcome::Update(r) => r,
            };
            self.registry.counters().bytes_received.inc_by(bytes);
            let summary = FitSummary {
                client_id: update.client_id.clone(),
                num_examples: update.num_examples,
                metrics,
            };
            let (b, take) = tokio::task::spawn_blocking(move || {
                let mut buffer = buffer;
                let take = buffer.take(trained_on, &update.parameters);
                (buffer, take)
            })
            .await?;
            buffer = b;
            match take {
                Take::Folded { .. } => since.results.push(summary),
                Take::Stale { staleness } => {
                    self.registry.counters().updates_stale.inc();
                    tracing::info!(client = %summary.client_id, staleness, "stale update dropped");
                }
                Take::UnknownVersion | Take::Mismatch => {
                    self.registry.counters().updates_rejected.inc();
                    since.failures.push(ClientFailure::rejected(
                        &summary.client_id,
                        if take == Take::Mismatch {
                            Rejection::Shape
                        } else {
                            Rejection::WrongRound
                        },
                        format!(
                            "client {}: update for model version {trained_on} refused ({take:?}) at version {}",
                            summary.client_id,
                            buffer.version()
                        ),
                    ));
                }
            }
            if !buffer.is_full() {
                continue;
            }
            let aggregate_started = Instant::now();
            let (b, (global, record)) = tokio::task::spawn_blocking(move || {
                let mut buffer = buffer;
                let published = buffer.publish(0);
                (buffer, published)
            })
            .await?;
            buffer = b;
            let version = buffer.version();
            self.global_round = version;
            let aggregate_seconds = aggregate_started.elapsed().as_secs_f64();
            let record = AsyncRecord {
                in_flight: in_flight.len(),
                ..record
            };
            let done = std::mem::take(&mut since);
            let round = self
                .version_record(
                    version,
                    &global,
                    done,
                    record,
                    started,
                    aggregate_seconds,
                    before,
                )
                .await?;
            if let Some(f) = self.on_round.as_mut() {
                f(&round);
            }
            rounds.push(round);
            wire = self.global(&global).await?;
            started = Instant::now();
            before = self.registry.counters().snapshot();
        }
        // Work still in flight is not wanted any more: the devices are told to drop it and a
        // late answer is counted as such.
        for request_id in in_flight.values() {
            self.registry.time_out(*request_id);
        }
        tasks.detach_all();
        Ok((rounds, buffer.global().clone(), cancelled))
    }

    /// Asks idle devices (picked at random) to train on the current version until
    /// `concurrency` are training. Returns how many were asked.
    async fn top_up(
        &mut self,
        fanout: &super::fanout::FanOut,
        buffer: &mut Buffer,
        wire: &super::fanout::Global,
        task: &Option<pollen_proto::fleet::TaskRef>,
        tasks: &mut JoinSet<Answer>,
        in_flight: &mut HashMap<String, u64>,
    ) -> Result<usize, DriverError> {
        let need = buffer.config().concurrency.saturating_sub(in_flight.len());
        if need == 0 {
            return Ok(0);
        }
        let idle: Vec<_> = self
            .registry
            .available()
            .into_iter()
            .filter(|c| !in_flight.contains_key(&c.id))
            .collect();
        if idle.is_empty() {
            return Ok(0);
        }
        let mut picked: Vec<usize> =
            sample(&mut self.rng, idle.len(), need.min(idle.len())).into_vec();
        picked.sort_unstable();
        let version = buffer.version();
        let clients: Vec<String> = picked.iter().map(|&i| idle[i].id.clone()).collect();
        let uploads = fanout.uploads(version, &clients).await?;
        let mut asked = 0;
        for (&i, upload) in picked.iter().zip(uploads) {
            let client = &idle[i];
            let config = lock(&self.strategy).fit_config(version);
            let request = FitRequest {
                client_id: client.id.clone(),
                config,
                announced_examples: client.num_examples,
                upload,
            };
            match fanout
                .send_fit(version, request, wire, task.clone(), tasks)
                .await
            {
                Ok(request_id) => {
                    in_flight.insert(client.id.clone(), request_id);
                    asked += 1;
                }
                Err(f) => tracing::debug!(client = %f.client_id, "not reached: {}", f.message),
            }
        }
        Ok(asked)
    }

    /// Evaluates a published version and records it.
    #[allow(clippy::too_many_arguments)]
    async fn version_record(
        &mut self,
        version: u64,
        global: &Arc<Parameters>,
        since: Since,
        asynchronous: AsyncRecord,
        started: Instant,
        aggregate_seconds: f64,
        before: crate::counters::CountersSnapshot,
    ) -> Result<RoundRecord, DriverError> {
        let train_metrics = crate::strategy::fedavg::weighted_metrics(
            since.results.iter().map(|r| (r.num_examples, &r.metrics)),
        );
        let closing = Closing {
            round: version,
            status: RoundStatus::Ok,
            error: None,
            sampled: since.dispatched,
            results: since.results,
            failures: since.failures,
            stragglers: Vec::new(),
            closure: None,
            train_metrics,
            fit_seconds: (started.elapsed().as_secs_f64() - aggregate_seconds).max(0.0),
            aggregate_seconds,
            asynchronous: Some(asynchronous),
            counters_before: before,
            started,
        };
        self.close_round(closing, global).await
    }
}
