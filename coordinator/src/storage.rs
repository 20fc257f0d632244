//! Object storage for weight blobs, behind the [`BlobStore`] trait.
//!
//! The coordinator is the only component that holds storage credentials. It writes each global
//! model once, reads each update once, and hands devices short-lived presigned URLs scoped to a
//! single object: a GET for the global model, a PUT for the one key the device must upload to.
//!
//! Backends:
//! - [`S3Store`] ([`s3`]): any S3-compatible store (AWS S3, MinIO, Ceph RGW, Garage): set
//!   `endpoint` and keep `path_style` for the non-AWS ones. The embedded default
//!   ([`embedded`]) is an in-process S3 server over a local folder that the same client talks
//!   to, so one machine needs nothing installed.
//! - [`MemoryStore`] ([`memory`]): objects in a map, for tests that act as the devices
//!   themselves.
//!
//! # Key layout
//! Every backend lays keys out alike, through [`Keys`]:
//! ```text
//! <prefix>runs/<run>/round-0000/global.safetensors          initial model
//! <prefix>runs/<run>/round-0003/global.safetensors          model produced by round 3
//! <prefix>runs/<run>/round-0004/updates/<client>.safetensors  a client's round-4 update
//! <prefix>runs/<run>/task-<sha256[..16]>.json               the run's task manifest
//! <prefix>runs/<run>/initial/<client>.safetensors           weights a client offered as initial
//! ```

pub mod embedded;
mod folder;
pub mod memory;
pub mod s3;

use std::time::Duration;

use bytes::Bytes;

pub use memory::MemoryStore;
pub use s3::{S3Store, StoreConfig};

/// The longest a presigned URL may live: SigV4's cap, which the S3 client enforces. The memory
/// store enforces it too, so that a TTL production would refuse fails in tests as well.
pub const MAX_PRESIGN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object storage at {endpoint}: bucket {bucket:?}: {message}")]
    Bucket {
        endpoint: String,
        bucket: String,
        message: String,
    },
    #[error("object storage: {op} {key:?}: {message}")]
    Request {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("object {key:?} is {size} bytes, more than the {limit} expected")]
    TooLarge { key: String, size: u64, limit: u64 },
    #[error("presigned URLs live at most 7 days (SigV4); asked for {0:?}")]
    Ttl(Duration),
}

/// The coordinator's handle on object storage: whole-object reads and writes with its own
/// credentials, and presigned URLs that let a device read or write one object without them.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Where blobs go, for the log line a person reads at start.
    fn describe(&self) -> String;

    /// The keys of a run's objects in this store.
    fn keys(&self) -> &Keys;

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError>;

    /// Reads a whole object, refusing objects larger than `limit` bytes before reading them.
    async fn get(&self, key: &str, limit: u64) -> Result<Bytes, StoreError>;

    /// Deletes an object; used for updates once folded, so storage stays O(model) per round.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// A URL that lets its holder GET exactly `key` for `ttl` (at most [`MAX_PRESIGN_TTL`]),
    /// and nothing else.
    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<String, StoreError>;

    /// A URL that lets its holder PUT exactly `key` for `ttl` (at most [`MAX_PRESIGN_TTL`]),
    /// and nothing else.
    async fn presign_put(&self, key: &str, ttl: Duration) -> Result<String, StoreError>;
}

/// Names a run's objects under a store's prefix (see the module's key layout).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` is prepended to every key as is, e.g. `"team-a/"`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Key of the global model that `round` produced (0 = the initial model).
    pub fn global(&self, run_id: &str, round: u64) -> String {
        format!(
            "{}runs/{run_id}/round-{round:04}/global.safetensors",
            self.prefix
        )
    }

    /// Key a client uploads its `round` update to.
    pub fn update(&self, run_id: &str, round: u64, client_id: &str) -> String {
        format!(
            "{}runs/{run_id}/round-{round:04}/updates/{client_id}.safetensors",
            self.prefix
        )
    }

    /// Key of a task manifest, named by its digest: a manifest is written once per run and
    /// content, whatever reads it.
    pub fn task(&self, run_id: &str, sha256: &str) -> String {
        let short = &sha256[..sha256.len().min(16)];
        format!("{}runs/{run_id}/task-{short}.json", self.prefix)
    }

    /// Key of a file the task names by digest (a TorchScript model).
    pub fn task_file(&self, run_id: &str, sha256: &str) -> String {
        let short = &sha256[..sha256.len().min(16)];
        format!("{}runs/{run_id}/file-{short}.bin", self.prefix)
    }

    /// Key a client uploads its weights to when asked for initial parameters.
    pub fn initial(&self, run_id: &str, client_id: &str) -> String {
        format!(
            "{}runs/{run_id}/initial/{client_id}.safetensors",
            self.prefix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout_under_the_prefix() {
        let keys = Keys::new("team-a/");
        assert_eq!(
            keys.global("r1", 0),
            "team-a/runs/r1/round-0000/global.safetensors"
        );
        assert_eq!(
            keys.global("r1", 12345),
            "team-a/runs/r1/round-12345/global.safetensors"
        );
        assert_eq!(
            keys.update("r1", 4, "dev-a"),
            "team-a/runs/r1/round-0004/updates/dev-a.safetensors"
        );
        assert_eq!(
            keys.task("r1", &"ab".repeat(32)),
            "team-a/runs/r1/task-abababababababab.json"
        );
        assert_eq!(
            keys.initial("r1", "dev-a"),
            "team-a/runs/r1/initial/dev-a.safetensors"
        );
        assert_eq!(
            Keys::default().global("r1", 3),
            "runs/r1/round-0003/global.safetensors"
        );
    }
}
