//! `verify_backup`: have a node read the backup back through the key,
//! check its checksum and restore it into a scratch directory; record the
//! verdict on the backup.
//!
//! If the coordinator dies: the resumed operation verifies again; nothing
//! but the verdict is written.

use super::Ctx;
use crate::backups::*;
use crate::store;
use anyhow::{anyhow, Result};
use corral_proto::pb;

impl Ctx<'_> {
    /// The `verify_backup` operation.
    pub(crate) async fn verify_backup(&self) -> Result<()> {
        let id = self.param_str("backup")?;
        let mut row = self
            .coord
            .store
            .read(|c| get(c, &id))?
            .ok_or_else(|| anyhow!("backup {id} no longer exists"))?;
        let node = reader_node(self.coord, &row)?;
        self.log(&format!(
            "verifying backup {id} on {}: reading it back through the key and restoring it \
             into a scratch directory",
            node.id
        ));
        let req = pb::VerifyBackupRequest {
            target: Some(self.coord.backups.target_for(&row.target, &row.cluster)?),
            key: self.coord.backups.key.for_backup(&row),
            object: row.object.clone(),
            engine: row.engine.clone(),
            sha256: row.sha256.clone(),
        };
        let outcome = self
            .call(&node.id, "verifying the backup", |mut c| {
                let r = req.clone();
                async move { c.verify_backup(r).await }
            })
            .await;
        row.verified_at_ms = corral_proto::now_ms();
        match outcome {
            Ok(v) => {
                row.verify_ok = true;
                row.verify_summary = v.summary.clone();
                self.coord.store.read(|c| put(c, &row))?;
                self.log(&format!(
                    "backup {id} is sound: {} read, {} restored; {}",
                    crate::ops::mb(v.stored_bytes),
                    crate::ops::mb(v.plain_bytes),
                    v.summary
                ));
                Ok(())
            }
            Err(e) => {
                let msg = format!("{e:#}");
                row.verify_ok = false;
                row.verify_summary = msg.clone();
                let now = corral_proto::now_ms();
                self.coord.store.tx(|tx| {
                    put(tx, &row)?;
                    store::insert_event(
                        tx,
                        now,
                        &node.id,
                        &row.cluster,
                        "backup_failed",
                        &format!(
                            "verifying backup {id} of cluster {} failed: {msg}",
                            row.cluster
                        ),
                        None,
                    )
                })?;
                Err(e.context(format!("backup {id} failed verification")))
            }
        }
    }
}
