//! The fleet's certificate authority and the certificates it issues.
//!
//! One CA per fleet, made here with rcgen (ECDSA P-256), never by shelling out to openssl. The
//! subject's common name is the identity the broker enforces: Mosquitto's
//! `use_identity_as_username` makes it the username its ACL patterns (`%u`) match, so a
//! device's CN is its device id and nothing else may hold that name.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::TrustError;

/// How long issued certificates stay valid. Devices live for years in the field; rotation is
/// re-issuing with `pollen fleet provision --renew`.
pub const LEAF_VALIDITY_DAYS: i64 = 825;
const CA_VALIDITY_DAYS: i64 = 3650;

/// What a certificate is for, which decides its extended key usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS client: devices, proxies, operators.
    Client,
    /// A TLS server: the broker, the coordinator, the object store.
    Server,
}

/// A fleet CA: its certificate (PEM) and the key that signs with it.
pub struct FleetCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// An issued certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn ca_params(fleet: &str) -> Result<CertificateParams, TrustError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(TrustError::cert)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pollen");
    dn.push(DnType::CommonName, format!("Pollen fleet {fleet} CA"));
    params.distinguished_name = dn;
    // Path length 0: the CA signs only end-entity certificates, so a leaked device key can
    // never mint identities.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, as RFC 5280 requires of serials.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl FleetCa {
    /// A new CA for `fleet`.
    pub fn create(fleet: &str) -> Result<Self, TrustError> {
        let key = KeyPair::generate().map_err(TrustError::cert)?;
        let mut params = ca_params(fleet)?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(TrustError::cert)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA of `fleet` stored as `cert_pem` with its key `key_pem`. The issuer's name is
    /// rebuilt from the fleet (as [`create`](Self::create) made it) and its key identifier from
    /// the key, so certificates issued later chain to the stored certificate.
    pub fn load(
        fleet: &str,
        cert_pem: String,
        key_pem: &str,
        key_path: &Path,
    ) -> Result<Self, TrustError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TrustError::File {
            path: key_path.to_path_buf(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let expected = ca_params(fleet)?;
        Ok(Self {
            cert_pem,
            issuer: Issuer::new(expected, key),
        })
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `common_name`, valid for the DNS names and IP addresses in `names`
    /// (servers) and used as `usage`.
    pub fn issue(
        &self,
        common_name: &str,
        names: &[String],
        usage: Usage,
    ) -> Result<Issued, TrustError> {
        let key = KeyPair::generate().map_err(TrustError::cert)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(TrustError::cert)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Pollen");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(TrustError::cert)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Where an identity's certificate and key live under a provisioning directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl IdentityFiles {
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    pub fn exist(&self) -> bool {
        self.cert.exists() && self.key.exists()
    }

    /// Writes the certificate and, readable by its owner only, the key.
    pub fn write(&self, issued: &Issued) -> Result<(), TrustError> {
        crate::write_public(&self.cert, issued.cert_pem.as_bytes())?;
        crate::write_private(&self.key, issued.key_pem.as_bytes())
    }
}

/// The DER bytes of a one-certificate PEM (what a TLS peer presents), for tests.
#[cfg(test)]
pub(crate) fn der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_ca_issues_certificates_naming_the_stored_ca_as_issuer() {
        let ca = FleetCa::create("f1").expect("ca");
        let dir = tempfile::tempdir().expect("tempdir");
        let key_path = dir.path().join("ca.key");
        let again =
            FleetCa::load("f1", ca.cert_pem.clone(), &ca.key_pem(), &key_path).expect("load");
        let leaf = again.issue("dev-1", &[], Usage::Client).expect("issue");
        // The issuer name of the leaf is byte-for-byte the subject name of the CA certificate
        // (what chain building compares), found by searching the DER encodings.
        let ca_der = der(&ca.cert_pem);
        let leaf_der = der(&leaf.cert_pem);
        let cn = b"Pollen fleet f1 CA";
        assert!(ca_der.windows(cn.len()).any(|w| w == cn));
        assert!(leaf_der.windows(cn.len()).any(|w| w == cn));
        assert!(leaf_der.windows(5).any(|w| w == b"dev-1"));
    }

    #[test]
    fn a_key_that_is_not_pem_is_refused_naming_the_file() {
        let ca = FleetCa::create("f1").expect("ca");
        let err = FleetCa::load("f1", ca.cert_pem, "garbage", Path::new("/x/ca.key"))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("/x/ca.key") && err.contains("PEM"), "{err}");
    }
}
