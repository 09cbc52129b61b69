//! Durable operations.
//!
//! Every mutating request becomes a row in `operations` (written in the same
//! transaction as the change it asks for, after checking that no other
//! operation holds the cluster), then runs here in a task of its own, so a
//! caller disconnecting does not cancel it. Each step is written to the
//! operation's log, and steps are idempotent on the agent's side (a clone is
//! not redone once the data is there, a resync carries the operation id, a
//! promotion of a primary is a no-op), so a coordinator that restarts
//! mid-way re-runs the unfinished operation from the top without doing
//! anything twice.

use crate::fleet::host_of;
use crate::fleet::Liveness;
use crate::store::{self, op_state, ClusterRow, NodeRow, OperationRow};
use crate::Coordinator;
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb::{self, agent_client::AgentClient};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub const CREATE_CLUSTER: &str = "create_cluster";
pub const ADD_NODE: &str = "add_node";
pub const REMOVE_NODE: &str = "remove_node";
pub const PROMOTE: &str = "promote";
pub const RESYNC: &str = "resync";
pub const REBOOT: &str = "reboot";
pub const DELETE_CLUSTER: &str = "delete_cluster";
pub const SET_SYNC: &str = "set_sync";
pub const FAILOVER: &str = "failover";
pub const REJOIN: &str = "rejoin";
pub const BACKUP: &str = "backup";
pub const VERIFY_BACKUP: &str = "verify_backup";
pub const CONFIGURE_BACKUPS: &str = "configure_backups";
pub const RESTORE: &str = "restore";
/// Operations that run beside the cluster's life: they neither hold back
/// a failover nor silence alerts (a failover makes them fail, if at all,
/// and they are retried by the operator or the next schedule).
pub const BACKGROUND: &[&str] = &[BACKUP, VERIFY_BACKUP];
/// Who requests scheduled backups.
pub const SCHEDULER: &str = "coordinator (backup schedule)";

/// The longest an operation of `kind` may run before it is given up and
/// fails, releasing the cluster. Generous for those that move data (a clone
/// or a restore of a large database takes hours), short for the ones that
/// only switch roles: a stuck one must not hold failovers back for long.
pub fn deadline(kind: &str) -> Duration {
    const MINUTE: u64 = 60;
    Duration::from_secs(match kind {
        FAILOVER | SET_SYNC => 5 * MINUTE,
        // A switchover waits for each replica to stream (2 min each).
        PROMOTE | REBOOT | REMOVE_NODE => 15 * MINUTE,
        REJOIN | DELETE_CLUSTER | CONFIGURE_BACKUPS => 120 * MINUTE,
        // Clones and restores, sized for terabytes.
        _ => 24 * 60 * MINUTE,
    })
}
/// A resumed operation past its deadline still gets this long to find its
/// steps done (they usually are).
const DEADLINE_FLOOR: Duration = Duration::from_secs(60);

/// Runs an operation's `steps`, failing them at the kind's [`deadline`],
/// counted from the request (`created_at_ms`) so that a resumed operation
/// has only what is left.
async fn within_deadline(
    kind: &str,
    created_at_ms: i64,
    steps: impl Future<Output = Result<()>>,
) -> Result<()> {
    let deadline = deadline(kind);
    let spent = Duration::from_millis((corral_proto::now_ms() - created_at_ms).max(0) as u64);
    let left = deadline.saturating_sub(spent).max(DEADLINE_FLOOR);
    match tokio::time::timeout(left, steps).await {
        Ok(outcome) => outcome,
        Err(_) => Err(anyhow!(
            "gave up: {kind} operations must finish within {} (so that none holds the \
             cluster's failovers for ever); steps the agents started carry on, and the next \
             operation finds them done",
            fmt_duration(deadline)
        )),
    }
}

fn fmt_duration(d: Duration) -> String {
    match d.as_secs() {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// How long an operation keeps retrying an agent it cannot reach.
const AGENT_UNREACHABLE_GIVE_UP: Duration = Duration::from_secs(60);
/// How long a new or resynced replica may take to start streaming once its
/// data is in place.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a failover keeps trying to repoint a replica that is up before
/// leaving it to the monitor (which repoints it when it next reports).
const REPOINT_GIVE_UP: Duration = Duration::from_secs(10);
/// Who the audit trail names for what the coordinator decided by itself.
pub const AUTO_FAILOVER: &str = "coordinator (auto-failover)";
/// How long a switchover waits for the target to replay the old primary's
/// last WAL before giving up and restarting the old primary.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Progress of the long step of each running operation (in memory: after a
/// restart the agent's next report fills it again).
#[derive(Default)]
pub struct Runner {
    progress: Mutex<HashMap<String, pb::Progress>>,
    /// The task of each running operation, so a failover can preempt a
    /// rejoin (see [`Runner::abort`]).
    tasks: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl Runner {
    /// Stops the task of operation `op` (its state is the caller's to
    /// record). Agent steps it started carry on, detached, and are
    /// idempotent.
    pub fn abort(&self, op: &str) {
        let task = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(op);
        if let Some(t) = task {
            t.abort();
        }
    }

    pub fn progress(&self, op: &str) -> Option<pb::Progress> {
        self.lock().get(op).cloned()
    }

    fn set_progress(&self, op: &str, p: Option<pb::Progress>) {
        match p {
            Some(p) => self.lock().insert(op.to_string(), p),
            None => self.lock().remove(op),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, pb::Progress>> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
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
                if crate::alerts::ANNOUNCED_OPERATIONS.contains(&op.kind.as_str()) {
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

/// One running operation and what its steps share.
pub(crate) struct Ctx<'a> {
    pub(crate) coord: &'a Arc<Coordinator>,
    pub(crate) op: &'a OperationRow,
    /// A switchover's pause before the promotion, for its log.
    paused_ms: Mutex<u128>,
}

/// The cluster's members as the store records them.
pub(crate) struct Members {
    pub(crate) primary: NodeRow,
    pub(crate) replicas: Vec<NodeRow>,
}

impl Members {
    pub(crate) fn replica_ids(&self) -> Vec<String> {
        self.replicas.iter().map(|n| n.id.clone()).collect()
    }
}

fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

pub(crate) fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

impl Ctx<'_> {
    pub(crate) fn log(&self, message: &str) {
        tracing::info!(op = %self.op.id, cluster = %self.op.cluster, "{message}");
        if let Err(e) = self
            .coord
            .store
            .read(|c| store::log_operation(c, &self.op.id, message))
        {
            tracing::error!(op = %self.op.id, error = %e, "writing the operation log");
        }
    }

    pub(crate) fn param(&self, key: &str) -> Result<serde_json::Value> {
        let params: serde_json::Value =
            serde_json::from_str(&self.op.params).context("operation parameters")?;
        Ok(params[key].clone())
    }

    pub(crate) fn param_str(&self, key: &str) -> Result<String> {
        self.param(key)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("operation has no {key}"))
    }

    pub(crate) fn cluster(&self) -> Result<ClusterRow> {
        self.coord
            .store
            .read(|c| store::get_cluster(c, &self.op.cluster))?
            .ok_or_else(|| anyhow!("cluster {} no longer exists", self.op.cluster))
    }

    pub(crate) fn members(&self) -> Result<Members> {
        let nodes = self
            .coord
            .store
            .read(|c| store::nodes_of_cluster(c, &self.op.cluster))?;
        let (primaries, replicas): (Vec<_>, Vec<_>) =
            nodes.into_iter().partition(|n| n.role == "primary");
        let primary = primaries
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("cluster {} has no primary", self.op.cluster))?;
        Ok(Members { primary, replicas })
    }

    pub(crate) fn node_row(&self, id: &str) -> Result<NodeRow> {
        self.coord
            .store
            .read(|c| store::get_node(c, id))?
            .ok_or_else(|| anyhow!("node {id} is no longer enrolled"))
    }

    /// The request that makes `role` of `cluster` run on a node.
    pub(crate) fn request(
        &self,
        cluster: &ClusterRow,
        role: &str,
    ) -> Result<pb::ConfigureEngineRequest> {
        let replication = cluster
            .replication_password_enc
            .as_deref()
            .ok_or_else(|| anyhow!("cluster {} has no replication password", cluster.name))?;
        Ok(pb::ConfigureEngineRequest {
            cluster: cluster.name.clone(),
            engine: cluster.engine.clone(),
            role: role.into(),
            port: cluster.port,
            admin_user: cluster.admin_user.clone(),
            admin_password: self.coord.secrets.open(&cluster.admin_password_enc)?,
            database: cluster.database.clone(),
            replication_password: self.coord.secrets.open(replication)?,
            term: cluster.term,
            lease_duration_ms: cluster.lease_ms,
            heartbeat_interval_ms: cluster.heartbeat_ms,
            wal_archive: crate::backup_upgrade::wal_archive_to_configure(self.coord, cluster)?,
            require_client_tls: self
                .coord
                .store
                .read(|c| crate::cluster_tls::required(c, &cluster.name))?,
            ..Default::default()
        })
    }

    pub(crate) fn primary_request(
        &self,
        cluster: &ClusterRow,
        replicas: Vec<String>,
        sync: bool,
        initialize: bool,
    ) -> Result<pb::ConfigureEngineRequest> {
        Ok(pb::ConfigureEngineRequest {
            replicas,
            sync,
            initialize,
            ..self.request(cluster, "primary")?
        })
    }

    pub(crate) fn replica_request(
        &self,
        cluster: &ClusterRow,
        upstream: &NodeRow,
        resync_id: &str,
    ) -> Result<pb::ConfigureEngineRequest> {
        Ok(pb::ConfigureEngineRequest {
            upstream: Some(pb::Upstream {
                node: upstream.id.clone(),
                host: host_of(&self.address_of(&upstream.id)?).to_string(),
                port: cluster.port,
            }),
            resync_id: resync_id.into(),
            ..self.request(cluster, "replica")?
        })
    }

    /// The agent address of `node`: its last heartbeat's, else the store's.
    pub(crate) fn address_of(&self, node: &str) -> Result<String> {
        self.coord
            .fleet
            .get(node)
            .map(|l| l.address)
            .or_else(|| {
                self.coord
                    .store
                    .read(|c| store::get_node(c, node))
                    .ok()
                    .flatten()
                    .map(|n| n.address)
            })
            .filter(|a| !a.is_empty())
            .ok_or_else(|| anyhow!("node {node} has not reported an address yet"))
    }

    /// Calls the agent on `node`, retrying while it is unreachable (it may
    /// be restarting) or the call timed out (the agent's step carries on
    /// detached; the retry waits for it), but not when it answers with an
    /// error.
    pub(crate) async fn call<T, F, Fut>(&self, node: &str, what: &str, f: F) -> Result<T>
    where
        F: FnMut(AgentClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(node, what, AGENT_UNREACHABLE_GIVE_UP, f)
            .await
    }

    /// [`Self::call`], giving up on an unreachable node after `give_up`.
    pub(crate) async fn call_within<T, F, Fut>(
        &self,
        node: &str,
        what: &str,
        give_up: Duration,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut(AgentClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let attempt = match self.address_of(node) {
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                Ok(address) => f(self.coord.agents.client(node, &address)?).await,
            };
            match attempt {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Cancelled
                    ) =>
                {
                    let since = *unreachable_since.get_or_insert_with(|| {
                        self.log(&format!(
                            "{what}: node {node} did not answer ({}); retrying",
                            s.message()
                        ));
                        Instant::now()
                    });
                    // A slow step (a long clone) times out the call while
                    // the node keeps heartbeating: keep waiting for it then.
                    // An agent that heartbeats but refuses connections is
                    // given up on like an unreachable one.
                    let up = s.code() != tonic::Code::Unavailable
                        && self.coord.fleet.liveness_of(node, Instant::now())
                            == crate::fleet::Liveness::Up;
                    if !up && since.elapsed() > give_up {
                        bail!(
                            "{what}: node {node} has been unreachable for {}s: {}",
                            give_up.as_secs(),
                            s.message()
                        );
                    }
                    if up {
                        unreachable_since = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(s) => bail!("{what} on node {node}: {}", s.message()),
            }
        }
    }

    pub(crate) async fn configure(
        &self,
        node: &str,
        req: pb::ConfigureEngineRequest,
    ) -> Result<()> {
        let what = format!("configuring {} as {}", node, req.role);
        let resp = self
            .with_progress(node, async {
                self.call(node, &what, |mut c| {
                    let r = req.clone();
                    async move { c.configure_engine(r).await }
                })
                .await
            })
            .await?;
        if let Some(clone) = &resp.clone {
            let secs = resp.clone_ms as f64 / 1000.0;
            self.log(&format!(
                "cloned {} to {node} in {secs:.2}s ({:.1} MB/s)",
                mb(clone.done_bytes),
                clone.done_bytes as f64 / 1e6 / secs.max(0.001)
            ));
        }
        let status = resp
            .status
            .ok_or_else(|| anyhow!("agent returned no status"))?;
        self.coord.fleet.set_engine(node, status);
        Ok(())
    }

    /// Runs `step`, meanwhile copying `node`'s progress reports (from its
    /// heartbeats) into the operation: its progress field, and a log line at
    /// each quarter.
    pub(crate) async fn with_progress<T>(&self, node: &str, step: impl Future<Output = T>) -> T {
        tokio::pin!(step);
        let mut logged_quarter = 0;
        loop {
            tokio::select! {
                out = &mut step => {
                    self.coord.ops.set_progress(&self.op.id, None);
                    return out;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let task = self.coord.fleet.get(node).and_then(|l| l.engine.task);
            let Some(task) = task else { continue };
            if let Some(quarter) = (task.done_bytes * 4).checked_div(task.total_bytes) {
                if quarter.min(4) > logged_quarter {
                    logged_quarter = quarter.min(4);
                    self.log(&format!(
                        "{} on {node}: {} / {} ({}%)",
                        task.kind,
                        mb(task.done_bytes),
                        mb(task.total_bytes),
                        (task.done_bytes * 100)
                            .checked_div(task.total_bytes)
                            .unwrap_or(0)
                    ));
                }
            }
            self.coord.ops.set_progress(
                &self.op.id,
                Some(pb::Progress {
                    message: format!("{} on {node}", task.kind),
                    ..task
                }),
            );
        }
    }

    /// A fresh status of `node`'s engine.
    pub(crate) async fn status(&self, node: &str) -> Result<pb::EngineStatus> {
        let s = self
            .call(node, "reading the engine status", |mut c| async move {
                c.get_status(pb::GetStatusRequest {}).await
            })
            .await?;
        self.coord.fleet.set_engine(node, s.clone());
        Ok(s)
    }

    /// Waits until `primary` reports `replica` streaming.
    pub(crate) async fn wait_streaming(&self, primary: &str, replica: &str) -> Result<()> {
        let began = Instant::now();
        loop {
            let s = self.status(primary).await?;
            let standby = s
                .replication
                .as_ref()
                .and_then(|r| r.standbys.iter().find(|s| s.name == replica));
            if let Some(st) = standby.filter(|s| s.state == "streaming") {
                // 0: the primary does not know the replica's position
                // (MariaDB never does; PostgreSQL before its first feedback).
                let behind = match s.replication.as_ref() {
                    Some(r) if st.replay_lsn > 0 => {
                        format!("{} behind", mb(r.lsn.saturating_sub(st.replay_lsn)))
                    }
                    _ => "the primary does not know its position".into(),
                };
                self.log(&format!(
                    "{replica} is streaming from {primary} ({behind}, {})",
                    st.sync_state
                ));
                return Ok(());
            }
            if began.elapsed() > STREAMING_TIMEOUT {
                bail!(
                    "{replica} did not start streaming from {primary} within {}s (primary sees it as {}); \
                     see the engine log on {replica}, then retry with `corralctl cluster resync {} --node {replica}`",
                    STREAMING_TIMEOUT.as_secs(),
                    standby.map(|s| s.state.as_str()).unwrap_or("not connected"),
                    self.op.cluster
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // ------------------------------------------------------------ operations

    pub(crate) async fn create_cluster(&self) -> Result<()> {
        let mut nodes: Vec<String> = match self.param("nodes")? {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => vec![self.param_str("node")?],
        };
        if nodes.is_empty() {
            bail!("operation has no nodes");
        }
        let primary = nodes.remove(0);
        self.bring_up(&primary, nodes).await
    }

    /// Starts the cluster on nodes holding nothing: `primary` initialised
    /// (or restored from the backup the operation names), then each of
    /// `nodes` cloned from it; the cluster is running at the end.
    pub(crate) async fn bring_up(&self, primary: &str, nodes: Vec<String>) -> Result<()> {
        let primary = primary.to_string();
        let cluster = self.cluster()?;
        self.coord.fleet.term_started(&cluster.name, cluster.term);
        self.log(&format!(
            "initialising {} on node {primary} and starting it as primary",
            cluster.engine
        ));
        let mut first = self.primary_request(&cluster, nodes.clone(), false, true)?;
        first.restore = self.restore_source().await?;
        self.configure(&primary, first).await?;
        let status = self
            .coord
            .fleet
            .get(&primary)
            .map(|l| l.engine)
            .unwrap_or_default();
        self.log(&format!(
            "{} {} running on node {primary} (pid {}, port {}); admin role {:?} and database {:?} ready",
            cluster.engine, status.version, status.pid, status.port, cluster.admin_user, cluster.database
        ));
        let primary_row = self.node_row(&primary)?;
        for replica in &nodes {
            self.log(&format!(
                "cloning {replica} from {primary} ({})",
                crate::engines::clone_method(&cluster.engine, &slot_label(replica))
            ));
            self.configure(replica, self.replica_request(&cluster, &primary_row, "")?)
                .await?;
            self.wait_streaming(&primary, replica).await?;
        }
        if cluster.sync && !nodes.is_empty() {
            self.log("turning on synchronous commit: every commit waits for one replica");
            self.configure(
                &primary,
                self.primary_request(&cluster, nodes, true, false)?,
            )
            .await?;
        }
        self.coord
            .store
            .read(|c| store::set_cluster_state(c, &cluster.name, "running"))?;
        Ok(())
    }

    pub(crate) async fn add_node(&self) -> Result<()> {
        let node = self.param_str("node")?;
        let cluster = self.cluster()?;
        let m = self.members()?;
        if crate::engines::family(&cluster.engine) == crate::engines::Family::Postgres {
            self.log(&format!(
                "creating replication slot {} on the primary {}",
                slot_label(&node),
                m.primary.id
            ));
        }
        self.configure(
            &m.primary.id,
            self.primary_request(&cluster, m.replica_ids(), cluster.sync, false)?,
        )
        .await?;
        self.log(&format!(
            "cloning {node} from {} ({})",
            m.primary.id,
            crate::engines::clone_method(&cluster.engine, &slot_label(&node))
        ));
        self.configure(&node, self.replica_request(&cluster, &m.primary, "")?)
            .await?;
        self.wait_streaming(&m.primary.id, &node).await?;
        Ok(())
    }

    pub(crate) async fn remove_node(&self) -> Result<()> {
        let node = self.param_str("node")?;
        let cluster = self.cluster()?;
        let m = self.members()?;
        let others: Vec<String> = m.replica_ids().into_iter().filter(|r| *r != node).collect();
        self.log(&format!(
            "detaching {node} from the primary {}: dropping its slot{}",
            m.primary.id,
            if cluster.sync {
                " and its place in synchronous_standby_names"
            } else {
                ""
            }
        ));
        self.configure(
            &m.primary.id,
            self.primary_request(&cluster, others.clone(), cluster.sync, false)?,
        )
        .await?;
        self.log(&format!(
            "stopping the engine on {node} and erasing its data"
        ));
        self.decommission(&node, &cluster).await?;
        // The slot was still in use while the replica ran; drop it now.
        self.configure(
            &m.primary.id,
            self.primary_request(&cluster, others.clone(), cluster.sync, false)?,
        )
        .await?;
        self.coord.store.tx(|tx| {
            store::unassign_node(tx, &node)?;
            if others.is_empty() {
                let mut c = cluster.clone();
                c.mode = "single".into();
                store::update_cluster(tx, &c)?;
            }
            Ok(())
        })?;
        self.log(&format!("{node} left the cluster and is free"));
        Ok(())
    }

    pub(crate) async fn promote(&self) -> Result<()> {
        let target = self.param_str("node")?;
        let force = self.param("force")?.as_bool().unwrap_or(false);
        let cluster = self.cluster()?;
        let m = self.members()?;
        let old = m.primary.clone();
        // Whether the old primary's engine is known to be stopped (a
        // resumed operation cannot tell: the target then waits for its
        // confirmation of the old primary to expire).
        let mut old_stopped = false;
        if old.id != target {
            old_stopped = self.switch_over(&cluster, &old, &target, &m, force).await?;
            let term = self.coord.store.tx(|tx| {
                let term = store::raise_term(tx, &cluster.name, &target)?;
                store::log_operation(
                    tx,
                    &self.op.id,
                    &format!("term raised to {term}: {target} is the primary of record"),
                )?;
                Ok(term)
            })?;
            self.coord.fleet.term_started(&cluster.name, term);
            if !old_stopped {
                // Not stopped (forced, unreachable): it may be alive and
                // hold a lease; no grant can follow the raise.
                self.await_lease_end(&cluster, &old.id).await;
            }
        } else {
            self.log(&format!(
                "{target} is already the primary of record (resumed after a coordinator restart)"
            ));
            // Whoever was primary before may not have been stopped (a forced
            // promotion): let any lease it may hold run out.
            for r in &m.replicas {
                self.await_lease_end(&cluster, &r.id).await;
            }
        }
        let cluster = self.cluster()?;
        let m = self.members()?;
        let paused = Instant::now();
        self.promote_node(&cluster, &target, &m, old_stopped)
            .await?;
        if old_stopped {
            self.log(&format!(
                "{target} is the primary; writes were paused for {} ms",
                paused.elapsed().as_millis() + self.stop_to_catch_up_ms()
            ));
        }
        // Everyone else follows the new primary: the former primary (rewound
        // if it wrote anything the new one never received) and the replicas.
        // A node that is down follows when it comes back (the monitor
        // rejoins it).
        let mut following = Vec::new();
        for r in &m.replicas {
            if self.coord.fleet.liveness_of(&r.id, Instant::now()) != Liveness::Up {
                self.log(&format!(
                    "{} is down; it will follow {target} when it comes back",
                    r.id
                ));
                continue;
            }
            self.log(&format!("{} now follows {target}", r.id));
            self.configure(&r.id, self.replica_request(&cluster, &m.primary, "")?)
                .await
                .with_context(|| {
                    format!(
                        "{} could not follow the new primary; resync it with `corralctl cluster resync {} --node {}`",
                        r.id, cluster.name, r.id
                    )
                })?;
            following.push(r.id.clone());
        }
        for r in &following {
            self.wait_streaming(&target, r).await?;
        }
        Ok(())
    }

    /// Milliseconds from stopping the old primary to the target having
    /// caught up, as recorded by [`Self::switch_over`].
    pub(crate) fn stop_to_catch_up_ms(&self) -> u128 {
        *self.paused_ms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every lease `old` may hold has run out, plus the margin.
    pub(crate) async fn await_lease_end(&self, cluster: &ClusterRow, old: &str) {
        let lease = cluster.lease();
        let end =
            self.coord.fleet.lease_until_of(old, cluster) + corral_proto::lease::margin(lease);
        let wait = end.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            self.log(&format!(
                "waiting {} ms for {old}'s lease to run out (plus the margin)",
                wait.as_millis()
            ));
            tokio::time::sleep(wait).await;
        }
    }

    /// Promotes `target` (the primary of record, term already raised):
    /// idempotent, so a resumed operation simply calls it again.
    pub(crate) async fn promote_node(
        &self,
        cluster: &ClusterRow,
        target: &str,
        m: &Members,
        old_stopped: bool,
    ) -> Result<pb::EngineStatus> {
        self.log(&format!("promoting {target} in term {}", cluster.term));
        if failpoint_once("promote-fails-once") {
            bail!("failpoint promote-fails-once: the promotion of {target} failed");
        }
        let r = pb::PromoteRequest {
            replicas: m.replica_ids(),
            sync: cluster.sync,
            term: cluster.term,
            lease_duration_ms: cluster.lease_ms,
            heartbeat_interval_ms: cluster.heartbeat_ms,
            primary_stopped: old_stopped,
        };
        let status = self
            .call(target, "promoting", |mut c| {
                let r = r.clone();
                async move { c.promote(r).await }
            })
            .await?;
        self.coord.fleet.set_engine(target, status.clone());
        Ok(status)
    }

    /// Stops `old`, waits for `target` to have every write. Returns whether
    /// the old primary was stopped (false: --force with `old` unreachable).
    pub(crate) async fn switch_over(
        &self,
        cluster: &ClusterRow,
        old: &NodeRow,
        target: &str,
        m: &Members,
        force: bool,
    ) -> Result<bool> {
        self.log(&format!(
            "stopping the primary {} ({}); writes pause from here",
            old.id,
            crate::engines::clean_stop(&cluster.engine)
        ));
        let paused = Instant::now();
        let term = cluster.term;
        // Forced, with the primary down: do not spend a minute retrying it.
        let give_up =
            if force && self.coord.fleet.liveness_of(&old.id, Instant::now()) != Liveness::Up {
                Duration::from_secs(2)
            } else {
                AGENT_UNREACHABLE_GIVE_UP
            };
        let stop = self
            .call_within(
                &old.id,
                "stopping the primary",
                give_up,
                |mut c| async move { c.stop_engine(pb::StopEngineRequest { term }).await },
            )
            .await;
        let checkpoint = match stop {
            Ok(s) => {
                self.log(&format!(
                    "{} stopped ({}) at checkpoint {}",
                    old.id,
                    s.cluster_state,
                    lsn(s.checkpoint_lsn)
                ));
                Some(s.checkpoint_lsn)
            }
            Err(e) if force => {
                self.log(&format!(
                    "could not stop {} ({e:#}); --force: promoting {target} anyway. \
                     Writes acknowledged by {} after {target}'s last replayed position are not on {target}; \
                     {} is fenced by the new term as soon as it hears of it",
                    old.id, old.id, old.id
                ));
                // It may still be alive and hold a lease: the promotion
                // waits for it (after the term is raised, see `promote`).
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(ckpt) = checkpoint {
            let began = Instant::now();
            loop {
                let s = self.status(target).await?;
                let replayed = s.replication.as_ref().map(|r| r.lsn).unwrap_or(0);
                if crate::engines::caught_up(&cluster.engine, replayed, ckpt) {
                    self.log(&format!(
                        "{target} has replayed every write ({} > checkpoint {})",
                        lsn(replayed),
                        lsn(ckpt)
                    ));
                    break;
                }
                if began.elapsed() > CATCH_UP_TIMEOUT {
                    self.log(&format!(
                        "{target} did not catch up within {}s (at {}, needs {}); restarting {} as the primary",
                        CATCH_UP_TIMEOUT.as_secs(),
                        lsn(replayed),
                        lsn(ckpt),
                        old.id
                    ));
                    self.configure(
                        &old.id,
                        self.primary_request(cluster, m.replica_ids(), cluster.sync, false)?,
                    )
                    .await?;
                    bail!(
                        "switchover abandoned: {target} did not receive every write; {} is the primary again",
                        old.id
                    );
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        *self.paused_ms.lock().unwrap_or_else(|p| p.into_inner()) = paused.elapsed().as_millis();
        Ok(checkpoint.is_some())
    }

    /// Automatic failover, decided by [`crate::failover::decide`] and
    /// recorded (term raised, the candidate made primary of record) before
    /// this runs: promote the candidate, repoint the replicas that are up.
    /// The old primary rejoins as a replica when it comes back (a
    /// [`REJOIN`] operation started by the monitor).
    pub(crate) async fn failover(&self) -> Result<()> {
        let old = self.param_str("old")?;
        let candidate = self.param_str("candidate")?;
        let detected = self.param("detected_at_ms")?.as_i64().unwrap_or(0);
        let lease_ended = self.param("lease_ended_at_ms")?.as_i64().unwrap_or(0);
        let cluster = self.cluster()?;
        let m = self.members()?;
        if m.primary.id != candidate {
            bail!(
                "{candidate} is no longer the primary of record (it is {}); nothing done",
                m.primary.id
            );
        }
        failpoint("failover-before-promote").await;
        // The term is raised: no lease is granted to the old primary any
        // more. One granted just before the raise (a heartbeat answered
        // while the monitor decided) must run out first.
        self.await_lease_end(&cluster, &old).await;
        let status = self.promote_node(&cluster, &candidate, &m, false).await?;
        let promoted = corral_proto::now_ms();
        let held = status.lease.as_ref().is_some_and(|l| l.held);
        self.log(&format!(
            "{candidate} is the primary in term {}{}",
            cluster.term,
            if held {
                " and holds its lease: writes resume"
            } else {
                "; waiting for its lease"
            }
        ));
        let mut repointed = Vec::new();
        for r in m.replicas.iter().filter(|r| r.id != old) {
            if self.coord.fleet.liveness_of(&r.id, Instant::now()) != Liveness::Up {
                self.log(&format!(
                    "{} is down; it will follow {candidate} when it comes back",
                    r.id
                ));
                continue;
            }
            self.log(&format!("{} now follows {candidate}", r.id));
            let req = self.replica_request(&cluster, &m.primary, "")?;
            match self.configure_within(&r.id, req, REPOINT_GIVE_UP).await {
                Ok(()) => repointed.push(r.id.clone()),
                Err(e) => self.log(&format!(
                    "{} could not be repointed yet ({e:#}); it is retried when it reports",
                    r.id
                )),
            }
        }
        let done = corral_proto::now_ms();
        self.log(&format!(
            "{old} will rejoin as a replica of {candidate} ({}) when it comes back",
            crate::engines::rejoin_method(&cluster.engine)
        ));
        let timeline = format!(
            "failover of {} from {old} to {candidate} in term {}: detected at {}, {old}'s lease ended at {} \
             ({} ms before), {candidate} chosen at detection, promoted at {} (+{} ms), replicas repointed at {} \
             (+{} ms: {})",
            cluster.name,
            cluster.term,
            fmt_ms(detected),
            fmt_ms(lease_ended),
            detected - lease_ended,
            fmt_ms(promoted),
            promoted - detected,
            fmt_ms(done),
            done - detected,
            if repointed.is_empty() {
                "none".to_string()
            } else {
                repointed.join(", ")
            }
        );
        self.coord.store.tx(|tx| {
            store::insert_event(
                tx,
                done,
                &candidate,
                &cluster.name,
                "failover",
                &timeline,
                None,
            )?;
            store::insert_audit(
                tx,
                AUTO_FAILOVER,
                "cluster.failover",
                &format!("cluster {} {old} -> {candidate}", cluster.name),
                "ok",
            )
        })?;
        self.log(&timeline);
        Ok(())
    }

    /// Brings a replica of record back into line with the primary: a
    /// former primary is rewound (or cloned again), a replica pointed at an
    /// old primary is repointed.
    pub(crate) async fn rejoin(&self) -> Result<()> {
        let node = self.param_str("node")?;
        let cluster = self.cluster()?;
        let m = self.members()?;
        if !m.replicas.iter().any(|r| r.id == node) {
            bail!("{node} is no longer a replica of {}", cluster.name);
        }
        self.log(&format!(
            "{node} rejoins as a replica of {} in term {}",
            m.primary.id, cluster.term
        ));
        self.configure(&node, self.replica_request(&cluster, &m.primary, "")?)
            .await?;
        self.wait_streaming(&m.primary.id, &node).await
    }

    pub(crate) async fn configure_within(
        &self,
        node: &str,
        req: pb::ConfigureEngineRequest,
        give_up: Duration,
    ) -> Result<()> {
        let what = format!("configuring {} as {}", node, req.role);
        let resp = self
            .call_within(node, &what, give_up, |mut c| {
                let r = req.clone();
                async move { c.configure_engine(r).await }
            })
            .await?;
        if let Some(status) = resp.status {
            self.coord.fleet.set_engine(node, status);
        }
        Ok(())
    }

    pub(crate) async fn resync(&self) -> Result<()> {
        let nodes: Vec<String> = self
            .param("nodes")?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let cluster = self.cluster()?;
        let m = self.members()?;
        for node in &nodes {
            if !m.replicas.iter().any(|r| &r.id == node) {
                bail!("{node} is no longer a replica of {}", cluster.name);
            }
            self.log(&format!(
                "resyncing {node}: erasing its data and cloning it again from {}",
                m.primary.id
            ));
            self.configure(
                node,
                self.replica_request(&cluster, &m.primary, &self.op.id)?,
            )
            .await?;
            self.wait_streaming(&m.primary.id, node).await?;
        }
        Ok(())
    }

    pub(crate) async fn reboot(&self) -> Result<()> {
        let node = self.param_str("node")?;
        let m = self.members()?;
        let is_primary = m.primary.id == node;
        self.log(&format!(
            "restarting the engine on {node}{}",
            if is_primary {
                " (the primary: writes pause until it is back)"
            } else {
                ""
            }
        ));
        let began = Instant::now();
        let term = self.cluster()?.term;
        let s = self
            .call(&node, "restarting the engine", |mut c| async move {
                c.restart_engine(pb::RestartEngineRequest { term }).await
            })
            .await?;
        self.coord.fleet.set_engine(&node, s);
        self.log(&format!(
            "{node} is back in {} ms",
            began.elapsed().as_millis()
        ));
        if !is_primary {
            self.wait_streaming(&m.primary.id, &node).await?;
        }
        Ok(())
    }

    /// Stops `node`'s engine and erases its data and spec.
    pub(crate) async fn decommission(&self, node: &str, cluster: &ClusterRow) -> Result<()> {
        let r = pb::DecommissionRequest {
            cluster: cluster.name.clone(),
            term: cluster.term,
        };
        self.call(node, "decommissioning", |mut c| {
            let r = r.clone();
            async move { c.decommission(r).await }
        })
        .await?;
        Ok(())
    }

    pub(crate) async fn delete_cluster(&self) -> Result<()> {
        let cluster = self.cluster()?;
        self.final_backup(&cluster).await?;
        let nodes = self
            .coord
            .store
            .read(|c| store::nodes_of_cluster(c, &cluster.name))?;
        // Replicas first, so the primary is the last to go.
        let mut order: Vec<&NodeRow> = nodes.iter().filter(|n| n.role != "primary").collect();
        order.extend(nodes.iter().filter(|n| n.role == "primary"));
        for n in order {
            self.log(&format!(
                "stopping the engine on {} and erasing its data",
                n.id
            ));
            self.decommission(&n.id, &cluster).await?;
        }
        self.coord.store.tx(|tx| {
            store::delete_cluster(tx, &cluster.name)?;
            crate::backups::forget_cluster(tx, &cluster.name)
        })?;
        self.log(&format!(
            "cluster {} deleted; its nodes are free (operations and audit rows are kept)",
            cluster.name
        ));
        Ok(())
    }

    pub(crate) async fn set_sync(&self) -> Result<()> {
        let cluster = self.cluster()?;
        let m = self.members()?;
        self.log(&format!(
            "{} synchronous commit on {}",
            if cluster.sync {
                "turning on"
            } else {
                "turning off"
            },
            m.primary.id
        ));
        self.configure(
            &m.primary.id,
            self.primary_request(&cluster, m.replica_ids(), cluster.sync, false)?,
        )
        .await
    }
}

/// Test-only pauses between steps, to kill the coordinator at an exact
/// point: `CORRAL_FAILPOINTS=failover-before-promote` makes a failover stop
/// (forever) once the term is raised and recorded, before the promotion.
/// Never set in production; the variable is read only where named.
async fn failpoint(name: &str) {
    let set =
        std::env::var("CORRAL_FAILPOINTS").is_ok_and(|v| v.split(',').any(|f| f.trim() == name));
    if set {
        tracing::warn!("failpoint {name}: pausing here until the process is killed");
        std::future::pending::<()>().await;
    }
}

/// A test-only failure, the first time only in this process:
/// `CORRAL_FAILPOINTS=promote-fails-once` makes the first promotion fail
/// before the agent is asked, leaving the primary of record a standby.
fn failpoint_once(name: &str) -> bool {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let set =
        std::env::var("CORRAL_FAILPOINTS").is_ok_and(|v| v.split(',').any(|f| f.trim() == name));
    set && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
}

/// Unix milliseconds as UTC time of day with milliseconds.
pub(crate) fn fmt_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(|t| {
            format!(
                "{:02}:{:02}:{:02}.{:03}",
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            )
        })
        .unwrap_or_else(|_| ms.to_string())
}

fn slot_label(node: &str) -> String {
    format!("corral_{}", node.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_operation_that_never_finishes_fails_at_its_deadline() {
        let began = tokio::time::Instant::now();
        let now = corral_proto::now_ms();
        let e = within_deadline(FAILOVER, now, std::future::pending())
            .await
            .unwrap_err();
        assert!(format!("{e}").contains("must finish within 5 min"), "{e}");
        assert_eq!(began.elapsed(), deadline(FAILOVER));
        // Resumed after a restart, with most of it spent: what is left,
        // but at least the floor.
        let began = tokio::time::Instant::now();
        let long_ago = now - 10 * 60 * 1000;
        assert!(within_deadline(FAILOVER, long_ago, std::future::pending())
            .await
            .is_err());
        assert_eq!(began.elapsed(), DEADLINE_FLOOR);
        // One that finishes is untouched.
        within_deadline(ADD_NODE, now, async { Ok(()) })
            .await
            .unwrap();
        for kind in [ADD_NODE, RESYNC, RESTORE, CREATE_CLUSTER, BACKUP] {
            assert!(deadline(kind) >= Duration::from_secs(24 * 3600), "{kind}");
        }
    }
}
