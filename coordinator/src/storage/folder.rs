//! What the embedded S3 server stores objects in: plain files, `<root>/<bucket>/<key>`.
//!
//! s3s speaks the protocol (routing, SigV4 and presigned URLs, XML); this backend implements
//! the operations Pollen's coordinator and devices use (buckets: head, create; objects: head,
//! get, put, delete) and refuses the others with S3's own `NotImplemented`. It replaces
//! s3s-fs, whose GETs stream files in 4 KiB reads (a blocking-pool round trip each: about 200
//! per 800 KB model, 20-30 MB/s with ten devices downloading at once), and whose PUTs leave
//! JSON side files behind that deletes never remove. Objects are whole files, read and written
//! in 1 MiB steps; a PUT goes to a temporary file renamed into place, so that a GET never sees
//! half an object. No fsync: the embedded store is a single machine's scratch space, and the
//! run's checkpoints are kept apart (`runs/<run>/models/`).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use futures::StreamExt as _;
use s3s::crypto::{Checksum as _, Md5};
use s3s::dto::{
    CreateBucketInput, CreateBucketOutput, DeleteObjectInput, DeleteObjectOutput, ETag,
    GetObjectInput, GetObjectOutput, HeadBucketInput, HeadBucketOutput, HeadObjectInput,
    HeadObjectOutput, PutObjectInput, PutObjectOutput, StreamingBlob, Timestamp,
};
use s3s::{S3, S3Error, S3Request, S3Response, S3Result, s3_error};
use tokio::io::AsyncWriteExt as _;

/// Read and write step: large enough that a model moves in a few blocking-pool trips.
const CHUNK: usize = 1 << 20;
/// S3's own ceiling for a single PUT; a presigned URL's holder cannot fill the disk past it in
/// one upload.
const MAX_OBJECT_BYTES: u64 = 5 << 30;
/// Where uploads are written before they are renamed into place: a name no bucket can have.
const UPLOADS: &str = ".uploads";

/// Buckets and objects as folders and files under `root`.
#[derive(Debug)]
pub(super) struct Folder {
    root: PathBuf,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> S3Error {
    s3_error!(e, InternalError, "{what} {}", path.display())
}

impl Folder {
    pub(super) fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join(UPLOADS))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// S3's bucket naming rules, which also keep a bucket a single plain folder name.
    fn bucket(&self, bucket: &str) -> S3Result<PathBuf> {
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && bucket.as_bytes()[0].is_ascii_alphanumeric()
            && !bucket.contains("..");
        if !valid {
            return Err(s3_error!(
                InvalidBucketName,
                "{bucket:?} is not a valid bucket name"
            ));
        }
        Ok(self.root.join(bucket))
    }

    /// The file of `key`: keys whose segments could leave the bucket's folder (`..`, empty,
    /// absolute, backslashes) are refused, as are folder-like keys ending in `/`.
    fn object(&self, bucket: &str, key: &str) -> S3Result<PathBuf> {
        let mut path = self.bucket(bucket)?;
        let bad = key.is_empty()
            || key.len() > 1024
            || key.contains(['\\', '\0'])
            || key
                .split('/')
                .any(|segment| segment.is_empty() || segment == "." || segment == "..");
        if bad {
            return Err(s3_error!(
                InvalidArgument,
                "key {key:?} is not supported by the embedded store"
            ));
        }
        path.extend(key.split('/'));
        Ok(path)
    }

    async fn bucket_exists(&self, bucket: &str) -> S3Result<PathBuf> {
        let path = self.bucket(bucket)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_dir() => Ok(path),
            _ => Err(s3_error!(NoSuchBucket, "no bucket {bucket:?}")),
        }
    }

    /// The object's file and what S3 says about it, or `NoSuchKey`.
    async fn stat(&self, bucket: &str, key: &str) -> S3Result<(PathBuf, Stat)> {
        let path = self.object(bucket, key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => {
                let modified = m.modified().map_err(|e| io_error("stat", &path, e))?;
                Ok((path, Stat::new(m.len(), modified)))
            }
            Ok(_) => Err(s3_error!(NoSuchKey)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.bucket_exists(bucket).await?;
                Err(s3_error!(NoSuchKey))
            }
            Err(e) => Err(io_error("stat", &path, e)),
        }
    }
}

/// Size, modification time and the ETag derived from both.
struct Stat {
    len: u64,
    modified: SystemTime,
}

impl Stat {
    fn new(len: u64, modified: SystemTime) -> Self {
        Self { len, modified }
    }

    /// Size and modification time, as file servers derive their ETags: it changes with every
    /// write without hashing the object (clients treat ETags as opaque; blobs carry their own
    /// SHA-256).
    fn e_tag(&self) -> ETag {
        let nanos = self
            .modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        ETag::Strong(format!("{nanos:x}-{:x}", self.len))
    }

    fn length(&self) -> S3Result<i64> {
        i64::try_from(self.len).map_err(|_| s3_error!(InternalError, "object too large"))
    }
}

#[async_trait::async_trait]
impl S3 for Folder {
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.bucket_exists(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let path = self.bucket(&req.input.bucket)?;
        match tokio::fs::create_dir(&path).await {
            Ok(()) => Ok(S3Response::new(CreateBucketOutput::default())),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(s3_error!(BucketAlreadyOwnedByYou))
            }
            Err(e) => Err(io_error("create", &path, e)),
        }
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let (_, stat) = self.stat(&req.input.bucket, &req.input.key).await?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(stat.length()?),
            e_tag: Some(stat.e_tag()),
            last_modified: Some(Timestamp::from(stat.modified)),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        if input.range.is_some() || input.part_number.is_some() {
            return Err(s3_error!(
                NotImplemented,
                "the embedded store serves whole objects only"
            ));
        }
        let (path, stat) = self.stat(&input.bucket, &input.key).await?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error("open", &path, e))?;
        let body = tokio_util::io::ReaderStream::with_capacity(file, CHUNK);
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(body)),
            content_length: Some(stat.length()?),
            e_tag: Some(stat.e_tag()),
            last_modified: Some(Timestamp::from(stat.modified)),
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let input = req.input;
        if input.checksum_algorithm.is_some()
            || input.checksum_crc32.is_some()
            || input.checksum_crc32c.is_some()
            || input.checksum_crc64nvme.is_some()
            || input.checksum_sha1.is_some()
            || input.checksum_sha256.is_some()
            || input.if_match.is_some()
            || input.if_none_match.is_some()
        {
            return Err(s3_error!(
                NotImplemented,
                "the embedded store takes no checksum or conditional headers (Content-MD5 is checked)"
            ));
        }
        let path = self.object(&input.bucket, &input.key)?;
        let bucket = self.bucket_exists(&input.bucket).await?;
        let Some(mut body) = input.body else {
            return Err(s3_error!(IncompleteBody));
        };
        if input
            .content_length
            .is_some_and(|n| u64::try_from(n).map_or(true, |n| n > MAX_OBJECT_BYTES))
        {
            return Err(s3_error!(EntityTooLarge));
        }
        let temp = self.root.join(UPLOADS).join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let written = async {
            let file = tokio::fs::File::create(&temp)
                .await
                .map_err(|e| io_error("create", &temp, e))?;
            let mut out = tokio::io::BufWriter::with_capacity(CHUNK, file);
            let mut md5 = input.content_md5.as_ref().map(|_| Md5::new());
            let mut len: u64 = 0;
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| s3_error!(IncompleteBody, "reading the body: {e}"))?;
                len += chunk.len() as u64;
                if len > MAX_OBJECT_BYTES {
                    return Err(s3_error!(EntityTooLarge));
                }
                if let Some(h) = &mut md5 {
                    h.update(&chunk);
                }
                out.write_all(&chunk)
                    .await
                    .map_err(|e| io_error("write", &temp, e))?;
            }
            out.flush().await.map_err(|e| io_error("write", &temp, e))?;
            if input
                .content_length
                .is_some_and(|n| u64::try_from(n).ok() != Some(len))
            {
                return Err(s3_error!(IncompleteBody, "{len} bytes, not Content-Length"));
            }
            if let (Some(h), Some(expected)) = (md5, &input.content_md5)
                && base64::engine::general_purpose::STANDARD.encode(h.finalize()) != *expected
            {
                return Err(s3_error!(
                    BadDigest,
                    "the body does not match its Content-MD5"
                ));
            }
            if let Some(parent) = path.parent().filter(|p| *p != bucket) {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| io_error("create", parent, e))?;
            }
            tokio::fs::rename(&temp, &path)
                .await
                .map_err(|e| io_error("rename into", &path, e))?;
            Ok(len)
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        let len = written?;
        let modified = tokio::fs::metadata(&path)
            .await
            .and_then(|m| m.modified())
            .map_err(|e| io_error("stat", &path, e))?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(Stat::new(len, modified).e_tag()),
            size: i64::try_from(len).ok(),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let input = req.input;
        let path = self.object(&input.bucket, &input.key)?;
        self.bucket_exists(&input.bucket).await?;
        // Folders a key made stay (empty ones cost nothing): removing them here would race an
        // upload about to land in the same folder.
        match tokio::fs::remove_file(&path).await {
            // Deleting a missing key succeeds in S3 too.
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("delete", &path, e)),
        }
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_buckets_that_would_leave_the_root_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Folder::new(dir.path()).expect("folder");
        assert_eq!(
            f.object("pollen", "runs/r/round-0001/global.safetensors")
                .expect("valid"),
            dir.path()
                .join("pollen/runs/r/round-0001/global.safetensors")
        );
        for key in ["../x", "a/../../x", "/abs", "a//b", "a/", "a\\b", ""] {
            assert!(f.object("pollen", key).is_err(), "{key:?}");
        }
        for bucket in ["..", ".uploads", "Caps", "a", "a/b", "x..y"] {
            assert!(f.bucket(bucket).is_err(), "{bucket:?}");
        }
    }
}
