//! Counters of what went wrong (and how much moved), shared by the service and the driver.
//! [`crate::metrics`] exports them to Prometheus; the run records carry per-round deltas of
//! their snapshots.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

/// Why a reply was dropped; variants are spelled as the exported label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum DropReason {
    late,
    duplicate,
    unknown,
    wrong_client,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: DropReason,
}

/// Why a valid update was not folded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum UnusedReason {
    straggler,
    stale,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UnusedLabels {
    reason: UnusedReason,
}

/// Monotonic counters; cheap to bump from any task.
#[derive(Debug)]
pub struct Counters {
    /// Replies to a request the coordinator had already closed at its deadline.
    pub replies_late: Counter,
    /// A second reply to a request that was already answered.
    pub replies_duplicate: Counter,
    /// Replies naming a request id the coordinator never issued (or long forgotten).
    pub replies_unknown: Counter,
    /// Replies from a client to a request addressed to another client.
    pub replies_wrong_client: Counter,
    /// Fit updates that failed validation (digest, codec, names, shapes, NaN/Inf).
    pub updates_rejected: Counter,
    /// Fits cancelled because their round had closed on its target (over-selection).
    pub stragglers_dropped: Counter,
    /// FedBuff updates trained on a model version older than the staleness limit.
    pub updates_stale: Counter,
    /// Stream messages that could not be decoded or broke the protocol; each ends its stream.
    pub messages_malformed: Counter,
    /// Joins refused because the client certificate's identity may not hold the client id.
    pub joins_refused: Counter,
    /// Weight bytes sent to and received from clients.
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    /// The `replies_*` counters are its members (a counter's clones share its value), all made
    /// up front so that every reason is exported from the start, at 0 too.
    replies_dropped: Family<DropLabels, Counter>,
    /// `stragglers_dropped` and `updates_stale`, by reason.
    updates_unused: Family<UnusedLabels, Counter>,
}

impl Default for Counters {
    fn default() -> Self {
        let replies_dropped = Family::<DropLabels, Counter>::default();
        let member = |reason| replies_dropped.get_or_create_owned(&DropLabels { reason });
        let updates_unused = Family::<UnusedLabels, Counter>::default();
        let unused = |reason| updates_unused.get_or_create_owned(&UnusedLabels { reason });
        Self {
            stragglers_dropped: unused(UnusedReason::straggler),
            updates_stale: unused(UnusedReason::stale),
            replies_late: member(DropReason::late),
            replies_duplicate: member(DropReason::duplicate),
            replies_unknown: member(DropReason::unknown),
            replies_wrong_client: member(DropReason::wrong_client),
            updates_rejected: Counter::default(),
            messages_malformed: Counter::default(),
            joins_refused: Counter::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            replies_dropped,
            updates_unused,
        }
    }
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CountersSnapshot {
    pub replies_late: u64,
    pub replies_duplicate: u64,
    pub replies_unknown: u64,
    pub replies_wrong_client: u64,
    pub updates_rejected: u64,
    #[serde(default)]
    pub stragglers_dropped: u64,
    #[serde(default)]
    pub updates_stale: u64,
    pub messages_malformed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            replies_late: self.replies_late.get(),
            replies_duplicate: self.replies_duplicate.get(),
            replies_unknown: self.replies_unknown.get(),
            replies_wrong_client: self.replies_wrong_client.get(),
            updates_rejected: self.updates_rejected.get(),
            stragglers_dropped: self.stragglers_dropped.get(),
            updates_stale: self.updates_stale.get(),
            messages_malformed: self.messages_malformed.get(),
            bytes_sent: self.bytes_sent.get(),
            bytes_received: self.bytes_received.get(),
        }
    }

    /// Adds these counters to `registry`; they keep counting there.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "pollen_sent",
            "Weight bytes sent to clients (inline or through object storage)",
            Unit::Bytes,
            self.bytes_sent.clone(),
        );
        registry.register_with_unit(
            "pollen_received",
            "Weight bytes received from clients",
            Unit::Bytes,
            self.bytes_received.clone(),
        );
        registry.register(
            "pollen_replies_dropped",
            "Replies dropped, by reason",
            self.replies_dropped.clone(),
        );
        registry.register(
            "pollen_updates_rejected",
            "Updates that failed validation (digest, size, shapes, NaN/Inf)",
            self.updates_rejected.clone(),
        );
        registry.register(
            "pollen_updates_unused",
            "Valid updates not folded: a straggler's after its round closed on its target, or one staler than FedBuff's limit",
            self.updates_unused.clone(),
        );
        registry.register(
            "pollen_joins_refused",
            "Joins refused: the client certificate names another identity than the client id",
            self.joins_refused.clone(),
        );
        registry.register(
            "pollen_messages_malformed",
            "Undecodable or protocol-breaking Fleet messages",
            self.messages_malformed.clone(),
        );
    }
}

impl CountersSnapshot {
    /// `self - earlier`, field by field: what happened in between.
    pub fn since(&self, earlier: &CountersSnapshot) -> CountersSnapshot {
        CountersSnapshot {
            replies_late: self.replies_late - earlier.replies_late,
            replies_duplicate: self.replies_duplicate - earlier.replies_duplicate,
            replies_unknown: self.replies_unknown - earlier.replies_unknown,
            replies_wrong_client: self.replies_wrong_client - earlier.replies_wrong_client,
            updates_rejected: self.updates_rejected - earlier.updates_rejected,
            stragglers_dropped: self.stragglers_dropped - earlier.stragglers_dropped,
            updates_stale: self.updates_stale - earlier.updates_stale,
            messages_malformed: self.messages_malformed - earlier.messages_malformed,
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
        }
    }
}
