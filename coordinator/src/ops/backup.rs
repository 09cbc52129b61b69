//! `backup` (and the final backup of `delete_cluster`): take the backup
//! whose record the request wrote, through the node
//! [`crate::backups::source_node`] picks, and record the outcome.
//!
//! If the coordinator dies mid-way: a backup already recorded `succeeded`
//! is not taken again; one still `running` is taken again under the same
//! id (its object name comes from the id, so it is overwritten, never
//! duplicated). A backup that fails is recorded `failed` with its reason
//! and raises `backup_failed`.

use super::Ctx;
use crate::backups::keys;
use crate::backups::*;
use crate::config::LOCAL_TARGET;
use crate::store;
use crate::store::ClusterRow;
use anyhow::{anyhow, Result};
use corral_proto::pb;

impl Ctx<'_> {
    /// The `backup` operation: takes backup `params.backup` (its record
    /// was written with the request).
    pub(crate) async fn backup(&self) -> Result<()> {
        let id = self.param_str("backup")?;
        let cluster = self.cluster()?;
        self.take_backup(&cluster, &id).await.map(|_| ())
    }

    /// Takes the backup whose record `id` exists, recording the outcome; a
    /// failure is recorded with its reason and raises `backup_failed`.
    pub(crate) async fn take_backup(&self, cluster: &ClusterRow, id: &str) -> Result<BackupRow> {
        let mut row = self
            .coord
            .store
            .read(|c| get(c, id))?
            .ok_or_else(|| anyhow!("backup {id} has no record"))?;
        if row.state == state::SUCCEEDED {
            return Ok(row);
        }
        let outcome = self.run_backup(cluster, &mut row).await;
        let now = corral_proto::now_ms();
        match outcome {
            Ok(()) => {
                row.state = state::SUCCEEDED.into();
                row.reason.clear();
                self.coord.store.read(|c| put(c, &row))?;
                self.log(&format!(
                    "backup {id} stored in {}: {} of data, {} stored, consistent at {}",
                    row.target,
                    crate::ops::mb(row.plain_bytes),
                    crate::ops::mb(row.stored_bytes),
                    row.position
                ));
                Ok(row)
            }
            Err(e) => {
                let reason = format!("{e:#}");
                row.state = state::FAILED.into();
                row.reason = reason.clone();
                row.finished_at_ms = now;
                self.coord.store.tx(|tx| {
                    put(tx, &row)?;
                    store::insert_event(
                        tx,
                        now,
                        &row.node,
                        &row.cluster,
                        "backup_failed",
                        &format!(
                            "{} backup {id} of cluster {} to {} failed: {reason}",
                            row.kind, row.cluster, row.target
                        ),
                        None,
                    )
                })?;
                Err(e.context(format!("backup {id} failed")))
            }
        }
    }

    pub(super) async fn run_backup(&self, cluster: &ClusterRow, row: &mut BackupRow) -> Result<()> {
        let target = self.coord.backups.target_for(&row.target, &cluster.name)?;
        row.key_scope = keys::scope_of(cluster);
        let nodes = self
            .coord
            .store
            .read(|c| store::nodes_of_cluster(c, &cluster.name))?;
        let node = source_node(self.coord, &nodes)?;
        row.node = node.id.clone();
        row.role = node.role.clone();
        if let Some(w) = wal_archive_of(self.coord, cluster)? {
            row.wal_target = w.target.map(|t| t.name).unwrap_or_default();
            row.wal_prefix = w.prefix;
        }
        self.coord.store.read(|c| put(c, row))?;
        self.log(&format!(
            "backing up {} from {} ({}) to target {} ({})",
            cluster.name, node.id, node.role, row.target, target.kind
        ));
        let req = pb::TakeBackupRequest {
            id: row.id.clone(),
            cluster: cluster.name.clone(),
            target: Some(target),
            key: self.coord.backups.key.for_backup(row),
            object: row.object.clone(),
        };
        let r = self
            .with_progress(&node.id, async {
                self.call(&node.id, "backing up", |mut c| {
                    let r = req.clone();
                    async move { c.take_backup(r).await }
                })
                .await
            })
            .await?;
        row.version = r.version;
        row.started_at_ms = r.started_at_ms;
        row.finished_at_ms = r.finished_at_ms;
        row.plain_bytes = r.plain_bytes;
        row.stored_bytes = r.stored_bytes;
        row.sha256 = r.sha256;
        row.position = r.position;
        row.position_time_ms = r.position_time_ms;
        row.key_id = r.key_id;
        row.start_wal = r.start_wal;
        Ok(())
    }

    /// Takes the final backup of a cluster being deleted.
    pub(crate) async fn final_backup(&self, cluster: &ClusterRow) -> Result<()> {
        let id = match self.param("final_backup")? {
            serde_json::Value::String(s) if !s.is_empty() => s,
            _ => return Ok(()),
        };
        let existing = self.coord.store.read(|c| get(c, &id))?;
        if existing.is_none() {
            let target = self
                .coord
                .store
                .read(|c| schedule_of(c, &cluster.name))?
                .map(|s| s.target)
                .unwrap_or_else(|| LOCAL_TARGET.to_string());
            let keep = self.coord.backups.config.final_backup_retain;
            let now = corral_proto::now_ms();
            let row = BackupRow {
                id: id.clone(),
                cluster: cluster.name.clone(),
                kind: kind::FINAL.into(),
                state: state::RUNNING.into(),
                target,
                engine: cluster.engine.clone(),
                started_at_ms: now,
                expires_at_ms: now + keep.as_millis() as i64,
                operation: self.op.id.clone(),
                object: object_name(&cluster.name, &id),
                key_scope: keys::scope_of(cluster),
                ..Default::default()
            };
            self.coord.store.read(|c| put(c, &row))?;
        }
        self.log(&format!(
            "taking the final backup {id} before deleting the cluster (kept for {})",
            crate::backups::fmt_duration(self.coord.backups.config.final_backup_retain)
        ));
        self.take_backup(cluster, &id).await.map_err(|e| {
            e.context(
                "the cluster was not deleted; retry, or delete it with --no-final-backup to \
                 skip the final backup",
            )
        })?;
        Ok(())
    }
}
