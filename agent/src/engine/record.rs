//! `engine.json`: what the agent keeps on disk of the spec it runs and of
//! its cluster (term, timing, peers, allowlist), so that a restarted agent
//! resumes the same engine and still refuses stale commands.

use super::contract::EngineSpec;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What engine.json holds: the spec plus the agent's own bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Stored {
    #[serde(flatten)]
    pub(super) spec: EngineSpec,
    /// Stopped on purpose: do not start it at agent start.
    #[serde(default)]
    pub(super) stopped: bool,
    /// The last resync request carried out, so a retried one is not redone.
    #[serde(default)]
    pub(super) last_resync: String,
    /// The cluster's term and timing as last heard, and the primary's peers.
    /// (Named apart from the spec's flattened `cluster`, its name.)
    #[serde(default, rename = "cluster_state")]
    pub(super) cluster: ClusterState,
}

/// What the agent keeps of its cluster beyond the engine spec, persisted so
/// that a restarted agent still refuses stale commands and can still reach
/// its replicas while the coordinator is away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The highest term seen; commands carrying a lower one are refused.
    #[serde(default)]
    pub term: u64,
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u32,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u32,
    /// Primary: agent address (host:port) of each replica, for confirmations.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
    /// The cluster's IP allowlist (empty: open) and its version, and the
    /// addresses always allowed (the cluster's nodes): applied at agent start
    /// from here, before the coordinator is heard from.
    ///
    /// Shared (`Arc`): the stored state is cloned many times a second, and
    /// a list may hold 10,000 entries.
    #[serde(default)]
    pub allowlist: std::sync::Arc<Vec<String>>,
    #[serde(default)]
    pub allowlist_version: u64,
    #[serde(default)]
    pub always_allowed: Vec<String>,
}

fn default_lease_ms() -> u32 {
    corral_proto::lease::DEFAULT_LEASE_MS
}

fn default_heartbeat_ms() -> u32 {
    corral_proto::lease::DEFAULT_HEARTBEAT_MS
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            term: 0,
            lease_ms: default_lease_ms(),
            heartbeat_ms: default_heartbeat_ms(),
            peers: Default::default(),
            allowlist: Default::default(),
            allowlist_version: 0,
            always_allowed: Vec::new(),
        }
    }
}

impl ClusterState {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(u64::from(self.lease_ms))
    }

    /// Takes the timing a command or an assignment carries, when valid.
    pub(super) fn set_timing(&mut self, lease_ms: u32, heartbeat_ms: u32) {
        if corral_proto::lease::validate(lease_ms, heartbeat_ms).is_ok() {
            self.lease_ms = lease_ms;
            self.heartbeat_ms = heartbeat_ms;
        }
    }
}

impl Stored {
    pub(super) fn load(state_dir: &Path) -> Result<Option<Stored>> {
        let path = spec_path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                Ok(Some(serde_json::from_str(&s).with_context(|| {
                    format!("{} is not valid", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub(super) fn save(&self, state_dir: &Path) -> Result<()> {
        corral_proto::pki::write_private(
            &spec_path(state_dir),
            &serde_json::to_string_pretty(self)?,
        )
    }
}

pub(super) fn spec_path(state_dir: &Path) -> PathBuf {
    state_dir.join("engine.json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::spec::tests::replica;
    use crate::engine::EngineSpec;

    #[test]
    fn engine_json_round_trips_and_reads_older_files() {
        let r = EngineSpec::from_request(&replica()).unwrap();
        let mut cluster = ClusterState {
            term: 7,
            ..Default::default()
        };
        cluster.peers.insert("vm3".into(), "10.0.0.3:7401".into());
        let stored = Stored {
            spec: r.spec,
            stopped: true,
            last_resync: "op-1".into(),
            cluster,
        };
        let text = serde_json::to_string(&stored).unwrap();
        let back: Stored = serde_json::from_str(&text).unwrap();
        assert_eq!(back.spec, stored.spec);
        assert_eq!(back.cluster, stored.cluster);
        assert!(back.stopped);
        // A file written before terms existed: defaults.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old.as_object_mut().unwrap().remove("cluster_state");
        let back: Stored = serde_json::from_value(old).unwrap();
        assert_eq!(back.cluster, ClusterState::default());
        assert_eq!(back.spec.cluster, "orders");
    }
}
