//! Shared pieces of Corral: the wire protocol and the trust model.
//!
//! # Layout
//!
//! - [`archive`]: the backup archive format: zstd-compressed, chunk-encrypted, tamper-evident.
//! - [`pb`]: the gRPC services and messages generated from `proto/corral.proto`.
//! - [`identity`]: who a peer is, read from its mutual-TLS certificate.
//! - [`lease`]: failover timing (lease, fence-ahead, margin) shared by agent and coordinator.
//! - [`pki`]: the certificate authority (CA), node enrollment and operator certificates.
//! - [`token`]: join tokens, which also pin the CA's fingerprint.
//! - [`tls`]: tonic TLS configuration and the pinned first contact of a new agent.
//! - [`certs`]: a server certificate that can be replaced while the server runs (renewal).
//! - [`names`]: validation of cluster and node names, shared by every entry point.
//! - [`exposition`]: Prometheus/OpenMetrics text for the agent's and coordinator's `/metrics`.

pub mod archive;
pub mod certs;
pub mod exposition;
pub mod identity;
pub mod lease;
pub mod names;
pub mod pki;
pub mod tls;
pub mod token;

/// Generated protobuf and gRPC code.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("corral.v1");
}

impl pb::EngineState {
    /// Lowercase name without the prefix: "running", "restarting", ...
    pub fn label(self) -> &'static str {
        match self {
            pb::EngineState::Unspecified => "unspecified",
            pb::EngineState::None => "none",
            pb::EngineState::Initializing => "initializing",
            pb::EngineState::Running => "running",
            pb::EngineState::Restarting => "restarting",
            pb::EngineState::Failed => "failed",
            pb::EngineState::Stopped => "stopped",
        }
    }
}

/// Engine states appear in JSON as their label, not their number.
pub fn serialize_engine_state<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(pb::EngineState::try_from(*v).unwrap_or_default().label())
}

/// Fills `buf` from the operating system's random number generator.
///
/// Every secret Corral makes (join tokens, database passwords, keys) comes
/// from here; a failure is reported, never papered over with a weaker source.
pub fn os_random(buf: &mut [u8]) -> anyhow::Result<()> {
    getrandom::fill(buf).map_err(|e| anyhow::anyhow!("reading the OS random number generator: {e}"))
}

/// A random string of `len` characters from `[A-Za-z0-9]`, for passwords.
///
/// Alphanumeric only, so it can be pasted into a connection URI or a shell
/// without escaping. 32 characters carry about 190 bits.
pub fn random_password(len: usize) -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        os_random(&mut buf)?;
        for b in buf {
            // Rejection sampling keeps every character equally likely.
            if (b as usize) < 256 - (256 % ALPHABET.len()) && out.len() < len {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// Milliseconds since the Unix epoch, for timestamps in messages and the store.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new, empty directory under the system's temporary directory, named
/// `<prefix>-<pid>-<n>` with `n` unique within the process: tests running in
/// parallel threads never share one (a time stamp alone does).
pub fn unique_temp_dir(prefix: &str) -> std::io::Result<std::path::PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    // A directory left by an earlier process with the same pid is stale.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_alphanumeric_and_distinct() {
        let a = super::random_password(32).unwrap();
        let b = super::random_password(32).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
