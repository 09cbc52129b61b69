//! The runner: each operation in a task of its own (a caller that
//! disconnects cancels nothing), within its kind's deadline, its outcome
//! logged, counted and announced; on start, every unfinished operation is
//! resumed from the top. One operation at a time per cluster is the
//! request's rule: the service records an operation only in a transaction
//! that finds no other holding the cluster
//! ([`crate::service::rules`], `begin_operation`).

use super::{within_deadline, Ctx};
use crate::model::{
    ADD_NODE, BACKGROUND, BACKUP, CONFIGURE_BACKUPS, CREATE_CLUSTER, DELETE_CLUSTER, FAILOVER,
    PROMOTE, REBOOT, REJOIN, REMOVE_NODE, RESTORE, RESYNC, SET_SYNC, VERIFY_BACKUP,
};
use crate::store::{op_state, OperationRow};
use crate::{store, Coordinator};
use anyhow::{anyhow, Result};
use std::sync::{Arc, Mutex};

/// A time-ordered, unique operation id: `op-<ms>-<random>`.
pub fn new_id() -> String {
    let mut r = [0u8; 4];
    let _ = corral_proto::os_random(&mut r);
    format!("op-{:x}-{}", corral_proto::now_ms(), hex::encode(r))
}

/// Starts running operation `id` in the background.
pub fn spawn(coord: Arc<Coordinator>, id: String) {
    let c = coord.clone();
    let op = id.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = run(&c, &op).await {
            tracing::error!(op = %op, error = %format!("{e:#}"), "operation runner");
        }
        c.ops
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&op);
    });
    coord
        .ops
        .tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, task.abort_handle());
}

/// Picks up operations a previous coordinator process left unfinished.
pub fn resume_unfinished(coord: &Arc<Coordinator>) {
    let ops = match coord.store.read(store::unfinished_operations) {
        Ok(ops) => ops,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "listing unfinished operations");
            return;
        }
    };
    for op in ops {
        tracing::info!(op = %op.id, kind = %op.kind, cluster = %op.cluster, "resuming operation after restart");
        let _ = coord.store.read(|c| {
            store::log_operation(
                c,
                &op.id,
                "coordinator restarted; resuming: steps already done are found done and skipped",
            )
        });
        spawn(coord.clone(), op.id);
    }
}

async fn run(coord: &Arc<Coordinator>, id: &str) -> Result<()> {
    let op = coord
        .store
        .read(|c| store::get_operation(c, id))?
        .ok_or_else(|| anyhow!("operation {id} vanished"))?;
    coord
        .store
        .read(|c| store::set_operation_state(c, id, op_state::RUNNING, ""))?;
    let ctx = Ctx {
        coord,
        op: &op,
        paused_ms: Mutex::new(0),
    };
    let steps = async {
        match op.kind.as_str() {
            CREATE_CLUSTER => ctx.create_cluster().await,
            ADD_NODE => ctx.add_node().await,
            REMOVE_NODE => ctx.remove_node().await,
            PROMOTE => ctx.promote().await,
            RESYNC => ctx.resync().await,
            REBOOT => ctx.reboot().await,
            DELETE_CLUSTER => ctx.delete_cluster().await,
            SET_SYNC => ctx.set_sync().await,
            FAILOVER => ctx.failover().await,
            REJOIN => ctx.rejoin().await,
            BACKUP => ctx.backup().await,
            VERIFY_BACKUP => ctx.verify_backup().await,
            CONFIGURE_BACKUPS => ctx.configure_backups().await,
            RESTORE => ctx.restore_in_place().await,
            other => Err(anyhow!("unknown operation kind {other:?}")),
        }
    };
    let outcome = within_deadline(&op.kind, op.created_at_ms, steps).await;
    coord.ops.set_progress(id, None);
    let took = format!(
        "{:.1}s",
        (corral_proto::now_ms() - op.created_at_ms).max(0) as f64 / 1000.0
    );
    let node = op_node(&op);
    match outcome {
        Ok(()) => {
            coord.counters.operation_finished(&op.kind, "succeeded");
            if op.kind == FAILOVER {
                coord
                    .counters
                    .failovers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            coord.store.tx(|tx| {
                store::log_operation(tx, id, "done")?;
                store::set_operation_state(tx, id, op_state::SUCCEEDED, "")?;
                // The seed's "notify you when the request is finished".
                if crate::model::ANNOUNCED_OPERATIONS.contains(&op.kind.as_str()) {
                    store::insert_event(
                        tx,
                        corral_proto::now_ms(),
                        &node,
                        &op.cluster,
                        "operation_completed",
                        &format!(
                            "{} {id} (requested by {}) completed in {took}",
                            op.kind, op.requested_by
                        ),
                        None,
                    )?;
                }
                Ok(())
            })
        }
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::warn!(op = %id, error = %msg, "operation failed");
            coord.counters.operation_finished(&op.kind, "failed");
            coord.store.tx(|tx| {
                store::log_operation(tx, id, &format!("failed: {msg}"))?;
                store::set_operation_state(tx, id, op_state::FAILED, &msg)?;
                if op.kind == CREATE_CLUSTER
                    || (op.kind == RESTORE && msg.contains(crate::backups::DATA_ERASED))
                {
                    store::set_cluster_state(tx, &op.cluster, "failed")?;
                }
                if BACKGROUND.contains(&op.kind.as_str()) {
                    // Already announced as backup_failed, with its reason.
                    return Ok(());
                }
                store::insert_event(
                    tx,
                    corral_proto::now_ms(),
                    &node,
                    &op.cluster,
                    "operation_failed",
                    &format!(
                        "{} {id} (requested by {}) failed after {took}: {msg} \
                         (`corralctl operation show {id}` has its log)",
                        op.kind, op.requested_by
                    ),
                    None,
                )?;
                Ok(())
            })
        }
    }
}

/// The node an operation is about, when it names one.
fn op_node(op: &OperationRow) -> String {
    serde_json::from_str::<serde_json::Value>(&op.params)
        .ok()
        .and_then(|p| p.get("node").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_default()
}
