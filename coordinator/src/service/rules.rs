//! The rules every request shares: lookups, one-transaction refusals, operation records, switchover fitness.

use super::internal;
use super::{Caller, Error, Service};
use crate::fleet::Liveness;
use crate::ops;
use crate::store::{self, ClusterRow, NodeRow, OperationRow};
use corral_proto::identity::Role;
use corral_proto::pb;
use corral_proto::{names, now_ms};
use rusqlite::Transaction;
use std::time::Instant;
/// A planned switchover is refused (without --force) to a replica further
/// behind than this: it would lengthen the pause while it catches up.
pub const MAX_PROMOTE_LAG_BYTES: i64 = 16 << 20;

impl Service {
    pub(crate) fn get_cluster_row(&self, name: &str) -> Result<ClusterRow, Error> {
        names::validate("cluster", name).map_err(Error::invalid_argument)?;
        self.0
            .store
            .read(|c| store::get_cluster(c, name))
            .map_err(internal)?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no cluster named {name:?}: see `corralctl cluster list`"
                ))
            })
    }

    /// Runs `f` in one transaction; `f` answers Ok(Err(status)) to refuse,
    /// which rolls everything back and returns that status.
    pub(crate) fn refusable_tx<T>(
        &self,
        f: impl FnOnce(&Transaction) -> anyhow::Result<Result<T, Error>>,
    ) -> Result<T, Error> {
        let mut refusal = None;
        self.0
            .store
            .tx(|tx| match f(tx)? {
                Ok(v) => Ok(v),
                Err(status) => {
                    refusal = Some(status);
                    anyhow::bail!("refused")
                }
            })
            .map_err(|e| refusal.take().unwrap_or_else(|| internal(e)))
    }

    /// Checks that a node exists, is up and belongs to no cluster.
    pub(crate) fn check_free_node(
        &self,
        tx: &Transaction,
        node: &str,
    ) -> anyhow::Result<Result<(), Error>> {
        if let Err(e) = names::validate("node", node) {
            return Ok(Err(Error::invalid_argument(e)));
        }
        let Some(n) = store::get_node(tx, node)? else {
            return Ok(Err(Error::not_found(format!(
                "unknown node {node:?}: see `corralctl node list` for enrolled nodes"
            ))));
        };
        if let Some(c) = n.cluster {
            return Ok(Err(Error::failed_precondition(format!(
                "node {node} already belongs to cluster {c}: a node serves one cluster"
            ))));
        }
        if self.0.fleet.liveness_of(node, Instant::now()) != Liveness::Up {
            return Ok(Err(Error::failed_precondition(format!(
                "node {node} is not up (no recent heartbeat): check its agent, then retry"
            ))));
        }
        Ok(Ok(()))
    }

    pub(crate) fn new_secret(&self) -> Result<Vec<u8>, Error> {
        let password = corral_proto::random_password(32).map_err(internal)?;
        self.0.secrets.seal(&password).map_err(internal)
    }

    /// Records operation `kind` on `cluster` after `check` accepts it, in
    /// one transaction that also makes sure no other operation holds the
    /// cluster. `check` sees the cluster and its nodes and may update them.
    pub(crate) fn begin_operation(
        &self,
        who: &str,
        cluster: &str,
        kind: &str,
        plan: Plan,
        check: impl FnOnce(
            &Transaction,
            &mut ClusterRow,
            &[NodeRow],
            &mut Plan,
        ) -> anyhow::Result<Result<(), Error>>,
    ) -> Result<OperationRow, Error> {
        names::validate("cluster", cluster).map_err(Error::invalid_argument)?;
        let now = now_ms();
        let mut plan = plan;
        self.refusable_tx(|tx| {
            let Some(mut row) = store::get_cluster(tx, cluster)? else {
                return Ok(Err(Error::not_found(format!(
                    "no cluster named {cluster:?}: see `corralctl cluster list`"
                ))));
            };
            // Telling the nodes where WAL goes can run beside a backup.
            let running = if kind == ops::CONFIGURE_BACKUPS {
                store::holding_operation_of(tx, cluster)?
            } else {
                store::unfinished_operation_of(tx, cluster)?
            };
            if let Some(running) = running {
                return Ok(Err(busy(&running)));
            }
            let nodes = store::nodes_of_cluster(tx, cluster)?;
            if let Err(s) = check(tx, &mut row, &nodes, &mut plan)? {
                return Ok(Err(s));
            }
            let op = OperationRow {
                id: ops::new_id(),
                cluster: cluster.into(),
                kind: kind.into(),
                state: store::op_state::PENDING.into(),
                params: plan.params.to_string(),
                requested_by: who.into(),
                created_at_ms: now,
                updated_at_ms: now,
                error: String::new(),
            };
            store::update_cluster(tx, &row)?;
            store::insert_operation(tx, &op)?;
            store::log_operation(tx, &op.id, &format!("requested by {who}: {}", plan.summary))?;
            Ok(Ok(op))
        })
    }

    /// An operator request that records a durable operation: `caller`
    /// must hold `min` (a refusal is audited), `record` checks the request
    /// and writes the operation in one transaction, its outcome is
    /// audited as `action` on `target`, and the runner starts it.
    pub(crate) fn operation_request(
        &self,
        caller: &Caller,
        min: Role,
        action: &str,
        target: &str,
        record: impl FnOnce(&str) -> Result<OperationRow, Error>,
    ) -> Result<pb::Operation, Error> {
        let who = self.authorize_audited(caller, min, action, target)?;
        self.start_operation(&who, action, target, || record(&who))
    }

    /// Runs an operation request: authorised, audited, recorded, started.
    pub(crate) fn start_operation(
        &self,
        who: &str,
        action: &str,
        target: &str,
        record: impl FnOnce() -> Result<OperationRow, Error>,
    ) -> Result<pb::Operation, Error> {
        let op = self.audited(who, action, target, record)?;
        tracing::info!(op = %op.id, kind = %op.kind, cluster = %op.cluster, "operation accepted");
        ops::spawn(self.0.clone(), op.id.clone());
        self.operation_pb(op)
    }

    /// Whether `node` looks fit to become the primary, from the live view.
    pub(crate) fn promotion_blockers(&self, node: &NodeRow, primary: &NodeRow) -> Vec<String> {
        let mut why = Vec::new();
        let now = Instant::now();
        if self.0.fleet.liveness_of(&node.id, now) != Liveness::Up {
            why.push(format!("{} is not up (no recent heartbeat)", node.id));
        }
        let engine = self.0.fleet.get(&node.id).map(|l| l.engine);
        match engine {
            Some(e) if e.state == pb::EngineState::Running as i32 && e.healthy => {}
            Some(e) => why.push(format!(
                "{}'s engine is {} ({})",
                node.id,
                pb::EngineState::try_from(e.state)
                    .unwrap_or_default()
                    .label(),
                if e.message.is_empty() {
                    "not healthy"
                } else {
                    e.message.as_str()
                }
            )),
            None => why.push(format!("{}'s engine has not reported", node.id)),
        }
        let view = self.replica_view_from(node, Some(&primary.id));
        if !matches!(view.state.as_str(), "streaming" | "sync") {
            why.push(format!(
                "{} is not streaming from {} ({})",
                node.id,
                primary.id,
                if view.state.is_empty() {
                    "unknown"
                } else {
                    view.state.as_str()
                }
            ));
        } else if view.lag_bytes < 0 {
            why.push(format!(
                "{} has not yet reported how far it has replayed",
                node.id
            ));
        } else if view.lag_bytes > MAX_PROMOTE_LAG_BYTES {
            why.push(format!(
                "{} is {} bytes behind the primary (limit {MAX_PROMOTE_LAG_BYTES})",
                node.id, view.lag_bytes
            ));
        }
        if self.0.fleet.liveness_of(&primary.id, now) != Liveness::Up {
            why.push(format!(
                "the primary {} is down, so a planned switchover cannot stop it first; writes it \
                 acknowledged that did not reach {} would be lost",
                primary.id, node.id
            ));
        }
        why
    }
}

/// What an operation will do: its parameters and a line for its log.
pub(crate) struct Plan {
    pub(crate) params: serde_json::Value,
    pub(crate) summary: String,
}

pub(crate) fn plan(params: serde_json::Value, summary: impl Into<String>) -> Plan {
    Plan {
        params,
        summary: summary.into(),
    }
}

/// The refusal for a request on a cluster another operation holds.
pub(crate) fn busy(running: &OperationRow) -> Error {
    Error::failed_precondition(format!(
        "operation {} ({}) is {} on cluster {} (requested by {}); wait for it to finish \
         (`corralctl operation show {}`) and retry",
        running.id, running.kind, running.state, running.cluster, running.requested_by, running.id
    ))
}

/// The confirmation a destructive request must carry.
pub(crate) fn confirmed(what: &str, name: &str, confirm: &str) -> Result<(), Error> {
    if confirm == name {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "this {what} is destructive: repeat the {} name to confirm (--confirm {name})",
            if what.contains("node") {
                "node"
            } else {
                "cluster"
            }
        )))
    }
}

pub(crate) fn refuse<T>(status: Error) -> anyhow::Result<Result<T, Error>> {
    Ok(Err(status))
}

pub(crate) fn require_running(row: &ClusterRow) -> Result<(), Error> {
    if row.state == "running" {
        Ok(())
    } else {
        Err(Error::failed_precondition(format!(
            "cluster {} is {}, not running: see `corralctl operation list --cluster {}`",
            row.name, row.state, row.name
        )))
    }
}

pub(crate) fn member<'a>(
    nodes: &'a [NodeRow],
    cluster: &str,
    node: &str,
) -> Result<&'a NodeRow, Error> {
    names::validate("node", node).map_err(Error::invalid_argument)?;
    nodes.iter().find(|n| n.id == node).ok_or_else(|| {
        Error::not_found(format!(
            "node {node:?} is not a member of cluster {cluster}: see `corralctl cluster show {cluster}`"
        ))
    })
}
