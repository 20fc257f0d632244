//! One synchronous round: the fit phase driven through [`FitRound`], aggregation, centralized
//! and federated evaluation, and the round's record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use pollen_proto::Parameters;
use tokio::task::JoinSet;

use super::fanout::{Answer, FitRequest, Outcome, Received};
use super::record::Closing;
use super::{DriverError, RoundDriver, lock};
use crate::records::{RoundRecord, RoundStatus};
use crate::round::{Admission, FitRound, RoundOutcome};
use crate::strategy::{ClientFailure, FitAggregator, FitSummary, Rejection};

/// What the fit phase hands to aggregation.
struct FitPhase {
    outcome: RoundOutcome,
    aggregator: Box<dyn FitAggregator>,
}

impl RoundDriver {
    pub(super) async fn run_round(
        &mut self,
        round: u64,
        global: &mut Arc<Parameters>,
    ) -> Result<RoundRecord, DriverError> {
        let started = Instant::now();
        let before = self.registry.counters().snapshot();
        self.registry.forget_closed_before(round);
        let needed = lock(&self.strategy).min_available_clients();
        // A round starts once enough clients are back; if they are not, the round fails.
        let _ = self
            .registry
            .wait_for(needed, self.config.wait_for_clients)
            .await;
        let available = self.registry.available();
        let instructions =
            lock(&self.strategy).configure_fit(round, global, &available, &mut self.rng);

        let fit_started = Instant::now();
        let mut store_error = None;
        let phase = if instructions.is_empty() {
            None
        } else {
            match self.fit(round, global, instructions, &available).await {
                Ok(phase) => Some(phase),
                // Storage trouble costs this round, not the run: the model stays as it was.
                Err(DriverError::Store(e)) => {
                    store_error = Some(format!("round {round}: {e}"));
                    None
                }
                Err(e) => return Err(e),
            }
        };
        let fit_seconds = fit_started.elapsed().as_secs_f64();

        let agg_started = Instant::now();
        let mut status = RoundStatus::Ok;
        let mut error = None;
        let mut train_metrics = BTreeMap::new();
        let mut outcome = None;
        match phase {
            None => {
                status = RoundStatus::Failed;
                error = Some(store_error.unwrap_or_else(|| {
                    format!(
                        "round {round}: {} clients connected, fewer than min_available_clients = {needed}",
                        available.len()
                    )
                }));
            }
            Some(FitPhase {
                outcome: fit,
                aggregator,
            }) => {
                let strategy = self.strategy.clone();
                let (res, fails) = (fit.results.clone(), fit.failures.clone());
                let g = global.clone();
                let aggregated = tokio::task::spawn_blocking(move || {
                    lock(&strategy).aggregate_fit(round, &g, aggregator, &res, &fails)
                })
                .await?;
                match aggregated {
                    Ok((Some(p), metrics)) => {
                        *global = Arc::new(p);
                        self.global_round = round;
                        train_metrics = metrics;
                    }
                    Ok((None, metrics)) => train_metrics = metrics,
                    Err(e) => {
                        status = RoundStatus::Failed;
                        error = Some(e.to_string());
                    }
                }
                outcome = Some(fit);
            }
        }
        let aggregate_seconds = agg_started.elapsed().as_secs_f64();
        if let Some(e) = &error {
            tracing::warn!("{e}; the global model stays as it was");
        }
        let fit = outcome.unwrap_or(RoundOutcome {
            round,
            sampled: 0,
            results: Vec::new(),
            failures: Vec::new(),
            stragglers: Vec::new(),
            dropped: Vec::new(),
            closure: crate::round::Closure::AllAnswered,
        });
        let closing = Closing {
            round,
            status,
            error,
            sampled: fit.sampled,
            closure: (fit.sampled > 0).then(|| fit.closure.as_str().to_string()),
            results: fit.results,
            failures: fit.failures,
            stragglers: fit.stragglers,
            train_metrics,
            fit_seconds,
            aggregate_seconds,
            asynchronous: None,
            counters_before: before,
            started,
        };
        self.close_round(closing, global).await
    }

    /// The fit phase: fan out, fold answers as they arrive while the round takes them, close
    /// on everyone, on the target or at the deadline.
    async fn fit(
        &mut self,
        round: u64,
        global: &Arc<Parameters>,
        instructions: Vec<crate::strategy::Instruction>,
        available: &[crate::strategy::ClientInfo],
    ) -> Result<FitPhase, DriverError> {
        let wire = self.global(global).await?;
        let task = self.task_ref().await?;
        let fanout = self.fanout();
        let clients: Vec<String> = instructions.iter().map(|i| i.client_id.clone()).collect();
        let uploads = fanout.uploads(round, &clients).await?;
        let mut state = FitRound::begin(
            round,
            clients,
            tokio::time::Instant::now(),
            self.config.round_timeout,
            self.config.close_after,
        );
        let mut tasks: JoinSet<Answer> = JoinSet::new();
        let mut open: BTreeMap<String, u64> = BTreeMap::new();
        for (instruction, upload) in instructions.into_iter().zip(uploads) {
            let announced_examples = available
                .iter()
                .find(|c| c.id == instruction.client_id)
                .map_or(0, |c| c.num_examples);
            let client_id = instruction.client_id.clone();
            let request = FitRequest {
                client_id: instruction.client_id,
                config: instruction.config,
                announced_examples,
                upload,
            };
            match fanout
                .send_fit(round, request, &wire, task.clone(), &mut tasks)
                .await
            {
                Ok(request_id) => {
                    open.insert(client_id, request_id);
                }
                Err(failure) => state.fail(failure),
            }
        }

        let strategy = self.strategy.clone();
        let g = global.clone();
        let mut aggregator =
            tokio::task::spawn_blocking(move || lock(&strategy).fit_aggregator(round, &g)).await?;
        // Every request's task ends by the deadline (a client that has not answered by then
        // times out there and is told to cancel), or a little after it when an answer that
        // arrived in time is still being read and checked.
        while !(state.is_closed() && state.is_settled()) {
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let answer = joined?;
            open.remove(&answer.client_id);
            aggregator = self.take(&mut state, answer, aggregator).await?;
        }
        // Stragglers of a round closed on its target: cancel their work. Their tasks see the
        // request closed and end on their own, deleting whatever they uploaded.
        for client in state.stragglers() {
            if let Some(id) = open.get(&client) {
                self.registry.time_out(*id);
                self.registry.counters().stragglers_dropped.inc();
            }
        }
        tasks.detach_all();
        // A backstop: nothing is open once every task has ended.
        state.expire(state.deadline());
        Ok(FitPhase {
            outcome: state.finish(),
            aggregator,
        })
    }

    /// Takes one answer into the round: a failure as it is; an update, if the round admits
    /// it, folded into the aggregator on a blocking thread.
    async fn take(
        &mut self,
        state: &mut FitRound,
        answer: Answer,
        aggregator: Box<dyn FitAggregator>,
    ) -> Result<Box<dyn FitAggregator>, DriverError> {
        let round = state.round();
        let Received {
            update,
            metrics,
            bytes,
        } = match answer.outcome {
            Outcome::Failed(f) => {
                state.fail(f);
                return Ok(aggregator);
            }
            Outcome::Update(received) => received,
        };
        let arrived = answer.arrived_at.unwrap_or_else(tokio::time::Instant::now);
        if let Admission::Drop(reason) = state.admit(&update.client_id, arrived) {
            tracing::info!(client = %update.client_id, round, reason = reason.as_str(), "update not taken");
            return Ok(aggregator);
        }
        self.registry.counters().bytes_received.inc_by(bytes);
        let summary = FitSummary {
            client_id: update.client_id.clone(),
            num_examples: update.num_examples,
            metrics,
        };
        let (aggregator, folded) = tokio::task::spawn_blocking(move || {
            let mut aggregator = aggregator;
            let r = aggregator.fold(&update);
            (aggregator, r)
        })
        .await?;
        match folded {
            Ok(()) => state.accept(summary),
            Err(e) => {
                self.registry.counters().updates_rejected.inc();
                let message = format!("client {}, round {round}: {e}", summary.client_id);
                tracing::warn!("update rejected: {message}");
                state.reject(&summary.client_id, Rejection::Aggregation, message);
            }
        }
        Ok(aggregator)
    }

    /// Federated evaluation, when the strategy asks for it.
    pub(super) async fn federated_evaluate(
        &mut self,
        round: u64,
        global: &Arc<Parameters>,
    ) -> Result<Option<crate::strategy::Evaluation>, DriverError> {
        let available = self.registry.available();
        let instructions =
            lock(&self.strategy).configure_evaluate(round, global, &available, &mut self.rng);
        if instructions.is_empty() {
            return Ok(None);
        }
        let wire = self.global(global).await?;
        let task = self.task_ref().await?;
        let fanout = self.fanout();
        let mut tasks = JoinSet::new();
        let mut failures: Vec<ClientFailure> = Vec::new();
        for instruction in instructions {
            if let Err(f) = fanout
                .send_evaluate(
                    round,
                    instruction.client_id,
                    instruction.config,
                    &wire,
                    task.clone(),
                    &mut tasks,
                )
                .await
            {
                failures.push(f);
            }
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined? {
                Ok(r) => results.push(r),
                Err(f) => failures.push(f),
            }
        }
        Ok(lock(&self.strategy).aggregate_evaluate(round, &results, &failures))
    }
}
