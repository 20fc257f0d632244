//! A synchronous fit round as a state machine: pure logic over the sampled clients, the answers
//! they send and an explicit clock, so that quorum, deadline, early-close and late-reply rules
//! are unit-tested without sockets or a runtime. The driver's async fan-out feeds it events and
//! does what it says (fold an update, cancel a straggler).
//!
//! ```text
//! begin(sampled, opened_at, timeout, close_after)
//!   admit(client, arrived_at) -> Take | Drop(reason)      an answer carrying an update
//!   accept(summary) / reject(client, ..) / fail(failure)  what became of it
//!   expire(now)                                           the deadline: open clients time out
//! finish() -> RoundOutcome { results, failures, stragglers, dropped, closure }
//! ```
//!
//! A round closes when every sampled client has answered, when `close_after` results are in
//! (over-selection: the rest are stragglers, cancelled and counted), or at its deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::strategy::{ClientFailure, FailureReason, FitSummary, Rejection};

/// Where one sampled client stands in the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Asked, no answer taken yet.
    Open,
    /// Its update was admitted and is being folded (or was).
    Admitted,
    Succeeded,
    Failed,
    /// No answer by the deadline; an answer now is late.
    TimedOut,
    /// Still training when the round closed early; its answer is not wanted.
    Straggler,
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Closure {
    /// Every sampled client answered (or failed) before the deadline.
    AllAnswered,
    /// `close_after` results were in; the clients still training were dropped.
    Target,
    /// The deadline passed with clients still open; they timed out.
    Deadline,
}

impl Closure {
    pub fn as_str(self) -> &'static str {
        match self {
            Closure::AllAnswered => "all_answered",
            Closure::Target => "target",
            Closure::Deadline => "deadline",
        }
    }
}

/// Why an answer was not taken into the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// From a client this round did not sample.
    NotSampled,
    /// A second answer from a client whose answer was already taken.
    Duplicate,
    /// Arrived after the round's deadline.
    Late,
    /// Arrived after the round closed on its target: a straggler's.
    Straggler,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NotSampled => "not_sampled",
            DropReason::Duplicate => "duplicate",
            DropReason::Late => "late",
            DropReason::Straggler => "straggler",
        }
    }
}

/// Whether an answer carrying an update may be folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Take,
    Drop(DropReason),
}

/// What a finished round hands to aggregation and to the records.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundOutcome {
    pub round: u64,
    pub sampled: usize,
    pub results: Vec<FitSummary>,
    pub failures: Vec<ClientFailure>,
    /// Clients still training when the round closed on its target.
    pub stragglers: Vec<String>,
    /// Answers not taken, and why.
    pub dropped: Vec<(String, DropReason)>,
    pub closure: Closure,
}

/// One synchronous fit round.
#[derive(Debug)]
pub struct FitRound {
    round: u64,
    deadline: Instant,
    close_after: Option<usize>,
    clients: BTreeMap<String, Slot>,
    results: Vec<FitSummary>,
    failures: Vec<ClientFailure>,
    dropped: Vec<(String, DropReason)>,
    closure: Option<Closure>,
}

impl FitRound {
    /// Opens round `round` over `sampled` at `opened_at`, closing at `opened_at + timeout` at
    /// the latest, or once `close_after` results are in. A round that sampled nobody is closed
    /// from the start.
    pub fn begin(
        round: u64,
        sampled: impl IntoIterator<Item = String>,
        opened_at: Instant,
        timeout: Duration,
        close_after: Option<usize>,
    ) -> Self {
        let clients: BTreeMap<String, Slot> =
            sampled.into_iter().map(|c| (c, Slot::Open)).collect();
        let closure = clients.is_empty().then_some(Closure::AllAnswered);
        Self {
            round,
            deadline: opened_at + timeout,
            close_after: close_after.filter(|k| *k > 0),
            clients,
            results: Vec::new(),
            failures: Vec::new(),
            dropped: Vec::new(),
            closure,
        }
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the round takes no more answers.
    pub fn is_closed(&self) -> bool {
        self.closure.is_some()
    }

    /// Whether every admitted update has been settled (accepted or rejected): a closed round
    /// can be finished once this holds.
    pub fn is_settled(&self) -> bool {
        !self.clients.values().any(|s| *s == Slot::Admitted)
    }

    /// Clients still training while the round is open.
    pub fn open_clients(&self) -> Vec<String> {
        self.with_slot(Slot::Open)
    }

    /// Clients dropped when the round closed on its target.
    pub fn stragglers(&self) -> Vec<String> {
        self.with_slot(Slot::Straggler)
    }

    fn with_slot(&self, slot: Slot) -> Vec<String> {
        self.clients
            .iter()
            .filter(|(_, s)| **s == slot)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// An answer from `client` carrying an update arrived at `arrived_at`: may it be folded?
    /// A dropped answer is remembered (and the caller counts it).
    pub fn admit(&mut self, client: &str, arrived_at: Instant) -> Admission {
        let reason = match self.clients.get(client) {
            None => Some(DropReason::NotSampled),
            Some(Slot::Straggler) => Some(DropReason::Straggler),
            Some(Slot::TimedOut) => Some(DropReason::Late),
            Some(Slot::Admitted | Slot::Succeeded | Slot::Failed) => Some(DropReason::Duplicate),
            // The arrival time decides, not when its validation finished: an answer in by the
            // deadline counts even if reading and checking it took longer.
            Some(Slot::Open) if arrived_at > self.deadline => Some(DropReason::Late),
            Some(Slot::Open) if self.closure.is_some() => Some(DropReason::Late),
            Some(Slot::Open) => None,
        };
        match reason {
            Some(r) => {
                self.dropped.push((client.to_string(), r));
                Admission::Drop(r)
            }
            None => {
                self.clients.insert(client.to_string(), Slot::Admitted);
                Admission::Take
            }
        }
    }

    /// An admitted update was folded. Closes the round when it was the last awaited answer or
    /// the `close_after`-th result.
    pub fn accept(&mut self, summary: FitSummary) {
        if self.clients.get(&summary.client_id) != Some(&Slot::Admitted) {
            // Only admitted answers are folded; anything else is a driver bug, kept out of
            // the record rather than counted twice.
            tracing::error!(client = %summary.client_id, "a result that was not admitted was accepted; ignored");
            return;
        }
        self.clients
            .insert(summary.client_id.clone(), Slot::Succeeded);
        self.results.push(summary);
        if self
            .close_after
            .is_some_and(|k| self.results.len() >= k && self.closure.is_none())
        {
            self.closure = Some(Closure::Target);
            for slot in self.clients.values_mut() {
                if *slot == Slot::Open {
                    *slot = Slot::Straggler;
                }
            }
        }
        self.close_if_all_answered();
    }

    /// An admitted update, or an answer that never got that far, was refused.
    pub fn reject(&mut self, client: &str, rejection: Rejection, message: impl Into<String>) {
        self.fail(ClientFailure::rejected(client, rejection, message));
    }

    /// A sampled client failed (its own error, a timeout noticed by its proxy, a disconnect, a
    /// refused update). Failures of clients that are not open (or admitted) are dropped.
    pub fn fail(&mut self, failure: ClientFailure) {
        match self.clients.get(&failure.client_id) {
            Some(Slot::Open | Slot::Admitted) => {
                self.clients.insert(failure.client_id.clone(), Slot::Failed);
                self.failures.push(failure);
                self.close_if_all_answered();
            }
            Some(Slot::Straggler) => self
                .dropped
                .push((failure.client_id, DropReason::Straggler)),
            Some(Slot::TimedOut) => self.dropped.push((failure.client_id, DropReason::Late)),
            Some(_) => self
                .dropped
                .push((failure.client_id, DropReason::Duplicate)),
            None => self
                .dropped
                .push((failure.client_id, DropReason::NotSampled)),
        }
    }

    /// The clock reached `now`: at or past the deadline, every open client times out and the
    /// round closes (answers already admitted are still settled). Returns the clients that
    /// timed out (the caller cancels their work).
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        if now < self.deadline || self.closure.is_some() {
            return Vec::new();
        }
        let open = self.open_clients();
        for client in &open {
            self.clients.insert(client.clone(), Slot::TimedOut);
            self.failures.push(ClientFailure::new(
                client,
                FailureReason::Timeout,
                "no answer before the round deadline",
            ));
        }
        self.closure = Some(if open.is_empty() {
            Closure::AllAnswered
        } else {
            Closure::Deadline
        });
        open
    }

    fn close_if_all_answered(&mut self) {
        if self.closure.is_some()
            || self
                .clients
                .values()
                .any(|s| matches!(s, Slot::Open | Slot::Admitted))
        {
            return;
        }
        // A client whose proxy or task already noticed the deadline kept the round open until
        // then: the deadline closed it.
        let timed_out = self
            .failures
            .iter()
            .any(|f| f.reason == FailureReason::Timeout);
        self.closure = Some(if timed_out {
            Closure::Deadline
        } else {
            Closure::AllAnswered
        });
    }

    /// The round's outcome. Clients still open (a round finished before its deadline without
    /// closing, which the driver never does) are recorded as timed out.
    pub fn finish(mut self) -> RoundOutcome {
        for (client, slot) in &self.clients {
            if matches!(slot, Slot::Open | Slot::Admitted) {
                self.failures.push(ClientFailure::new(
                    client,
                    FailureReason::Timeout,
                    "no answer before the round closed",
                ));
            }
        }
        RoundOutcome {
            round: self.round,
            sampled: self.clients.len(),
            stragglers: self.with_slot(Slot::Straggler),
            results: self.results,
            failures: self.failures,
            dropped: self.dropped,
            closure: self.closure.unwrap_or(Closure::Deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    fn result(client: &str) -> FitSummary {
        FitSummary {
            client_id: client.into(),
            num_examples: 10,
            metrics: Default::default(),
        }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Admits and accepts an update from `client` arriving at `t`.
    fn answer(r: &mut FitRound, client: &str, t: Instant) -> Admission {
        let a = r.admit(client, t);
        if a == Admission::Take {
            r.accept(result(client));
        }
        a
    }

    #[test]
    fn a_round_closes_when_every_sampled_client_has_answered() {
        let t0 = Instant::now();
        let mut r = FitRound::begin(1, sampled(3), t0, Duration::from_secs(10), None);
        assert_eq!(answer(&mut r, "c0", at(t0, 100)), Admission::Take);
        r.fail(ClientFailure::new("c2", FailureReason::ClientError, "boom"));
        assert!(!r.is_closed());
        assert_eq!(answer(&mut r, "c1", at(t0, 300)), Admission::Take);
        assert!(r.is_closed());
        let out = r.finish();
        assert_eq!(out.closure, Closure::AllAnswered);
        assert_eq!(
            (out.sampled, out.results.len(), out.failures.len()),
            (3, 2, 1)
        );
        assert!(out.stragglers.is_empty() && out.dropped.is_empty());
    }

    #[test]
    fn at_the_deadline_open_clients_time_out_and_later_answers_are_late() {
        let t0 = Instant::now();
        let mut r = FitRound::begin(4, sampled(3), t0, Duration::from_secs(2), None);
        answer(&mut r, "c0", at(t0, 500));
        assert!(r.expire(at(t0, 1999)).is_empty(), "not yet");
        assert!(!r.is_closed());
        assert_eq!(
            r.expire(at(t0, 2000)),
            vec!["c1".to_string(), "c2".to_string()]
        );
        assert!(r.is_closed());
        // An answer that arrived after the deadline is late, even if it reaches the round now.
        assert_eq!(
            r.admit("c1", at(t0, 2100)),
            Admission::Drop(DropReason::Late)
        );
        // So is a failure its proxy reports after the deadline.
        r.fail(ClientFailure::new(
            "c2",
            FailureReason::Timeout,
            "device deadline",
        ));
        let out = r.finish();
        assert_eq!(out.closure, Closure::Deadline);
        assert_eq!(out.results.len(), 1);
        assert!(
            out.failures
                .iter()
                .all(|f| f.reason == FailureReason::Timeout)
        );
        assert_eq!(out.failures.len(), 2);
        assert_eq!(
            out.dropped,
            vec![
                ("c1".to_string(), DropReason::Late),
                ("c2".to_string(), DropReason::Late)
            ]
        );
    }

    #[test]
    fn an_answer_that_arrived_after_the_deadline_is_dropped_as_late() {
        let t0 = Instant::now();
        let mut r = FitRound::begin(1, sampled(2), t0, Duration::from_secs(1), None);
        assert_eq!(
            r.admit("c0", at(t0, 1001)),
            Admission::Drop(DropReason::Late)
        );
        // One that arrived in time counts, however long its checks took.
        assert_eq!(answer(&mut r, "c1", at(t0, 999)), Admission::Take);
        let timed_out = r.expire(at(t0, 5000));
        assert_eq!(timed_out, vec!["c0".to_string()]);
        let out = r.finish();
        assert_eq!(out.results.len(), 1);
        assert_eq!(out.dropped, vec![("c0".to_string(), DropReason::Late)]);
    }

    #[test]
    fn over_selection_closes_at_the_target_and_drops_the_stragglers() {
        let t0 = Instant::now();
        let mut r = FitRound::begin(2, sampled(5), t0, Duration::from_secs(60), Some(3));
        answer(&mut r, "c4", at(t0, 10));
        r.fail(ClientFailure::new("c0", FailureReason::ClientError, "oom"));
        answer(&mut r, "c2", at(t0, 20));
        assert!(!r.is_closed());
        answer(&mut r, "c3", at(t0, 30));
        assert!(r.is_closed());
        assert_eq!(r.stragglers(), vec!["c1".to_string()]);
        // The straggler's result comes in afterwards: dropped, never folded.
        assert_eq!(
            r.admit("c1", at(t0, 40)),
            Admission::Drop(DropReason::Straggler)
        );
        // The deadline changes nothing once closed.
        assert!(r.expire(at(t0, 60_000)).is_empty());
        let out = r.finish();
        assert_eq!(out.closure, Closure::Target);
        assert_eq!(out.results.len(), 3);
        assert_eq!(out.failures.len(), 1);
        assert_eq!(out.stragglers, vec!["c1".to_string()]);
        assert_eq!(out.dropped, vec![("c1".to_string(), DropReason::Straggler)]);
    }

    #[test]
    fn duplicates_and_strangers_are_dropped_and_never_counted_twice() {
        let t0 = Instant::now();
        let mut r = FitRound::begin(1, sampled(2), t0, Duration::from_secs(5), None);
        assert_eq!(answer(&mut r, "c0", at(t0, 1)), Admission::Take);
        assert_eq!(
            r.admit("c0", at(t0, 2)),
            Admission::Drop(DropReason::Duplicate)
        );
        assert_eq!(
            r.admit("intruder", at(t0, 3)),
            Admission::Drop(DropReason::NotSampled)
        );
        r.fail(ClientFailure::new(
            "c0",
            FailureReason::Disconnected,
            "gone",
        ));
        let out = {
            r.fail(ClientFailure::new(
                "c1",
                FailureReason::Timeout,
                "proxy deadline",
            ));
            r.finish()
        };
        assert_eq!(out.results.len(), 1);
        assert_eq!(
            out.failures.len(),
            1,
            "c0's late failure is not a second outcome"
        );
        assert_eq!(out.dropped.len(), 3);
    }

    #[test]
    fn a_rejected_update_is_a_failure_with_its_reason_and_frees_the_round() {
        let t0 = Instant::now();
        let mut r = FitRound::begin(3, sampled(2), t0, Duration::from_secs(5), Some(2));
        answer(&mut r, "c0", at(t0, 1));
        assert_eq!(r.admit("c1", at(t0, 2)), Admission::Take);
        assert!(!r.is_settled());
        r.reject("c1", Rejection::NonFinite, "NaN in w");
        assert!(r.is_settled());
        assert!(
            r.is_closed(),
            "everyone answered, though the target was not met"
        );
        let out = r.finish();
        assert_eq!(out.closure, Closure::AllAnswered);
        assert_eq!(out.failures[0].rejection, Some(Rejection::NonFinite));
        assert_eq!(out.failures[0].reason, FailureReason::Rejected);
    }

    #[test]
    fn a_round_that_sampled_nobody_is_closed_from_the_start() {
        let r = FitRound::begin(1, Vec::new(), Instant::now(), Duration::from_secs(1), None);
        assert!(r.is_closed());
        let out = r.finish();
        assert_eq!((out.sampled, out.results.len()), (0, 0));
    }
}
