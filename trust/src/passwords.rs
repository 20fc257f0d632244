//! Mosquitto password files, for deployments whose devices log in with a username and
//! password instead of a certificate.
//!
//! Mosquitto 2's format is `user:$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 over the
//! password with a 12-byte salt, both base64, as `mosquitto_passwd` writes it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Iterations `mosquitto_passwd` uses by default.
pub const ITERATIONS: u32 = 101;

/// One password-file line (without the newline) for `user` with `password`.
pub fn entry(user: &str, password: &str) -> String {
    let salt: [u8; 12] = rand::random();
    entry_with_salt(user, password, &salt, ITERATIONS)
}

fn entry_with_salt(user: &str, password: &str, salt: &[u8], iterations: u32) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, iterations, &mut hash);
    format!(
        "{user}:$7${iterations}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(hash)
    )
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
        let line = entry_with_salt("dev-1", "password", b"salt", 1);
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
