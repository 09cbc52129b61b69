//! `restore` (in place) and the restore source of `create_cluster`: check
//! the backup on a node before touching the cluster (read through the key,
//! restored in a scratch directory), mark the cluster `restoring`, erase
//! the replicas and then the primary, start a new WAL archive, restore the
//! primary from the backup (to a point in time on PostgreSQL, from the
//! archived WAL) and clone the replicas again.
//!
//! If the coordinator dies before the primary is erased, the cluster's
//! data is intact, and the resumed operation checks again and goes on.
//! After, the resumed operation runs the same steps on erased nodes
//! (decommission is a no-op there) and restores from the same backup; a
//! failure from that point marks the cluster failed
//! ([`crate::backups::DATA_ERASED`]), since it holds no data.

use super::Ctx;
use crate::backups::*;
use crate::store;
use anyhow::{anyhow, bail, Result};
use corral_proto::pb;
use std::time::Duration;

impl Ctx<'_> {
    /// For a cluster created from a backup: what its first node restores.
    /// The backup `id` of the store.
    fn backup_row(&self, id: &str) -> Result<BackupRow> {
        self.coord
            .store
            .read(|c| get(c, id))?
            .ok_or_else(|| anyhow!("backup {id} no longer exists"))
    }

    pub(crate) async fn restore_source(&self) -> Result<Option<pb::RestoreSource>> {
        let id = match self.param("restore")? {
            serde_json::Value::String(s) if !s.is_empty() => s,
            _ => return Ok(None),
        };
        let to_time_ms = self.param("to_time_ms")?.as_i64().unwrap_or(0);
        let row = self.backup_row(&id)?;
        let wal = if to_time_ms > 0 {
            if row.wal_prefix.is_empty() {
                bail!(
                    "backup {id} was taken without WAL archiving, so it restores only to its end"
                );
            }
            if self.op.kind != crate::ops::RESTORE {
                // (An in-place restore flushed before erasing the nodes.)
                self.flush_source_wal(&row).await;
            }
            // The WAL archive a backup recorded was written with the
            // backup's own key (a legacy archive, with the master key).
            Some(pb::WalArchive {
                target: Some(
                    self.coord
                        .backups
                        .target_for(&row.wal_target, &row.cluster)?,
                ),
                key: self.coord.backups.key.for_backup(&row),
                prefix: row.wal_prefix.clone(),
            })
        } else {
            None
        };
        self.log(&format!(
            "restoring backup {id} (taken {} from {}, {}){}",
            fmt_time(row.position_time_ms),
            row.node,
            crate::ops::mb(row.plain_bytes),
            if to_time_ms > 0 {
                format!(
                    " and recovering to {} with the archived WAL",
                    fmt_time(to_time_ms)
                )
            } else {
                String::new()
            }
        ));
        Ok(Some(pb::RestoreSource {
            target: Some(self.coord.backups.target_for(&row.target, &row.cluster)?),
            key: self.coord.backups.key.for_backup(&row),
            object: row.object.clone(),
            engine: row.engine.clone(),
            sha256: row.sha256.clone(),
            to_time_ms,
            wal,
            stored_bytes: row.stored_bytes,
            start_wal: row.start_wal.clone(),
        }))
    }

    /// Before a point-in-time restore: asks the source cluster's primary,
    /// if it still runs, to archive its current WAL segment, so that a time
    /// just passed is covered. Best effort: logged when it cannot.
    pub(super) async fn flush_source_wal(&self, row: &BackupRow) {
        let primary = self.coord.store.read(|c| {
            Ok(store::nodes_of_cluster(c, &row.cluster)?
                .into_iter()
                .find(|n| n.role == "primary"))
        });
        let Ok(Some(primary)) = primary else {
            self.log(&format!(
                "cluster {} is gone: recovering with the WAL archived so far",
                row.cluster
            ));
            return;
        };
        let r = self
            .call_within(
                &primary.id,
                "archiving the source's current WAL",
                Duration::from_secs(10),
                |mut c| async move {
                    c.flush_wal_archive(pb::FlushWalArchiveRequest { term: 0 })
                        .await
                },
            )
            .await;
        match r {
            Ok(r) => self.log(&format!(
                "{} archived its WAL up to segment {}",
                primary.id, r.segment
            )),
            Err(e) => self.log(&format!(
                "could not make {} archive its current WAL ({e:#}); recovering with the WAL archived so far",
                primary.id
            )),
        }
    }

    /// The `restore` operation: the cluster's data replaced by a backup's.
    /// The backup is read back and checked first, where it will be read
    /// from; only then are the nodes erased, the primary restored and the
    /// replicas cloned from it again.
    pub(crate) async fn restore_in_place(&self) -> Result<()> {
        let id = self.param_str("restore")?;
        let to_time_ms = self.param("to_time_ms")?.as_i64().unwrap_or(0);
        let row = self.backup_row(&id)?;
        let cluster = self.cluster()?;
        let m = self.members()?;
        let target = self.coord.backups.target_for(&row.target, &row.cluster)?;
        if target.kind == "local" && row.node != m.primary.id {
            bail!(
                "backup {id} is in the local target of node {}, but the primary that would \
                 restore it is {}; use a backup in a shared target (s3), or restore into a new \
                 cluster whose first node is {}",
                row.node,
                m.primary.id,
                row.node
            );
        }
        let checker = if target.kind == "local" {
            m.primary.clone()
        } else {
            reader_node(self.coord, &row)?
        };
        self.log(&format!(
            "checking backup {id} on {} before touching the cluster (read through the key, \
             restored in a scratch directory)",
            checker.id
        ));
        let req = pb::VerifyBackupRequest {
            target: Some(target),
            key: self.coord.backups.key.for_backup(&row),
            object: row.object.clone(),
            engine: row.engine.clone(),
            sha256: row.sha256.clone(),
        };
        let v = self
            .call(&checker.id, "checking the backup", |mut c| {
                let r = req.clone();
                async move { c.verify_backup(r).await }
            })
            .await
            .map_err(|e| e.context("the cluster was not touched"))?;
        self.log(&format!("backup {id} is sound: {}", v.summary));
        if to_time_ms > 0 {
            self.flush_source_wal(&row).await;
        }
        self.coord
            .store
            .read(|c| store::set_cluster_state(c, &cluster.name, "restoring"))?;
        for n in &m.replicas {
            self.log(&format!(
                "stopping the engine on {} and erasing its data",
                n.id
            ));
            self.decommission(&n.id, &cluster).await?;
        }
        self.log(&format!(
            "stopping the engine on the primary {} and erasing its data",
            m.primary.id
        ));
        self.decommission(&m.primary.id, &cluster)
            .await
            .map_err(|e| e.context(DATA_ERASED))?;
        // A new WAL archive: the restored timeline must not meet the one
        // the cluster wrote before.
        let prefix = format!(
            "wal/{}/{}/k1-restored-{}/",
            cluster.name,
            cluster.created_at_ms,
            corral_proto::now_ms()
        );
        self.coord
            .store
            .read(|c| set_wal_prefix(c, &cluster.name, &prefix))?;
        self.bring_up(&m.primary.id, m.replica_ids())
            .await
            .map_err(|e| e.context(DATA_ERASED))
    }
}
