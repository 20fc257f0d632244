//! [`S3Store`]: object storage over the S3 API, the production backend. AWS S3, MinIO and the
//! embedded s3s server ([`super::embedded`]) all go through this one client.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{BlobStore, Keys, StoreError};

/// Where blobs are stored. Credentials come from `credentials` when given, else from the AWS
/// default chain (environment, profile, instance role). `Debug` never shows the secret.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `http(s)://host:port` of an S3-compatible endpoint; `None` means AWS S3 itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// Prepended to every key, e.g. `"team-a/"`.
    #[serde(default)]
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most non-AWS stores.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Create the bucket when it does not exist.
    #[serde(default = "default_true")]
    pub create_bucket: bool,
    /// Static credentials (access key id, secret). Never sent to devices.
    #[serde(skip)]
    pub credentials: Option<(String, String)>,
    /// A PEM CA trusted besides the platform's roots, for an endpoint whose certificate a
    /// private CA signed (the embedded server with the fleet's certificates, MinIO on site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_bucket() -> String {
    "pollen".into()
}
fn default_true() -> bool {
    true
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("create_bucket", &self.create_bucket)
            .field("ca_file", &self.ca_file)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(id, _)| (id, "***")),
            )
            .finish()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: default_region(),
            bucket: default_bucket(),
            prefix: String::new(),
            path_style: true,
            create_bucket: true,
            credentials: None,
            ca_file: None,
        }
    }
}

/// A bucket of an S3-compatible store.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    keys: Keys,
    endpoint: String,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

/// The SDK's own HTTPS client (hyper + rustls, the platform's trust roots plus `ca_pem`), on
/// ring: the SDK's default would link a second crypto backend, aws-lc-rs.
fn https_client(ca_pem: Option<Vec<u8>>) -> Result<aws_sdk_s3::config::SharedHttpClient, String> {
    use aws_smithy_http_client::tls::{
        Provider, TlsContext, TrustStore, rustls_provider::CryptoMode,
    };
    let mut trust = TrustStore::default();
    if let Some(pem) = ca_pem {
        trust = trust.with_pem_certificate(pem);
    }
    let context = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .tls_context(context)
        .build_https())
}

/// The PEM CA file at `path`, checked to hold a certificate; the error names the file.
fn read_ca(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("CA file {path:?} cannot be read: {e}"))?;
    match CertificateDer::pem_slice_iter(&pem).next() {
        Some(Ok(_)) => Ok(pem),
        Some(Err(e)) => Err(format!("CA file {path:?} is not PEM: {e}")),
        None => Err(format!("CA file {path:?} holds no PEM certificate")),
    }
}

fn sdk_message<E: std::error::Error>(e: E) -> String {
    DisplayErrorContext(e).to_string()
}

/// The error of request `op` on `key`, with the SDK's whole chain of causes.
fn failed<E: std::error::Error>(op: &'static str, key: &str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Request {
        op,
        key: key.to_string(),
        message: sdk_message(e),
    }
}

impl S3Store {
    /// Builds the S3 client and makes sure the bucket exists.
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let ca_error = |message: String| StoreError::Bucket {
            endpoint: config.endpoint.clone().unwrap_or_default(),
            bucket: config.bucket.clone(),
            message,
        };
        let ca = match &config.ca_file {
            Some(path) => Some(read_ca(path).map_err(ca_error)?),
            None => None,
        };
        let http = https_client(ca).map_err(ca_error)?;
        let mut builder = match &config.credentials {
            Some((key, secret)) => aws_sdk_s3::config::Builder::new()
                .behavior_version(BehaviorVersion::latest())
                .credentials_provider(Credentials::new(key, secret, None, None, "pollen-config")),
            None => {
                let shared = aws_config::defaults(BehaviorVersion::latest())
                    .http_client(http.clone())
                    .load()
                    .await;
                aws_sdk_s3::config::Builder::from(&shared)
            }
        };
        builder = builder
            .http_client(http)
            .region(Region::new(config.region.clone()))
            .force_path_style(config.path_style)
            // Flexible checksums would put a checksum of the *empty* body into presigned PUT
            // URLs, which then reject the device's upload; blobs carry their own SHA-256.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let store = Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            keys: Keys::new(config.prefix.clone()),
            endpoint: config
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("AWS S3 ({})", config.region)),
        };
        store.ensure_bucket(config.create_bucket).await?;
        Ok(store)
    }

    async fn ensure_bucket(&self, create: bool) -> Result<(), StoreError> {
        let bucket_error = |message: String| StoreError::Bucket {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            message,
        };
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) && create => self
                .client
                .create_bucket()
                .bucket(&self.bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| bucket_error(format!("cannot create it: {}", sdk_message(e)))),
            Err(e) => Err(bucket_error(sdk_message(e))),
        }
    }

    fn presigning(ttl: Duration) -> Result<PresigningConfig, StoreError> {
        PresigningConfig::expires_in(ttl).map_err(|_| StoreError::Ttl(ttl))
    }
}

#[async_trait::async_trait]
impl BlobStore for S3Store {
    fn describe(&self) -> String {
        let prefix = match self.keys.prefix() {
            "" => String::new(),
            p => format!(", keys under {p:?}"),
        };
        format!("S3 bucket {:?} at {}{prefix}", self.bucket, self.endpoint)
    }

    fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/octet-stream")
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map(|_| ())
            .map_err(failed("PUT", key))
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Bytes, StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(failed("GET", key))?;
        let too_large = |size: u64| StoreError::TooLarge {
            key: key.to_string(),
            size,
            limit,
        };
        let announced = out.content_length().unwrap_or(0).max(0) as u64;
        if announced > limit {
            return Err(too_large(announced));
        }
        // Read chunk by chunk and stop at the limit: a missing or lying Content-Length must not
        // make the coordinator buffer an arbitrary object.
        let mut body = out.body;
        let mut bytes = bytes::BytesMut::with_capacity(announced as usize);
        while let Some(chunk) = body.try_next().await.map_err(|e| StoreError::Request {
            op: "GET",
            key: key.to_string(),
            message: e.to_string(),
        })? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(too_large((bytes.len() + chunk.len()) as u64));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes.freeze())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(failed("DELETE", key))
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<String, StoreError> {
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::presigning(ttl)?)
            .await
            .map_err(failed("presign GET", key))?;
        Ok(req.uri().to_string())
    }

    async fn presign_put(&self, key: &str, ttl: Duration) -> Result<String, StoreError> {
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::presigning(ttl)?)
            .await
            .map_err(failed("presign PUT", key))?;
        Ok(req.uri().to_string())
    }
}
