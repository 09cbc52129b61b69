//! `rejoin`: bring a replica of record back into line with the primary: a
//! former primary is rewound (or cloned again), a replica following an old
//! primary is repointed; then wait for it to stream.
//!
//! If the coordinator dies: the operation is resumed from the top; the
//! configure is idempotent. A failover preempts a rejoin
//! ([`super::Runner::abort`]).

use super::Ctx;
use anyhow::{bail, Result};

impl Ctx<'_> {
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
}
