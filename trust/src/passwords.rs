//! Mosquitto password files, for deployments whose devices log in with a username and
//! password instead of a certificate.
//!
//! Mosquitto 2's format is `user:$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 over the
//! password with a 12-byte salt, both base64, as `mosquitto_passwd` writes it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Iterations `mosquitto_passwd` uses by default.
pub const ITERATIONS: u32 = 101;

/// A password as Mosquitto stores it: PBKDF2-HMAC-SHA512 with a random 12-byte salt. The
/// password file and the dynamic-security plugin's JSON hold the same three fields.
#[derive(Debug, Clone)]
pub struct Hashed {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub hash: [u8; 64],
}

impl Hashed {
    pub fn new(password: &str) -> Self {
        let salt: [u8; 12] = rand::random();
        Self::with_salt(password, &salt, ITERATIONS)
    }

    fn with_salt(password: &str, salt: &[u8], iterations: u32) -> Self {
        let mut hash = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, iterations, &mut hash);
        Self {
            iterations,
            salt: salt.to_vec(),
            hash,
        }
    }

    /// The salt and the hash in base64, as both Mosquitto formats write them.
    pub fn salt_b64(&self) -> String {
        STANDARD.encode(&self.salt)
    }
    pub fn hash_b64(&self) -> String {
        STANDARD.encode(self.hash)
    }

    /// This password's line of a password file (without the newline), for `user`.
    pub fn entry(&self, user: &str) -> String {
        format!(
            "{user}:$7${}${}${}",
            self.iterations,
            self.salt_b64(),
            self.hash_b64()
        )
    }
}

/// One password-file line (without the newline) for `user` with `password`.
pub fn entry(user: &str, password: &str) -> String {
    Hashed::new(password).entry(user)
}

/// A random password: 24 bytes of entropy, URL-safe so it survives config files and URLs.
pub fn generate() -> String {
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_mosquitto_2s_pbkdf2_format() {
        // PBKDF2-HMAC-SHA512 test vector (RFC 6070's inputs, SHA-512 output from the
        // Python hashlib.pbkdf2_hmac reference): password "password", salt "salt", 1 iteration.
        let line = Hashed::with_salt("password", b"salt", 1).entry("dev-1");
        let fields: Vec<&str> = line.splitn(2, ':').collect();
        assert_eq!(fields[0], "dev-1");
        let parts: Vec<&str> = fields[1].split('$').collect();
        assert_eq!(parts[..3], ["", "7", "1"]);
        assert_eq!(STANDARD.decode(parts[3]).expect("salt"), b"salt");
        let hash = STANDARD.decode(parts[4]).expect("hash");
        assert_eq!(hex(&hash[..16]), "867f70cf1ade02cff3752599a3a53dc4");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn each_entry_has_its_own_salt() {
        assert_ne!(entry("a", "pw"), entry("a", "pw"));
        assert_ne!(generate(), generate());
    }
}
