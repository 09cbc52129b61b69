//! The node's identity.
//!
//! A node is enrolled once: it fetches the coordinator's CA (accepting it
//! only if it matches the fingerprint pinned in the join token), generates a
//! key pair, and trades the token and a CSR for a certificate naming its node
//! id. Key, certificate and CA are stored 0600 in the state directory, and
//! `node.json` is written last, so an interrupted enrollment is simply redone
//! (with a new token: the old one may already be spent).
//!
//! A renewal ([`crate::renew`]) writes the new key and certificate to new
//! files and then points `node.json` at them, in one rename: whatever the
//! moment of a crash, `node.json` names a key and certificate that exist and
//! match.
//!
//! The join token is best kept out of the command line, where every user of
//! the machine can read it (`ps`): [`Join`] reads it from a file, standard
//! input or the environment.

use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use corral_proto::pki::{self, CertKey, COORDINATOR_DNS};
use corral_proto::token::JoinToken;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `node.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    /// The coordinator this node enrolled with.
    pub coordinator: String,
    pub enrolled_at_ms: i64,
    /// The certificate and key in use, file names in the state directory;
    /// absent until the first renewal (enrollment writes `node.crt` and
    /// `node.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// Where the join token comes from.
#[derive(Debug, Clone)]
pub enum Join {
    None,
    /// Given as such (`--join TOKEN` or `CORRAL_JOIN_TOKEN`).
    Token(String),
    /// `--join-file PATH`: the file's first line.
    File(PathBuf),
    /// `--join -`: the first line of standard input.
    Stdin,
}

impl Join {
    /// The token, read only now: an enrolled node needs none, and its
    /// token file may long be gone.
    fn read(&self) -> Result<Option<String>> {
        let first_line = |text: &str| text.lines().next().unwrap_or("").trim().to_string();
        match self {
            Join::None => Ok(None),
            Join::Token(t) => Ok(Some(t.trim().to_string())),
            Join::File(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--join-file {}", path.display()))?;
                Ok(Some(first_line(&text)))
            }
            Join::Stdin => {
                let mut text = String::new();
                let mut input = std::io::Read::take(std::io::stdin(), 4096);
                std::io::Read::read_to_string(&mut input, &mut text)
                    .context("--join -: reading the token from standard input")?;
                Ok(Some(first_line(&text)))
            }
        }
    }
}

/// A node's credentials, loaded from its state directory.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub info: NodeInfo,
    pub cert: CertKey,
    pub ca_pem: String,
}

/// The coordinator refused the enrollment: a definite answer, not a fault to
/// retry. The agent exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("enrollment refused by the coordinator at {coordinator}: {reason}")]
pub struct Refused {
    pub coordinator: String,
    pub reason: String,
}

/// How many times an enrollment the coordinator defers (RESOURCE_EXHAUSTED:
/// rate limit, busy) is tried again before the agent gives up (about an
/// hour at most).
const ENROLL_RETRIES: u32 = 120;

/// How long to wait before trying a deferred enrollment again: what the
/// coordinator asked ("retry in 12s"), else a backoff from 1 s to 30 s;
/// plus up to a second of jitter, so nodes deferred together spread out.
fn retry_after(message: &str, attempt: u32) -> Duration {
    let asked = message
        .split("retry in ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.trim().parse::<u64>().ok());
    let base = asked.unwrap_or_else(|| 1u64 << attempt.min(5)).clamp(1, 30);
    let jitter = u64::from(std::process::id() % 1000) + u64::from(attempt) * 137 % 1000;
    Duration::from_secs(base) + Duration::from_millis(jitter % 1000)
}

struct Paths {
    info: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

fn paths(state_dir: &Path) -> Paths {
    Paths {
        info: state_dir.join("node.json"),
        cert: state_dir.join("node.crt"),
        key: state_dir.join("node.key"),
        ca: state_dir.join("ca.crt"),
    }
}

/// A file name `node.json` may point at: a plain name inside the state
/// directory, nothing else.
fn in_state_dir(state_dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("node.json names {name:?}, which is not a file of the state directory");
    }
    Ok(state_dir.join(name))
}

fn read_info(p: &Paths) -> Result<NodeInfo> {
    serde_json::from_str(&pki::read(&p.info)?).with_context(|| {
        format!(
            "{} is not valid: remove the state directory to enroll again",
            p.info.display()
        )
    })
}

/// Loads the identity stored in `state_dir`, if the node is enrolled.
pub fn load(state_dir: &Path) -> Result<Option<NodeIdentity>> {
    let p = paths(state_dir);
    if !p.info.exists() {
        return Ok(None);
    }
    let info = read_info(&p)?;
    let cert = match &info.cert_file {
        Some(name) => in_state_dir(state_dir, name)?,
        None => p.cert.clone(),
    };
    let key = match &info.key_file {
        Some(name) => in_state_dir(state_dir, name)?,
        None => p.key.clone(),
    };
    Ok(Some(NodeIdentity {
        info,
        cert: CertKey {
            cert_pem: pki::read(&cert)?,
            key_pem: pki::read(&key)?,
        },
        ca_pem: pki::read(&p.ca)?,
    }))
}

/// Keeps a renewed certificate and its key as the node's identity: new
/// files first (each written whole and synced), then `node.json` pointing at
/// them (the one rename that switches), then the directory synced so the
/// switch survives a power cut; the files it replaced are removed last.
pub fn store_renewed(state_dir: &Path, cert: &CertKey) -> Result<()> {
    let p = paths(state_dir);
    let mut info = read_info(&p)?;
    let generation = corral_proto::now_ms();
    let (cert_name, key_name) = (
        format!("node.{generation}.crt"),
        format!("node.{generation}.key"),
    );
    pki::write_private(&state_dir.join(&key_name), &cert.key_pem)?;
    pki::write_private(&state_dir.join(&cert_name), &cert.cert_pem)?;
    let before = [info.cert_file.take(), info.key_file.take()];
    info.cert_file = Some(cert_name.clone());
    info.key_file = Some(key_name.clone());
    pki::write_private(&p.info, &serde_json::to_string_pretty(&info)?)?;
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", state_dir.display()))?;
    // Old identities: the files the previous node.json named (or the
    // enrollment's), and any left by a renewal interrupted before its switch.
    let mut stale: Vec<PathBuf> = before
        .iter()
        .flatten()
        .filter_map(|n| in_state_dir(state_dir, n).ok())
        .chain([p.cert, p.key])
        .collect();
    if let Ok(dir) = std::fs::read_dir(state_dir) {
        stale.extend(dir.flatten().map(|e| e.path()).filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("node.")
                && (name.ends_with(".crt") || name.ends_with(".key"))
                && name != cert_name
                && name != key_name
        }));
    }
    for path in stale {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Returns the node's identity: the stored one, or a new one obtained with
/// `token`.
///
/// `node_id` must match a stored identity when one exists (a node cannot
/// change its name by restarting); a token given to an enrolled node is
/// ignored with a note (and not read), so a service file may keep
/// `--join-file` harmlessly.
pub async fn ensure(
    state_dir: &Path,
    coordinator: &str,
    join: &Join,
    node_id: &str,
) -> Result<NodeIdentity> {
    if let Some(identity) = load(state_dir)? {
        if identity.info.node_id != node_id {
            bail!(
                "this state directory ({}) belongs to node {:?}, not {:?}: drop --node-id, or use \
                 another --state-dir to enroll a new node",
                state_dir.display(),
                identity.info.node_id,
                node_id
            );
        }
        if !matches!(join, Join::None) {
            tracing::info!(node = %node_id, "already enrolled; ignoring the join token");
        }
        return Ok(identity);
    }
    let Some(token) = join.read()? else {
        bail!(
            "node is not enrolled yet ({} has no node.json): start the agent once with \
             --join-file FILE holding a join token (make one on the coordinator with \
             `corralctl token create`)",
            state_dir.display()
        );
    };
    enroll(state_dir, coordinator, &token, node_id).await
}

async fn enroll(
    state_dir: &Path,
    coordinator: &str,
    token: &str,
    node_id: &str,
) -> Result<NodeIdentity> {
    corral_proto::names::validate("node", node_id).map_err(|e| anyhow!("--node-id: {e}"))?;
    let parsed = JoinToken::parse(token).map_err(|e| anyhow!("the join token: {e}"))?;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    // A refused pin is a refusal too: the token belongs to another coordinator.
    let ca_pem = corral_proto::tls::fetch_pinned_ca(coordinator, &parsed.ca_fingerprint)
        .await
        .map_err(|e| {
            if let Some(pin) = e.downcast_ref::<corral_proto::tls::PinMismatch>() {
                anyhow::Error::new(Refused {
                    coordinator: coordinator.into(),
                    reason: pin.0.clone(),
                })
            } else {
                e
            }
        })?;
    let (csr_pem, key_pem) = pki::new_csr(node_id)?;
    let tls = corral_proto::tls::client_config(&ca_pem, None, COORDINATOR_DNS);
    let channel = corral_proto::tls::channel(coordinator, tls, Duration::from_secs(15))?;
    let mut client = pb::agent_upcalls_client::AgentUpcallsClient::new(channel);
    let request = pb::EnrollRequest {
        token: token.to_string(),
        node_id: node_id.to_string(),
        csr_pem,
    };
    let mut attempt = 0;
    let response = loop {
        match client.enroll(request.clone()).await {
            // Many nodes enrolling at once from one address (behind NAT)
            // or a busy coordinator: wait as asked, and try again.
            Err(s) if s.code() == tonic::Code::ResourceExhausted && attempt < ENROLL_RETRIES => {
                let wait = retry_after(s.message(), attempt);
                tracing::warn!(
                    "enrollment deferred by the coordinator ({}); trying again in {} s",
                    s.message(),
                    wait.as_secs()
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => break other,
        }
    };
    let response = response
        .map_err(|s| match s.code() {
            tonic::Code::PermissionDenied
            | tonic::Code::AlreadyExists
            | tonic::Code::InvalidArgument => anyhow::Error::new(Refused {
                coordinator: coordinator.into(),
                reason: s.message().to_string(),
            }),
            _ => anyhow!(
                "enrolling with the coordinator at {coordinator}: {}",
                s.message()
            ),
        })?
        .into_inner();
    let p = paths(state_dir);
    pki::write_private(&p.key, &key_pem)?;
    pki::write_private(&p.cert, &response.certificate_pem)?;
    pki::write_private(&p.ca, &ca_pem)?;
    let info = NodeInfo {
        node_id: response.node_id,
        coordinator: coordinator.to_string(),
        enrolled_at_ms: corral_proto::now_ms(),
        cert_file: None,
        key_file: None,
    };
    pki::write_private(&p.info, &serde_json::to_string_pretty(&info)?)?;
    tracing::info!(node = %info.node_id, coordinator, "enrolled");
    Ok(NodeIdentity {
        info,
        cert: CertKey {
            cert_pem: response.certificate_pem,
            key_pem,
        },
        ca_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::identity::Identity;

    #[test]
    fn a_renewed_identity_replaces_the_enrolled_one_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::CertAuthority::generate("t").unwrap();
        let node = Identity::Node("vm1".into());
        let first = ca.issue(&node, &[]).unwrap();
        let p = paths(dir.path());
        pki::write_private(&p.key, &first.key_pem).unwrap();
        pki::write_private(&p.cert, &first.cert_pem).unwrap();
        pki::write_private(&p.ca, ca.cert_pem()).unwrap();
        let info = NodeInfo {
            node_id: "vm1".into(),
            coordinator: "c:7400".into(),
            enrolled_at_ms: 1,
            cert_file: None,
            key_file: None,
        };
        pki::write_private(&p.info, &serde_json::to_string(&info).unwrap()).unwrap();
        assert_eq!(
            load(dir.path()).unwrap().unwrap().cert.cert_pem,
            first.cert_pem
        );

        for _ in 0..2 {
            let next = ca.issue(&node, &[]).unwrap();
            store_renewed(dir.path(), &next).unwrap();
            let loaded = load(dir.path()).unwrap().unwrap();
            assert_eq!(loaded.cert.cert_pem, next.cert_pem);
            assert_eq!(loaded.cert.key_pem, next.key_pem);
            assert_eq!(loaded.info.enrolled_at_ms, 1);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // Only the identity in use is left: one certificate and one key.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".crt") || n.ends_with(".key"))
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}"); // ca.crt, node.N.crt, node.N.key
    }

    #[test]
    fn a_deferred_enrollment_waits_as_asked_or_backs_off() {
        let secs = |m: &str, a: u32| retry_after(m, a).as_secs();
        let asked = "too many enrollment attempts from 10.0.0.1 without a certificate: retry in 12s (the limit is ...)";
        assert_eq!(secs(asked, 0), 12);
        assert_eq!(secs(asked, 7), 12);
        assert_eq!(secs("retry in 600s", 0), 30, "capped");
        let busy = "the coordinator is busy with other enrollments: retry in a few seconds";
        assert_eq!(
            (0..7).map(|a| secs(busy, a)).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 30, 30]
        );
        assert!(retry_after(busy, 0) < Duration::from_secs(2));
    }

    #[test]
    fn node_json_cannot_point_outside_the_state_directory() {
        let dir = Path::new("/var/lib/corral-agent");
        assert!(in_state_dir(dir, "node.1.crt").is_ok());
        for bad in ["", "../etc/shadow", "/etc/shadow", ".hidden"] {
            assert!(in_state_dir(dir, bad).is_err(), "{bad}");
        }
    }
}
