//! Blobs over presigned object-storage URLs: download and verify the global model or a task
//! manifest, upload an update. Shared by the gRPC fleet client and the MQTT edge agent.
//!
//! A presigned URL's query string is a credential (it carries the signature), so nothing here
//! ever prints one: errors name the URL through [`redact`], and `reqwest` errors are stripped of
//! the URL they carry.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pollen_proto::blob::{self, BlobError, Parameters};
use pollen_proto::device::BlobGet;
use pollen_proto::fleet::FailureCode;

use crate::client::{ClientError, TaskBlob};

/// How many bytes of an error answer's body are quoted in the error.
const BODY_SNIPPET_BYTES: usize = 200;

/// Never reserve more than this up front, whatever size a command announces: the buffer grows
/// as bytes actually arrive.
const MAX_PREALLOCATION: usize = 64 * 1024 * 1024;

/// Why a blob could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{method} {url}: not a usable URL ({reason})")]
    BadUrl {
        method: &'static str,
        url: String,
        reason: String,
    },
    #[error("{method} {url}: {source}")]
    Http {
        method: &'static str,
        url: String,
        source: reqwest::Error,
    },
    #[error("{method} {url}: HTTP {status}: {body:?}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        /// The first bytes of the answer's body (often the storage service's error document).
        body: String,
    },
    #[error(
        "GET {url}: the blob is larger than the {announced} bytes the command announced ({seen})"
    )]
    TooLarge {
        url: String,
        announced: u64,
        seen: String,
    },
    #[error("GET {url}: received {received} bytes, the command announced {announced}")]
    Size {
        url: String,
        announced: u64,
        received: u64,
    },
    #[error("GET {url}: {source}")]
    Blob { url: String, source: BlobError },
    #[error("GET {url}: the task file is announced as {size} bytes; at most {max} are accepted")]
    TaskTooLarge { url: String, size: u64, max: u64 },
}

impl TransferError {
    /// How the failure is reported to the proxy: a blob in a codec this build cannot read is a
    /// bad instruction, everything else is a transfer problem.
    pub fn failure_code(&self) -> FailureCode {
        match self {
            TransferError::Blob {
                source: BlobError::UnsupportedCodec(_),
                ..
            }
            | TransferError::TaskTooLarge { .. } => FailureCode::BadInstruction,
            _ => FailureCode::BlobTransfer,
        }
    }
}

impl From<TransferError> for ClientError {
    fn from(e: TransferError) -> Self {
        ClientError {
            code: e.failure_code(),
            message: e.to_string(),
        }
    }
}

/// `url` without its query string, fragment and password: safe to log.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_query(None);
            parsed.set_fragment(None);
            // Only fails for URLs that cannot have a password; then there is none to hide.
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => {
            let end = url.find(['?', '#']).unwrap_or(url.len());
            url[..end].to_string()
        }
    }
}

/// An HTTP client for presigned URLs: bounded connect and read stalls, no overall timeout (a
/// large model on a slow link may legitimately take minutes). `ca_pem` adds a CA (PEM) to the
/// public roots, for an object store whose certificate a private CA signed (the embedded S3
/// server serving the fleet's coordinator certificate, an on-premises MinIO).
pub fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("pollen-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = ca_pem {
        for ca in reqwest::Certificate::from_pem_bundle(pem)? {
            builder = builder.add_root_certificate(ca);
        }
    }
    builder.build()
}

/// Reads the PEM CA file an [`http_client`] is to trust; the error names the file.
pub fn read_ca(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("object store CA {path:?} cannot be read: {e}"))?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        Ok(_) => Err(format!("object store CA {path:?} holds no PEM certificate")),
        Err(e) => Err(format!("object store CA {path:?} is not PEM: {e}")),
    }
}

/// Tries of a request that fails before any answer arrives.
const SEND_ATTEMPTS: u64 = 3;

/// Sends the request `build` makes, again (after 100 ms, then 200 ms) when it failed before an
/// answer arrived: a busy server's full accept queue resets new connections (seen with 1000
/// devices starting transfers at once). GET and PUT of one presigned key are idempotent.
async fn send_with_retries(
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut attempt = 1;
    loop {
        match build().send().await {
            Err(e) if attempt < SEND_ATTEMPTS && (e.is_connect() || e.is_request()) => {
                tracing::debug!(attempt, "transfer failed before an answer, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn parse_url(method: &'static str, url: &str) -> Result<reqwest::Url, TransferError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| TransferError::BadUrl {
        method,
        url: redact(url),
        reason: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(TransferError::BadUrl {
            method,
            url: redact(url),
            reason: format!("scheme {:?}; expected http or https", parsed.scheme()),
        });
    }
    Ok(parsed)
}

/// Reads at most [`BODY_SNIPPET_BYTES`] of an error answer, as printable text.
async fn body_snippet(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < BODY_SNIPPET_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(BODY_SNIPPET_BYTES);
    String::from_utf8_lossy(&bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Largest task manifest accepted: manifests are a few KiB of JSON.
pub const MAX_TASK_BYTES: u64 = 1024 * 1024;

/// Downloads the blob `get` names, refusing more bytes than it announces, then verifies codec
/// and digest and decodes it (on a blocking thread: the model may be megabytes).
pub async fn download(http: &reqwest::Client, get: &BlobGet) -> Result<Parameters, TransferError> {
    let shown = redact(&get.url);
    // No point fetching what cannot be read: a model comes as weights, never as a change.
    let codec = match blob::known_codec(get.codec) {
        Ok(c) if !pollen_proto::codec::is_delta(c) => c,
        _ => {
            return Err(TransferError::Blob {
                url: shown,
                source: BlobError::UnsupportedCodec(get.codec),
            });
        }
    };
    let body = fetch(http, &get.url, get.size_bytes).await?;
    let (sha256, wire) = (get.sha256.clone(), get.codec);
    let decoded = tokio::task::spawn_blocking(move || {
        blob::verify(&body, &sha256, wire)?;
        pollen_proto::codec::decode(&body, codec, None, None)
    })
    .await
    .map_err(|e| TransferError::Blob {
        url: shown.clone(),
        source: BlobError::Malformed(format!("decoding stopped: {e}")),
    })?;
    decoded.map_err(|source| TransferError::Blob { url: shown, source })
}

/// Largest file a task may name (a TorchScript model): the CNN of the MNIST benchmarks is 7 MB.
pub const MAX_TASK_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Downloads a task's file (a TorchScript model) from its presigned `url` and checks its size
/// and digest.
pub async fn download_task_file(
    http: &reqwest::Client,
    url: &str,
    sha256: &str,
    size_bytes: u64,
) -> Result<crate::client::TaskFileBlob, TransferError> {
    if size_bytes > MAX_TASK_FILE_BYTES {
        return Err(TransferError::TaskTooLarge {
            url: redact(url),
            size: size_bytes,
            max: MAX_TASK_FILE_BYTES,
        });
    }
    let bytes = fetch(http, url, size_bytes).await?;
    blob::check_digest(&bytes, sha256).map_err(|source| TransferError::Blob {
        url: redact(url),
        source,
    })?;
    Ok(crate::client::TaskFileBlob {
        sha256: sha256.to_ascii_lowercase(),
        bytes,
    })
}

/// Downloads a task manifest from its presigned `url` and checks its size and digest.
pub async fn download_task(
    http: &reqwest::Client,
    url: &str,
    sha256: &str,
    size_bytes: u64,
) -> Result<TaskBlob, TransferError> {
    if size_bytes > MAX_TASK_BYTES {
        return Err(TransferError::TaskTooLarge {
            url: redact(url),
            size: size_bytes,
            max: MAX_TASK_BYTES,
        });
    }
    let bytes = fetch(http, url, size_bytes).await?;
    blob::check_digest(&bytes, sha256).map_err(|source| TransferError::Blob {
        url: redact(url),
        source,
    })?;
    Ok(TaskBlob {
        sha256: sha256.to_ascii_lowercase(),
        bytes,
        files: Vec::new(),
    })
}

/// GETs `url`, refusing an answer that is not exactly `announced` bytes long.
async fn fetch(http: &reqwest::Client, url: &str, announced: u64) -> Result<Bytes, TransferError> {
    const GET: &str = "GET";
    let shown = redact(url);
    let parsed = parse_url(GET, url)?;
    let http_error = |source: reqwest::Error| TransferError::Http {
        method: GET,
        url: shown.clone(),
        source: source.without_url(),
    };
    let mut response = send_with_retries(|| http.get(parsed.clone()))
        .await
        .map_err(http_error)?;
    let status = response.status();
    if !status.is_success() {
        return Err(TransferError::Status {
            method: GET,
            url: shown.clone(),
            status: status.as_u16(),
            body: body_snippet(response).await,
        });
    }
    if let Some(length) = response.content_length()
        && length > announced
    {
        return Err(TransferError::TooLarge {
            url: shown,
            announced,
            seen: format!("Content-Length {length}"),
        });
    }
    let capacity = usize::try_from(announced)
        .unwrap_or(usize::MAX)
        .min(MAX_PREALLOCATION);
    let mut body = BytesMut::with_capacity(capacity);
    while let Some(chunk) = response.chunk().await.map_err(http_error)? {
        if (body.len() + chunk.len()) as u64 > announced {
            return Err(TransferError::TooLarge {
                url: shown,
                announced,
                seen: format!("more than {announced} bytes received"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    if body.len() as u64 != announced {
        return Err(TransferError::Size {
            url: shown,
            announced,
            received: body.len() as u64,
        });
    }
    Ok(body.freeze())
}

/// PUTs `bytes` to a presigned `url` (Content-Length set). A non-2xx answer is an error that
/// quotes the status and the start of the body.
pub async fn upload(http: &reqwest::Client, url: &str, bytes: Bytes) -> Result<(), TransferError> {
    const PUT: &str = "PUT";
    let shown = redact(url);
    let parsed = parse_url(PUT, url)?;
    let response = send_with_retries(|| {
        http.put(parsed.clone())
            .header(reqwest::header::CONTENT_LENGTH, bytes.len())
            .body(bytes.clone())
    })
    .await
    .map_err(|source| TransferError::Http {
        method: PUT,
        url: shown.clone(),
        source: source.without_url(),
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(TransferError::Status {
            method: PUT,
            url: shown,
            status: status.as_u16(),
            body: body_snippet(response).await,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_no_signature_or_password() {
        assert_eq!(
            redact("https://s3.example/bucket/key?X-Amz-Signature=abc&X-Amz-Credential=x#frag"),
            "https://s3.example/bucket/key"
        );
        assert_eq!(
            redact("mqtt://user:secret@broker.example:1883"),
            "mqtt://user@broker.example:1883"
        );
        assert_eq!(redact("not a url?token=1"), "not a url");
    }

    #[test]
    fn only_unreadable_codecs_are_bad_instructions() {
        let codec = TransferError::Blob {
            url: "u".into(),
            source: BlobError::UnsupportedCodec(7),
        };
        assert_eq!(codec.failure_code(), FailureCode::BadInstruction);
        let digest = TransferError::Blob {
            url: "u".into(),
            source: BlobError::DigestMismatch {
                expected: "a".into(),
                actual: "b".into(),
            },
        };
        assert_eq!(digest.failure_code(), FailureCode::BlobTransfer);
        let e = ClientError::from(digest);
        assert!(e.message.contains("expected sha256 a"), "{}", e.message);
    }

    #[test]
    fn a_non_http_url_is_refused_by_name_without_its_query() {
        let e = parse_url("PUT", "ftp://host/key?sig=secret").expect_err("ftp");
        let text = e.to_string();
        assert!(
            text.contains("ftp://host/key") && !text.contains("secret"),
            "{text}"
        );
    }
}
