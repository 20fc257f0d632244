//! The run's task as the coordinator carries it: an opaque manifest (JSON bytes, named by
//! their SHA-256) that every instruction references, and an optional statistics phase that
//! fits the manifest before round 1. What the manifest says is the workflow's business; the
//! coordinator only stores, references and records it.

use bytes::Bytes;
use pollen_proto::Parameters;
use pollen_proto::blob::sha256_hex;
use pollen_proto::fleet::TaskRef;

use crate::statistics::FederatedStatistics;

/// What a statistics phase produces: the manifest the rounds use (with what was fitted), and
/// the initial model when the strategy could not make one before (e.g. the classes came from
/// the clients' label counts).
pub struct Fitted {
    pub manifest: Bytes,
    pub initial: Option<Parameters>,
}

/// Turns the federated statistics into the fitted manifest; an error ends the run before
/// round 1, with the message.
pub type FitManifest = Box<dyn FnOnce(&FederatedStatistics) -> Result<Fitted, String> + Send>;

/// A run's task.
pub struct TaskSetup {
    /// The manifest instructions reference (the statistics query's, when there is a
    /// statistics phase).
    pub manifest: Bytes,
    /// Ask the clients for statistics of their data before round 1, and fit the manifest.
    pub statistics: Option<FitManifest>,
}

impl TaskSetup {
    /// A task without a statistics phase.
    pub fn fixed(manifest: impl Into<Bytes>) -> Self {
        Self {
            manifest: manifest.into(),
            statistics: None,
        }
    }
}

/// The current manifest and where it was stored.
pub(crate) struct Published {
    pub manifest: Bytes,
    pub sha256: String,
    /// Object key once written to the store.
    pub key: Option<String>,
}

impl Published {
    pub fn new(manifest: Bytes) -> Self {
        Self {
            sha256: sha256_hex(&manifest),
            manifest,
            key: None,
        }
    }

    /// The reference for clients of a coordinator without object storage.
    pub fn inline(&self) -> TaskRef {
        TaskRef {
            sha256: self.sha256.clone(),
            size_bytes: self.manifest.len() as u64,
            inline: self.manifest.clone(),
            ..TaskRef::default()
        }
    }

    /// The reference by key and presigned URL.
    pub fn by_reference(&self, key: String, url: String) -> TaskRef {
        TaskRef {
            sha256: self.sha256.clone(),
            size_bytes: self.manifest.len() as u64,
            location: key,
            url,
            inline: Bytes::new(),
        }
    }
}
