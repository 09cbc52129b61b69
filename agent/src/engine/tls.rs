//! Certificates for the engines' own TLS: what clients and replicas of a
//! database verify.
//!
//! An engine presents the node's certificate (issued by the cluster's CA
//! at enrollment, renewed by [`crate::renew`]): it names the node
//! (`<id>.node.corral`), not its addresses, so peers and clients verify the
//! chain to the CA (libpq `sslmode=verify-ca`, MariaDB `VERIFY_CA`) rather
//! than the host name. The agent hands the driver an [`EngineTls`], which
//! the renewal updates; the driver copies it into files of its own, owned
//! by the engine's account and private to it (0600, in a 0700 directory),
//! at every `prepare`, and has the engine reload them when they changed.
//!
//! Without material (a driver made without [`EngineTls`], as some tests
//! do) the engine runs without TLS.

use super::os::{self, Account};
use anyhow::Result;
use corral_proto::pki::CertKey;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The certificate and key an engine presents, and the CA its peers and
/// clients verify them with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The leaf followed by the CA (the chain a client needs).
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl TlsMaterial {
    pub fn new(cert: &CertKey, ca_pem: &str) -> TlsMaterial {
        TlsMaterial {
            cert_pem: cert.cert_pem.clone(),
            key_pem: cert.key_pem.clone(),
            ca_pem: ca_pem.to_string(),
        }
    }
}

/// The node's current engine certificate, shared by the agent's drivers
/// and replaced at each renewal of the node certificate.
#[derive(Debug, Default)]
pub struct EngineTls(RwLock<Option<TlsMaterial>>);

impl EngineTls {
    pub fn new(material: TlsMaterial) -> EngineTls {
        EngineTls(RwLock::new(Some(material)))
    }

    /// Uses `material` from the next `prepare` of each engine on.
    pub fn replace(&self, material: TlsMaterial) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(material);
    }

    pub fn current(&self) -> Option<TlsMaterial> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A driver's copy of the material, under its base directory
    /// (`<base>/tls`), when there is material.
    pub fn files_in(&self, base: &Path) -> Option<TlsFiles> {
        self.current().map(|_| TlsFiles::new(&base.join("tls")))
    }

    /// Installs the current material under `base` for `acct`; returns
    /// whether the files changed (nothing to do without material).
    pub fn install_in(&self, base: &Path, acct: &Account) -> Result<bool> {
        match (self.current(), self.files_in(base)) {
            (Some(m), Some(f)) => f.install(&m, acct),
            _ => Ok(false),
        }
    }
}

/// Where an engine's copy of the material lives: `<dir>/server.crt`,
/// `server.key` and `ca.crt`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub dir: PathBuf,
}

impl TlsFiles {
    pub fn new(dir: &Path) -> TlsFiles {
        TlsFiles {
            dir: dir.to_path_buf(),
        }
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Writes `material` as `acct`'s private files (only what changed);
    /// returns whether anything did. The key is written before the
    /// certificate, so an engine that reloads in between fails to match
    /// them and keeps its old pair rather than presenting a new
    /// certificate with the old key.
    pub fn install(&self, material: &TlsMaterial, acct: &Account) -> Result<bool> {
        os::mkdir_owned(&self.dir, 0o700, acct)?;
        let mut changed = os::write_owned(&self.ca(), &material.ca_pem, acct)?;
        changed |= os::write_owned(&self.key(), &material.key_pem, acct)?;
        changed |= os::write_owned(&self.cert(), &material.cert_pem, acct)?;
        Ok(changed)
    }
}

/// How often a renewed node certificate is looked for.
const RENEWAL_POLL: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs for the agent's life: when [`crate::renew`] replaces the node
/// certificate, the engine gets it too (its files rewritten and reloaded
/// by the driver's `prepare`), long before the old one expires.
pub async fn follow_renewals(
    creds: std::sync::Arc<crate::credentials::Credentials>,
    tls: std::sync::Arc<EngineTls>,
    engine: std::sync::Arc<super::Engine>,
) {
    let mut seen = creds.cert().1;
    loop {
        tokio::time::sleep(RENEWAL_POLL).await;
        let (cert, generation) = creds.cert();
        if generation == seen {
            continue;
        }
        tls.replace(TlsMaterial::new(&cert, &creds.ca_pem));
        match engine.refresh_tls().await {
            Ok(()) => seen = generation,
            Err(e) => tracing::warn!("giving the engine the renewed certificate: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_is_what_drivers_get_next() {
        let m = |s: &str| TlsMaterial {
            cert_pem: s.into(),
            key_pem: format!("{s}-key"),
            ca_pem: "ca".into(),
        };
        assert_eq!(EngineTls::default().current(), None);
        let tls = EngineTls::new(m("a"));
        assert_eq!(tls.current(), Some(m("a")));
        tls.replace(m("b"));
        assert_eq!(tls.current(), Some(m("b")));
    }
}
