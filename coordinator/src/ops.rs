//! Durable operations.
//!
//! Every mutating request becomes a row in `operations` (written in the same
//! transaction as the change it asks for), then runs here in a task of its
//! own, so a caller disconnecting does not cancel it. Operations on one
//! cluster run one at a time, in the order they were created. Each step is
//! written to the operation's log before and after it runs, and steps are
//! idempotent on the agent's side, so a coordinator that restarts mid-way
//! re-runs the unfinished operation from the top without doing anything
//! twice.

use crate::store::{self, op_state, OperationRow};
use crate::Coordinator;
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const CREATE_CLUSTER: &str = "create_cluster";

/// How long an operation keeps retrying an agent it cannot reach.
const AGENT_UNREACHABLE_GIVE_UP: Duration = Duration::from_secs(60);

/// Per-cluster locks: the second operation on a cluster waits for the first.
#[derive(Default)]
pub struct Runner {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Runner {
    fn lock_for(&self, cluster: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(cluster.to_string()).or_default().clone()
    }
}

/// A time-ordered, unique operation id: `op-<ms>-<random>`.
pub fn new_id() -> String {
    let mut r = [0u8; 4];
    let _ = corral_proto::os_random(&mut r);
    format!("op-{:x}-{}", corral_proto::now_ms(), hex::encode(r))
}

/// Starts running operation `id` in the background.
pub fn spawn(coord: Arc<Coordinator>, id: String) {
    tokio::spawn(async move {
        if let Err(e) = run(&coord, &id).await {
            tracing::error!(op = %id, error = %format!("{e:#}"), "operation runner");
        }
    });
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
                "coordinator restarted; resuming from the first unfinished step",
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
    let lock = coord.ops.lock_for(&op.cluster);
    let _guard = lock.lock().await;
    coord
        .store
        .read(|c| store::set_operation_state(c, id, op_state::RUNNING, ""))?;
    let outcome = match op.kind.as_str() {
        CREATE_CLUSTER => create_cluster(coord, &op).await,
        other => Err(anyhow!("unknown operation kind {other:?}")),
    };
    match outcome {
        Ok(()) => coord.store.tx(|tx| {
            store::log_operation(tx, id, "done")?;
            store::set_operation_state(tx, id, op_state::SUCCEEDED, "")
        }),
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::warn!(op = %id, error = %msg, "operation failed");
            coord.store.tx(|tx| {
                store::log_operation(tx, id, &format!("failed: {msg}"))?;
                store::set_operation_state(tx, id, op_state::FAILED, &msg)?;
                if op.kind == CREATE_CLUSTER {
                    store::set_cluster_state(tx, &op.cluster, "failed")?;
                }
                Ok(())
            })
        }
    }
}

fn log(coord: &Coordinator, op: &OperationRow, message: &str) {
    tracing::info!(op = %op.id, cluster = %op.cluster, "{message}");
    if let Err(e) = coord
        .store
        .read(|c| store::log_operation(c, &op.id, message))
    {
        tracing::error!(op = %op.id, error = %e, "writing the operation log");
    }
}

async fn create_cluster(coord: &Arc<Coordinator>, op: &OperationRow) -> Result<()> {
    let params: serde_json::Value =
        serde_json::from_str(&op.params).context("operation parameters")?;
    let node = params["node"]
        .as_str()
        .ok_or_else(|| anyhow!("operation has no node"))?;
    let cluster = coord
        .store
        .read(|c| store::get_cluster(c, &op.cluster))?
        .ok_or_else(|| anyhow!("cluster {} no longer exists", op.cluster))?;
    let password = coord.secrets.open(&cluster.admin_password_enc)?;
    let request = pb::ConfigureEngineRequest {
        cluster: cluster.name.clone(),
        engine: cluster.engine.clone(),
        role: "primary".into(),
        port: cluster.port,
        admin_user: cluster.admin_user.clone(),
        admin_password: password,
        database: cluster.database.clone(),
    };
    log(
        coord,
        op,
        &format!(
            "initialising {} on node {node} and starting it as primary",
            cluster.engine
        ),
    );
    let status = configure_engine(coord, op, node, request).await?;
    coord.fleet.set_engine(node, status.clone());
    log(
        coord,
        op,
        &format!(
            "{} {} running on node {node} (pid {}, port {}); admin role {:?} and database {:?} ready",
            cluster.engine, status.version, status.pid, status.port, cluster.admin_user, cluster.database
        ),
    );
    coord
        .store
        .read(|c| store::set_cluster_state(c, &cluster.name, "running"))?;
    Ok(())
}

/// Calls ConfigureEngine on `node`, retrying while the agent is unreachable
/// (it may be restarting) but not when it answers with an error.
async fn configure_engine(
    coord: &Arc<Coordinator>,
    op: &OperationRow,
    node: &str,
    request: pb::ConfigureEngineRequest,
) -> Result<pb::EngineStatus> {
    let started = Instant::now();
    let mut reported = false;
    loop {
        let address = coord
            .fleet
            .get(node)
            .map(|l| l.address)
            .or_else(|| {
                coord
                    .store
                    .read(|c| store::get_node(c, node))
                    .ok()
                    .flatten()
                    .map(|n| n.address)
            })
            .filter(|a| !a.is_empty());
        let attempt = match address {
            None => Err(tonic::Status::unavailable(format!(
                "node {node} has not reported an address yet"
            ))),
            Some(address) => {
                let mut client = coord.agents.client(node, &address)?;
                client
                    .configure_engine(request.clone())
                    .await
                    .map(|r| r.into_inner())
            }
        };
        match attempt {
            Ok(resp) => {
                return resp
                    .status
                    .ok_or_else(|| anyhow!("agent returned no status"))
            }
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && started.elapsed() < AGENT_UNREACHABLE_GIVE_UP =>
            {
                if !reported {
                    log(
                        coord,
                        op,
                        &format!("node {node} unreachable ({}); retrying", s.message()),
                    );
                    reported = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => bail!("node {node}: {}", s.message()),
        }
    }
}
