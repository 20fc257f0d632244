//! Who may say what in a Pollen fleet.
//!
//! - [`pki`]: the fleet CA and the X.509 certificates it issues to devices, proxies,
//!   operators, the broker and the coordinator.
//! - [`policy`]: the broker policies that confine each identity to its own topics (a
//!   Mosquitto ACL and AWS IoT Core policy documents).
//! - [`dynsec`]: the same rules for Mosquitto's dynamic-security plugin, which also refuses
//!   subscriptions.
//! - [`identity`]: a TLS peer's identity (its certificate's common name) and what it may join as.
//! - [`passwords`]: Mosquitto password-file entries, for username/password deployments.
//! - [`provision`]: `pollen fleet provision`, which writes all of the above to a directory.

use std::path::{Path, PathBuf};

pub mod dynsec;
pub mod identity;
pub mod passwords;
pub mod pki;
pub mod policy;
pub mod provision;

pub use provision::{Provision, Provisioned};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{0}")]
    Input(String),
    #[error("certificate generation failed: {0}")]
    Certificate(String),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

impl TrustError {
    fn cert(e: rcgen::Error) -> Self {
        Self::Certificate(e.to_string())
    }

    fn io(path: &Path, e: std::io::Error) -> Self {
        Self::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

pub(crate) fn write_public(path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
    std::fs::write(path, bytes).map_err(|e| TrustError::io(path, e))
}

/// Writes a secret (private key, password) readable by its owner only, created so from the
/// start rather than narrowed after it was written.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| TrustError::io(path, e))?;
    file.write_all(bytes).map_err(|e| TrustError::io(path, e))
}
