//! Task manifests on the client side: a [`TaskRef`] (inline bytes, or a presigned GET) resolved
//! to a verified [`TaskBlob`], cached by digest so that a run's manifest is fetched once per
//! client rather than once per instruction; and the files the manifest names (a TorchScript
//! model), fetched, verified and cached the same way.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pollen_proto::blob::{check_digest, sha256_hex};
use pollen_proto::fleet::{TaskFile, TaskRef};

use crate::client::{ClientError, TaskBlob, TaskFileBlob};
use crate::transfer::{self, MAX_TASK_BYTES, MAX_TASK_FILE_BYTES};

/// Manifests kept in memory: a client serves one run at a time, two while one run ends and
/// the next begins.
const CAPACITY: usize = 4;

/// Verified manifests by digest, in memory and (optionally) in a folder that survives restarts.
#[derive(Debug, Default)]
pub struct TaskCache {
    entries: Mutex<VecDeque<Arc<TaskBlob>>>,
    dir: Option<PathBuf>,
}

impl TaskCache {
    /// A cache that also keeps manifests as `<dir>/<sha256>.json`.
    pub fn with_dir(dir: PathBuf) -> Self {
        Self {
            entries: Mutex::default(),
            dir: Some(dir),
        }
    }

    fn cached(&self, sha256: &str) -> Option<Arc<TaskBlob>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().find(|t| t.sha256 == sha256).cloned()
    }

    fn on_disk(&self, sha256: &str) -> Option<Arc<TaskBlob>> {
        let path = self.dir.as_ref()?.join(format!("{sha256}.json"));
        let bytes = std::fs::read(&path).ok()?;
        // A file damaged on disk is fetched again rather than trusted.
        (sha256_hex(&bytes) == sha256).then(|| {
            Arc::new(TaskBlob {
                sha256: sha256.to_string(),
                bytes: bytes.into(),
                files: Vec::new(),
            })
        })
    }

    fn remember(&self, task: Arc<TaskBlob>) {
        if let Some(dir) = &self.dir {
            let write = std::fs::create_dir_all(dir).and_then(|()| {
                std::fs::write(dir.join(format!("{}.json", task.sha256)), &task.bytes)
            });
            if let Err(e) = write {
                tracing::debug!("could not keep the task manifest in {}: {e}", dir.display());
            }
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|t| t.sha256 != task.sha256);
        entries.push_front(task);
        entries.truncate(CAPACITY);
    }

    /// The manifest `task` names: from the cache, its inline bytes, or its presigned URL (with
    /// `http`), digest verified. `None` in, `None` out: the instruction came without a task.
    pub async fn resolve(
        &self,
        task: Option<&TaskRef>,
        http: impl FnOnce() -> Result<reqwest::Client, ClientError>,
    ) -> Result<Option<Arc<TaskBlob>>, ClientError> {
        let Some(task) = task else {
            return Ok(None);
        };
        let sha256 = task.sha256.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ClientError::bad_instruction(format!(
                "task reference with sha256 {:?}; a manifest is named by its hex SHA-256",
                task.sha256
            )));
        }
        if let Some(hit) = self.cached(&sha256) {
            return Ok(Some(hit));
        }
        if let Some(mut hit) = self.on_disk(&sha256) {
            Arc::make_mut(&mut hit).files = self.files(&task.files, http).await?;
            self.remember(hit.clone());
            return Ok(Some(hit));
        }
        let blob = if !task.inline.is_empty() {
            if task.inline.len() as u64 > MAX_TASK_BYTES {
                return Err(ClientError::bad_instruction(format!(
                    "the inline task manifest is {} bytes; at most {MAX_TASK_BYTES} are accepted",
                    task.inline.len()
                )));
            }
            check_digest(&task.inline, &sha256)
                .map_err(|e| ClientError::bad_instruction(format!("task manifest: {e}")))?;
            TaskBlob {
                sha256,
                bytes: task.inline.clone(),
                files: Vec::new(),
            }
        } else if !task.url.is_empty() {
            let client = http()?;
            let blob =
                transfer::download_task(&client, &task.url, &sha256, task.size_bytes).await?;
            let files = self.files(&task.files, move || Ok(client)).await?;
            return Ok(Some(self.keep(TaskBlob { files, ..blob })));
        } else {
            return Err(ClientError::bad_instruction(
                "task reference with neither inline bytes nor a URL; this client holds no storage credentials",
            ));
        };
        let files = self.files(&task.files, http).await?;
        Ok(Some(self.keep(TaskBlob { files, ..blob })))
    }

    fn keep(&self, blob: TaskBlob) -> Arc<TaskBlob> {
        let blob = Arc::new(blob);
        self.remember(blob.clone());
        blob
    }

    /// The files a manifest names, each from disk, its inline bytes or its presigned URL,
    /// digest verified, kept on disk as `<dir>/<sha256>.bin`.
    async fn files(
        &self,
        refs: &[TaskFile],
        http: impl FnOnce() -> Result<reqwest::Client, ClientError>,
    ) -> Result<Vec<Arc<TaskFileBlob>>, ClientError> {
        let mut http = Some(http);
        let mut client: Option<reqwest::Client> = None;
        let mut out = Vec::with_capacity(refs.len());
        for f in refs {
            let sha256 = f.sha256.to_ascii_lowercase();
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ClientError::bad_instruction(format!(
                    "task file with sha256 {:?}; a file is named by its hex SHA-256",
                    f.sha256
                )));
            }
            let path = self.dir.as_ref().map(|d| d.join(format!("{sha256}.bin")));
            // A file damaged on disk is fetched again rather than trusted.
            if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok())
                && sha256_hex(&bytes) == sha256
            {
                out.push(Arc::new(TaskFileBlob {
                    sha256,
                    bytes: bytes.into(),
                }));
                continue;
            }
            let blob = if !f.inline.is_empty() {
                if f.inline.len() as u64 > MAX_TASK_FILE_BYTES {
                    return Err(ClientError::bad_instruction(format!(
                        "an inline task file of {} bytes; at most {MAX_TASK_FILE_BYTES} are accepted",
                        f.inline.len()
                    )));
                }
                check_digest(&f.inline, &sha256)
                    .map_err(|e| ClientError::bad_instruction(format!("task file: {e}")))?;
                TaskFileBlob {
                    sha256,
                    bytes: f.inline.clone(),
                }
            } else if !f.url.is_empty() {
                if client.is_none()
                    && let Some(make) = http.take()
                {
                    client = Some(make()?);
                }
                let Some(c) = client.as_ref() else {
                    return Err(ClientError::training("no HTTP client for the task's files"));
                };
                transfer::download_task_file(c, &f.url, &sha256, f.size_bytes).await?
            } else {
                return Err(ClientError::bad_instruction(
                    "task file with neither inline bytes nor a URL; this client holds no storage credentials",
                ));
            };
            if let Some(path) = &path
                && let Err(e) = std::fs::write(path, &blob.bytes)
            {
                tracing::debug!("could not keep the task file in {}: {e}", path.display());
            }
            out.push(Arc::new(blob));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(doc: &str) -> TaskRef {
        TaskRef {
            sha256: sha256_hex(doc.as_bytes()),
            size_bytes: doc.len() as u64,
            inline: bytes::Bytes::copy_from_slice(doc.as_bytes()),
            ..Default::default()
        }
    }

    fn no_http() -> Result<reqwest::Client, ClientError> {
        Err(ClientError::training("no HTTP in this test"))
    }

    #[tokio::test]
    async fn inline_manifests_are_verified_cached_and_kept_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = TaskCache::with_dir(dir.path().to_path_buf());
        let r = inline("{\"task\":1}");
        let got = cache
            .resolve(Some(&r), no_http)
            .await
            .expect("resolves")
            .expect("some");
        assert_eq!(&got.bytes[..], b"{\"task\":1}");
        // Known by digest now: a reference without bytes or URL resolves from the cache, and
        // from disk in a fresh cache (an agent restarted mid-run).
        let bare = TaskRef {
            inline: bytes::Bytes::new(),
            ..r.clone()
        };
        assert!(cache.resolve(Some(&bare), no_http).await.is_ok());
        let fresh = TaskCache::with_dir(dir.path().to_path_buf());
        assert!(fresh.resolve(Some(&bare), no_http).await.is_ok());
        assert!(cache.resolve(None, no_http).await.expect("ok").is_none());
    }

    #[tokio::test]
    async fn files_come_with_their_manifest_verified_and_a_tampered_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = TaskCache::with_dir(dir.path().to_path_buf());
        let model = b"a TorchScript archive".to_vec();
        let file = TaskFile {
            sha256: sha256_hex(&model),
            size_bytes: model.len() as u64,
            inline: model.clone().into(),
            ..Default::default()
        };
        let r = TaskRef {
            files: vec![file.clone()],
            ..inline("{\"model\":1}")
        };
        let got = cache
            .resolve(Some(&r), no_http)
            .await
            .expect("resolves")
            .expect("some");
        assert_eq!(
            &got.file(&file.sha256).expect("the file").bytes[..],
            &model[..]
        );
        // Kept on disk: a fresh cache finds manifest and file without their bytes.
        let bare = TaskRef {
            inline: bytes::Bytes::new(),
            files: vec![TaskFile {
                inline: bytes::Bytes::new(),
                ..file.clone()
            }],
            ..r.clone()
        };
        let fresh = TaskCache::with_dir(dir.path().to_path_buf());
        let again = fresh
            .resolve(Some(&bare), no_http)
            .await
            .expect("resolves")
            .expect("some");
        assert!(again.file(&file.sha256).is_some());
        // A file whose bytes are not its digest's is a bad instruction naming the digest.
        let tampered = TaskRef {
            files: vec![TaskFile {
                inline: bytes::Bytes::from_static(b"something else"),
                ..file
            }],
            ..inline("{\"model\":2}")
        };
        let e = TaskCache::default()
            .resolve(Some(&tampered), no_http)
            .await
            .expect_err("tampered");
        assert!(
            e.message.contains("digest mismatch") && e.message.contains(&sha256_hex(&model)),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn a_manifest_that_does_not_match_its_digest_is_refused() {
        let mut r = inline("{\"task\":1}");
        r.inline = bytes::Bytes::from_static(b"{\"task\":2}");
        let e = TaskCache::default()
            .resolve(Some(&r), no_http)
            .await
            .expect_err("tampered");
        assert!(e.message.contains("digest mismatch"), "{}", e.message);
        let mut r = inline("{}");
        r.sha256 = "abc".into();
        let e = TaskCache::default()
            .resolve(Some(&r), no_http)
            .await
            .expect_err("bad digest");
        assert!(e.message.contains("hex SHA-256"), "{}", e.message);
    }
}
