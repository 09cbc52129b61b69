//! The node's identity.
//!
//! A node is enrolled once: it fetches the coordinator's CA (accepting it
//! only if it matches the fingerprint pinned in the join token), generates a
//! key pair, and trades the token and a CSR for a certificate naming its node
//! id. Key, certificate and CA are stored 0600 in the state directory, and
//! `node.json` is written last, so an interrupted enrollment is simply redone
//! (with a new token: the old one may already be spent).

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

/// Loads the identity stored in `state_dir`, if the node is enrolled.
pub fn load(state_dir: &Path) -> Result<Option<NodeIdentity>> {
    let p = paths(state_dir);
    if !p.info.exists() {
        return Ok(None);
    }
    let info: NodeInfo = serde_json::from_str(&pki::read(&p.info)?).with_context(|| {
        format!(
            "{} is not valid: remove the state directory to enroll again",
            p.info.display()
        )
    })?;
    Ok(Some(NodeIdentity {
        info,
        cert: CertKey {
            cert_pem: pki::read(&p.cert)?,
            key_pem: pki::read(&p.key)?,
        },
        ca_pem: pki::read(&p.ca)?,
    }))
}

/// Returns the node's identity: the stored one, or a new one obtained with
/// `token`.
///
/// `node_id` must match a stored identity when one exists (a node cannot
/// change its name by restarting); a `token` given to an enrolled node is
/// ignored with a note, so a service file may keep `--join` harmlessly.
pub async fn ensure(
    state_dir: &Path,
    coordinator: &str,
    token: Option<&str>,
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
        if token.is_some() {
            tracing::info!(node = %node_id, "already enrolled; ignoring --join");
        }
        return Ok(identity);
    }
    let Some(token) = token else {
        bail!(
            "node is not enrolled yet ({} has no node.json): start the agent once with \
             --join TOKEN (make one on the coordinator with `corralctl token create`)",
            state_dir.display()
        );
    };
    enroll(state_dir, coordinator, token, node_id).await
}

async fn enroll(
    state_dir: &Path,
    coordinator: &str,
    token: &str,
    node_id: &str,
) -> Result<NodeIdentity> {
    corral_proto::names::validate("node", node_id).map_err(|e| anyhow!("--node-id: {e}"))?;
    let parsed = JoinToken::parse(token).map_err(|e| anyhow!("--join: {e}"))?;
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
    let response = client
        .enroll(pb::EnrollRequest {
            token: token.to_string(),
            node_id: node_id.to_string(),
            csr_pem,
        })
        .await
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
