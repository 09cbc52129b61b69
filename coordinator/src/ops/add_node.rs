//! `add_node`: tell the primary about the new replica (its slot and the
//! synchronous standby list), clone the node from it, wait for it to
//! stream.
//!
//! If the coordinator dies between steps: the node is already a replica
//! of record (assigned in the request's transaction), and both configures
//! are idempotent (an existing slot is kept, a clone in place is not
//! redone), so the resumed operation simply sends them again.

use super::{slot_label, Ctx};
use anyhow::Result;

impl Ctx<'_> {
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
}
