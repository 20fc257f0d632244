//! Broker addresses shared by the proxy, the edge agent and the CLI.
//!
//! A broker is named by a URL: `mqtt://[user[:password]@]host[:port]` (port 1883 by default) or
//! `mqtts://...` (port 8883) with an optional CA file and client certificate + key (X.509, as
//! AWS IoT Core requires). [`mqtt_options`] turns one into `rumqttc` options with Pollen's
//! packet-size limits set, so no component forgets them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};

use crate::limits::MAX_MQTT_PAYLOAD_BYTES;

/// Where a broker is and how to authenticate to it. `Debug` shows the URL without its password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` or `mqtts://host:port`; user and password may be given in the URL.
    pub url: String,
    /// PEM file of the CA that signed the broker's certificate (mqtts only; the system roots
    /// are not consulted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that authenticate devices by certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl BrokerConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    /// The URL as it may be logged: any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("url", &self.redacted_url())
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// `url` with its password (if any) replaced by `***`, for logs and error messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_string(),
        // Unparseable: show only the part before any '@', which is where credentials would be.
        Err(_) => match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_string(),
        },
    }
}

/// Why a broker configuration cannot be used. Each variant names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker url {url:?} is not a URL: {reason}")]
    Url { url: String, reason: String },
    #[error("broker url {url:?} has scheme {scheme:?}; use mqtt:// or mqtts://")]
    Scheme { url: String, scheme: String },
    #[error("broker url {url:?} has no host")]
    Host { url: String },
    #[error("broker {field} {path:?} could not be read: {source}")]
    File {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("broker {field} is set but the url {url:?} is not mqtts://")]
    TlsWithoutMqtts { field: &'static str, url: String },
    #[error("broker cert_file and key_file must be given together")]
    HalfClientAuth,
    #[error("broker url {url:?}: mqtts:// needs ca_file (the CA that signed the broker)")]
    NoCa { url: String },
    #[error("broker {field} {path:?}: {reason}")]
    Tls {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Largest MQTT packet a Pollen component sends: one payload plus room for the topic and header.
pub const MAX_OUTGOING_PACKET_BYTES: usize = MAX_MQTT_PAYLOAD_BYTES + 1024;

/// Largest packet accepted. Bigger than anything Pollen sends, so that a stray large message on
/// a subscribed topic is read and discarded as malformed, but bounded so that a peer cannot make
/// a component buffer megabytes.
pub const MAX_INCOMING_PACKET_BYTES: usize = 256 * 1024;

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, BrokerError> {
    std::fs::read(path).map_err(|source| BrokerError::File {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// A broker URL, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// User and password from the URL, if any.
    pub login: Option<(String, String)>,
}

/// Parses `mqtt://[user[:password]@]host[:port]` or `mqtts://...`.
pub fn parse_url(url: &str) -> Result<BrokerAddress, BrokerError> {
    let parsed = url::Url::parse(url).map_err(|e| BrokerError::Url {
        url: redact(url),
        reason: e.to_string(),
    })?;
    let tls = match parsed.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => {
            return Err(BrokerError::Scheme {
                url: redact(url),
                scheme: other.to_string(),
            });
        }
    };
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| BrokerError::Host { url: redact(url) })?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed.port().unwrap_or(if tls { 8883 } else { 1883 });
    let login = (!parsed.username().is_empty()).then(|| {
        (
            parsed.username().to_string(),
            parsed.password().unwrap_or_default().to_string(),
        )
    });
    Ok(BrokerAddress {
        tls,
        host,
        port,
        login,
    })
}

/// A TLS client config trusting the CA in `ca_file` (PEM), presenting `client_auth` (PEM
/// certificate chain and private key) when given. The crypto provider is named (ring, the
/// workspace's one backend) rather than taken from a process default that an application
/// embedding Pollen may not have installed.
fn tls_client_config(
    ca_file: &Path,
    client_auth: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, BrokerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |field: &'static str, path: &Path, reason: String| BrokerError::Tls {
        field,
        path: path.to_path_buf(),
        reason,
    };
    let certs =
        |field: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, BrokerError> {
            let pem = read(field, path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(field, path, format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(bad(field, path, "holds no PEM certificate".into()));
            }
            Ok(certs)
        };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs("ca_file", ca_file)? {
        roots
            .add(cert)
            .map_err(|e| bad("ca_file", ca_file, format!("unusable CA certificate: {e}")))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("ca_file", ca_file, format!("TLS setup: {e}")))?
    .with_root_certificates(roots);
    match client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_file, key_file)) => {
            let chain = certs("cert_file", cert_file)?;
            let key = PrivateKeyDer::from_pem_slice(&read("key_file", key_file)?)
                .map_err(|e| bad("key_file", key_file, format!("not a PEM private key: {e}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                bad(
                    "cert_file",
                    cert_file,
                    format!("certificate and key do not fit: {e}"),
                )
            })
        }
    }
}

/// A client and its event loop for `options`, with Nagle's algorithm off: Pollen's messages
/// are small request/reply exchanges, and Nagle holding a PUBACK or a reply behind the peer's
/// delayed ACK (40 ms on Linux) would add that to every hop of a round.
pub fn client(options: MqttOptions, capacity: usize) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, capacity);
    let mut network = eventloop.network_options.clone();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// MQTT options for `client_id` on `broker`, with Pollen's packet limits. Callers set the
/// session (clean or persistent), keep-alive and last-will.
pub fn mqtt_options(broker: &BrokerConfig, client_id: &str) -> Result<MqttOptions, BrokerError> {
    let BrokerAddress {
        tls,
        host,
        port,
        login,
    } = parse_url(&broker.url)?;
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_max_packet_size(MAX_INCOMING_PACKET_BYTES, MAX_OUTGOING_PACKET_BYTES);
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    if tls {
        let ca_file = broker.ca_file.as_deref().ok_or_else(|| BrokerError::NoCa {
            url: broker.redacted_url(),
        })?;
        let client_auth = match (&broker.cert_file, &broker.key_file) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => return Err(BrokerError::HalfClientAuth),
        };
        let config = tls_client_config(ca_file, client_auth)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    } else {
        for (field, set) in [
            ("ca_file", broker.ca_file.is_some()),
            ("cert_file", broker.cert_file.is_some()),
            ("key_file", broker.key_file.is_some()),
        ] {
            if set {
                return Err(BrokerError::TlsWithoutMqtts {
                    field,
                    url: broker.redacted_url(),
                });
            }
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_url_defaults_to_port_1883() {
        let a = parse_url("mqtt://127.0.0.1").unwrap();
        assert!(!a.tls);
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 1883));
        assert!(a.login.is_none());
    }

    #[test]
    fn mqtts_defaults_to_8883_and_reads_credentials() {
        let a = parse_url("mqtts://dev:s3cret@broker.example:8884").unwrap();
        assert!(a.tls);
        assert_eq!((a.host.as_str(), a.port), ("broker.example", 8884));
        assert_eq!(a.login, Some(("dev".into(), "s3cret".into())));
        assert_eq!(parse_url("mqtts://b.example").unwrap().port, 8883);
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        let e = parse_url("http://x").unwrap_err().to_string();
        assert!(e.contains("scheme \"http\""), "{e}");
        let e = parse_url("not a url").unwrap_err().to_string();
        assert!(e.contains("is not a URL"), "{e}");
        let e = mqtt_options(&BrokerConfig::new("mqtts://x"), "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs ca_file"), "{e}");
        let mut b = BrokerConfig::new("mqtt://x");
        b.ca_file = Some("/ca.pem".into());
        let e = mqtt_options(&b, "c").unwrap_err().to_string();
        assert!(e.contains("ca_file") && e.contains("not mqtts"), "{e}");
    }

    #[test]
    fn passwords_never_reach_logs() {
        let b = BrokerConfig::new("mqtts://dev:s3cret@broker.example:8884");
        assert!(!b.redacted_url().contains("s3cret"));
        assert!(!format!("{b:?}").contains("s3cret"));
        let e = mqtt_options(&b, "c").unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
        assert_eq!(redact("mqtt://h:1883"), "mqtt://h:1883");
    }

    #[test]
    fn options_carry_pollens_packet_limits() {
        let o = mqtt_options(&BrokerConfig::new("mqtt://127.0.0.1:1999"), "dev-1").unwrap();
        assert_eq!(o.broker_address(), ("127.0.0.1".to_string(), 1999));
        assert_eq!(o.max_packet_size(), MAX_INCOMING_PACKET_BYTES);
    }
}
