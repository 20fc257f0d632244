//! `pollen serve`: a long-lived coordinator that runs what operators submit, one run at a
//! time, over the clients (proxy bridges, direct agents) connected to it.
//!
//! Runs queue in the run store (status `queued`), so the queue outlives the process: at start
//! the service takes up the queued runs and the `interrupted` ones (their coordinator died:
//! they continue from their records, see [`crate::resume`]), oldest first. One service serves
//! one fleet (`--fleet`): its runs share the fleet's connected clients and run in turn, and a
//! spec naming another fleet is refused; a second fleet gets a service of its own, which may
//! share the run database. Control requests come through the HTTP endpoint's control API
//! ([`pollen_dashboard::control`]); a stop cancels the run's token (its current round is
//! abandoned, the completed ones stay recorded, the run is `cancelled`) or takes a queued run
//! off the queue.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use pollen_coordinator::RunStore;
use pollen_coordinator::metrics::Metrics;
use pollen_coordinator::records::RecordError;
use pollen_coordinator::registry::Registry;
use pollen_coordinator::storage::BlobStore;
use pollen_dashboard::control::{Accepted, Control, ControlError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::run::DriveOptions;
use crate::spec::RunSpec;

/// How often an idle service looks for interrupted runs to take up.
const RESCAN: Duration = Duration::from_secs(2);

/// What every run of the service runs over.
pub struct ServiceContext {
    pub registry: Arc<Registry>,
    pub store: Option<Arc<dyn BlobStore>>,
    pub metrics: Arc<Metrics>,
    pub wait_for_clients: Duration,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<String>,
    current: Option<(String, CancellationToken)>,
}

/// The service's queue and the run store it keeps it in.
pub struct Service {
    runs: Arc<RunStore>,
    /// The fleet whose clients join this coordinator: only its runs are run here (a spec's
    /// `[devices] fleet`), which is also what operators are authorized on.
    fleet: String,
    queue: Mutex<Queue>,
    wake: Notify,
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(e.to_string())
}

impl Service {
    pub fn new(runs: Arc<RunStore>, fleet: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            runs,
            fleet: fleet.into(),
            queue: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// Whether this service holds `id` (running it or waiting to).
    fn holds(&self, id: &str) -> bool {
        let q = self.lock();
        q.current.as_ref().is_some_and(|(c, _)| c == id) || q.waiting.iter().any(|w| w == id)
    }

    /// Why `spec` is not for this service, if it is not.
    fn foreign(&self, spec: &RunSpec) -> Option<String> {
        (spec.devices.fleet != self.fleet).then(|| {
            format!(
                "the spec trains fleet {:?}; this service serves fleet {:?}",
                spec.devices.fleet, self.fleet
            )
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enqueue(&self, id: String) {
        {
            let mut q = self.lock();
            if q.current.as_ref().is_some_and(|(c, _)| *c == id) || q.waiting.contains(&id) {
                return;
            }
            q.waiting.push_back(id);
        }
        self.wake.notify_one();
    }

    /// Queues the runs the store holds as queued or interrupted that this service does not
    /// hold yet, oldest first; what it took up.
    pub fn take_up(&self) -> Result<Vec<String>, RecordError> {
        let mut runs = self.runs.list_runs()?;
        runs.reverse();
        let mut taken = Vec::new();
        for run in runs {
            if !matches!(run.status.as_str(), "queued" | "interrupted") || self.holds(&run.id) {
                continue;
            }
            let spec = self
                .runs
                .run(&run.id)?
                .and_then(|(_, text)| RunSpec::parse(&text, &run.id).ok());
            let why = match &spec {
                None => Some("its spec no longer parses".to_string()),
                Some(spec) if self.foreign(spec).is_some() => continue,
                Some(spec) if run.status == "interrupted" => crate::resume::refusal(spec),
                Some(_) => None,
            };
            if let Some(why) = why {
                tracing::warn!(run = %run.id, "run left as it is: {why}");
                continue;
            }
            taken.push(run.id.clone());
            self.enqueue(run.id);
        }
        Ok(taken)
    }

    /// Runs the queue until `shutdown`: each run to its end (completed, cancelled by a stop,
    /// or failed), then the next.
    pub async fn run_queue(self: Arc<Self>, ctx: ServiceContext, shutdown: CancellationToken) {
        loop {
            let next = {
                let mut q = self.lock();
                q.waiting.pop_front().map(|id| {
                    let token = shutdown.child_token();
                    q.current = Some((id.clone(), token.clone()));
                    (id, token)
                })
            };
            let Some((id, token)) = next else {
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = shutdown.cancelled() => return,
                    // A run whose coordinator died shows as interrupted only once its lease
                    // is over, which may be after this service started.
                    _ = tokio::time::sleep(RESCAN) => {
                        let service = self.clone();
                        match tokio::task::spawn_blocking(move || service.take_up()).await {
                            Ok(Ok(taken)) if !taken.is_empty() => {
                                tracing::info!(?taken, "interrupted or queued runs taken up");
                            }
                            Ok(Err(e)) => tracing::warn!("looking for runs to take up: {e}"),
                            _ => {}
                        }
                        continue;
                    }
                }
            };
            match self.run_one(&ctx, &id, token, &shutdown).await {
                Ok(status) => tracing::info!(run = %id, %status, "run ended"),
                Err(e) => tracing::error!(run = %id, "run not started or ended in error: {e:#}"),
            }
            self.lock().current = None;
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    async fn run_one(
        &self,
        ctx: &ServiceContext,
        id: &str,
        token: CancellationToken,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<&'static str> {
        let (_, text) = self.runs.run(id)?.context("the run's record is gone")?;
        let spec = RunSpec::parse(&text, &format!("run {id}'s spec"))?;
        let runs = self.runs.clone();
        let wanted = id.to_string();
        // Only what is still queued or interrupted: a run stopped meanwhile stays stopped.
        let reopened = tokio::task::spawn_blocking(move || {
            runs.reopen_run(&wanted, &["queued", "interrupted"])
        })
        .await??;
        // From here the run is ours: if it cannot go on, it is marked failed.
        let prepared = async {
            let resume = crate::resume::locate(&reopened.handle, &reopened.rounds)?;
            let manifest = crate::task::resolve_blind(&spec)?;
            let for_data = spec.clone();
            let server =
                tokio::task::spawn_blocking(move || crate::task::server_data(&for_data)).await??;
            anyhow::Ok((resume, manifest, server))
        }
        .await;
        let run = Arc::new(reopened.handle);
        let (resume, manifest, server) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = run.finish("failed");
                return Err(e);
            }
        };
        eprintln!(
            "run {id}: starting after {} recorded rounds",
            resume.completed
        );
        let options = DriveOptions {
            registry: ctx.registry.clone(),
            run: run.clone(),
            store: ctx.store.clone(),
            server,
            wait_for_clients: ctx.wait_for_clients,
            metrics: Some(ctx.metrics.clone()),
            resume: Some(resume),
        };
        let run_id = id.to_string();
        let summary = crate::run::drive(
            &spec,
            manifest,
            options,
            move |r| {
                tracing::info!(run = %run_id, round = r.round, status = ?r.status, accuracy = ?r.accuracy, "round recorded");
            },
            token,
        )
        .await;
        match summary {
            // Failed before its rounds (a corrupt checkpoint, a task that does not build):
            // marked so, or it would show as interrupted and be taken up again and again.
            Err(e) => {
                let _ = run.finish("failed");
                Err(e)
            }
            // The service stopping is not an operator's stop: the run waits for its return.
            Ok(s) if s.cancelled && shutdown.is_cancelled() => {
                let _ = run.finish("queued");
                Ok("queued again")
            }
            Ok(s) if s.cancelled => Ok("cancelled"),
            Ok(_) => Ok("completed"),
        }
    }
}

impl Control for Service {
    fn submit(&self, text: &str) -> Result<Accepted, ControlError> {
        let spec = RunSpec::parse(text, "the submitted spec")
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        if let Some(why) = self.foreign(&spec) {
            return Err(ControlError::Invalid(why));
        }
        let id = self
            .runs
            .queue_run(&spec.name, &spec.to_toml(), spec.seed, spec.rounds)
            .map_err(internal)?;
        self.enqueue(id.clone());
        Ok(Accepted {
            id,
            status: "queued".into(),
        })
    }

    fn stop(&self, id: &str) -> Result<Accepted, ControlError> {
        let accepted = |status: &str| {
            Ok(Accepted {
                id: id.to_string(),
                status: status.into(),
            })
        };
        {
            let mut q = self.lock();
            if let Some((current, token)) = &q.current
                && current == id
            {
                token.cancel();
                return accepted("stopping");
            }
            if let Some(at) = q.waiting.iter().position(|w| w == id) {
                q.waiting.remove(at);
                drop(q);
                // Queued by a submit or a resume, or taken up as interrupted.
                for from in ["queued", "interrupted"] {
                    if self.runs.settle(id, from, "cancelled").map_err(internal)? {
                        return accepted("cancelled");
                    }
                }
                return Err(ControlError::Conflict(format!(
                    "run {id} changed while being stopped; see its status"
                )));
            }
        }
        match self.runs.run_status(id).map_err(internal)? {
            None => Err(ControlError::NotFound(format!("no run {id:?}"))),
            Some(status) => Err(ControlError::Conflict(format!(
                "run {id} is {status}, not running or queued here: nothing to stop"
            ))),
        }
    }

    fn resume(&self, id: &str) -> Result<Accepted, ControlError> {
        if self.holds(id) {
            return Err(ControlError::Conflict(format!(
                "run {id} is already running or queued here"
            )));
        }
        let Some((row, text)) = self.runs.run(id).map_err(internal)? else {
            return Err(ControlError::NotFound(format!("no run {id:?}")));
        };
        match row.status.as_str() {
            "interrupted" | "cancelled" | "failed" | "queued" => {}
            status => {
                return Err(ControlError::Conflict(format!(
                    "run {id} is {status}: only an interrupted, stopped or failed run can be resumed"
                )));
            }
        }
        let spec = RunSpec::parse(&text, &format!("run {id}'s spec"))
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        if let Some(why) = crate::resume::refusal(&spec).or_else(|| self.foreign(&spec)) {
            return Err(ControlError::Invalid(format!("run {id}: {why}")));
        }
        // Queued in the store too, so that a restarted service takes it up.
        if row.status != "queued"
            && !self
                .runs
                .settle(id, &row.status, "queued")
                .map_err(internal)?
        {
            return Err(ControlError::Conflict(format!(
                "run {id} changed while being resumed; try again"
            )));
        }
        self.enqueue(id.to_string());
        Ok(Accepted {
            id: id.to_string(),
            status: "queued".into(),
        })
    }
}
