//! The embedded object store: an S3-compatible HTTP server (s3s) over a local folder
//! ([`super::folder`]: one file per object).
//!
//! It speaks the real S3 API, SigV4 signatures and presigned URLs included, so the coordinator
//! and the devices use exactly the code path they use against AWS S3 or MinIO. It listens on a
//! loopback port chosen by the OS unless told otherwise, and generates a fresh access key and
//! secret per start; both stay in this process (devices only ever see presigned URLs).
//!
//! With [`EmbeddedTls`] it serves HTTPS (rustls on ring), typically with the coordinator
//! certificate `pollen fleet provision` issues; devices then trust the fleet CA
//! (`[storage] ca_file`) and presigned URLs are `https://`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use rand::Rng;
use rand::distr::Alphanumeric;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::StoreConfig;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("embedded S3: cannot use folder {path:?}: {message}")]
    Folder { path: PathBuf, message: String },
    #[error(
        "embedded S3: {addr} cannot be used: presigned URLs carry the listen address and devices must reach it; give a loopback or a routable address (e.g. 192.168.1.10:9000), not 0.0.0.0 or ::"
    )]
    Unspecified { addr: SocketAddr },
    #[error("embedded S3: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("embedded S3: TLS {what} {path:?}: {message}")]
    Tls {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// HTTPS for the embedded server: the certificate it presents (PEM, valid for the address
/// devices reach it at) and the CA that signed it, which the coordinator's own S3 client
/// trusts (and devices must too).
#[derive(Debug, Clone)]
pub struct EmbeddedTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

impl EmbeddedTls {
    fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, EmbeddedError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let tls_error =
            |what: &'static str, path: &Path, message: &dyn std::fmt::Display| EmbeddedError::Tls {
                what,
                path: path.to_path_buf(),
                message: message.to_string(),
            };
        let cert_error = |e: &dyn std::fmt::Display| tls_error("certificate", &self.cert_file, e);
        let certs = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| cert_error(&e))?;
        if certs.is_empty() {
            return Err(cert_error(&"holds no PEM certificate"));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| tls_error("key", &self.key_file, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| cert_error(&e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| cert_error(&e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running embedded S3 server.
pub struct EmbeddedS3 {
    /// `http://ip:port`, what clients use as their endpoint.
    pub endpoint: String,
    pub addr: SocketAddr,
    pub root: PathBuf,
    access_key: String,
    secret_key: String,
    ca_file: Option<PathBuf>,
    handle: JoinHandle<()>,
}

impl std::fmt::Debug for EmbeddedS3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedS3")
            .field("endpoint", &self.endpoint)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn random_token(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

impl EmbeddedS3 {
    /// Serves `root` (created if missing) on `listen` until `shutdown` fires: over HTTPS with
    /// `tls`, else plain HTTP.
    pub async fn start(
        root: &Path,
        listen: SocketAddr,
        tls: Option<&EmbeddedTls>,
        shutdown: CancellationToken,
    ) -> Result<Self, EmbeddedError> {
        if listen.ip().is_unspecified() {
            return Err(EmbeddedError::Unspecified { addr: listen });
        }
        let acceptor = tls.map(EmbeddedTls::acceptor).transpose()?;
        let folder = |message: String| EmbeddedError::Folder {
            path: root.to_path_buf(),
            message,
        };
        std::fs::create_dir_all(root).map_err(|e| folder(e.to_string()))?;
        let fs = super::folder::Folder::new(root).map_err(|e| folder(e.to_string()))?;
        // AWS-shaped keys: 20-character id, 40-character secret.
        let access_key = format!("PLN{}", random_token(17).to_uppercase());
        let secret_key = random_token(40);
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(
                access_key.clone(),
                secret_key.clone(),
            ));
            b.build()
        };
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| EmbeddedError::Listen {
                addr: listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmbeddedError::Listen {
                addr: listen,
                source,
            })?;
        let handle = tokio::spawn(async move {
            let mut http = ConnBuilder::new(TokioExecutor::new());
            // A client that opens a connection and never finishes its request headers (a
            // device whose link died) is cut off rather than kept forever.
            http.http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30));
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            loop {
                let socket = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(e) => {
                            // Out of descriptors and the like: keep serving the others.
                            tracing::warn!("embedded S3: accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = shutdown.cancelled() => break,
                };
                let _ = socket.set_nodelay(true);
                let service = service.clone();
                match &acceptor {
                    None => {
                        let conn = graceful.watch(
                            http.serve_connection(TokioIo::new(socket), service)
                                .into_owned(),
                        );
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!("embedded S3 connection: {e}");
                            }
                        });
                    }
                    Some(acceptor) => {
                        // The handshake runs in the connection's task, so that a slow or
                        // silent client holds up no one else.
                        let (acceptor, http, graceful_watch) =
                            (acceptor.clone(), http.clone(), graceful.watcher());
                        tokio::spawn(async move {
                            let stream = match tokio::time::timeout(
                                HANDSHAKE_TIMEOUT,
                                acceptor.accept(socket),
                            )
                            .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!("embedded S3 TLS handshake: {e}");
                                    return;
                                }
                                Err(_) => return,
                            };
                            let conn = graceful_watch.watch(
                                http.serve_connection(TokioIo::new(stream), service)
                                    .into_owned(),
                            );
                            if let Err(e) = conn.await {
                                tracing::debug!("embedded S3 connection: {e}");
                            }
                        });
                    }
                }
            }
            tokio::select! {
                () = graceful.shutdown() => {}
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            }
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, root = %root.display(), scheme, "embedded S3 server listening");
        Ok(Self {
            endpoint: format!("{scheme}://{addr}"),
            addr,
            root: root.to_path_buf(),
            access_key,
            secret_key,
            ca_file: tls.map(|t| t.ca_file.clone()),
            handle,
        })
    }

    /// The store configuration that reaches this server (credentials included).
    pub fn store_config(&self, bucket: &str) -> StoreConfig {
        StoreConfig {
            endpoint: Some(self.endpoint.clone()),
            bucket: bucket.to_string(),
            credentials: Some((self.access_key.clone(), self.secret_key.clone())),
            ca_file: self.ca_file.clone(),
            ..StoreConfig::default()
        }
    }

    /// The secret half of the credentials, for tests proving it never reaches a device.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// Waits for the server task after its shutdown token fired.
    pub async fn join(self) {
        let _ = self.handle.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::s3::S3Store;
    use crate::storage::{BlobStore, StoreConfig, StoreError};

    /// HTTPS with a certificate from a fleet CA: the coordinator's client gets in when it
    /// trusts that CA and not otherwise, and a bad key file is named in the error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_serves_clients_that_trust_the_fleet_ca_only() {
        use pollen_trust::pki::{FleetCa, IdentityFiles, Usage};
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = FleetCa::create("f1").expect("ca");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).expect("write ca");
        let files = IdentityFiles::new(dir.path(), "coordinator");
        files
            .write(
                &ca.issue("pollen-coordinator", &["127.0.0.1".into()], Usage::Server)
                    .expect("issue"),
            )
            .expect("write");
        let tls = EmbeddedTls {
            cert_file: files.cert.clone(),
            key_file: files.key.clone(),
            ca_file: ca_file.clone(),
        };
        let stop = CancellationToken::new();
        let s3 = EmbeddedS3::start(
            &dir.path().join("s3"),
            "127.0.0.1:0".parse().expect("addr"),
            Some(&tls),
            stop.clone(),
        )
        .await
        .expect("starts");
        assert!(s3.endpoint.starts_with("https://"), "{}", s3.endpoint);
        let config = s3.store_config("pollen");
        let store = S3Store::connect(&config)
            .await
            .expect("trusts the fleet CA");
        store
            .put("k", bytes::Bytes::from_static(b"v"))
            .await
            .expect("put");
        assert_eq!(store.get("k", 10).await.expect("get").as_ref(), b"v");

        let untrusting = StoreConfig {
            ca_file: None,
            ..config.clone()
        };
        let e = S3Store::connect(&untrusting).await.expect_err("unknown CA");
        assert!(matches!(e, StoreError::Bucket { .. }), "{e}");
        let missing = StoreConfig {
            ca_file: Some(dir.path().join("nope.pem")),
            ..config
        };
        let e = S3Store::connect(&missing).await.expect_err("no CA file");
        assert!(e.to_string().contains("nope.pem"), "{e}");

        let bad = EmbeddedTls {
            key_file: dir.path().join("absent.key"),
            ..tls
        };
        let e = EmbeddedS3::start(
            &dir.path().join("s3b"),
            "127.0.0.1:0".parse().expect("addr"),
            Some(&bad),
            stop.clone(),
        )
        .await
        .expect_err("no key");
        assert!(e.to_string().contains("absent.key"), "{e}");
        stop.cancel();
        s3.join().await;
    }

    /// Through the S3 client, as the coordinator uses the server: whole objects in and out,
    /// the limit enforced, and uploads and deletes in one folder at once all succeed and leave
    /// no files behind (no side files, no half-written uploads).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn objects_round_trip_and_deletes_leave_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        let s3 = EmbeddedS3::start(
            dir.path(),
            "127.0.0.1:0".parse().expect("addr"),
            None,
            stop.clone(),
        )
        .await
        .expect("starts");
        let store = S3Store::connect(&s3.store_config("pollen"))
            .await
            .expect("connects");
        let store = std::sync::Arc::new(store);
        let body = |i: usize| bytes::Bytes::from(vec![i as u8; 20_000 + i]);
        let mut uploads = tokio::task::JoinSet::new();
        for i in 0..8 {
            let store = store.clone();
            uploads.spawn(async move {
                let key = format!("runs/r/round-0001/updates/c{i}.safetensors");
                for _ in 0..40 {
                    store.put(&key, body(i)).await.expect("put");
                    assert_eq!(store.get(&key, 1 << 20).await.expect("get"), body(i));
                    store.delete(&key).await.expect("delete");
                }
            });
        }
        while let Some(done) = uploads.join_next().await {
            done.expect("an upload task failed");
        }
        // One key rewritten by some while others read it: every read is one whole version.
        store.put("shared", body(0)).await.expect("put");
        let mut mixed = tokio::task::JoinSet::new();
        for i in 0..6 {
            let store = store.clone();
            mixed.spawn(async move {
                for round in 0..30 {
                    if i % 2 == 0 {
                        store.put("shared", body(i + round % 3)).await.expect("put");
                    } else {
                        let got = store.get("shared", 1 << 20).await.expect("get");
                        assert!(
                            (0..8).any(|j| got == body(j)),
                            "a read of {} bytes is no version of the object",
                            got.len()
                        );
                    }
                }
            });
        }
        while let Some(done) = mixed.join_next().await {
            done.expect("a reader or writer failed");
        }
        store.delete("shared").await.expect("delete");
        fn files(dir: &Path) -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .expect("readable")
                .flat_map(|e| {
                    let path = e.expect("entry").path();
                    if path.is_dir() {
                        files(&path)
                    } else {
                        vec![path]
                    }
                })
                .collect()
        }
        let left = files(dir.path());
        assert!(left.is_empty(), "{left:?}");

        store.put("big.safetensors", body(0)).await.expect("put");
        let e = store.get("big.safetensors", 1000).await.expect_err("limit");
        assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
        let e = store.get("missing", 1000).await.expect_err("missing");
        assert!(e.to_string().contains("NoSuchKey"), "{e}");
        stop.cancel();
        s3.join().await;
    }
}
