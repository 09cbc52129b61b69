//! `configure_backups`: tell every node of a cluster where WAL goes (or
//! that it goes nowhere) after its schedule changed. Runs beside a backup.
//!
//! If the coordinator dies: the resumed operation tells them again
//! (idempotent).

use super::Ctx;
use crate::backups::*;
use anyhow::Result;

impl Ctx<'_> {
    /// The `configure_backups` operation: tells every node of the cluster
    /// where its WAL is archived (or that it is not), after a schedule
    /// change.
    pub(crate) async fn configure_backups(&self) -> Result<()> {
        let cluster = self.cluster()?;
        let m = self.members()?;
        let primary_row = m.primary.clone();
        self.configure(
            &m.primary.id,
            self.primary_request(&cluster, m.replica_ids(), cluster.sync, false)?,
        )
        .await?;
        for r in &m.replicas {
            self.configure(&r.id, self.replica_request(&cluster, &primary_row, "")?)
                .await?;
        }
        self.log(&match wal_archive_of(self.coord, &cluster)? {
            Some(w) => format!(
                "WAL is archived to target {} under {}",
                w.target.map(|t| t.name).unwrap_or_default(),
                w.prefix
            ),
            None => "WAL is not archived".into(),
        });
        Ok(())
    }
}
