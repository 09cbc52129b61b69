//! The coordinator's certificate authority.
//!
//! `corralctl pki init` makes a CA, the coordinator's certificate and a first
//! admin operator certificate. Agents never see the CA key: they send a CSR
//! with a join token and get back a certificate whose identity (common name
//! and DNS name) the CA chose, whatever the CSR asked for.
//!
//! Certificates carry DNS names under the `.corral` pseudo-domain, and peers
//! verify those names rather than IP addresses, so a node can move address
//! without a new certificate: the coordinator is `coordinator.corral`, node
//! `vm1` is `vm1.node.corral`.

use anyhow::{anyhow, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};
use std::path::Path;
use time::{Duration, OffsetDateTime};

use crate::identity::Identity;

/// DNS name in the coordinator's certificate; clients verify it.
pub const COORDINATOR_DNS: &str = "coordinator.corral";

/// DNS name in the certificate of node `id`; the coordinator verifies it.
pub fn node_dns(id: &str) -> String {
    format!("{id}.node.corral")
}

/// Default lifetime of a node certificate. Agents renew theirs on their own
/// once a third of it is left, so a short one costs nothing and a stolen
/// key stops mattering soon (the coordinator flag `--node-cert-lifetime`
/// changes it).
pub const NODE_VALIDITY: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// Default lifetime of an operator certificate, renewed by hand with
/// `corralctl pki renew` (or issued again).
pub const OPERATOR_VALIDITY: std::time::Duration = std::time::Duration::from_secs(90 * 86_400);
/// The coordinator's own certificate, issued by `pki init`.
const COORDINATOR_VALIDITY: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);
/// The CA outlives every certificate it signs; replacing it means enrolling
/// every node again.
const CA_VALIDITY: Duration = Duration::days(3650);

/// The default lifetime of a certificate for `identity`.
pub fn default_validity(identity: &Identity) -> std::time::Duration {
    match identity {
        Identity::Coordinator => COORDINATOR_VALIDITY,
        Identity::Node(_) => NODE_VALIDITY,
        Identity::Operator { .. } => OPERATOR_VALIDITY,
    }
}

/// How far before its issue a certificate's validity starts, so a peer whose
/// clock is a little behind still accepts it: an hour, but never more than
/// a tenth of the lifetime (a 20 s test certificate must not be mostly
/// backdating, or its renewal point would be meaningless).
fn backdate(lifetime: std::time::Duration) -> std::time::Duration {
    (lifetime / 10).min(std::time::Duration::from_secs(3600))
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertKey {
    /// The certificate, followed by the CA certificate (the chain a peer needs).
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertAuthority {
    pub fn generate(name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Corral CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let cert_pem = cert.pem();
        Self::from_pem(&cert_pem, &key.serialize_pem())
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).context("parsing the CA certificate")?;
        Ok(CertAuthority {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// Loads `ca.crt` and `ca.key` from a PKI directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let cert = read(&dir.join("ca.crt"))?;
        let key = read(&dir.join("ca.key"))?;
        Self::from_pem(&cert, &key)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: what join tokens pin.
    pub fn fingerprint(&self) -> Result<String> {
        fingerprint_pem(&self.cert_pem)
    }

    /// Issues a fresh key and certificate for `identity`, valid for the
    /// default lifetime of its kind.
    pub fn issue(&self, identity: &Identity, extra_dns: &[String]) -> Result<CertKey> {
        self.issue_for(identity, extra_dns, default_validity(identity))
    }

    /// [`CertAuthority::issue`] with a lifetime of `validity`.
    pub fn issue_for(
        &self,
        identity: &Identity,
        extra_dns: &[String],
        validity: std::time::Duration,
    ) -> Result<CertKey> {
        let key = KeyPair::generate().context("generating a key")?;
        let cert_pem = self.sign(identity, &key, extra_dns, validity)?;
        Ok(CertKey {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs an agent's CSR as node `node_id`, for the default lifetime.
    pub fn sign_node_csr(&self, csr_pem: &str, node_id: &str) -> Result<String> {
        let node = Identity::Node(node_id.to_string());
        self.sign_csr(csr_pem, &node, NODE_VALIDITY)
    }

    /// Signs a CSR as `identity`, valid for `validity`. Only the CSR's
    /// public key is used: the subject and names come from the CA, so a CSR
    /// cannot ask for another identity. The CSR's own signature is verified.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        validity: std::time::Duration,
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow!("invalid certificate signing request: {e}"))?;
        self.sign(identity, &csr.public_key, &[], validity)
    }

    fn sign(
        &self,
        identity: &Identity,
        public_key: &impl rcgen::PublicKeyData,
        extra_dns: &[String],
        validity: std::time::Duration,
    ) -> Result<String> {
        let mut dns: Vec<String> = match identity {
            Identity::Coordinator => vec![COORDINATOR_DNS.into(), "localhost".into()],
            Identity::Node(id) => vec![node_dns(id)],
            Identity::Operator { .. } => vec![],
        };
        dns.extend(extra_dns.iter().cloned());
        let mut params = CertificateParams::new(dns).context("certificate names")?;
        params
            .distinguished_name
            .push(DnType::CommonName, identity.common_name());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match identity {
            Identity::Operator { .. } => vec![ExtendedKeyUsagePurpose::ClientAuth],
            _ => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - backdate(validity);
        params.not_after = now + validity;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .context("signing a certificate")?;
        Ok(format!("{}{}", cert.pem(), self.cert_pem))
    }

    /// Writes a complete PKI directory: the CA, the coordinator's certificate
    /// and a first admin operator certificate. Refuses to overwrite an
    /// existing CA: that would orphan every enrolled agent.
    pub fn init_dir(dir: &Path, admin_name: &str, extra_dns: &[String]) -> Result<CertAuthority> {
        if dir.join("ca.key").exists() {
            return Err(anyhow!(
                "{} already holds a CA (ca.key); refusing to overwrite it, since every \
                 enrolled agent trusts it. Use another --dir, or remove it by hand if you \
                 really mean to start over",
                dir.display()
            ));
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = CertAuthority::generate(admin_name)?;
        let coord = ca.issue(&Identity::Coordinator, extra_dns)?;
        let admin = ca.issue(
            &Identity::Operator {
                role: crate::identity::Role::Admin,
                name: admin_name.into(),
            },
            &[],
        )?;
        write_private(&dir.join("coordinator.key"), &coord.key_pem)?;
        write_public(&dir.join("coordinator.crt"), &coord.cert_pem)?;
        write_private(&dir.join("admin.key"), &admin.key_pem)?;
        write_public(&dir.join("admin.crt"), &admin.cert_pem)?;
        write_public(&dir.join("ca.crt"), ca.cert_pem())?;
        // The CA key last: its presence marks a complete directory.
        write_private(&dir.join("ca.key"), &ca.key_pem())?;
        Ok(ca)
    }
}

fn random_serial() -> Result<SerialNumber> {
    let mut b = [0u8; 16];
    crate::os_random(&mut b)?;
    b[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&b))
}

/// When the certificate in `pem` expires, in Unix milliseconds.
pub fn not_after_ms(pem: &str) -> Result<i64> {
    Ok(validity_ms(pem)?.1)
}

/// When the certificate in `pem` becomes valid and when it expires, in Unix
/// milliseconds.
pub fn validity_ms(pem: &str) -> Result<(i64, i64)> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow!("reading a PEM certificate: {e}"))?;
    validity_der(&block.contents)
}

/// [`validity_ms`] of a DER certificate.
pub fn validity_der(der: &[u8]) -> Result<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("parsing a certificate: {e}"))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp() * 1000,
        v.not_after.timestamp() * 1000,
    ))
}

/// SHA-256 of the first certificate in `pem`, lowercase hex.
pub fn fingerprint_pem(pem: &str) -> Result<String> {
    let der = first_cert_der(pem)?;
    Ok(fingerprint_der(&der))
}

/// The Corral identity the first certificate in `pem` names.
pub fn identity_pem(pem: &str) -> Result<Identity> {
    Identity::from_cert_der(&first_cert_der(pem)?).map_err(|e| anyhow!(e))
}

pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn first_cert_der(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let cert = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| anyhow!("no certificate in PEM text"))?
        .map_err(|e| anyhow!("unreadable certificate PEM: {e}"))?;
    Ok(cert.to_vec())
}

/// A new key pair and a CSR for it, as an agent makes before enrolling.
pub fn new_csr(node_id: &str) -> Result<(String, String)> {
    new_csr_for(&Identity::Node(node_id.to_string()))
}

/// A new key pair and a CSR naming `identity` (the CA decides the identity
/// anyway; the name only helps whoever reads the CSR). Returns (CSR, key).
pub fn new_csr_for(identity: &Identity) -> Result<(String, String)> {
    let key = KeyPair::generate().context("generating a key")?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.common_name());
    let csr = params.serialize_request(&key).context("making the CSR")?;
    Ok((csr.pem().context("encoding the CSR")?, key.serialize_pem()))
}

pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes a secret file with mode 0600, atomically (temp file + rename), so a
/// crash never leaves a truncated key behind.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    write_mode(path, contents, 0o600)
}

pub fn write_public(path: &Path, contents: &str) -> Result<()> {
    write_mode(path, contents, 0o644)
}

fn write_mode(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A name of its own per write: two writers of the same file (or of
    // two files with the same stem) never share a temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_identity_is_chosen_by_the_ca() {
        let ca = CertAuthority::generate("t").unwrap();
        // The CSR claims another node; the certificate names the one the CA chose.
        let (csr, _key) = new_csr("evil").unwrap();
        let pem = ca.sign_node_csr(&csr, "vm1").unwrap();
        let der = first_cert_der(&pem).unwrap();
        assert_eq!(
            Identity::from_cert_der(&der).unwrap(),
            Identity::Node("vm1".into())
        );
    }

    #[test]
    fn expiry_is_read_from_the_certificate() {
        let ca = CertAuthority::generate("t").unwrap();
        let (csr, _) = new_csr("vm1").unwrap();
        let leaf = ca.sign_node_csr(&csr, "vm1").unwrap();
        let day = 86_400_000;
        let now = crate::now_ms();
        let leaf_days = (not_after_ms(&leaf).unwrap() - now) / day;
        let ca_days = (not_after_ms(ca.cert_pem()).unwrap() - now) / day;
        assert!((29..=30).contains(&leaf_days), "{leaf_days}");
        assert!((3648..=3650).contains(&ca_days), "{ca_days}");
        assert!(not_after_ms("not a certificate").is_err());
        let admin = Identity::Operator {
            role: crate::identity::Role::Admin,
            name: "a".into(),
        };
        let op = ca.issue(&admin, &[]).unwrap();
        let op_days = (not_after_ms(&op.cert_pem).unwrap() - now) / day;
        assert!((89..=90).contains(&op_days), "{op_days}");
    }

    #[test]
    fn a_short_lifetime_is_barely_backdated() {
        let ca = CertAuthority::generate("t").unwrap();
        let (csr, _) = new_csr("vm1").unwrap();
        let node = Identity::Node("vm1".into());
        let pem = ca
            .sign_csr(&csr, &node, std::time::Duration::from_secs(20))
            .unwrap();
        let (from, to) = validity_ms(&pem).unwrap();
        // 20 s ahead, 2 s back (a tenth), to the second.
        assert!((21_000..=23_000).contains(&(to - from)), "{}", to - from);
        let long = ca.sign_node_csr(&csr, "vm1").unwrap();
        let (from, to) = validity_ms(&long).unwrap();
        assert_eq!(to - from, (30 * 86_400 + 3600) * 1000);
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = CertAuthority::generate("t").unwrap();
        let err = ca.sign_node_csr("not a csr", "vm1").unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid certificate signing request"),
            "{err}"
        );
    }

    #[test]
    fn fingerprints_differ_between_cas() {
        let a = CertAuthority::generate("a").unwrap();
        let b = CertAuthority::generate("b").unwrap();
        assert_eq!(a.fingerprint().unwrap().len(), 64);
        assert_ne!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
    }
}
