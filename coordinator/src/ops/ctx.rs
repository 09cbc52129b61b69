//! What the steps of every operation share: its parameters, the cluster
//! and members of record, the requests to agents (retried while an agent
//! is unreachable, up to a give-up time), progress of the long step, and
//! waiting for a replica to stream.

use super::{mb, Ctx, Members, AGENT_UNREACHABLE_GIVE_UP, STREAMING_TIMEOUT};
use crate::fleet::host_of;
use crate::store;
use crate::store::{ClusterRow, NodeRow};
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use corral_proto::pb::agent_client::AgentClient;
use std::future::Future;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

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
            wal_archive: crate::backups::upgrade::wal_archive_to_configure(self.coord, cluster)?,
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
}
