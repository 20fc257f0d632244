//! The run's task as the driver carries it: the manifest written to object storage once and
//! referenced by every instruction, and the statistics phase before round 1.

use std::time::{Instant, SystemTime};

use pollen_proto::fleet::{
    ServerMessage, StatisticsIns, TaskRef, server_message::Msg as ServerMsg,
};
use tokio::task::JoinSet;

use super::fanout::{await_reply, unexpected};
use super::{DriverError, RoundDriver};
use crate::registry::Reply;
use crate::statistics::{Combiner, FederatedStatistics};
use crate::strategy::{ClientFailure, FailureReason};

impl RoundDriver {
    /// The reference every instruction carries: the manifest written to the store once (and
    /// named by a presigned GET shared by the fan-out), or inline without a store.
    pub(super) async fn task_ref(&mut self) -> Result<Option<TaskRef>, DriverError> {
        let ttl = self.presign_ttl();
        let Some(task) = self.task.as_mut() else {
            return Ok(None);
        };
        let Some(store) = self.store.clone() else {
            return Ok(Some(task.inline()));
        };
        let key = match &task.key {
            Some(key) => key.clone(),
            None => {
                let key = store.keys().task(&self.run_id, &task.sha256);
                store.put(&key, task.manifest.clone()).await?;
                task.key = Some(key.clone());
                key
            }
        };
        let url = store.presign_get(&key, ttl).await?;
        let mut files = Vec::with_capacity(task.files.len());
        for file in &mut task.files {
            let key = match &file.key {
                Some(key) => key.clone(),
                None => {
                    let key = store.keys().task_file(&self.run_id, &file.sha256);
                    store.put(&key, file.bytes.clone()).await?;
                    file.key = Some(key.clone());
                    key
                }
            };
            let url = store.presign_get(&key, ttl).await?;
            files.push((key, url));
        }
        Ok(Some(task.by_reference(key, url, files)))
    }

    /// Keeps the manifest the rounds use next to the run's records (`task.json`).
    pub(super) fn record_task(&self) -> Result<(), DriverError> {
        if let (Some(run), Some(task)) = (&self.run, &self.task) {
            run.write_file("task.json", &task.manifest)
                .map_err(|source| DriverError::Record { round: 0, source })?;
            tracing::info!(sha256 = %task.sha256, bytes = task.manifest.len(), "task manifest published");
        }
        Ok(())
    }

    /// Asks every connected client for statistics of its data under the current manifest, and
    /// combines those that answer in time and fit the others'. Refusals and silences are
    /// logged and recorded; the phase fails only if no client's statistics were accepted.
    pub(super) async fn statistics(&mut self) -> Result<FederatedStatistics, DriverError> {
        let started = Instant::now();
        let task = self.task_ref().await?;
        let deadline = tokio::time::Instant::now() + self.config.round_timeout;
        let deadline_unix_ms = pollen_proto::unix_ms(SystemTime::now() + self.config.round_timeout);
        let mut tasks = JoinSet::new();
        let mut failures: Vec<ClientFailure> = Vec::new();
        let clients = self.registry.available();
        for client in &clients {
            let (task, run_id) = (task.clone(), self.run_id.clone());
            let build = move |request_id| ServerMessage {
                msg: Some(ServerMsg::Statistics(StatisticsIns {
                    request_id,
                    task,
                    config: Default::default(),
                    deadline_unix_ms,
                    run_id,
                })),
            };
            match self.registry.request(&client.id, 0, build).await {
                Ok((request_id, rx)) => {
                    let registry = self.registry.clone();
                    let client_id = client.id.clone();
                    tasks.spawn(async move {
                        let reply = await_reply(&registry, request_id, rx, deadline).await;
                        (client_id, reply)
                    });
                }
                Err(e) => failures.push(ClientFailure::new(
                    &client.id,
                    FailureReason::Disconnected,
                    e.to_string(),
                )),
            }
        }
        let mut combiner = Combiner::default();
        while let Some(joined) = tasks.join_next().await {
            let (client_id, reply) = joined?;
            match reply {
                Ok(Reply::Statistics(res)) => {
                    let added = match res.statistics {
                        Some(s) => combiner.add(&client_id, &s),
                        None => Err("an answer without statistics".into()),
                    };
                    if let Err(message) = added {
                        self.registry.counters().updates_rejected.inc();
                        tracing::warn!(client = %client_id, "statistics rejected: {message}");
                        failures.push(ClientFailure::rejected(
                            &client_id,
                            crate::strategy::Rejection::Malformed,
                            message,
                        ));
                    }
                }
                Ok(other) => failures.push(unexpected(&client_id, other)),
                Err((reason, message)) => {
                    failures.push(ClientFailure::new(&client_id, reason, message))
                }
            }
        }
        for f in &failures {
            tracing::warn!(client = %f.client_id, reason = f.reason.as_str(), "no statistics: {}", f.message);
        }
        let Some(combined) = combiner.finish() else {
            let reasons: Vec<String> = failures
                .iter()
                .take(5)
                .map(|f| format!("{}: {}", f.client_id, f.message))
                .collect();
            return Err(DriverError::Statistics(format!(
                "none of the {} clients sent statistics that could be used ({})",
                clients.len(),
                reasons.join("; ")
            )));
        };
        tracing::info!(
            clients = combined.clients.len(),
            failed = failures.len(),
            examples = combined.num_examples,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "federated statistics combined"
        );
        if let Some(run) = &self.run {
            let mut json = combined.to_json();
            json["failures"] = serde_json::Value::Array(
                failures
                    .iter()
                    .map(|f| serde_json::json!({"client": f.client_id, "reason": f.reason.as_str(), "message": f.message}))
                    .collect(),
            );
            let text = serde_json::to_vec_pretty(&json).unwrap_or_default();
            run.write_file("statistics.json", &text)
                .map_err(|source| DriverError::Record { round: 0, source })?;
        }
        Ok(combined)
    }
}
