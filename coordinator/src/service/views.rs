//! How the store's rows and the fleet's live state are shown: the API's messages.

use super::internal;
use super::{Error, Service};
use crate::fleet::host_of;
use crate::store::{self, ClusterRow, NodeRow, OperationRow};
use corral_proto::pb;
use std::time::Instant;
/// How a replica is doing, from its primary's point of view.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    /// "streaming", "sync", "catching up", "not streaming"; "" for a primary.
    pub state: String,
    /// -1 when unknown.
    pub lag_bytes: i64,
    pub lag_ms: i64,
}

impl Service {
    /// The replication state of `node` as its cluster's primary reports it.
    /// Reads the store: not for use inside a store transaction.
    pub fn replica_view(&self, row: &NodeRow) -> ReplicaView {
        let primary = row.cluster.as_ref().and_then(|cluster| {
            self.0
                .store
                .read(|c| store::nodes_of_cluster(c, cluster))
                .ok()
                .and_then(|nodes| nodes.into_iter().find(|n| n.role == "primary"))
        });
        self.replica_view_from(row, primary.map(|p| p.id).as_deref())
    }

    /// [`Self::replica_view`] given the primary's id: the live view only.
    pub(crate) fn replica_view_from(&self, row: &NodeRow, primary: Option<&str>) -> ReplicaView {
        if row.role != "replica" {
            return ReplicaView {
                state: String::new(),
                lag_bytes: -1,
                lag_ms: -1,
            };
        }
        let primary_rep = primary
            .and_then(|p| self.0.fleet.get(p))
            .and_then(|l| l.engine.replication);
        let own = self.0.fleet.get(&row.id).and_then(|l| l.engine.replication);
        replica_view(&row.id, primary_rep.as_ref(), own.as_ref())
    }

    pub(crate) fn node_pb(&self, row: &NodeRow, now: Instant) -> pb::Node {
        let view = self.replica_view(row);
        let live = self.0.fleet.get(&row.id);
        let address = live
            .as_ref()
            .map(|l| l.address.clone())
            .unwrap_or_else(|| row.address.clone());
        pb::Node {
            id: row.id.clone(),
            address: host_of(&address).to_string(),
            cluster: row.cluster.clone().unwrap_or_default(),
            role: row.role.clone(),
            state: self.0.fleet.liveness_of(&row.id, now).as_str().to_string(),
            last_heartbeat_ms: live.as_ref().map(|l| l.last_seen_ms).unwrap_or(0),
            metrics: live.as_ref().map(|l| l.metrics),
            engine: live.map(|l| l.engine),
            enrolled_at_ms: row.enrolled_at_ms,
            lag_bytes: view.lag_bytes,
            lag_ms: view.lag_ms,
            replication: view.state,
        }
    }

    pub(crate) fn cluster_pb(&self, row: &ClusterRow) -> Result<pb::Cluster, Error> {
        let nodes = self
            .0
            .store
            .read(|c| store::nodes_of_cluster(c, &row.name))
            .map_err(internal)?;
        let now = Instant::now();
        Ok(pb::Cluster {
            name: row.name.clone(),
            engine: row.engine.clone(),
            mode: row.mode.clone(),
            state: row.state.clone(),
            created_at_ms: row.created_at_ms,
            nodes: nodes.iter().map(|n| self.node_pb(n, now)).collect(),
            port: row.port,
            database: row.database.clone(),
            sync: row.sync,
            termination_protection: row.termination_protection,
            term: row.term,
            auto_failover: row.auto_failover,
            lease_ms: row.lease_ms,
            heartbeat_interval_ms: row.heartbeat_ms,
            profile: corral_proto::lease::profile_of(row.lease_ms, row.heartbeat_ms).into(),
            failover_status: self.0.judgements.get(&row.name).unwrap_or_default(),
        })
    }

    pub(crate) fn operation_pb(&self, row: OperationRow) -> Result<pb::Operation, Error> {
        let progress = self.0.ops.progress(&row.id);
        let log = self
            .0
            .store
            .read(|c| store::operation_log(c, &row.id))
            .map_err(internal)?;
        Ok(pb::Operation {
            id: row.id,
            cluster: row.cluster,
            kind: row.kind,
            state: row.state,
            created_at_ms: row.created_at_ms,
            updated_at_ms: row.updated_at_ms,
            requested_by: row.requested_by,
            progress,
            error: row.error,
            log: log
                .into_iter()
                .map(|(at_ms, message)| pb::OperationLogEntry { at_ms, message })
                .collect(),
        })
    }
}

/// Pure: how replica `node` is doing, from its primary's replication report
/// (and its own, when the primary does not see it).
pub fn replica_view(
    node: &str,
    primary: Option<&pb::Replication>,
    own: Option<&pb::Replication>,
) -> ReplicaView {
    let Some(p) = primary.filter(|p| !p.in_recovery) else {
        return ReplicaView {
            state: "not streaming".into(),
            lag_bytes: -1,
            lag_ms: -1,
        };
    };
    match p.standbys.iter().find(|s| s.name == node) {
        Some(s) => ReplicaView {
            state: match (s.state.as_str(), s.sync_state.as_str()) {
                ("streaming", "sync" | "quorum") => "sync".into(),
                ("streaming", _) => "streaming".into(),
                ("catchup", _) | ("startup", _) | ("backup", _) => "catching up".into(),
                (other, _) => other.to_string(),
            },
            // 0 until the standby's first feedback message (PostgreSQL),
            // or always (MariaDB's primary does not know its replicas'
            // positions): the replica's own report, else unknown.
            lag_bytes: if s.replay_lsn != 0 {
                p.lsn.saturating_sub(s.replay_lsn) as i64
            } else {
                own.filter(|o| o.in_recovery && o.lsn > 0)
                    .map(|o| p.lsn.saturating_sub(o.lsn) as i64)
                    .unwrap_or(-1)
            },
            lag_ms: s.replay_lag_ms as i64,
        },
        None => ReplicaView {
            state: "not streaming".into(),
            lag_bytes: own
                .filter(|o| o.in_recovery && o.lsn > 0)
                .map(|o| p.lsn.saturating_sub(o.lsn) as i64)
                .unwrap_or(-1),
            lag_ms: -1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn primary(standbys: Vec<pb::Standby>) -> pb::Replication {
        pb::Replication {
            lsn: 1000,
            standbys,
            ..Default::default()
        }
    }

    pub(crate) fn standby(name: &str, state: &str, sync: &str, replay: u64) -> pb::Standby {
        pb::Standby {
            name: name.into(),
            state: state.into(),
            sync_state: sync.into(),
            replay_lsn: replay,
            replay_lag_ms: 7,
            ..Default::default()
        }
    }

    #[test]
    pub(crate) fn replica_views() {
        let own = pb::Replication {
            in_recovery: true,
            lsn: 400,
            ..Default::default()
        };
        // (primary's report, replica's own, expected state, bytes, ms)
        let cases = [
            (
                Some(primary(vec![standby("r", "streaming", "async", 900)])),
                None,
                "streaming",
                100,
                7,
            ),
            (
                Some(primary(vec![standby("r", "streaming", "quorum", 1000)])),
                None,
                "sync",
                0,
                7,
            ),
            (
                Some(primary(vec![standby("r", "catchup", "async", 10)])),
                None,
                "catching up",
                990,
                7,
            ),
            // Connected, but no feedback yet: lag unknown, not 1000.
            (
                Some(primary(vec![standby("r", "streaming", "async", 0)])),
                None,
                "streaming",
                -1,
                7,
            ),
            // No position from the primary (MariaDB): its own.
            (
                Some(primary(vec![standby("r", "streaming", "async", 0)])),
                Some(own.clone()),
                "streaming",
                600,
                7,
            ),
            // The primary does not see it: lag from its own position.
            (
                Some(primary(vec![standby("x", "streaming", "async", 900)])),
                Some(own.clone()),
                "not streaming",
                600,
                -1,
            ),
            (Some(primary(vec![])), None, "not streaming", -1, -1),
            (None, Some(own.clone()), "not streaming", -1, -1),
        ];
        for (p, o, state, bytes, ms) in cases {
            let v = replica_view("r", p.as_ref(), o.as_ref());
            assert_eq!(
                (v.state.as_str(), v.lag_bytes, v.lag_ms),
                (state, bytes, ms),
                "{p:?} {o:?}"
            );
        }
    }

    #[test]
    pub(crate) fn host_of_strips_ports_and_brackets() {
        assert_eq!(super::host_of("10.0.0.1:7401"), "10.0.0.1");
        assert_eq!(super::host_of("[fd31::1]:7401"), "fd31::1");
        assert_eq!(super::host_of("vm1"), "vm1");
    }
}
