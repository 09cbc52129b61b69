//! `delete_cluster`: take the final backup (unless declined), stop and
//! erase the replicas, then the primary, then delete the cluster's rows in
//! one transaction.
//!
//! If the coordinator dies between steps: the final backup's id is fixed
//! in the request, so the resumed operation finds it taken and does not
//! take another; decommissioning an erased node is a no-op. The cluster
//! is `deleting` (refusing other requests) until its rows are gone.

use super::Ctx;
use crate::store;
use crate::store::NodeRow;
use anyhow::Result;

impl Ctx<'_> {
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
}
