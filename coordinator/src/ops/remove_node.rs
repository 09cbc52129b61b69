//! `remove_node`: detach the node on the primary first (so no commit waits
//! for it), stop its engine and erase its data, drop its slot, and only
//! then free it in the store.
//!
//! If the coordinator dies between steps: the node stays a member of
//! record until the last step, so the resumed operation detaches it again
//! (idempotent) and decommissions it (a no-op once erased): a node is never
//! free while it still holds data or a slot on the primary.

use super::Ctx;
use crate::store;
use anyhow::Result;

impl Ctx<'_> {
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
}
