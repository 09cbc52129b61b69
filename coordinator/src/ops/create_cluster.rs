//! `create_cluster`: initialise the primary (or restore it from the backup
//! the operation names), clone each replica from it, turn on synchronous
//! commit if asked, mark the cluster running.
//!
//! If the coordinator dies between steps: the operation is resumed from
//! the top, and each configure is idempotent on the agent (an initialised
//! or cloned data directory is found in place, not redone), so it finishes
//! what was left. The cluster stays `creating` until the last step; a
//! create that fails leaves it `failed` ([`super::runner`]).

use super::{slot_label, Ctx};
use crate::store;
use anyhow::{bail, Result};

impl Ctx<'_> {
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
}
