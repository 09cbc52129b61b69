//! Join tokens: `corral1.<secret>.<ca-sha256>`.
//!
//! The secret (32 random bytes, base64url) authenticates the agent to the
//! coordinator once; the coordinator stores only its SHA-256. The CA
//! fingerprint authenticates the coordinator to the agent: a new agent
//! trusts only a coordinator whose CA has exactly that fingerprint, so a
//! token cannot be replayed against, or redirected to, another coordinator.

use base64::Engine as _;
use sha2::{Digest, Sha256};

const PREFIX: &str = "corral1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub secret: String,
    pub ca_fingerprint: String,
}

impl JoinToken {
    pub fn generate(ca_fingerprint: &str) -> anyhow::Result<Self> {
        let mut b = [0u8; 32];
        crate::os_random(&mut b)?;
        Ok(JoinToken {
            secret: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
            ca_fingerprint: ca_fingerprint.to_string(),
        })
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            "malformed join token: expected corral1.<secret>.<ca-fingerprint> as printed by \
             `corralctl token create`"
                .to_string()
        };
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if secret.len() != 43 || fp.len() != 64 || !fp.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(JoinToken {
            secret: secret.into(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }

    /// What the coordinator stores: never the secret itself.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}", self.secret, self.ca_fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = JoinToken::generate(&"ab".repeat(32)).unwrap();
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for s in [
            "",
            "corral1",
            "corral2.x.y",
            "corral1.short.abc",
            "corral1.a.b.c",
        ] {
            assert!(JoinToken::parse(s)
                .unwrap_err()
                .contains("malformed join token"));
        }
    }
}
