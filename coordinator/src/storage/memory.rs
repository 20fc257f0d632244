//! [`MemoryStore`]: objects in a map, for tests that play the devices themselves.
//!
//! Its presigned URLs name what an S3 URL signs, in the clear:
//! `memory://<METHOD>/<key>?expires_unix_ms=<ms>`. A test acting as a device turns one back
//! into a transfer with [`MemoryStore::download`] or [`MemoryStore::upload`], which refuse
//! the wrong method and an expired URL as S3 would (nothing is signed, so a test can also
//! forge one).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{BlobStore, Keys, MAX_PRESIGN_TTL, StoreError};

const SCHEME: &str = "memory://";
const EXPIRES: &str = "?expires_unix_ms=";

/// What a presigned URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        })
    }
}

/// Why a presigned URL could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is not a presigned memory:// URL")]
    Malformed(String),
    #[error("{url:?} allows {allowed}, not {used}")]
    WrongMethod {
        url: String,
        allowed: Method,
        used: Method,
    },
    #[error("{url:?} expired at unix ms {expired_at}")]
    Expired { url: String, expired_at: u64 },
    #[error("no object {0:?}")]
    NotFound(String),
}

/// An in-memory [`BlobStore`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    keys: Keys,
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryStore {
    /// An empty store whose keys start with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            keys: Keys::new(prefix),
            objects: Mutex::default(),
        }
    }

    fn objects(&self) -> MutexGuard<'_, BTreeMap<String, Bytes>> {
        // Inserts and removals of whole entries leave the map consistent even if a holder
        // panicked; a failed test should report its own assertion, not a poisoned lock.
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys of the objects stored, sorted.
    pub fn stored(&self) -> Vec<String> {
        self.objects().keys().cloned().collect()
    }

    /// What a device holding `url` gets from a GET on it.
    pub fn download(&self, url: &str) -> Result<Bytes, UrlError> {
        let key = Self::allowed(url, Method::Get)?;
        self.objects()
            .get(&key)
            .cloned()
            .ok_or(UrlError::NotFound(key))
    }

    /// A device's PUT of `bytes` on `url`.
    pub fn upload(&self, url: &str, bytes: Bytes) -> Result<(), UrlError> {
        let key = Self::allowed(url, Method::Put)?;
        self.objects().insert(key, bytes);
        Ok(())
    }

    /// The key `url` lets its holder `used` on, now.
    fn allowed(url: &str, used: Method) -> Result<String, UrlError> {
        let malformed = || UrlError::Malformed(url.to_string());
        let rest = url.strip_prefix(SCHEME).ok_or_else(malformed)?;
        let (method, rest) = rest.split_once('/').ok_or_else(malformed)?;
        let allowed = match method {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            _ => return Err(malformed()),
        };
        let (key, expires) = rest.rsplit_once(EXPIRES).ok_or_else(malformed)?;
        let expired_at: u64 = expires.parse().map_err(|_| malformed())?;
        if allowed != used {
            return Err(UrlError::WrongMethod {
                url: url.to_string(),
                allowed,
                used,
            });
        }
        if pollen_proto::now_unix_ms() >= expired_at {
            return Err(UrlError::Expired {
                url: url.to_string(),
                expired_at,
            });
        }
        Ok(key.to_string())
    }

    fn presign(method: Method, key: &str, ttl: Duration) -> Result<String, StoreError> {
        if ttl > MAX_PRESIGN_TTL {
            return Err(StoreError::Ttl(ttl));
        }
        let expires = pollen_proto::unix_ms(SystemTime::now() + ttl);
        Ok(format!("{SCHEME}{method}/{key}{EXPIRES}{expires}"))
    }
}

#[async_trait::async_trait]
impl BlobStore for MemoryStore {
    fn describe(&self) -> String {
        "in memory (this process only)".into()
    }

    fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.objects().insert(key.to_string(), bytes);
        Ok(())
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Bytes, StoreError> {
        let objects = self.objects();
        let bytes = objects.get(key).ok_or_else(|| StoreError::Request {
            op: "GET",
            key: key.to_string(),
            message: "no such object".into(),
        })?;
        if bytes.len() as u64 > limit {
            return Err(StoreError::TooLarge {
                key: key.to_string(),
                size: bytes.len() as u64,
                limit,
            });
        }
        Ok(bytes.clone())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        // Like S3, deleting a missing object succeeds.
        self.objects().remove(key);
        Ok(())
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<String, StoreError> {
        Self::presign(Method::Get, key, ttl)
    }

    async fn presign_put(&self, key: &str, ttl: Duration) -> Result<String, StoreError> {
        Self::presign(Method::Put, key, ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn a_presigned_put_then_get_moves_the_bytes_to_exactly_that_key() {
        let store = MemoryStore::new("p/");
        let key = store.keys().update("run", 1, "dev-a");
        let put = store.presign_put(&key, HOUR).await.expect("presign");
        assert!(put.starts_with("memory://PUT/p/runs/run/round-0001/updates/dev-a"));
        store
            .upload(&put, Bytes::from_static(b"update"))
            .expect("upload");
        assert_eq!(store.stored(), vec![key.clone()]);
        let get = store.presign_get(&key, HOUR).await.expect("presign");
        assert_eq!(store.download(&get), Ok(Bytes::from_static(b"update")));
        assert_eq!(
            store.get(&key, 6).await.expect("get"),
            Bytes::from_static(b"update")
        );
    }

    #[tokio::test]
    async fn a_url_is_refused_for_the_other_method_and_once_expired() {
        let store = MemoryStore::default();
        store
            .put("k", Bytes::from_static(b"global"))
            .await
            .expect("put");
        let get = store.presign_get("k", HOUR).await.expect("presign");
        assert!(matches!(
            store.upload(&get, Bytes::from_static(b"overwrite")),
            Err(UrlError::WrongMethod {
                allowed: Method::Get,
                used: Method::Put,
                ..
            })
        ));
        let put = store.presign_put("k", HOUR).await.expect("presign");
        assert!(matches!(
            store.download(&put),
            Err(UrlError::WrongMethod {
                allowed: Method::Put,
                used: Method::Get,
                ..
            })
        ));
        let expired = store
            .presign_get("k", Duration::ZERO)
            .await
            .expect("presign");
        assert!(matches!(
            store.download(&expired),
            Err(UrlError::Expired { .. })
        ));
        // None of the refused uses wrote anything.
        assert_eq!(
            store.get("k", 100).await.expect("get"),
            Bytes::from_static(b"global")
        );
        assert!(matches!(
            store.download("https://bucket.s3/k"),
            Err(UrlError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn get_refuses_objects_over_the_limit_and_missing_ones() {
        let store = MemoryStore::default();
        store
            .put("k", Bytes::from(vec![0u8; 10]))
            .await
            .expect("put");
        assert!(matches!(
            store.get("k", 9).await,
            Err(StoreError::TooLarge {
                size: 10,
                limit: 9,
                ..
            })
        ));
        assert_eq!(store.get("k", 10).await.expect("at the limit").len(), 10);
        store.delete("k").await.expect("delete");
        store.delete("k").await.expect("deleting twice is fine");
        assert!(matches!(
            store.get("k", 10).await,
            Err(StoreError::Request { op: "GET", .. })
        ));
    }

    #[tokio::test]
    async fn urls_may_not_outlive_what_sigv4_allows() {
        let store = MemoryStore::default();
        assert!(store.presign_put("k", MAX_PRESIGN_TTL).await.is_ok());
        assert!(matches!(
            store
                .presign_put("k", MAX_PRESIGN_TTL + Duration::from_secs(1))
                .await,
            Err(StoreError::Ttl(_))
        ));
    }
}
