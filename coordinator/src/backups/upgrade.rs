//! Moving PostgreSQL WAL archiving to per-cluster keys after an upgrade.
//!
//! A node keeps archiving WAL with the key and prefix it was last
//! configured with. Nodes configured before per-cluster keys archive with
//! the master key under `wal/<cluster>/<created>/`; the coordinator tells
//! each such cluster once, as soon as it is idle, to archive with its own
//! key under the keyed prefix (a `configure_backups` operation). A cluster
//! whose nodes were sent a keyed archive is marked by its row in
//! `backup_wal_keyed`, so this happens once per cluster.

use crate::backups::{self, ScheduleRow};
use crate::store::{self, ClusterRow, OperationRow};
use crate::Coordinator;
use anyhow::Result;
use corral_proto::pb;
use rusqlite::{Connection, OptionalExtension};
use std::sync::Arc;

/// Who the operations this starts are requested by.
pub const WHO: &str = "coordinator (WAL archive moved to the cluster's key)";

fn is_keyed(c: &Connection, cluster: &str) -> Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM backup_wal_keyed WHERE cluster = ?1")?
            .query_row([cluster], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

/// What a node is sent in ConfigureEngine: the cluster's WAL archive, and
/// the cluster marked as archiving with its own key from now on.
pub fn wal_archive_to_configure(
    coord: &Coordinator,
    cluster: &ClusterRow,
) -> Result<Option<pb::WalArchive>> {
    let w = backups::wal_archive_of(coord, cluster)?;
    if let Some(w) = &w {
        coord.store.read(|c| {
            if !is_keyed(c, &cluster.name)? {
                backups::set_wal_prefix(c, &cluster.name, &w.prefix)?;
            }
            Ok(())
        })?;
    }
    Ok(w)
}

/// Pure: whether `cluster`, with a schedule, still archives with the
/// master key and can be reconfigured now.
pub fn needs_move(engine: &str, state: &str, keyed: bool, busy: bool) -> bool {
    engine == "postgres" && state == "running" && !keyed && !busy
}

/// Moves clusters to their own key as they become idle, every few
/// seconds, until dropped.
pub async fn run(coord: Arc<Coordinator>) {
    // Schedules set from now on are configured by the request that sets
    // them; only those from before this start may predate cluster keys.
    let started_at_ms = corral_proto::now_ms();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let moved = coord.store.read(backups::schedules).and_then(|all| {
            let old: Vec<ScheduleRow> = all
                .into_iter()
                .filter(|s| s.created_at_ms < started_at_ms)
                .collect();
            pass(&coord, &old)
        });
        if let Err(e) = moved {
            tracing::warn!(error = %format!("{e:#}"), "moving WAL archiving to cluster keys");
        }
    }
}

/// One pass: starts the `configure_backups` operation of every idle
/// PostgreSQL cluster with a schedule that was never configured with its
/// own key.
pub fn pass(coord: &Arc<Coordinator>, schedules: &[ScheduleRow]) -> Result<()> {
    for s in schedules {
        let started = coord.store.tx(|tx| {
            let Some(cluster) = store::get_cluster(tx, &s.cluster)? else {
                return Ok(None);
            };
            let keyed = is_keyed(tx, &cluster.name)?;
            let busy = store::unfinished_operation_of(tx, &cluster.name)?.is_some();
            if !needs_move(&cluster.engine, &cluster.state, keyed, busy) {
                return Ok(None);
            }
            let prefix = backups::wal_prefix(tx, &cluster)?;
            backups::set_wal_prefix(tx, &cluster.name, &prefix)?;
            let now = corral_proto::now_ms();
            let op = OperationRow {
                id: crate::ops::new_id(),
                cluster: cluster.name.clone(),
                kind: crate::ops::CONFIGURE_BACKUPS.into(),
                state: store::op_state::PENDING.into(),
                params: "{}".into(),
                requested_by: WHO.into(),
                created_at_ms: now,
                updated_at_ms: now,
                error: String::new(),
            };
            store::insert_operation(tx, &op)?;
            store::log_operation(
                tx,
                &op.id,
                &format!(
                    "requested by {WHO}: archive WAL with the cluster's own key under {prefix} \
                     (it was archived with the master key before)"
                ),
            )?;
            Ok(Some(op.id))
        })?;
        if let Some(op) = started {
            tracing::info!(cluster = %s.cluster, op = %op, "moving WAL archiving to the cluster's key");
            crate::ops::spawn(coord.clone(), op);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idle_running_postgres_clusters_not_yet_keyed_move() {
        assert!(needs_move("postgres", "running", false, false));
        assert!(!needs_move("postgres", "running", true, false));
        assert!(!needs_move("postgres", "running", false, true));
        assert!(!needs_move("redis", "running", false, false));
        assert!(!needs_move("postgres", "creating", false, false));
    }
}
