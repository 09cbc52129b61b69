//! Encryption at rest for database passwords.
//!
//! The store never holds a password in clear: each is sealed with
//! ChaCha20-Poly1305 under a 256-bit key kept in `secret.key` (mode 0600)
//! beside the database, so a copied `corral.db` alone reveals nothing. Back up
//! the key with the database, or the credentials cannot be shown again.

use anyhow::{anyhow, Context, Result};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::path::Path;

pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl SecretBox {
    /// Loads the key at `path`, creating it on first start.
    pub fn load_or_create(path: &Path) -> Result<SecretBox> {
        let key = if path.exists() {
            let hexkey = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let bytes = hex::decode(hexkey.trim())
                .map_err(|_| anyhow!("{} is not a hex-encoded key", path.display()))?;
            if bytes.len() != 32 {
                return Err(anyhow!("{} must hold a 32-byte key", path.display()));
            }
            bytes
        } else {
            let mut b = vec![0u8; 32];
            corral_proto::os_random(&mut b)?;
            corral_proto::pki::write_private(path, &hex::encode(&b))?;
            b
        };
        Ok(SecretBox {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        })
    }

    /// Returns nonce (12 bytes) followed by the ciphertext.
    pub fn seal(&self, plain: &str) -> Result<Vec<u8>> {
        let mut nonce = [0u8; 12];
        corral_proto::os_random(&mut nonce)?;
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .map_err(|_| anyhow!("encrypting a secret"))?;
        Ok([nonce.as_slice(), &ct].concat())
    }

    pub fn open(&self, sealed: &[u8]) -> Result<String> {
        if sealed.len() < 12 {
            return Err(anyhow!("stored secret is truncated"));
        }
        let (nonce, ct) = sealed.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| {
                anyhow!("stored secret does not decrypt: secret.key does not match this database")
            })?;
        String::from_utf8(plain).context("stored secret is not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_key_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let a = SecretBox::load_or_create(&path).unwrap();
        let sealed = a.seal("hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        let b = SecretBox::load_or_create(&path).unwrap();
        assert_eq!(b.open(&sealed).unwrap(), "hunter2");
        std::fs::remove_file(&path).unwrap();
        let c = SecretBox::load_or_create(&path).unwrap();
        assert!(c.open(&sealed).is_err());
    }
}
