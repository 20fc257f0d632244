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
/// Longest wait for the next piece of an upload's body.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// Where uploads are written before they are renamed into place: a name no bucket can have.
const UPLOADS: &str = ".uploads";

/// Buckets and objects as folders and files under `root`.
#[derive(Debug)]
pub(super) struct Folder {
    root: PathBuf,
}

/// The server's own failure: logged with its path, answered without it (the answer reaches
/// devices, which have no business knowing the server's folders).
fn io_error(what: &str, path: &Path, e: std::io::Error) -> S3Error {
    tracing::warn!(path = %path.display(), "embedded S3: cannot {what}: {e}");
    s3_error!(
        e,
        InternalError,
        "the embedded store cannot {what} the object"
    )
}

/// An error meaning no object is there: nothing at the path, or a file or folder in the way
/// (`a/b` when `a` is an object, or a key naming a folder other keys made).
fn is_absent(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{IsADirectory, NotADirectory, NotFound};
    matches!(e.kind(), NotFound | NotADirectory | IsADirectory)
}

/// An upload's temporary file, removed unless it was renamed into place: also when the
/// request is dropped mid-body (a device gone, the server shutting down).
struct TempUpload(PathBuf);

impl Drop for TempUpload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Folder {
    pub(super) fn new(root: &Path) -> std::io::Result<Self> {
        // What a crash left half-written is of no use to anyone.
        let uploads = root.join(UPLOADS);
        if uploads.exists() {
            std::fs::remove_dir_all(&uploads)?;
        }
        std::fs::create_dir_all(&uploads)?;
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

    /// The object's file, open, and what S3 says about it, or `NoSuchKey`. Size and ETag come
    /// from the open file, so that they describe the bytes served even if a PUT renames a new
    /// object over the key meanwhile.
    async fn open(&self, bucket: &str, key: &str) -> S3Result<(tokio::fs::File, Stat)> {
        let path = self.object(bucket, key)?;
        let absent = async || {
            self.bucket_exists(bucket).await?;
            Err(s3_error!(NoSuchKey))
        };
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if is_absent(&e) => return absent().await,
            Err(e) => return Err(io_error("open", &path, e)),
        };
        let meta = file
            .metadata()
            .await
            .map_err(|e| io_error("stat", &path, e))?;
        if !meta.is_file() {
            return absent().await;
        }
        Ok((
            file,
            Stat::of(&meta).map_err(|e| io_error("stat", &path, e))?,
        ))
    }
}

/// Size, modification time and file identity, and the ETag derived from them.
struct Stat {
    len: u64,
    modified: SystemTime,
    inode: u64,
}

impl Stat {
    fn of(meta: &std::fs::Metadata) -> std::io::Result<Self> {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(Self {
            len: meta.len(),
            modified: meta.modified()?,
            inode,
        })
    }

    /// Inode, modification time and size, as file servers derive their ETags, without hashing
    /// the object (clients treat ETags as opaque; blobs carry their own SHA-256). Every PUT
    /// renames a new file into place, so the inode changes with every write even within the
    /// file system's timestamp granularity.
    fn e_tag(&self) -> ETag {
        let nanos = self
            .modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        ETag::Strong(format!("{:x}-{nanos:x}-{:x}", self.inode, self.len))
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
        let (_, stat) = self.open(&req.input.bucket, &req.input.key).await?;
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
        let (file, stat) = self.open(&input.bucket, &input.key).await?;
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
        let temp = TempUpload(self.root.join(UPLOADS).join(format!(
            "{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        )));
        let file = tokio::fs::File::create(&temp.0)
            .await
            .map_err(|e| io_error("create", &temp.0, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(CHUNK, file);
        let mut md5 = input.content_md5.as_ref().map(|_| Md5::new());
        let mut len: u64 = 0;
        loop {
            // A device whose link died mid-upload without closing the connection would hold
            // the upload (and its file) forever.
            let next = tokio::time::timeout(BODY_IDLE, body.next())
                .await
                .map_err(|_| s3_error!(RequestTimeout, "no body bytes for {BODY_IDLE:?}"))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| s3_error!(IncompleteBody, "reading the body: {e}"))?;
            len += chunk.len() as u64;
            if len > MAX_OBJECT_BYTES {
                return Err(s3_error!(EntityTooLarge));
            }
            if let Some(h) = &mut md5 {
                h.update(&chunk);
            }
            out.write_all(&chunk)
                .await
                .map_err(|e| io_error("write", &temp.0, e))?;
        }
        out.flush()
            .await
            .map_err(|e| io_error("write", &temp.0, e))?;
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
        // Read before the rename (which keeps it): afterwards the key may already hold another
        // upload, or nothing.
        let stat = out
            .get_ref()
            .metadata()
            .await
            .and_then(|m| Stat::of(&m))
            .map_err(|e| io_error("stat", &temp.0, e))?;
        drop(out);
        let conflict = || {
            s3_error!(
                InvalidRequest,
                "key {:?} runs into an object or a folder of other objects",
                input.key
            )
        };
        if let Some(parent) = path.parent().filter(|p| *p != bucket) {
            match tokio::fs::create_dir_all(parent).await {
                Ok(()) => {}
                Err(e) if is_absent(&e) || e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(conflict());
                }
                Err(e) => return Err(io_error("create a folder for", parent, e)),
            }
        }
        match tokio::fs::rename(&temp.0, &path).await {
            Ok(()) => {}
            Err(e) if is_absent(&e) || e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                return Err(conflict());
            }
            Err(e) => return Err(io_error("store", &path, e)),
        }
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(stat.e_tag()),
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
            Err(e) if is_absent(&e) => {}
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
