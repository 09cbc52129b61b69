//! Backup requests: take, list, show, delete, download, verify, restore, schedule.

use super::internal;
use super::rules::{busy, confirmed, plan, refuse, require_running};
use super::{Caller, Error, Service};
use crate::ops;
use crate::store::{self, OperationRow};
use corral_proto::identity::Role;
use corral_proto::pb;
use corral_proto::{names, now_ms};
use tokio_stream::StreamExt;
impl Service {
    pub async fn backup_now(
        &self,
        caller: &Caller,
        r: pb::BackupNowRequest,
    ) -> Result<pb::Operation, Error> {
        let target = format!("cluster {}", r.cluster);
        self.operation_request(caller, Role::Operator, "backup.now", &target, |who| {
            let target_name = self.backup_target_of(&r.cluster, &r.target)?;
            names::validate("cluster", &r.cluster).map_err(Error::invalid_argument)?;
            let id = self.refusable_tx(|tx| {
                let Some(row) = store::get_cluster(tx, &r.cluster)? else {
                    return refuse(Error::not_found(format!(
                        "no cluster named {:?}: see `corralctl cluster list`",
                        r.cluster
                    )));
                };
                or_refuse!(require_running(&row));
                if let Some(running) = store::unfinished_operation_of(tx, &r.cluster)? {
                    return refuse(busy(&running));
                }
                Ok(Ok(crate::backups::new_backup_operation(
                    tx,
                    &row,
                    crate::backups::kind::MANUAL,
                    &target_name,
                    who,
                )?))
            })?;
            self.0
                .store
                .read(|c| store::get_operation(c, &id))
                .map_err(internal)?
                .ok_or_else(|| Error::internal("the backup operation vanished"))
        })
    }

    pub async fn list_backups(
        &self,
        caller: &Caller,
        req: pb::ListBackupsRequest,
    ) -> Result<pb::ListBackupsResponse, Error> {
        caller.authorize(Role::Viewer)?;
        let cluster = req.cluster.clone();
        if !cluster.is_empty() {
            names::validate("cluster", &cluster).map_err(Error::invalid_argument)?;
        }
        let rows = self
            .0
            .store
            .read(|c| crate::backups::list(c, (!cluster.is_empty()).then_some(cluster.as_str())))
            .map_err(internal)?;
        Ok(pb::ListBackupsResponse {
            backups: rows.iter().map(|b| self.backup_pb(b)).collect(),
        })
    }

    pub async fn get_backup(
        &self,
        caller: &Caller,
        req: pb::GetBackupRequest,
    ) -> Result<pb::Backup, Error> {
        caller.authorize(Role::Viewer)?;
        let b = self.backup_row(&req.id)?;
        Ok(self.backup_pb(&b))
    }

    pub async fn delete_backup(
        &self,
        caller: &Caller,
        req: pb::DeleteBackupRequest,
    ) -> Result<pb::Backup, Error> {
        let r = req.clone();
        let target = format!("backup {}", r.id);
        let who = self.authorize_audited(caller, Role::Operator, "backup.delete", &target)?;
        let b = self.audited(&who, "backup.delete", &target, || {
            let b = self.backup_row(&r.id)?;
            if r.confirm != r.id {
                return Err(Error::invalid_argument(format!(
                    "deleting a backup is final: repeat its id to confirm (--confirm {})",
                    r.id
                )));
            }
            if b.state == crate::backups::state::RUNNING {
                return Err(Error::failed_precondition(format!(
                    "backup {} is still running; wait for it (`corralctl operation show {}`)",
                    b.id, b.operation
                )));
            }
            Ok(b)
        })?;
        crate::backups::delete_backup(&self.0, &b)
            .await
            .map_err(|e| Error::unavailable(format!("{e:#}; the backup is kept, retry")))?;
        Ok(self.backup_pb(&b))
    }

    pub async fn download_backup(
        &self,
        caller: &Caller,
        req: pb::DownloadBackupRequest,
    ) -> Result<super::Chunks<pb::BackupChunk>, Error> {
        let r = req.clone();
        let target = format!("backup {}{}", r.id, if r.raw { " (raw)" } else { "" });
        let who = self.authorize_audited(caller, Role::Operator, "backup.download", &target)?;
        let (b, node) = self.audited(&who, "backup.download", &target, || {
            let b = self.backup_row(&r.id)?;
            if b.state != crate::backups::state::SUCCEEDED {
                return Err(Error::failed_precondition(format!(
                    "backup {} is {}: only a succeeded backup can be downloaded",
                    b.id, b.state
                )));
            }
            let node = crate::backups::reader_node(&self.0, &b)
                .map_err(|e| Error::unavailable(format!("{e:#}")))?;
            Ok((b, node))
        })?;
        let mut client = self
            .0
            .agents
            .client(&node.id, &node.address)
            .map_err(internal)?;
        let stream = client
            .read_backup_object(pb::ReadBackupObjectRequest {
                target: Some(
                    self.0
                        .backups
                        .target_for(&b.target, &b.cluster)
                        .map_err(internal)?,
                ),
                object: b.object.clone(),
                key: if r.raw {
                    Vec::new()
                } else {
                    self.0.backups.key.for_backup(&b)
                },
            })
            .await?
            .into_inner();
        Ok(Box::pin(stream.map(|c| c.map_err(Error::from))))
    }

    pub async fn verify_backup(
        &self,
        caller: &Caller,
        r: pb::VerifyBackupOperatorRequest,
    ) -> Result<pb::Operation, Error> {
        let target = format!("backup {}", r.id);
        self.operation_request(caller, Role::Operator, "backup.verify", &target, |who| {
            let b = self.backup_row(&r.id)?;
            if b.state != crate::backups::state::SUCCEEDED {
                return Err(Error::failed_precondition(format!(
                    "backup {} is {}: only a succeeded backup can be verified",
                    b.id, b.state
                )));
            }
            let now = now_ms();
            let op = OperationRow {
                id: ops::new_id(),
                cluster: b.cluster.clone(),
                kind: ops::VERIFY_BACKUP.into(),
                state: store::op_state::PENDING.into(),
                params: serde_json::json!({ "backup": b.id }).to_string(),
                requested_by: who.to_string(),
                created_at_ms: now,
                updated_at_ms: now,
                error: String::new(),
            };
            self.0
                .store
                .tx(|tx| {
                    store::insert_operation(tx, &op)?;
                    store::log_operation(
                        tx,
                        &op.id,
                        &format!("requested by {who}: verify backup {}", b.id),
                    )
                })
                .map_err(internal)?;
            Ok(op)
        })
    }

    pub async fn restore_backup(
        &self,
        caller: &Caller,
        req: pb::RestoreBackupRequest,
    ) -> Result<pb::Operation, Error> {
        let r = req.clone();
        let target = if r.into_new_cluster.is_empty() {
            format!("cluster {} from backup {}", r.cluster, r.id)
        } else {
            format!("new cluster {} from backup {}", r.into_new_cluster, r.id)
        };
        let who = self.authorize_audited(caller, Role::Operator, "backup.restore", &target)?;
        let b = self.audited(&who, "backup.restore", &target, || self.restorable(&r))?;
        if r.into_new_cluster.is_empty() {
            return self.start_operation(&who, "backup.restore", &target, || {
                confirmed("restore in place", &r.cluster, &r.confirm)?;
                self.begin_operation(
                    &who,
                    &r.cluster,
                    ops::RESTORE,
                    plan(
                        serde_json::json!({ "restore": b.id, "to_time_ms": r.to_time_ms }),
                        format!(
                            "check backup {}, then erase every node, restore the primary from it \
                             and clone the replicas again",
                            b.id
                        ),
                    ),
                    |_, row, _, _| {
                        if row.engine != b.engine {
                            return refuse(Error::invalid_argument(format!(
                                "backup {} is of a {} cluster; {} runs {}",
                                b.id, b.engine, row.name, row.engine
                            )));
                        }
                        if row.state == "creating" || row.state == "deleting" {
                            return refuse(Error::failed_precondition(format!(
                                "cluster {} is {}",
                                row.name, row.state
                            )));
                        }
                        Ok(Ok(()))
                    },
                )
            });
        }
        let create = pb::CreateClusterRequest {
            name: r.into_new_cluster.clone(),
            engine: b.engine.clone(),
            mode: if r.nodes.len() > 1 {
                "primary-replica".into()
            } else {
                "single".into()
            },
            nodes: r.nodes.clone(),
            sync: false,
            require_tls: false,
        };
        let op = self.audited(
            &who,
            "cluster.create",
            &format!("cluster {}", create.name),
            || self.create_cluster_tx(&who, &create, Some((&b.id, r.to_time_ms))),
        )?;
        tracing::info!(cluster = %create.name, backup = %b.id, op = %op.id, "restore into a new cluster accepted");
        ops::spawn(self.0.clone(), op.id.clone());
        self.operation_pb(op)
    }

    /// Whether backup `r.id` can be restored as `r` asks: the backup, or the
    /// refusal.
    fn restorable(&self, r: &pb::RestoreBackupRequest) -> Result<crate::backups::BackupRow, Error> {
        let b = self.backup_row(&r.id)?;
        if !r.cluster.is_empty() && b.cluster != r.cluster {
            return Err(Error::invalid_argument(format!(
                "backup {} is of cluster {}, not {}",
                b.id, b.cluster, r.cluster
            )));
        }
        if b.state != crate::backups::state::SUCCEEDED {
            return Err(Error::failed_precondition(format!(
                "backup {} is {}{}: only a succeeded backup can be restored",
                b.id,
                b.state,
                if b.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", b.reason)
                }
            )));
        }
        if r.to_time_ms != 0 {
            check_to_time(&b, r.to_time_ms)?;
        }
        if r.into_new_cluster.is_empty() {
            return Ok(b);
        }
        if r.nodes.is_empty() {
            return Err(Error::invalid_argument(
                "--into-new-cluster needs --nodes: the free nodes of the new cluster (the \
                 first is its primary)",
            ));
        }
        // The built-in local target (no path) is each agent's own
        // directory; a configured path may be a shared mount (NFS).
        let node_private = self
            .0
            .backups
            .target(&b.target)
            .map(|t| t.kind == "local" && t.path.is_empty())
            .unwrap_or(false);
        if node_private && r.nodes[0] != b.node {
            return Err(Error::failed_precondition(format!(
                "backup {} is in node {}'s own local target, so only {} can restore it: \
                 make {} the new cluster's first node (free it first if it serves a \
                 cluster), or back up to a shared target (s3, or a local path every \
                 node mounts)",
                b.id, b.node, b.node, b.node
            )));
        }
        Ok(b)
    }

    pub async fn set_backup_schedule(
        &self,
        caller: &Caller,
        req: pb::SetBackupScheduleRequest,
    ) -> Result<pb::BackupSchedule, Error> {
        let r = req.clone();
        let target = format!(
            "cluster {} cron={:?} retain={}/{}ms target={}",
            r.cluster, r.cron, r.retain_count, r.retain_ms, r.target
        );
        let who = self.authorize_audited(caller, Role::Operator, "backup.schedule", &target)?;
        let op = self.audited(&who, "backup.schedule", &target, || {
            let row = self.get_cluster_row(&r.cluster)?;
            let before = self
                .0
                .store
                .read(|c| crate::backups::schedule_of(c, &r.cluster))
                .map_err(internal)?;
            if r.cron.is_empty() {
                self.0
                    .store
                    .read(|c| crate::backups::remove_schedule(c, &r.cluster))
                    .map_err(internal)?;
            } else {
                crate::backups::parse_cron(&r.cron).map_err(Error::invalid_argument)?;
                if r.retain_ms < 0 {
                    return Err(Error::invalid_argument("--retain must not be negative"));
                }
                let target_name = self.backup_target_of(&r.cluster, &r.target)?;
                let now = now_ms();
                self.0
                    .store
                    .read(|c| {
                        crate::backups::put_schedule(
                            c,
                            &crate::backups::ScheduleRow {
                                cluster: r.cluster.clone(),
                                cron: r.cron.clone(),
                                retain_count: r.retain_count,
                                retain_ms: r.retain_ms,
                                target: target_name,
                                last_run_ms: before.as_ref().map_or(now, |b| b.last_run_ms),
                                created_at_ms: before.as_ref().map_or(now, |b| b.created_at_ms),
                            },
                        )
                    })
                    .map_err(internal)?;
            }
            // PostgreSQL archives its WAL to the schedule's target: tell the
            // nodes when that changes.
            let after = self
                .0
                .store
                .read(|c| crate::backups::schedule_of(c, &r.cluster))
                .map_err(internal)?;
            let wal_changed = row.engine == "postgres"
                && before.as_ref().map(|s| &s.target) != after.as_ref().map(|s| &s.target);
            if !wal_changed || row.state != "running" {
                return Ok(None);
            }
            let summary = match &after {
                Some(s) => format!("archive WAL to target {}", s.target),
                None => "stop archiving WAL".to_string(),
            };
            match self.begin_operation(
                &who,
                &r.cluster,
                ops::CONFIGURE_BACKUPS,
                plan(serde_json::json!({}), summary),
                |_, _, _, _| Ok(Ok(())),
            ) {
                Ok(op) => Ok(Some(op)),
                Err(s) => {
                    // Put the schedule back as it was: nothing half-applied.
                    let _ = self.0.store.read(|c| match &before {
                        Some(b) => crate::backups::put_schedule(c, b),
                        None => crate::backups::remove_schedule(c, &r.cluster),
                    });
                    Err(s)
                }
            }
        })?;
        if let Some(op) = op {
            ops::spawn(self.0.clone(), op.id.clone());
        }
        self.schedule_pb(&r.cluster)
    }

    pub async fn get_backup_schedule(
        &self,
        caller: &Caller,
        req: pb::GetBackupScheduleRequest,
    ) -> Result<pb::BackupSchedule, Error> {
        caller.authorize(Role::Viewer)?;
        let cluster = req.cluster.clone();
        self.get_cluster_row(&cluster)?;
        self.schedule_pb(&cluster)
    }

    pub(crate) fn backup_row(&self, id: &str) -> Result<crate::backups::BackupRow, Error> {
        if id.is_empty() {
            return Err(Error::invalid_argument(
                "give a backup id (`corralctl backup list`)",
            ));
        }
        self.0
            .store
            .read(|c| crate::backups::get(c, id))
            .map_err(internal)?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no backup {id:?}: see `corralctl backup list` (expired and deleted backups \
                     are gone)"
                ))
            })
    }

    pub(crate) fn backup_pb(&self, b: &crate::backups::BackupRow) -> pb::Backup {
        let mut p = crate::backups::to_pb(b);
        if b.state == crate::backups::state::RUNNING {
            p.progress = self.0.ops.progress(&b.operation);
        }
        p
    }

    /// The target a backup of `cluster` goes to: the one asked for, else
    /// the schedule's, else the built-in local one; it must be configured.
    pub(crate) fn backup_target_of(&self, cluster: &str, asked: &str) -> Result<String, Error> {
        let name = if asked.is_empty() {
            self.0
                .store
                .read(|c| crate::backups::schedule_of(c, cluster))
                .map_err(internal)?
                .map(|s| s.target)
                .unwrap_or_else(|| crate::config::LOCAL_TARGET.to_string())
        } else {
            asked.to_string()
        };
        self.0
            .backups
            .target(&name)
            .map_err(|e| Error::invalid_argument(format!("{e:#}")))?;
        Ok(name)
    }

    pub(crate) fn schedule_pb(&self, cluster: &str) -> Result<pb::BackupSchedule, Error> {
        let s = self
            .0
            .store
            .read(|c| crate::backups::schedule_of(c, cluster))
            .map_err(internal)?;
        let engine = self.get_cluster_row(cluster)?.engine;
        Ok(match s {
            None => pb::BackupSchedule {
                cluster: cluster.into(),
                ..Default::default()
            },
            Some(s) => pb::BackupSchedule {
                next_run_ms: crate::backups::parse_cron(&s.cron)
                    .ok()
                    .and_then(|c| crate::backups::next_run(&c, s.last_run_ms.max(s.created_at_ms)))
                    .unwrap_or(0),
                cluster: s.cluster,
                cron: s.cron,
                retain_count: s.retain_count,
                retain_ms: s.retain_ms,
                target: s.target,
                last_run_ms: s.last_run_ms,
                wal_archiving: engine == "postgres",
            },
        })
    }
}

/// A point-in-time restore of `b` to `to_time_ms` is possible.
fn check_to_time(b: &crate::backups::BackupRow, to_time_ms: i64) -> Result<(), Error> {
    if b.engine != "postgres" {
        return Err(Error::invalid_argument(
            "--to-time needs PostgreSQL: other engines restore to the end of a backup",
        ));
    }
    if b.wal_prefix.is_empty() {
        return Err(Error::failed_precondition(format!(
            "backup {} was taken while the cluster archived no WAL (no backup \
             schedule), so it restores only to its end; drop --to-time",
            b.id
        )));
    }
    if to_time_ms < b.position_time_ms {
        return Err(Error::invalid_argument(format!(
            "--to-time {} is before backup {} was consistent ({}): choose an \
             earlier backup (`corralctl backup list {}`)",
            crate::backups::fmt_time(to_time_ms),
            b.id,
            crate::backups::fmt_time(b.position_time_ms),
            b.cluster
        )));
    }
    if to_time_ms > now_ms() {
        return Err(Error::invalid_argument(format!(
            "--to-time {} is in the future",
            crate::backups::fmt_time(to_time_ms)
        )));
    }
    Ok(())
}
