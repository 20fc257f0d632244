//! TLS for the `Fleet` gRPC link: the coordinator's server certificate, the CA it trusts for
//! client certificates, and the files a proxy or direct agent presents. All PEM, as
//! `pollen fleet provision` writes them; rustls on ring underneath (tonic's `tls-ring`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why a TLS configuration cannot be used. Each variant names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field} {path:?} could not be read: {source}")]
    File {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} and {1} must be given together")]
    Half(&'static str, &'static str),
    #[error("coordinator {endpoint:?}: TLS options are set, so use https://")]
    NotHttps { endpoint: String },
    #[error(
        "coordinator {endpoint:?}: https:// needs a CA file (the CA that signed the coordinator)"
    )]
    NoCa { endpoint: String },
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// What a client of the coordinator (proxy, direct agent) uses to reach it over TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM of the CA that signed the coordinator's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate: its common name is the identity the coordinator checks (a
    /// device id, or `pollen-proxy.<id>` for a proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl ClientTls {
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }

    /// The tonic client configuration for `endpoint`, or `None` for plaintext `http://`.
    pub fn config(&self, endpoint: &str) -> Result<Option<ClientTlsConfig>, TlsError> {
        let https = endpoint.starts_with("https://");
        if !https {
            return if self.is_empty() {
                Ok(None)
            } else {
                Err(TlsError::NotHttps {
                    endpoint: endpoint.to_string(),
                })
            };
        }
        let ca = self.ca_file.as_deref().ok_or_else(|| TlsError::NoCa {
            endpoint: endpoint.to_string(),
        })?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca_file", ca)?));
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("cert_file", cert)?,
                    read("key_file", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err(TlsError::Half("cert_file", "key_file")),
        }
        Ok(Some(config))
    }
}

/// The coordinator's side: its certificate and key, and the CA whose client certificates it
/// requires (mutual TLS) when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

impl ServerTls {
    pub fn config(&self) -> Result<ServerTlsConfig, TlsError> {
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(
            read("cert_file", &self.cert_file)?,
            read("key_file", &self.key_file)?,
        ));
        if let Some(ca) = &self.client_ca_file {
            // Required, not optional: a client without a certificate from this CA fails the
            // handshake before it can send anything.
            config = config.client_ca_root(Certificate::from_pem(read("client_ca_file", ca)?));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_needs_no_files_and_tls_options_need_https() {
        assert!(
            ClientTls::default()
                .config("http://x:1")
                .expect("plain")
                .is_none()
        );
        let tls = ClientTls {
            ca_file: Some("ca.pem".into()),
            ..Default::default()
        };
        let err = tls.config("http://x:1").expect_err("http").to_string();
        assert!(err.contains("use https://"), "{err}");
        let err = ClientTls::default()
            .config("https://x:1")
            .expect_err("no ca")
            .to_string();
        assert!(err.contains("needs a CA file"), "{err}");
        let err = tls.config("https://x:1").expect_err("missing").to_string();
        assert!(
            err.contains("ca_file \"ca.pem\" could not be read"),
            "{err}"
        );
    }
}
