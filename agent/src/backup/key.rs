//! The 32-byte backup key a request carries, checked. It sits below the
//! backup pipeline and the engine, which both read it.

use anyhow::{anyhow, Result};

/// The 32-byte key a request carries.
pub fn key_of(bytes: &[u8]) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| {
        anyhow!(
            "the backup key must be 32 bytes, got {}; the coordinator sends its key file's",
            bytes.len()
        )
    })
}
