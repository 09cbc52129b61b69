//! Cluster requests: create, list, show, set, delete, resync.

use super::internal;
use super::rules::{confirmed, member, plan, refuse, require_running};
use super::{Caller, Error, Service};
/// The engines this build can run, and the modes it supports.
pub use crate::engines::ENGINES;
use crate::ops;
use crate::store::{self, ClusterRow, OperationRow};
use corral_proto::identity::Role;
use corral_proto::pb;
use corral_proto::{names, now_ms};
pub const MODES: &[&str] = &["single", "primary-replica"];

impl Service {
    pub async fn create_cluster(
        &self,
        caller: &Caller,
        req: pb::CreateClusterRequest,
    ) -> Result<pb::Operation, Error> {
        let target = format!("cluster {}", req.name);
        let who = self.authorize_audited(caller, Role::Operator, "cluster.create", &target)?;
        let op = self.audited(&who, "cluster.create", &target, || {
            self.create_cluster_tx(&who, &req, None)
        })?;
        tracing::info!(cluster = %req.name, op = %op.id, "cluster create accepted");
        ops::spawn(self.0.clone(), op.id.clone());
        self.operation_pb(op)
    }

    pub async fn list_clusters(
        &self,
        caller: &Caller,
        _req: pb::ListClustersRequest,
    ) -> Result<pb::ListClustersResponse, Error> {
        caller.authorize(Role::Viewer)?;
        let rows = self.0.store.read(store::list_clusters).map_err(internal)?;
        let clusters = rows
            .iter()
            .map(|r| self.cluster_pb(r))
            .collect::<Result<_, _>>()?;
        Ok(pb::ListClustersResponse { clusters })
    }

    pub async fn get_cluster(
        &self,
        caller: &Caller,
        req: pb::GetClusterRequest,
    ) -> Result<pb::Cluster, Error> {
        caller.authorize(Role::Viewer)?;
        let row = self.get_cluster_row(&req.name)?;
        self.cluster_pb(&row)
    }

    pub async fn set_cluster(
        &self,
        caller: &Caller,
        req: pb::SetClusterRequest,
    ) -> Result<pb::SetClusterResponse, Error> {
        let r = req.clone();
        let mut changes = Vec::new();
        if let Some(v) = r.sync {
            changes.push(format!("sync={}", on_off(v)));
        }
        if let Some(v) = r.termination_protection {
            changes.push(format!("termination-protection={}", on_off(v)));
        }
        if let Some(v) = r.auto_failover {
            changes.push(format!("auto-failover={}", on_off(v)));
        }
        if let Some(v) = r.lease_ms {
            changes.push(format!("lease={v}ms"));
        }
        if let Some(v) = r.heartbeat_interval_ms {
            changes.push(format!("heartbeat={v}ms"));
        }
        if let Some(v) = &r.profile {
            changes.push(format!("profile={v}"));
        }
        let target = format!("cluster {} {}", r.name, changes.join(" "));
        let who = self.authorize_audited(caller, Role::Operator, "cluster.set", &target)?;
        let outcome = self.audited(&who, "cluster.set", &target, || {
            if changes.is_empty() {
                return Err(Error::invalid_argument(
                    "nothing to set: give sync=on|off, termination-protection=on|off, \
                     auto-failover=on|off, profile=lan|wan, lease=DURATION and/or \
                     heartbeat=DURATION",
                ));
            }
            let timing = timing_of(&r)?;
            let current = self.get_cluster_row(&r.name)?;
            // Settings the store holds and agents pick up from their next
            // heartbeat's answer: no operation needed.
            let flags = |row: &mut ClusterRow| -> Result<(), Error> {
                if let Some(v) = r.termination_protection {
                    row.termination_protection = v;
                }
                if let Some(v) = r.auto_failover {
                    row.auto_failover = v;
                }
                let lease = timing.0.unwrap_or(row.lease_ms);
                let heartbeat = timing.1.unwrap_or(row.heartbeat_ms);
                corral_proto::lease::validate(lease, heartbeat)
                    .map_err(|e| Error::invalid_argument(format!("{e}; nothing was changed")))?;
                row.set_lease(lease, now_ms());
                row.heartbeat_ms = heartbeat;
                Ok(())
            };
            let sync_changes = r.sync.is_some_and(|v| v != current.sync);
            if !sync_changes {
                let mut row = current;
                flags(&mut row)?;
                self.0
                    .store
                    .tx(|tx| store::update_cluster(tx, &row))
                    .map_err(internal)?;
                return Ok(None);
            }
            let sync = r.sync.unwrap_or(current.sync);
            let op = self.begin_operation(
                &who,
                &r.name,
                ops::SET_SYNC,
                plan(serde_json::json!({ "sync": sync }), changes.join(" ")),
                |_, row, nodes, _| {
                    or_refuse!(require_running(row));
                    if sync && !nodes.iter().any(|n| n.role == "replica") {
                        return refuse(Error::failed_precondition(format!(
                            "sync=on needs at least one replica to wait for; add one first \
                             (`corralctl node add {} NODE`)",
                            row.name
                        )));
                    }
                    row.sync = sync;
                    or_refuse!(flags(row));
                    Ok(Ok(()))
                },
            )?;
            Ok(Some(op))
        })?;
        let operation = match outcome {
            Some(op) => {
                ops::spawn(self.0.clone(), op.id.clone());
                Some(self.operation_pb(op)?)
            }
            None => None,
        };
        let row = self.get_cluster_row(&r.name)?;
        Ok(pb::SetClusterResponse {
            cluster: Some(self.cluster_pb(&row)?),
            operation,
        })
    }

    pub async fn delete_cluster(
        &self,
        caller: &Caller,
        r: pb::DeleteClusterRequest,
    ) -> Result<pb::Operation, Error> {
        let target = format!("cluster {}", r.name);
        self.operation_request(caller, Role::Operator, "cluster.delete", &target, |who| {
            confirmed("cluster deletion", &r.name, &r.confirm)?;
            let (params, summary) = if r.no_final_backup {
                (
                    serde_json::json!({}),
                    "delete the cluster, stop every engine and erase every node's data \
                     (no final backup)"
                        .to_string(),
                )
            } else {
                (
                    serde_json::json!({ "final_backup": crate::backups::new_id() }),
                    format!(
                        "take a final backup (kept for {}), then delete the cluster, stop every \
                         engine and erase every node's data",
                        crate::backups::fmt_duration(self.0.backups.config.final_backup_retain)
                    ),
                )
            };
            self.begin_operation(
                who,
                &r.name,
                ops::DELETE_CLUSTER,
                plan(params, summary),
                |_, row, _, _| {
                    if row.termination_protection {
                        return refuse(Error::failed_precondition(format!(
                            "cluster {} has termination protection on; turn it off first with \
                             `corralctl cluster set {} termination-protection=off`",
                            row.name, row.name
                        )));
                    }
                    row.state = "deleting".into();
                    Ok(Ok(()))
                },
            )
        })
    }

    pub async fn resync_cluster(
        &self,
        caller: &Caller,
        r: pb::ResyncClusterRequest,
    ) -> Result<pb::Operation, Error> {
        let target = if r.node.is_empty() {
            format!("cluster {}", r.name)
        } else {
            format!("cluster {} node {}", r.name, r.node)
        };
        self.operation_request(caller, Role::Operator, "cluster.resync", &target, |who| {
            confirmed("resync", &r.name, &r.confirm)?;
            self.begin_operation(
                who,
                &r.name,
                ops::RESYNC,
                plan(serde_json::json!({}), ""),
                |_, row, nodes, plan| {
                    if nodes.len() < 2 {
                        return refuse(Error::failed_precondition(format!(
                            "cluster {} has a single node: there is no replica to resync",
                            row.name
                        )));
                    }
                    let chosen: Vec<String> = if r.node.is_empty() {
                        nodes
                            .iter()
                            .filter(|n| n.role == "replica")
                            .map(|n| n.id.clone())
                            .collect()
                    } else {
                        let n = or_refuse!(member(nodes, &row.name, &r.node));
                        if n.role == "primary" {
                            return refuse(Error::failed_precondition(format!(
                                "{} is the primary, the source every replica is cloned from; \
                                 to rebuild it, promote another node first",
                                n.id
                            )));
                        }
                        vec![n.id.clone()]
                    };
                    plan.summary =
                        format!("erase and re-clone {} from the primary", chosen.join(", "));
                    plan.params = serde_json::json!({ "nodes": chosen });
                    Ok(Ok(()))
                },
            )
        })
    }

    /// Validates a create request against the current state and records the
    /// cluster, the node assignments, the operation and nothing else, in one
    /// transaction. Any refusal leaves the store untouched.
    pub(crate) fn create_cluster_tx(
        &self,
        who: &str,
        req: &pb::CreateClusterRequest,
        restore: Option<(&str, i64)>,
    ) -> Result<OperationRow, Error> {
        let mode = validate_create(req)?;
        let sealed = self.new_secret()?;
        let replication = self.new_secret()?;
        let now = now_ms();
        let op = OperationRow {
            id: ops::new_id(),
            cluster: req.name.clone(),
            kind: ops::CREATE_CLUSTER.into(),
            state: store::op_state::PENDING.into(),
            params: match restore {
                Some((backup, to_time_ms)) => serde_json::json!({
                    "nodes": req.nodes, "restore": backup, "to_time_ms": to_time_ms
                }),
                None => serde_json::json!({ "nodes": req.nodes }),
            }
            .to_string(),
            requested_by: who.into(),
            created_at_ms: now,
            updated_at_ms: now,
            error: String::new(),
        };
        self.refusable_tx(|tx| {
            if store::get_cluster(tx, &req.name)?.is_some() {
                return Ok(Err(Error::already_exists(format!(
                    "a cluster named {:?} already exists: choose another name",
                    req.name
                ))));
            }
            for n in &req.nodes {
                if let Err(s) = self.check_free_node(tx, n)? {
                    return Ok(Err(s));
                }
            }
            store::insert_cluster(
                tx,
                &ClusterRow {
                    name: req.name.clone(),
                    engine: req.engine.clone(),
                    mode: mode.into(),
                    state: "creating".into(),
                    port: u32::from(crate::engines::default_port(&req.engine)),
                    database: crate::engines::default_database(&req.engine).into(),
                    admin_user: "admin".into(),
                    admin_password_enc: sealed.clone(),
                    created_at_ms: now,
                    sync: req.sync,
                    termination_protection: false,
                    replication_password_enc: Some(replication.clone()),
                    term: 1,
                    auto_failover: true,
                    lease_ms: corral_proto::lease::DEFAULT_LEASE_MS,
                    heartbeat_ms: corral_proto::lease::DEFAULT_HEARTBEAT_MS,
                    prev_lease_ms: 0,
                    lease_changed_at_ms: 0,
                    allowlist_version: 0,
                },
            )?;
            crate::cluster_tls::set(tx, &req.name, req.require_tls)?;
            for (i, n) in req.nodes.iter().enumerate() {
                let role = if i == 0 { "primary" } else { "replica" };
                store::assign_node(tx, n, &req.name, role)?;
            }
            store::insert_operation(tx, &op)?;
            store::log_operation(
                tx,
                &op.id,
                &format!(
                    "requested by {who}: {} {mode} on {}{}",
                    req.engine,
                    req.nodes.join(", "),
                    if req.sync { " (sync)" } else { "" }
                ),
            )?;
            Ok(Ok(()))
        })?;
        Ok(op)
    }
}

fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

/// The checks of a create request that need no store: names, engine, mode
/// and node count. Returns the mode.
fn validate_create(req: &pb::CreateClusterRequest) -> Result<&str, Error> {
    names::validate("cluster", &req.name).map_err(Error::invalid_argument)?;
    if !ENGINES.contains(&req.engine.as_str()) {
        return Err(Error::invalid_argument(format!(
            "unknown engine {:?}: supported engines are {}",
            req.engine,
            ENGINES.join(", ")
        )));
    }
    let mode = if req.mode.is_empty() {
        "single"
    } else {
        req.mode.as_str()
    };
    if !MODES.contains(&mode) {
        return Err(Error::invalid_argument(format!(
            "unsupported mode {mode:?}: this version supports {}",
            MODES.join(", ")
        )));
    }
    match (mode, req.nodes.len()) {
        ("single", 1) => {}
        ("single", n) => {
            return Err(Error::invalid_argument(format!(
                "a single-node cluster needs exactly one node, got {n}; for replicas use \
                 --mode primary-replica"
            )))
        }
        (_, 0) => {
            return Err(Error::invalid_argument(
                "a primary-replica cluster needs at least one node (the first is the primary)",
            ))
        }
        _ => {}
    }
    for (i, n) in req.nodes.iter().enumerate() {
        names::validate("node", n).map_err(Error::invalid_argument)?;
        if req.nodes[..i].contains(n) {
            return Err(Error::invalid_argument(format!(
                "node {n} is listed twice: each node holds one copy of the data"
            )));
        }
    }
    if req.sync && req.nodes.len() < 2 {
        return Err(Error::invalid_argument(
            "--sync needs at least one replica to wait for: list two or more nodes",
        ));
    }
    Ok(mode)
}

/// The lease and heartbeat a `cluster set` asks for: a profile's, or those
/// given one by one (each None when left as it is).
fn timing_of(r: &pb::SetClusterRequest) -> Result<(Option<u32>, Option<u32>), Error> {
    let Some(name) = &r.profile else {
        return Ok((r.lease_ms, r.heartbeat_interval_ms));
    };
    if r.lease_ms.is_some() || r.heartbeat_interval_ms.is_some() {
        return Err(Error::invalid_argument(format!(
            "profile={name} sets the lease and the heartbeat: give either the profile or \
             lease=DURATION heartbeat=DURATION, not both; nothing was changed"
        )));
    }
    let (lease, heartbeat) = corral_proto::lease::profile(name)
        .map_err(|e| Error::invalid_argument(format!("{e}; nothing was changed")))?;
    Ok((Some(lease), Some(heartbeat)))
}
