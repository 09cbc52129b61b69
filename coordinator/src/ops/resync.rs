//! `resync`: erase and clone again each named replica from the primary.
//!
//! If the coordinator dies between nodes: the request carries the
//! operation id as its resync key, so the agent does not erase again a node
//! it already re-cloned under this id; the resumed operation goes on with
//! the next. The primary is never resynced (the service refuses it).

use super::Ctx;
use anyhow::{bail, Result};

impl Ctx<'_> {
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
}
