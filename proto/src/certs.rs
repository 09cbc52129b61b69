//! A server certificate that can be replaced while the server runs.
//!
//! An agent renews its node certificate without a restart: its gRPC server
//! presents whatever a [`LiveCert`] holds at each handshake, so connections
//! made after a renewal get the new certificate while established ones carry
//! on undisturbed.

use anyhow::{Context, Result};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::sync::{Arc, RwLock};

use crate::pki::CertKey;

/// The certificate and key a TLS server presents, swappable at any time.
#[derive(Debug)]
pub struct LiveCert(RwLock<Arc<CertifiedKey>>);

impl LiveCert {
    pub fn new(me: &CertKey) -> Result<LiveCert> {
        Ok(LiveCert(RwLock::new(certified(me)?)))
    }

    /// Presents `me` from the next handshake on. A certificate that does not
    /// match its key is refused and the current one stays.
    pub fn replace(&self, me: &CertKey) -> Result<()> {
        let next = certified(me)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// The leaf certificate presented now (DER).
    pub fn leaf(&self) -> Vec<u8> {
        let current = self.0.read().unwrap_or_else(|p| p.into_inner());
        current
            .end_entity_cert()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }
}

impl rustls::server::ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn certified(me: &CertKey) -> Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_slice_iter(me.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading our certificate")?;
    if chain.is_empty() {
        anyhow::bail!("no certificate in our certificate file");
    }
    let key =
        PrivateKeyDer::from_pem_slice(me.key_pem.as_bytes()).context("reading our private key")?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider)
        .context("our certificate and key do not match")?;
    Ok(Arc::new(ck))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::pki::CertAuthority;

    #[test]
    fn replacing_changes_the_presented_certificate_and_refuses_a_mismatch() {
        let ca = CertAuthority::generate("t").unwrap();
        let node = Identity::Node("vm1".into());
        let a = ca.issue(&node, &[]).unwrap();
        let b = ca.issue(&node, &[]).unwrap();
        let live = LiveCert::new(&a).unwrap();
        let fp = |l: &LiveCert| crate::pki::fingerprint_der(&l.leaf());
        assert_eq!(fp(&live), crate::pki::fingerprint_pem(&a.cert_pem).unwrap());
        live.replace(&b).unwrap();
        assert_eq!(fp(&live), crate::pki::fingerprint_pem(&b.cert_pem).unwrap());
        let mismatch = CertKey {
            cert_pem: a.cert_pem.clone(),
            key_pem: b.key_pem.clone(),
        };
        assert!(live.replace(&mismatch).is_err());
        assert_eq!(fp(&live), crate::pki::fingerprint_pem(&b.cert_pem).unwrap());
    }
}
