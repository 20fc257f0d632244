//! The run's task as the coordinator carries it: an opaque manifest (JSON bytes, named by
//! their SHA-256) that every instruction references, and an optional statistics phase that
//! fits the manifest before round 1. What the manifest says is the workflow's business; the
//! coordinator only stores, references and records it.

use bytes::Bytes;
use pollen_proto::Parameters;
use pollen_proto::blob::sha256_hex;
use pollen_proto::fleet::{TaskFile, TaskRef};

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
    /// Files the manifest names by digest (a TorchScript model): stored once, referenced by
    /// every instruction with the manifest.
    pub files: Vec<Bytes>,
}

impl TaskSetup {
    /// A task without a statistics phase.
    pub fn fixed(manifest: impl Into<Bytes>) -> Self {
        Self {
            manifest: manifest.into(),
            statistics: None,
            files: Vec::new(),
        }
    }

    /// The task with `files` besides its manifest.
    pub fn with_files(mut self, files: Vec<Bytes>) -> Self {
        self.files = files;
        self
    }
}

/// A file of the task and where it was stored.
pub(crate) struct PublishedFile {
    pub bytes: Bytes,
    pub sha256: String,
    pub key: Option<String>,
}

/// The current manifest, its files and where they were stored.
pub(crate) struct Published {
    pub manifest: Bytes,
    pub sha256: String,
    /// Object key once written to the store.
    pub key: Option<String>,
    pub files: Vec<PublishedFile>,
}

impl Published {
    pub fn new(manifest: Bytes, files: &[Bytes]) -> Self {
        Self {
            sha256: sha256_hex(&manifest),
            manifest,
            key: None,
            files: files
                .iter()
                .map(|bytes| PublishedFile {
                    sha256: sha256_hex(bytes),
                    bytes: bytes.clone(),
                    key: None,
                })
                .collect(),
        }
    }

    /// The reference for clients of a coordinator without object storage.
    pub fn inline(&self) -> TaskRef {
        TaskRef {
            sha256: self.sha256.clone(),
            size_bytes: self.manifest.len() as u64,
            inline: self.manifest.clone(),
            files: self
                .files
                .iter()
                .map(|f| TaskFile {
                    sha256: f.sha256.clone(),
                    size_bytes: f.bytes.len() as u64,
                    inline: f.bytes.clone(),
                    ..TaskFile::default()
                })
                .collect(),
            ..TaskRef::default()
        }
    }

    /// The reference by key and presigned URL; `files` are the files' keys and URLs, in order.
    pub fn by_reference(&self, key: String, url: String, files: Vec<(String, String)>) -> TaskRef {
        TaskRef {
            sha256: self.sha256.clone(),
            size_bytes: self.manifest.len() as u64,
            location: key,
            url,
            inline: Bytes::new(),
            files: self
                .files
                .iter()
                .zip(files)
                .map(|(f, (location, url))| TaskFile {
                    sha256: f.sha256.clone(),
                    size_bytes: f.bytes.len() as u64,
                    location,
                    url,
                    inline: Bytes::new(),
                })
                .collect(),
        }
    }
}
