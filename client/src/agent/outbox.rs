//! Finished replies waiting to be (re)delivered, and the ids of handled commands, optionally
//! persisted under the agent's work directory so that a restarted agent still delivers what it
//! finished before dying and does not redo a command the broker redelivers.
//!
//! ```text
//! <work_dir>/outbox/<request_id>.pb   OutboxRecord{expires_unix_ms, reply payload}
//! <work_dir>/handled.json             {"<request_id>": <forget at, Unix ms>, ...}
//! ```
//!
//! Files are written to a temporary name and renamed, so a crash never leaves half a record.
//! Persistence is best effort: a write that fails is logged and the reply still goes out from
//! memory.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use pollen_proto::blob::sha256_hex;
use pollen_proto::device::Reply;
use prost::Message;

/// One persisted outbox entry.
#[derive(Clone, PartialEq, prost::Message)]
struct OutboxRecord {
    #[prost(uint64, tag = "1")]
    expires_unix_ms: u64,
    /// The encoded `Reply`, exactly as published.
    #[prost(bytes = "bytes", tag = "2")]
    payload: Bytes,
}

#[derive(Debug)]
struct Entry {
    payload: Bytes,
    expires_unix_ms: u64,
    /// Handed to the MQTT client since the last (re)connect.
    sent: bool,
}

/// Replies kept until their command's deadline, keyed by request id.
#[derive(Debug, Default)]
pub struct Outbox {
    dir: Option<PathBuf>,
    entries: BTreeMap<String, Entry>,
}

/// A file name for `request_id` that cannot escape the outbox folder: the id itself when it is
/// tame, else a digest of it (the record inside names the id either way).
fn file_name(request_id: &str) -> String {
    let tame = request_id.len() <= 100
        && !request_id.starts_with('.')
        && request_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if tame {
        format!("{request_id}.pb")
    } else {
        format!("id-{}.pb", &sha256_hex(request_id.as_bytes())[..32])
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

impl Outbox {
    /// An outbox in memory only.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// An outbox persisted in `dir` (created if missing), loaded with the entries a previous
    /// run left that have not expired. Unreadable and expired files are removed.
    pub fn open(dir: PathBuf, now_ms: u64) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut entries = BTreeMap::new();
        for item in std::fs::read_dir(&dir)? {
            let path = item?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pb") {
                continue;
            }
            let loaded = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    let record = OutboxRecord::decode(bytes.as_slice())
                        .map_err(|e| format!("not an outbox record: {e}"))?;
                    let reply = Reply::decode(record.payload.as_ref())
                        .map_err(|e| format!("not a Reply: {e}"))?;
                    Ok((reply.request_id, record))
                });
            match loaded {
                Ok((id, record)) if record.expires_unix_ms > now_ms && !id.is_empty() => {
                    entries.insert(
                        id,
                        Entry {
                            payload: record.payload,
                            expires_unix_ms: record.expires_unix_ms,
                            sent: false,
                        },
                    );
                }
                Ok(_) => remove(&path),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "dropping an unreadable outbox file: {e}");
                    remove(&path);
                }
            }
        }
        Ok(Self {
            dir: Some(dir),
            entries,
        })
    }

    /// Keeps `payload` (an encoded [`Reply`]) for `request_id` until `expires_unix_ms`.
    pub fn put(&mut self, request_id: &str, payload: Bytes, expires_unix_ms: u64) {
        if let Some(dir) = &self.dir {
            let record = OutboxRecord {
                expires_unix_ms,
                payload: payload.clone(),
            };
            let path = dir.join(file_name(request_id));
            if let Err(e) = write_atomically(&path, &record.encode_to_vec()) {
                tracing::warn!(path = %path.display(), "cannot persist a reply (it is still sent): {e}");
            }
        }
        self.entries.insert(
            request_id.to_string(),
            Entry {
                payload,
                expires_unix_ms,
                sent: false,
            },
        );
    }

    pub fn get(&self, request_id: &str) -> Option<&Bytes> {
        self.entries.get(request_id).map(|e| &e.payload)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Request ids in the outbox (to mark them handled after a restart).
    pub fn request_ids(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries
            .iter()
            .map(|(id, e)| (id.as_str(), e.expires_unix_ms))
    }

    /// Every entry, to republish after a (re)connect. Marks them all unsent first.
    pub fn all(&mut self) -> Vec<(String, Bytes)> {
        self.entries
            .iter_mut()
            .map(|(id, e)| {
                e.sent = false;
                (id.clone(), e.payload.clone())
            })
            .collect()
    }

    /// Entries not yet handed to the MQTT client.
    pub fn unsent(&self) -> Vec<(String, Bytes)> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.sent)
            .map(|(id, e)| (id.clone(), e.payload.clone()))
            .collect()
    }

    pub fn mark_sent(&mut self, request_id: &str) {
        if let Some(e) = self.entries.get_mut(request_id) {
            e.sent = true;
        }
    }

    /// Drops entries whose deadline passed: the proxy would discard them anyway.
    pub fn expire(&mut self, now_ms: u64) {
        let dir = self.dir.as_deref();
        self.entries.retain(|id, e| {
            let keep = e.expires_unix_ms > now_ms;
            if !keep && let Some(dir) = dir {
                remove(&dir.join(file_name(id)));
            }
            keep
        });
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), "cannot remove an outbox file: {e}");
    }
}

/// Loads the handled request ids a previous run saved at `path`, dropping expired ones. A
/// missing file is an empty set; an unreadable one is logged and ignored (the worst outcome is
/// a redelivered command run twice, which the proxy dedupes).
pub fn load_handled(path: &Path, now_ms: u64) -> HashMap<String, u64> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read handled request ids: {e}");
            return HashMap::new();
        }
    };
    match serde_json::from_str::<HashMap<String, u64>>(&text) {
        Ok(mut ids) => {
            ids.retain(|_, forget| *forget > now_ms);
            ids
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring unreadable handled request ids: {e}");
            HashMap::new()
        }
    }
}

/// Saves the handled request ids to `path` (best effort, logged on failure).
pub fn save_handled(path: &Path, ids: &HashMap<String, u64>) {
    let result = serde_json::to_vec(ids)
        .map_err(io::Error::other)
        .and_then(|bytes| write_atomically(path, &bytes));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), "cannot save handled request ids: {e}");
    }
}

#[cfg(test)]
mod tests {
    use pollen_proto::device::{FitReply, reply::Body};

    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn reply(id: &str) -> Bytes {
        Reply {
            request_id: id.into(),
            device_id: "dev-1".into(),
            round: 2,
            body: Some(Body::Fit(FitReply {
                sha256: "ab".repeat(32),
                size_bytes: 99,
                ..Default::default()
            })),
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn a_reopened_outbox_holds_the_replies_that_have_not_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outbox");
        let mut outbox = Outbox::open(path.clone(), NOW).expect("opens");
        outbox.put("r-1", reply("r-1"), NOW + 1000);
        outbox.put("old", reply("old"), NOW + 10);
        // An id that is no safe file name is stored under a digest.
        outbox.put("../../etc/passwd", reply("../../etc/passwd"), NOW + 1000);
        std::fs::write(path.join("junk.pb"), b"not a record").expect("write");
        drop(outbox);

        let reopened = Outbox::open(path.clone(), NOW + 10).expect("reopens");
        assert_eq!(reopened.get("r-1"), Some(&reply("r-1")));
        assert!(reopened.get("old").is_none(), "expired");
        assert!(reopened.get("../../etc/passwd").is_some());
        assert_eq!(reopened.len(), 2);
        let mut files: Vec<String> = std::fs::read_dir(&path)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files.contains(&"r-1.pb".to_string()), "{files:?}");
        assert!(files.iter().all(|f| f.ends_with(".pb")), "{files:?}");
    }

    #[test]
    fn expired_replies_leave_memory_and_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path().to_path_buf(), NOW).expect("opens");
        outbox.put("r-1", reply("r-1"), NOW + 5);
        assert!(dir.path().join("r-1.pb").exists());
        outbox.expire(NOW + 5);
        assert!(outbox.is_empty());
        assert!(!dir.path().join("r-1.pb").exists());
    }

    #[test]
    fn entries_are_unsent_until_marked_and_again_after_a_reconnect() {
        let mut outbox = Outbox::in_memory();
        outbox.put("a", reply("a"), NOW + 5);
        assert_eq!(outbox.unsent().len(), 1);
        outbox.mark_sent("a");
        assert!(outbox.unsent().is_empty());
        assert_eq!(outbox.all().len(), 1);
        assert_eq!(outbox.unsent().len(), 1);
    }

    #[test]
    fn handled_ids_survive_a_round_trip_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handled.json");
        assert!(load_handled(&path, NOW).is_empty());
        let ids = HashMap::from([("a".to_string(), NOW + 10), ("b".to_string(), NOW + 1)]);
        save_handled(&path, &ids);
        let loaded = load_handled(&path, NOW + 1);
        assert_eq!(loaded, HashMap::from([("a".to_string(), NOW + 10)]));
        std::fs::write(&path, "{ not json").expect("write");
        assert!(load_handled(&path, NOW).is_empty());
    }
}
