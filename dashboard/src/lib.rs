//! pollen-dashboard: the coordinator's HTTP endpoint, apart from the FL core so that embedding
//! the coordinator pulls in no web server: the web dashboard at `/`, its JSON API under `/api/`, live
//! events at `/api/events` (server-sent events), Prometheus metrics at `/metrics` and liveness
//! at `/healthz`.
//!
//! The dashboard is one static page (`dashboard.html`, no framework, no external assets: it
//! works on an offline gateway network) that reads the run records and subscribes to live
//! events. Everything it shows comes from the same sources as `pollen runs` / `pollen status`
//! (the run records) and `/metrics` (the live registry and counters).
//!
//! With [`access::Access`] (operators and a Cedar policy), every path but `/healthz` needs an
//! operator's bearer token (or the cookie `/login?token=` sets) and a policy that permits the
//! request; without it the endpoint serves loopback only.

pub mod access;
pub mod control;
mod guard;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use futures::{Stream, StreamExt};
use pollen_proto::prometheus;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use pollen_coordinator::metrics::{LiveEvent, Metrics};
use pollen_coordinator::records::{RoundRecord, RunOverview, RunStore};
use pollen_coordinator::registry::Registry;

use access::{Access, Action, Operator, Resource};
use guard::{allow, allow_run, authenticate, fleet_of_spec, login, run_fleet};

const DASHBOARD: &str = include_str!("dashboard.html");

/// What the endpoint serves from. A coordinator driving a run has all three; a dashboard over
/// past runs only (`pollen dashboard`) has no registry or metrics, and serves no `/metrics`.
#[derive(Clone, Default)]
pub struct HttpSources {
    /// Connected clients: live device status on the dashboard.
    pub registry: Option<Arc<Registry>>,
    /// Prometheus metrics (the registry's clients and counters included) and the live event
    /// stream.
    pub metrics: Option<Arc<Metrics>>,
    /// The run records the dashboard lists and charts.
    pub runs: Option<Arc<RunStore>>,
    /// Operators and the policies over what they may do; required beyond loopback.
    pub access: Option<Arc<Access>>,
    /// A coordinator service's control (`pollen serve`): submit, stop and resume runs.
    pub control: Option<Arc<dyn control::Control>>,
}

/// A running HTTP endpoint.
pub type HttpServer = prometheus::MetricsServer;

/// The handlers' state: the sources, and the shutdown that ends event streams.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) sources: HttpSources,
    shutdown: CancellationToken,
}

impl FromRef<AppState> for HttpSources {
    fn from_ref(app: &AppState) -> Self {
        app.sources.clone()
    }
}

/// Binds `addr` (port 0: any free port) and serves until `shutdown` fires.
pub async fn serve_http(
    addr: SocketAddr,
    sources: HttpSources,
    shutdown: CancellationToken,
) -> std::io::Result<HttpServer> {
    if !addr.ip().is_loopback() && sources.access.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "serving the dashboard, its API and /metrics on {addr} (beyond loopback) needs operators: --operators FILE (see `pollen operator add`)"
            ),
        ));
    }
    let state = AppState {
        sources,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/runs", get(list_runs).post(control::submit))
        .route("/api/runs/{id}", get(show_run))
        .route("/api/runs/{id}/stop", post(control::stop))
        .route("/api/runs/{id}/resume", post(control::resume))
        .route("/api/runs/{id}/devices", get(run_devices))
        .route("/api/events", get(events))
        .route("/api/runs/{id}/model", get(download_model))
        .route("/login", get(login))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .with_state(state);
    let server = prometheus::serve_router(addr, app, shutdown).await?;
    tracing::info!(addr = %server.addr, "HTTP endpoint listening");
    Ok(server)
}

/// An error the API answers with: a status and a one-line text body.
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Runs a records query off the async workers (SQLite calls block).
pub(crate) async fn records<T: Send + 'static>(
    s: &HttpSources,
    query: impl FnOnce(&RunStore) -> Result<T, pollen_coordinator::records::RecordError>
    + Send
    + 'static,
) -> Result<T, ApiError> {
    let Some(runs) = s.runs.clone() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this endpoint keeps no run records".into(),
        ));
    };
    tokio::task::spawn_blocking(move || query(&runs))
        .await
        .map_err(internal)?
        .map_err(internal)
}

async fn render_metrics(
    State(s): State<HttpSources>,
    op: Option<Extension<Operator>>,
) -> Result<impl IntoResponse, ApiError> {
    allow(
        &s,
        op.as_deref(),
        Action::ScrapeMetrics,
        &Resource::Coordinator,
    )?;
    let Some(metrics) = &s.metrics else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "no coordinator runs here, so there are no live metrics".into(),
        ));
    };
    Ok((
        [(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)],
        metrics.render(),
    ))
}

/// A run as the dashboard lists it.
#[derive(Serialize)]
struct RunJson {
    #[serde(flatten)]
    overview: RunOverview,
    /// The run this coordinator is driving now.
    live: bool,
}

fn live_run(s: &HttpSources) -> Option<String> {
    s.metrics.as_ref().and_then(|m| m.live_run())
}

async fn list_runs(
    State(s): State<HttpSources>,
    op: Option<Extension<Operator>>,
) -> Result<impl IntoResponse, ApiError> {
    let live = live_run(&s);
    let runs = records(&s, |r| {
        r.overviews()?
            .into_iter()
            .map(|o| {
                let spec = r.run(&o.run.id)?.map(|(_, spec)| spec).unwrap_or_default();
                Ok((o, fleet_of_spec(&spec)))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    // An operator sees only the runs the policy lets them view.
    let runs: Vec<RunOverview> = runs
        .into_iter()
        .filter(|(o, fleet)| {
            let run = Resource::Run {
                id: o.run.id.clone(),
                fleet: fleet.clone(),
            };
            allow(&s, op.as_deref(), Action::ViewRun, &run).is_ok()
        })
        .map(|(o, _)| o)
        .collect();
    let runs: Vec<RunJson> = runs
        .into_iter()
        .map(|overview| RunJson {
            live: live.as_deref() == Some(overview.run.id.as_str()),
            overview,
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "runs": runs })))
}

#[derive(Serialize)]
struct RunDetail {
    run: RunJson,
    spec: String,
    rounds: Vec<RoundRecord>,
}

async fn show_run(
    State(s): State<HttpSources>,
    Path(id): Path<String>,
    op: Option<Extension<Operator>>,
) -> Result<impl IntoResponse, ApiError> {
    allow_run(&s, op.as_deref(), Action::ViewRun, &id).await?;
    let live = live_run(&s);
    let wanted = id.clone();
    let found = records(&s, move |r| {
        let Some((row, spec)) = r.run(&wanted)? else {
            return Ok(None);
        };
        Ok(Some((r.overview(row)?, spec, r.rounds(&wanted)?)))
    })
    .await?;
    let Some((overview, spec, rounds)) = found else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no run {id:?}")));
    };
    Ok(axum::Json(RunDetail {
        run: RunJson {
            live: live.as_deref() == Some(id.as_str()),
            overview,
        },
        spec,
        rounds,
    }))
}

/// A device of a run: what the records say it did, and its connection if the run is live.
#[derive(Debug, Serialize, PartialEq)]
struct DeviceJson {
    id: String,
    status: &'static str,
    examples: Option<u64>,
    agent_version: Option<String>,
    connected_since: Option<u64>,
    last_seen: Option<u64>,
    /// Rounds this device's update was aggregated in.
    rounds: u64,
    failures: u64,
    last_failure: Option<String>,
    last_round: Option<u64>,
}

impl DeviceJson {
    fn unseen(id: &str) -> Self {
        Self {
            id: id.to_string(),
            status: "offline",
            examples: None,
            agent_version: None,
            connected_since: None,
            last_seen: None,
            rounds: 0,
            failures: 0,
            last_failure: None,
            last_round: None,
        }
    }
}

/// Participation and failures per device from a run's rounds, merged with the registry's view
/// of connected and departed clients when the run is the live one.
fn devices_of(rounds: &[RoundRecord], live: Option<&Registry>) -> Vec<DeviceJson> {
    let mut devices: BTreeMap<String, DeviceJson> = BTreeMap::new();
    if let Some(registry) = live {
        for c in registry.clients() {
            devices.insert(
                c.id.clone(),
                DeviceJson {
                    status: c.status,
                    examples: Some(c.examples),
                    agent_version: Some(c.agent_version),
                    connected_since: c.connected_since,
                    last_seen: Some(c.last_seen),
                    ..DeviceJson::unseen(&c.id)
                },
            );
        }
    }
    for r in rounds {
        for id in &r.participants {
            let d = devices
                .entry(id.clone())
                .or_insert_with(|| DeviceJson::unseen(id));
            d.rounds += 1;
            d.last_round = Some(r.round);
        }
        for f in &r.failures {
            let d = devices
                .entry(f.client.clone())
                .or_insert_with(|| DeviceJson::unseen(&f.client));
            d.failures += 1;
            d.last_failure = Some(format!("round {}: {}: {}", r.round, f.reason, f.message));
            d.last_round = Some(r.round);
        }
    }
    devices.into_values().collect()
}

async fn run_devices(
    State(s): State<HttpSources>,
    Path(id): Path<String>,
    op: Option<Extension<Operator>>,
) -> Result<impl IntoResponse, ApiError> {
    allow_run(&s, op.as_deref(), Action::ViewRun, &id).await?;
    let live = live_run(&s).as_deref() == Some(id.as_str());
    let wanted = id.clone();
    let rounds = records(&s, move |r| {
        Ok(match r.run(&wanted)? {
            Some(_) => Some(r.rounds(&wanted)?),
            None => None,
        })
    })
    .await?;
    let Some(rounds) = rounds else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no run {id:?}")));
    };
    let registry = if live { s.registry.as_deref() } else { None };
    let devices = devices_of(&rounds, registry);
    Ok(axum::Json(serde_json::json!({
        "live": live,
        "now": pollen_proto::now_unix_ms(),
        "devices": devices,
    })))
}

/// What the event stream tells: `round` (a recorded round), `run` (a run started or ended),
/// `devices` (clients connected or left; refetch). Device changes are sent at most every
/// 300 ms, so a thousand devices joining make a handful of events, not a thousand. The stream
/// ends when the server shuts down (graceful shutdown waits for open connections).
async fn events(
    State(app): State<AppState>,
    op: Option<Extension<Operator>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let s = app.sources;
    allow(
        &s,
        op.as_deref(),
        Action::WatchEvents,
        &Resource::Coordinator,
    )?;
    let state = EventSources {
        viewer: op.map(|Extension(o)| o),
        sources: s.clone(),
        fleets: BTreeMap::new(),
        rounds: s.metrics.as_ref().map(|m| m.subscribe()),
        clients: s.registry.as_ref().map(|r| r.watch()),
        metrics: s.metrics.clone(),
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        let event = state.next().await?;
        Some((Ok(event), state))
    })
    .take_until(app.shutdown.cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// What one event-stream subscriber listens to.
struct EventSources {
    /// The operator listening: events of runs the policy does not let them view are skipped.
    viewer: Option<Operator>,
    sources: HttpSources,
    /// Fleets of the runs seen so far.
    fleets: BTreeMap<String, String>,
    rounds: Option<tokio::sync::broadcast::Receiver<LiveEvent>>,
    clients: Option<tokio::sync::watch::Receiver<u64>>,
    metrics: Option<Arc<Metrics>>,
}

impl EventSources {
    /// Whether the listening operator may view run `id` (always, without operators).
    async fn may_view(&mut self, id: &str) -> bool {
        if self.sources.access.is_none() {
            return true;
        }
        let fleet = match self.fleets.get(id) {
            Some(f) => f.clone(),
            None => match run_fleet(&self.sources, id).await {
                Ok(f) => {
                    self.fleets.insert(id.to_string(), f.clone());
                    f
                }
                Err(_) => return false,
            },
        };
        let run = Resource::Run {
            id: id.to_string(),
            fleet,
        };
        allow(&self.sources, self.viewer.as_ref(), Action::ViewRun, &run).is_ok()
    }

    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            let changed = async {
                match &mut self.clients {
                    Some(w) => w.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let next = async {
                match &mut self.rounds {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = next => match ev {
                    Ok(LiveEvent::Round(r)) if !self.may_view(&r.run_id).await => {}
                    Ok(LiveEvent::Run { id, .. }) if !self.may_view(&id).await => {}
                    Ok(LiveEvent::Round(r)) => match serde_json::to_string(&*r) {
                        Ok(json) => return Some(Event::default().event("round").data(json)),
                        Err(e) => tracing::error!("round {} not sent to the dashboard: {e}", r.round),
                    },
                    Ok(LiveEvent::Run { id, status }) => {
                        let data = serde_json::json!({ "id": id, "status": status });
                        return Some(Event::default().event("run").data(data.to_string()));
                    }
                    // Fell behind: whatever was missed is in the records; tell the page to
                    // refetch the run.
                    Err(RecvError::Lagged(_)) => {
                        let id = self.metrics.as_ref().and_then(|m| m.live_run());
                        let data = serde_json::json!({ "id": id, "status": "running" });
                        return Some(Event::default().event("run").data(data.to_string()));
                    }
                    Err(RecvError::Closed) => return None,
                },
                alive = changed => {
                    if !alive {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if let Some(w) = &mut self.clients {
                        // Whatever changed during the pause is covered by this one event.
                        w.borrow_and_update();
                    }
                    return Some(Event::default().event("devices").data("{}"));
                }
            }
        }
    }
}

async fn dashboard(
    State(s): State<HttpSources>,
    op: Option<Extension<Operator>>,
) -> Result<impl IntoResponse, ApiError> {
    allow(
        &s,
        op.as_deref(),
        Action::ViewDashboard,
        &Resource::Coordinator,
    )?;
    Ok(Html(DASHBOARD))
}

/// The run's latest checkpoint (safetensors, PyTorch layout, its manifest in the header).
async fn download_model(
    State(s): State<HttpSources>,
    Path(id): Path<String>,
    op: Option<Extension<Operator>>,
) -> Result<impl IntoResponse, ApiError> {
    allow_run(&s, op.as_deref(), Action::DownloadModel, &id).await?;
    let wanted = id.clone();
    let dir = records(&s, move |r| Ok(r.run(&wanted)?.map(|(row, _)| row.dir)))
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no run {id:?}")))?;
    let models = std::path::Path::new(&dir).join("models");
    let latest = std::fs::read_dir(&models)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .max()
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("run {id:?} has no checkpoint yet"),
            )
        })?;
    let bytes = tokio::fs::read(&latest).await.map_err(internal)?;
    let name = latest
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}-{name}\""),
            ),
        ],
        bytes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_coordinator::counters::Counters;
    use pollen_coordinator::records::{FailureRecord, RoundStatus};

    fn round(n: u64, participants: &[&str], failures: &[(&str, &str)]) -> RoundRecord {
        RoundRecord {
            run_id: "r".into(),
            round: n,
            status: RoundStatus::Ok,
            error: None,
            accuracy: None,
            loss: None,
            metrics: Default::default(),
            primary_metric: None,
            evaluation: None,
            sampled: participants.len() + failures.len(),
            succeeded: participants.len(),
            failed: failures.len(),
            failures_by_reason: Default::default(),
            rejections: Default::default(),
            stragglers: Vec::new(),
            closure: None,
            train_loss: None,
            train_metrics: Default::default(),
            federated_loss: None,
            federated_metrics: Default::default(),
            seconds: 0.1,
            fit_seconds: 0.1,
            aggregate_seconds: 0.0,
            evaluate_seconds: 0.0,
            bytes_sent: 0,
            bytes_received: 0,
            late_replies: 0,
            rejected_updates: 0,
            participants: participants.iter().map(|s| s.to_string()).collect(),
            failures: failures
                .iter()
                .map(|(c, reason)| FailureRecord {
                    client: c.to_string(),
                    reason: reason.to_string(),
                    rejection: None,
                    message: "no reply".into(),
                })
                .collect(),
            privacy: None,
            asynchronous: None,
            rng_word_pos: None,
            finished_at: String::new(),
        }
    }

    #[test]
    fn devices_count_participation_and_failures_from_the_records() {
        let rounds = [
            round(1, &["a", "b"], &[("c", "timeout")]),
            round(2, &["a"], &[("b", "rejected")]),
        ];
        let devices = devices_of(&rounds, None);
        let a = &devices[0];
        assert_eq!((a.id.as_str(), a.rounds, a.failures), ("a", 2, 0));
        assert_eq!(a.last_round, Some(2));
        let b = &devices[1];
        assert_eq!((b.rounds, b.failures), (1, 1));
        assert_eq!(
            b.last_failure.as_deref(),
            Some("round 2: rejected: no reply")
        );
        let c = &devices[2];
        assert_eq!((c.rounds, c.failures, c.status), (0, 1, "offline"));
    }

    #[tokio::test]
    async fn live_devices_carry_their_connection_and_status() {
        let registry = Registry::new(Arc::new(Counters::default()));
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let info = |id: &str| pollen_coordinator::strategy::ClientInfo {
            id: id.into(),
            num_examples: 600,
            agent_version: "0.1.0".into(),
            properties: Default::default(),
            data: None,
        };
        registry.register(info("a"), tx.clone());
        let gone = registry.register(info("b"), tx.clone());
        registry.unregister("b", gone);
        let _open = registry
            .request("a", 1, |_| Default::default())
            .await
            .expect("a is connected");
        let devices = devices_of(&[round(1, &["a"], &[])], Some(&registry));
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].status, "training");
        assert_eq!(devices[0].examples, Some(600));
        assert!(devices[0].connected_since.is_some());
        assert_eq!(devices[0].rounds, 1);
        assert_eq!(devices[1].status, "offline");
        assert!(devices[1].last_seen.is_some());
        assert_eq!(devices[1].connected_since, None);
    }
}
