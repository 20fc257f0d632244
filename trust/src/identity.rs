//! Who a TLS peer is: the common name of its certificate, and what that name may do on the
//! Fleet link.

use crate::TrustError;
use crate::policy::RESERVED_PREFIX;

/// The subject common name of a DER certificate (already verified against the fleet CA by
/// the TLS handshake; this only reads it).
pub fn common_name(der: &[u8]) -> Result<String, TrustError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TrustError::Certificate(format!("peer certificate does not parse: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| TrustError::Certificate("peer certificate has no common name".into()))?;
    cn.as_str()
        .map(str::to_string)
        .map_err(|e| TrustError::Certificate(format!("peer certificate common name: {e}")))
}

/// Whether the holder of a certificate named `identity` may join the coordinator as
/// `client_id`: a device or direct agent only as itself, a proxy (`pollen-proxy.<id>`) as any
/// device it bridges.
pub fn may_join_as(identity: &str, client_id: &str) -> bool {
    identity == client_id || identity.starts_with(&format!("{RESERVED_PREFIX}proxy."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{FleetCa, Usage, der};

    #[test]
    fn the_identity_is_the_common_name_and_binds_the_client_id() {
        let ca = FleetCa::create("f1").expect("ca");
        let cert = ca.issue("dev-7", &[], Usage::Client).expect("issue");
        let name = common_name(&der(&cert.cert_pem)).expect("cn");
        assert_eq!(name, "dev-7");
        assert!(may_join_as(&name, "dev-7"));
        assert!(!may_join_as(&name, "dev-8"));
        assert!(may_join_as("pollen-proxy.proxy-0", "dev-8"));
        assert!(!may_join_as("pollen-operator.admin", "dev-8"));
        assert!(common_name(b"not a certificate").is_err());
    }
}
