//! Counters of what went wrong (and how much moved), shared by the service and the driver.
//! [`crate::metrics`] exports them to Prometheus; the run records carry per-round deltas.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Monotonic counters; cheap to bump from any task.
#[derive(Debug, Default)]
pub struct Counters {
    /// Replies to a request the coordinator had already closed at its deadline.
    pub replies_late: AtomicU64,
    /// A second reply to a request that was already answered.
    pub replies_duplicate: AtomicU64,
    /// Replies naming a request id the coordinator never issued (or long forgotten).
    pub replies_unknown: AtomicU64,
    /// Replies from a client to a request addressed to another client.
    pub replies_wrong_client: AtomicU64,
    /// Fit updates that failed validation (digest, codec, names, shapes, NaN/Inf).
    pub updates_rejected: AtomicU64,
    /// Stream messages that could not be decoded or broke the protocol; each ends its stream.
    pub messages_malformed: AtomicU64,
    /// Weight bytes sent to and received from clients.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CountersSnapshot {
    pub replies_late: u64,
    pub replies_duplicate: u64,
    pub replies_unknown: u64,
    pub replies_wrong_client: u64,
    pub updates_rejected: u64,
    pub messages_malformed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            replies_late: self.replies_late.load(Relaxed),
            replies_duplicate: self.replies_duplicate.load(Relaxed),
            replies_unknown: self.replies_unknown.load(Relaxed),
            replies_wrong_client: self.replies_wrong_client.load(Relaxed),
            updates_rejected: self.updates_rejected.load(Relaxed),
            messages_malformed: self.messages_malformed.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
        }
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
            messages_malformed: self.messages_malformed - earlier.messages_malformed,
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
        }
    }
}
