//! `set_sync`: one configure of the primary with the synchronous commit
//! setting the request's transaction recorded.
//!
//! If the coordinator dies: the resumed operation sends it again
//! (idempotent).

use super::Ctx;
use anyhow::Result;

impl Ctx<'_> {
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
