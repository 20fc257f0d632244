//! Prometheus metrics of the coordinator, in one `prometheus-client` registry per coordinator.
//!
//! Three sources: what each finished round reports ([`Metrics::observe_round`]): rounds by
//! status, client results and failures by reason, durations as histograms, the latest accuracy
//! and loss; the live [`crate::counters::Counters`]; and, read at each scrape, the run, the
//! clients connected and the uptime. Names follow Prometheus conventions (`pollen_` prefix,
//! `_total` counters, `_seconds` and `_bytes` units); counters are registered without `_total`,
//! which the encoder appends.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use tokio::sync::broadcast;

use crate::records::{RoundRecord, RoundStatus};
use crate::registry::Registry;
use crate::strategy::FailureReason;

/// Failure reasons, all exported (at 0 too) so that dashboards see every series from the start.
const FAILURE_REASONS: [FailureReason; 5] = [
    FailureReason::Timeout,
    FailureReason::ClientError,
    FailureReason::Rejected,
    FailureReason::Disconnected,
    FailureReason::ProtocolError,
];

/// Upper bounds of the round-duration histogram, in seconds.
const ROUND_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];
/// Upper bounds of the aggregation-duration histogram, in seconds.
const AGGREGATE_BUCKETS: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

// Label values: variants are spelled as they are exported.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Status {
    ok,
    failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    status: Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum ClientResult {
    success,
    failure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: ClientResult,
}

/// `reason` is [`FailureReason::as_str`], the spelling of the run records too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Outcome {
    sampled,
    succeeded,
    failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

/// A family whose members for `label_sets` exist from the start, so that they are exported at
/// 0 before anything happened.
fn family<S, M>(label_sets: impl IntoIterator<Item = S>) -> Family<S, M>
where
    S: Clone + std::hash::Hash + Eq,
    M: Default,
{
    let family = Family::default();
    for labels in label_sets {
        drop(family.get_or_create(&labels));
    }
    family
}

/// What live views (the dashboard's event stream) are told as it happens.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// A round was recorded.
    Round(Arc<RoundRecord>),
    /// A run started (`running`) or ended (`completed`, `failed`, `cancelled`).
    Run { id: String, status: String },
}

/// Events buffered per subscriber; one that falls further behind is told to resynchronise.
const EVENT_BUFFER: usize = 256;

/// What finished rounds add up to.
#[derive(Debug)]
struct RoundMetrics {
    rounds: Family<StatusLabels, Counter>,
    last_round: Gauge<u64, AtomicU64>,
    clients_sampled: Counter,
    client_results: Family<ResultLabels, Counter>,
    client_failures: Family<FailureLabels, Counter>,
    round_clients: Family<OutcomeLabels, Gauge<u64, AtomicU64>>,
    round_seconds: Histogram,
    aggregate_seconds: Histogram,
}

impl RoundMetrics {
    fn new() -> Self {
        Self {
            rounds: family([Status::ok, Status::failed].map(|status| StatusLabels { status })),
            last_round: Gauge::default(),
            clients_sampled: Counter::default(),
            client_results: family(
                [ClientResult::success, ClientResult::failure]
                    .map(|result| ResultLabels { result }),
            ),
            client_failures: family(FAILURE_REASONS.map(|r| FailureLabels { reason: r.as_str() })),
            round_clients: family(
                [Outcome::sampled, Outcome::succeeded, Outcome::failed]
                    .map(|outcome| OutcomeLabels { outcome }),
            ),
            round_seconds: Histogram::new(ROUND_BUCKETS.iter().copied()),
            aggregate_seconds: Histogram::new(AGGREGATE_BUCKETS.iter().copied()),
        }
    }

    fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "pollen_rounds",
            "Rounds finished, by status",
            self.rounds.clone(),
        );
        registry.register(
            "pollen_round",
            "The last finished round",
            self.last_round.clone(),
        );
        registry.register(
            "pollen_clients_sampled",
            "Clients sampled for fit, summed over rounds",
            self.clients_sampled.clone(),
        );
        registry.register(
            "pollen_client_results",
            "Client fit results, successful or failed",
            self.client_results.clone(),
        );
        registry.register(
            "pollen_client_failures",
            "Client fit failures, by reason",
            self.client_failures.clone(),
        );
        registry.register(
            "pollen_round_clients",
            "Clients of the last round, by outcome",
            self.round_clients.clone(),
        );
        registry.register_with_unit(
            "pollen_round_duration",
            "Wall time of a round (fit, aggregation, evaluation, records)",
            Unit::Seconds,
            self.round_seconds.clone(),
        );
        registry.register_with_unit(
            "pollen_aggregation_duration",
            "Time to finish a round's aggregation",
            Unit::Seconds,
            self.aggregate_seconds.clone(),
        );
    }

    fn observe(&self, r: &RoundRecord) {
        let status = match r.status {
            RoundStatus::Ok => Status::ok,
            RoundStatus::Failed => Status::failed,
        };
        self.rounds.get_or_create(&StatusLabels { status }).inc();
        self.last_round.set(r.round);
        self.clients_sampled.inc_by(r.sampled as u64);
        let result = |result| self.client_results.get_or_create(&ResultLabels { result });
        result(ClientResult::success).inc_by(r.succeeded as u64);
        result(ClientResult::failure).inc_by(r.failures_by_reason.values().sum::<usize>() as u64);
        for (reason, n) in &r.failures_by_reason {
            if let Some(known) = FAILURE_REASONS.iter().find(|f| f.as_str() == reason) {
                let labels = FailureLabels {
                    reason: known.as_str(),
                };
                self.client_failures
                    .get_or_create(&labels)
                    .inc_by(*n as u64);
            }
        }
        for (outcome, n) in [
            (Outcome::sampled, r.sampled),
            (Outcome::succeeded, r.succeeded),
            (Outcome::failed, r.failed),
        ] {
            let labels = OutcomeLabels { outcome };
            self.round_clients.get_or_create(&labels).set(n as u64);
        }
        self.round_seconds.observe(r.seconds);
        self.aggregate_seconds.observe(r.aggregate_seconds);
    }
}

/// The run and the latest evaluation: what live views ask for and scrapes read.
#[derive(Debug, Default, Clone)]
struct Latest {
    run_id: Option<String>,
    run_status: Option<String>,
    accuracy: Option<f64>,
    loss: Option<f64>,
    train_loss: Option<f64>,
    federated_loss: Option<f64>,
}

fn lock(latest: &Mutex<Latest>) -> MutexGuard<'_, Latest> {
    latest.lock().unwrap_or_else(|e| e.into_inner())
}

/// What is read at each scrape rather than counted: the run, the latest evaluation (absent
/// until a round had one, rather than a misleading 0), the clients connected now, the uptime.
struct LiveCollector {
    started: Instant,
    latest: Arc<Mutex<Latest>>,
    fleet: Arc<Registry>,
}

impl std::fmt::Debug for LiveCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCollector")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let latest = lock(&self.latest).clone();
        if let Some(run) = &latest.run_id {
            encoder
                .encode_descriptor(
                    "pollen_run",
                    "The run this coordinator drives.",
                    None,
                    MetricType::Info,
                )?
                .encode_info(&[("run_id", run.as_str())])?;
        }
        let mut gauge = |name: &'static str, help: &'static str, value: f64| {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)
        };
        gauge(
            "pollen_run_elapsed_seconds",
            "Seconds since the coordinator started.",
            self.started.elapsed().as_secs_f64(),
        )?;
        for (name, help, value) in [
            (
                "pollen_accuracy",
                "Accuracy of the global model (centralized, else federated evaluation), 0-1.",
                latest.accuracy,
            ),
            (
                "pollen_loss",
                "Loss of the global model on the evaluation data.",
                latest.loss,
            ),
            (
                "pollen_train_loss",
                "Example-weighted training loss the clients reported.",
                latest.train_loss,
            ),
            (
                "pollen_federated_loss",
                "Example-weighted evaluation loss the clients reported.",
                latest.federated_loss,
            ),
        ] {
            if let Some(v) = value {
                gauge(name, help, v)?;
            }
        }
        encoder
            .encode_descriptor(
                "pollen_clients_connected",
                "Fleet clients (direct or proxy bridges) connected now.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&self.fleet.len())
    }
}

/// The coordinator's metrics; share one per process.
#[derive(Debug)]
pub struct Metrics {
    rounds: RoundMetrics,
    latest: Arc<Mutex<Latest>>,
    registry: prometheus_client::registry::Registry,
    events: broadcast::Sender<LiveEvent>,
}

impl Metrics {
    /// Metrics of the coordinator whose clients and counters are in `fleet`.
    pub fn new(fleet: Arc<Registry>) -> Self {
        let rounds = RoundMetrics::new();
        let latest = Arc::new(Mutex::new(Latest::default()));
        let mut registry = prometheus_client::registry::Registry::default();
        rounds.register(&mut registry);
        fleet.counters().register(&mut registry);
        registry.register_collector(Box::new(LiveCollector {
            started: Instant::now(),
            latest: latest.clone(),
            fleet,
        }));
        Self {
            rounds,
            latest,
            registry,
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.events.subscribe()
    }

    /// The run being driven now, if one is running.
    pub fn live_run(&self) -> Option<String> {
        let s = lock(&self.latest);
        match s.run_status.as_deref() {
            Some("running") => s.run_id.clone(),
            _ => None,
        }
    }

    /// Takes in a run's start (`running`) or end.
    pub fn observe_run(&self, run_id: &str, status: &str) {
        {
            let mut s = lock(&self.latest);
            s.run_id = Some(run_id.to_string());
            s.run_status = Some(status.to_string());
        }
        // No subscribers is not an error: nobody is watching.
        let _ = self.events.send(LiveEvent::Run {
            id: run_id.to_string(),
            status: status.to_string(),
        });
    }

    /// Takes in a finished round.
    pub fn observe_round(&self, r: &RoundRecord) {
        self.rounds.observe(r);
        {
            let mut s = lock(&self.latest);
            s.run_id = Some(r.run_id.clone());
            s.accuracy = r.accuracy.or(s.accuracy);
            s.loss = r.loss.or(s.loss);
            s.train_loss = r.train_loss.or(s.train_loss);
            s.federated_loss = r.federated_loss.or(s.federated_loss);
        }
        // The record (participants included) is copied only when a dashboard is watching.
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(LiveEvent::Round(Arc::new(r.clone())));
        }
    }

    /// The exposition, with live values read now.
    pub fn render(&self) -> String {
        pollen_proto::prometheus::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counters;

    fn record(round: u64, status: RoundStatus, seconds: f64) -> RoundRecord {
        RoundRecord {
            run_id: "run-1".into(),
            round,
            status,
            error: None,
            accuracy: Some(0.5 + round as f64 / 10.0),
            loss: Some(1.0 / round as f64),
            metrics: Default::default(),
            primary_metric: None,
            evaluation: None,
            sampled: 3,
            succeeded: 2,
            failed: 1,
            failures_by_reason: [("timeout".to_string(), 1)].into(),
            rejections: Default::default(),
            stragglers: Vec::new(),
            closure: None,
            train_loss: Some(0.3),
            train_metrics: Default::default(),
            federated_loss: None,
            federated_metrics: Default::default(),
            seconds,
            fit_seconds: 0.0,
            aggregate_seconds: 0.0002,
            evaluate_seconds: 0.0,
            bytes_sent: 0,
            bytes_received: 0,
            late_replies: 0,
            rejected_updates: 0,
            participants: vec![],
            failures: vec![],
            privacy: None,
            asynchronous: None,
            rng_word_pos: None,
            finished_at: String::new(),
        }
    }

    #[test]
    fn rounds_show_up_as_counters_histograms_and_gauges() {
        let fleet = Arc::new(Registry::new(Arc::new(Counters::default())));
        let m = Metrics::new(fleet.clone());
        m.observe_round(&record(1, RoundStatus::Ok, 0.3));
        m.observe_round(&record(2, RoundStatus::Failed, 7.0));
        fleet.counters().bytes_sent.inc_by(1234);
        let text = m.render();
        for line in [
            "pollen_rounds_total{status=\"ok\"} 1",
            "pollen_rounds_total{status=\"failed\"} 1",
            "pollen_client_results_total{result=\"success\"} 4",
            "pollen_client_results_total{result=\"failure\"} 2",
            "pollen_client_failures_total{reason=\"timeout\"} 2",
            "pollen_client_failures_total{reason=\"protocol_error\"} 0",
            "pollen_round_duration_seconds_bucket{le=\"0.5\"} 1",
            "pollen_round_duration_seconds_bucket{le=\"10.0\"} 2",
            "pollen_round_duration_seconds_bucket{le=\"+Inf\"} 2",
            "pollen_round_duration_seconds_count 2",
            "pollen_round_clients{outcome=\"failed\"} 1",
            "pollen_round 2",
            "pollen_accuracy 0.7",
            "pollen_sent_bytes_total 1234",
            "pollen_replies_dropped_total{reason=\"wrong_client\"} 0",
            "pollen_clients_connected 0",
            "pollen_run_info{run_id=\"run-1\"} 1",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("pollen_federated_loss"), "{text}");
    }

    /// Run ids embed the run's name, which may hold anything; the encoder escapes label values.
    #[test]
    fn the_run_id_label_is_escaped() {
        let m = Metrics::new(Arc::new(Registry::new(Arc::new(Counters::default()))));
        m.observe_run("a\"b\\c\nd", "running");
        let text = m.render();
        assert!(
            text.contains("pollen_run_info{run_id=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
    }

    /// Every metric the Grafana dashboard in docs/ queries is one this module exports.
    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana/pollen-dashboard.json"))
                .expect("the dashboard is JSON");
        let m = Metrics::new(Arc::new(Registry::new(Arc::new(Counters::default()))));
        let mut r = record(1, RoundStatus::Ok, 0.3);
        r.federated_loss = Some(0.5);
        m.observe_round(&r);
        let text = m.render();
        let exported: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("pollen_") {
                        queried += 1;
                        assert!(
                            exported.contains(word),
                            "panel {:?} queries {word}, which /metrics does not export",
                            panel["title"]
                        );
                    }
                }
            }
        }
        assert!(queried >= 15, "{queried}");
    }
}
