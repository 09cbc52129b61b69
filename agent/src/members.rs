//! Which nodes may ask this replica to confirm their primary: the members
//! of its cluster as the coordinator last named them, with the certificate
//! fingerprints each may present (`Assignment.members`).
//!
//! Every node certificate of the CA passes the TLS handshake, including one
//! revoked by an operator or belonging to a forgotten node. The Peer API
//! therefore also checks the caller's certificate against this list, so
//! such a node cannot keep a primary's lease alive (or its own).
//!
//! The list is kept in `<state_dir>/members.json` too: a replica whose agent
//! restarts while the coordinator is away still knows whom to confirm (a
//! coordinator outage must not take writes down).

use corral_proto::pb;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Known {
    /// The cluster; empty: this node serves none (or has not heard yet).
    pub cluster: String,
    /// Every other member: node id -> fingerprints it may present.
    pub nodes: BTreeMap<String, BTreeSet<String>>,
}

impl Known {
    pub fn of(a: Option<&pb::Assignment>) -> Known {
        let Some(a) = a else {
            return Known::default();
        };
        Known {
            cluster: a.cluster.clone(),
            nodes: a
                .members
                .iter()
                .map(|m| (m.node.clone(), m.fingerprints.iter().cloned().collect()))
                .collect(),
        }
    }

    /// Whether node `caller`, presenting certificate `fp`, is a member the
    /// coordinator named; if not, why not.
    pub fn check(&self, caller: &str, fp: &str) -> Result<(), String> {
        let Some(fps) = self.nodes.get(caller) else {
            return Err(if self.cluster.is_empty() {
                "this node has not heard from the coordinator which nodes share its cluster, \
                 so it confirms no one yet"
                    .to_string()
            } else {
                format!(
                    "node {caller} is not a member of cluster {} as the coordinator last named \
                     them",
                    self.cluster
                )
            });
        };
        if fps.contains(fp) {
            Ok(())
        } else {
            Err(format!(
                "certificate {}… is not one the coordinator names for node {caller}: it was \
                 revoked, replaced by a renewal, or its node was forgotten",
                &fp[..fp.len().min(16)]
            ))
        }
    }
}

pub struct Members {
    path: PathBuf,
    known: Mutex<Known>,
    /// The last refusal logged: a refused primary asks every interval, and
    /// one line per change says enough.
    last_refusal: Mutex<String>,
}

impl Members {
    /// Loads the list kept in `state_dir`; none (or an unreadable one)
    /// means none known until the coordinator's next answer.
    pub fn load(state_dir: &Path) -> Members {
        let path = state_dir.join("members.json");
        let known = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!("ignoring {}: {e}", path.display());
                Known::default()
            }),
            Err(_) => Known::default(),
        };
        Members {
            path,
            known: Mutex::new(known),
            last_refusal: Mutex::default(),
        }
    }

    /// Takes the members named in a heartbeat's answer (none: this node
    /// serves no cluster); a change is written to disk.
    pub fn learn(&self, a: Option<&pb::Assignment>) {
        let next = Known::of(a);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if *known == next {
            return;
        }
        let text = serde_json::to_string_pretty(&next).unwrap_or_default();
        if let Err(e) = corral_proto::pki::write_private(&self.path, &text) {
            // Still used in memory; only a restart during a coordinator
            // outage would miss it.
            tracing::warn!("keeping the cluster's members: {e:#}");
        }
        *known = next;
    }

    pub fn check(&self, caller: &str, fp: &str) -> Result<(), String> {
        let verdict = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(caller, fp);
        if let Err(why) = &verdict {
            let mut last = self.last_refusal.lock().unwrap_or_else(|p| p.into_inner());
            if *last != *why {
                tracing::warn!(%caller, "refused a confirmation request: {why}");
                *last = why.clone();
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(members: &[(&str, &[&str])]) -> pb::Assignment {
        pb::Assignment {
            cluster: "shop".into(),
            members: members
                .iter()
                .map(|(node, fps)| pb::PeerAddress {
                    node: node.to_string(),
                    address: String::new(),
                    fingerprints: fps.iter().map(|f| f.to_string()).collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_named_members_with_named_certificates_pass() {
        let a = assignment(&[("vm1", &["aaaa", "bbbb"]), ("vm3", &[])]);
        let k = Known::of(Some(&a));
        assert!(k.check("vm1", "aaaa").is_ok());
        assert!(k.check("vm1", "bbbb").is_ok());
        let e = k.check("vm1", "cccc").unwrap_err();
        assert!(
            e.contains("not one the coordinator names for node vm1"),
            "{e}"
        );
        // A member whose every certificate was revoked.
        assert!(k.check("vm3", "aaaa").is_err());
        let e = k.check("vm9", "aaaa").unwrap_err();
        assert!(e.contains("not a member of cluster shop"), "{e}");
        let e = Known::of(None).check("vm1", "aaaa").unwrap_err();
        assert!(e.contains("has not heard from the coordinator"), "{e}");
    }

    #[test]
    fn the_list_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let m = Members::load(dir.path());
        assert!(m.check("vm1", "aaaa").is_err());
        m.learn(Some(&assignment(&[("vm1", &["aaaa"])])));
        assert!(Members::load(dir.path()).check("vm1", "aaaa").is_ok());
        m.learn(None);
        assert!(Members::load(dir.path()).check("vm1", "aaaa").is_err());
    }
}
