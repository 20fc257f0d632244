//! Prometheus metrics of the coordinator, in the text exposition format (version 0.0.4).
//!
//! Two sources: the live [`crate::counters::Counters`] and client registry (read at scrape time), and what each
//! finished round reports ([`Metrics::observe_round`]): rounds by status, client results and
//! failures by reason, durations as histograms, the latest accuracy and loss. Names follow
//! Prometheus conventions (`pollen_` prefix, `_total` counters, `_seconds` and `_bytes` units).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::broadcast;

use pollen_proto::prometheus::{by_label, counter, gauge};

use crate::records::{RoundRecord, RoundStatus};
use crate::registry::Registry;

/// Failure reasons, all exported (at 0 too) so that dashboards see every series from the start.
const FAILURE_REASONS: [&str; 5] = [
    "timeout",
    "client_error",
    "rejected",
    "disconnected",
    "protocol_error",
];

/// Upper bounds of the round-duration histogram, in seconds.
const ROUND_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];
/// Upper bounds of the aggregation-duration histogram, in seconds.
const AGGREGATE_BUCKETS: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let slot = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[slot] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
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

#[derive(Debug)]
struct State {
    run_id: Option<String>,
    run_status: Option<String>,
    rounds_ok: u64,
    rounds_failed: u64,
    last_round: u64,
    clients_sampled: u64,
    clients_succeeded: u64,
    failures_by_reason: BTreeMap<String, u64>,
    round_seconds: Histogram,
    aggregate_seconds: Histogram,
    accuracy: Option<f64>,
    loss: Option<f64>,
    train_loss: Option<f64>,
    federated_loss: Option<f64>,
    last_sampled: u64,
    last_succeeded: u64,
    last_failed: u64,
}

/// The coordinator's metrics; share one per process.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    state: Mutex<State>,
    events: broadcast::Sender<LiveEvent>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            events: broadcast::channel(EVENT_BUFFER).0,
            state: Mutex::new(State {
                run_id: None,
                run_status: None,
                rounds_ok: 0,
                rounds_failed: 0,
                last_round: 0,
                clients_sampled: 0,
                clients_succeeded: 0,
                failures_by_reason: BTreeMap::new(),
                round_seconds: Histogram::new(ROUND_BUCKETS),
                aggregate_seconds: Histogram::new(AGGREGATE_BUCKETS),
                accuracy: None,
                loss: None,
                train_loss: None,
                federated_loss: None,
                last_sampled: 0,
                last_succeeded: 0,
                last_failed: 0,
            }),
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.events.subscribe()
    }

    /// The run being driven now, if one is running.
    pub fn live_run(&self) -> Option<String> {
        let s = self.lock();
        match s.run_status.as_deref() {
            Some("running") => s.run_id.clone(),
            _ => None,
        }
    }

    /// Takes in a run's start (`running`) or end.
    pub fn observe_run(&self, run_id: &str, status: &str) {
        {
            let mut s = self.lock();
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
        self.observe_round_numbers(r);
        // The record (participants included) is copied only when a dashboard is watching.
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(LiveEvent::Round(Arc::new(r.clone())));
        }
    }

    fn observe_round_numbers(&self, r: &RoundRecord) {
        let mut s = self.lock();
        s.run_id = Some(r.run_id.clone());
        match r.status {
            RoundStatus::Ok => s.rounds_ok += 1,
            RoundStatus::Failed => s.rounds_failed += 1,
        }
        s.last_round = r.round;
        s.clients_sampled += r.sampled as u64;
        s.clients_succeeded += r.succeeded as u64;
        for (reason, n) in &r.failures_by_reason {
            *s.failures_by_reason.entry(reason.clone()).or_insert(0) += *n as u64;
        }
        s.round_seconds.observe(r.seconds);
        s.aggregate_seconds.observe(r.aggregate_seconds);
        s.accuracy = r.accuracy.or(s.accuracy);
        s.loss = r.loss.or(s.loss);
        s.train_loss = r.train_loss.or(s.train_loss);
        s.federated_loss = r.federated_loss.or(s.federated_loss);
        s.last_sampled = r.sampled as u64;
        s.last_succeeded = r.succeeded as u64;
        s.last_failed = r.failed as u64;
    }

    /// The exposition text, with live values read from `registry`.
    pub fn render(&self, registry: &Registry) -> String {
        let c = registry.counters().snapshot();
        let s = self.lock();
        let mut out = String::with_capacity(4096);
        if let Some(run) = &s.run_id {
            by_label(
                &mut out,
                "gauge",
                "pollen_run_info",
                "The run this coordinator drives.",
                "run_id",
                [(run, 1)],
            );
        }
        gauge(
            &mut out,
            "pollen_run_elapsed_seconds",
            "Seconds since the coordinator started.",
            self.started.elapsed().as_secs_f64(),
        );
        by_label(
            &mut out,
            "counter",
            "pollen_rounds_total",
            "Rounds finished, by status.",
            "status",
            [("ok", s.rounds_ok), ("failed", s.rounds_failed)],
        );
        gauge(
            &mut out,
            "pollen_round",
            "The last finished round.",
            s.last_round,
        );
        counter(
            &mut out,
            "pollen_clients_sampled_total",
            "Clients sampled for fit, summed over rounds.",
            s.clients_sampled,
        );
        let failures: u64 = s.failures_by_reason.values().sum();
        by_label(
            &mut out,
            "counter",
            "pollen_client_results_total",
            "Client fit results, successful or failed.",
            "result",
            [("success", s.clients_succeeded), ("failure", failures)],
        );
        by_label(
            &mut out,
            "counter",
            "pollen_client_failures_total",
            "Client fit failures, by reason.",
            "reason",
            FAILURE_REASONS.map(|r| (r, s.failures_by_reason.get(r).copied().unwrap_or(0))),
        );
        by_label(
            &mut out,
            "gauge",
            "pollen_round_clients",
            "Clients of the last round, by outcome.",
            "outcome",
            [
                ("sampled", s.last_sampled),
                ("succeeded", s.last_succeeded),
                ("failed", s.last_failed),
            ],
        );
        s.round_seconds.render(
            &mut out,
            "pollen_round_duration_seconds",
            "Wall time of a round (fit, aggregation, evaluation, records).",
        );
        s.aggregate_seconds.render(
            &mut out,
            "pollen_aggregation_duration_seconds",
            "Time to finish a round's aggregation.",
        );
        for (name, help, value) in [
            (
                "pollen_accuracy",
                "Accuracy of the global model (centralized, else federated evaluation), 0-1.",
                s.accuracy,
            ),
            (
                "pollen_loss",
                "Loss of the global model on the evaluation data.",
                s.loss,
            ),
            (
                "pollen_train_loss",
                "Example-weighted training loss the clients reported.",
                s.train_loss,
            ),
            (
                "pollen_federated_loss",
                "Example-weighted evaluation loss the clients reported.",
                s.federated_loss,
            ),
        ] {
            if let Some(v) = value {
                gauge(&mut out, name, help, v);
            }
        }
        gauge(
            &mut out,
            "pollen_clients_connected",
            "Fleet clients (direct or proxy bridges) connected now.",
            registry.len(),
        );
        counter(
            &mut out,
            "pollen_sent_bytes_total",
            "Weight bytes sent to clients (inline or through object storage).",
            c.bytes_sent,
        );
        counter(
            &mut out,
            "pollen_received_bytes_total",
            "Weight bytes received from clients.",
            c.bytes_received,
        );
        by_label(
            &mut out,
            "counter",
            "pollen_replies_dropped_total",
            "Replies dropped, by reason.",
            "reason",
            [
                ("late", c.replies_late),
                ("duplicate", c.replies_duplicate),
                ("unknown", c.replies_unknown),
                ("wrong_client", c.replies_wrong_client),
            ],
        );
        counter(
            &mut out,
            "pollen_updates_rejected_total",
            "Updates that failed validation (digest, size, shapes, NaN/Inf).",
            c.updates_rejected,
        );
        counter(
            &mut out,
            "pollen_messages_malformed_total",
            "Undecodable or protocol-breaking Fleet messages.",
            c.messages_malformed,
        );
        out
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
            finished_at: String::new(),
        }
    }

    #[test]
    fn rounds_show_up_as_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.observe_round(&record(1, RoundStatus::Ok, 0.3));
        m.observe_round(&record(2, RoundStatus::Failed, 7.0));
        let registry = Registry::new(Arc::new(Counters::default()));
        Counters::add(&registry.counters().bytes_sent, 1234);
        let text = m.render(&registry);
        for line in [
            "pollen_rounds_total{status=\"ok\"} 1",
            "pollen_rounds_total{status=\"failed\"} 1",
            "pollen_client_results_total{result=\"success\"} 4",
            "pollen_client_results_total{result=\"failure\"} 2",
            "pollen_client_failures_total{reason=\"timeout\"} 2",
            "pollen_round_duration_seconds_bucket{le=\"0.5\"} 1",
            "pollen_round_duration_seconds_bucket{le=\"10\"} 2",
            "pollen_round_duration_seconds_count 2",
            "pollen_accuracy 0.7",
            "pollen_sent_bytes_total 1234",
            "pollen_clients_connected 0",
            "pollen_run_info{run_id=\"run-1\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    /// Every metric the Grafana dashboard in docs/ queries is one this module exports.
    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana/pollen-dashboard.json"))
                .expect("the dashboard is JSON");
        let m = Metrics::default();
        let mut r = record(1, RoundStatus::Ok, 0.3);
        r.federated_loss = Some(0.5);
        m.observe_round(&r);
        let text = m.render(&Registry::new(Arc::new(Counters::default())));
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
