//! Node requests: add, remove, promote (switchover), reboot, credentials, list.

use super::internal;
use super::rules::{confirmed, member, plan, refuse, require_running};
use super::{Caller, Error, Service};
use crate::fleet::{host_of, Liveness};
use crate::ops;
use crate::store::{self};
use corral_proto::identity::Role;
use corral_proto::pb;
use std::time::Instant;
impl Service {
    pub async fn add_node(
        &self,
        caller: &Caller,
        r: pb::AddNodeRequest,
    ) -> Result<pb::Operation, Error> {
        let target = format!("cluster {} node {}", r.cluster, r.node);
        self.operation_request(caller, Role::Operator, "node.add", &target, |who| {
            self.begin_operation(
                who,
                &r.cluster,
                ops::ADD_NODE,
                plan(
                    serde_json::json!({ "node": r.node }),
                    format!("add {} as a replica", r.node),
                ),
                |tx, row, nodes, _| {
                    or_refuse!(require_running(row));
                    let Some(primary) = nodes.iter().find(|n| n.role == "primary") else {
                        return refuse(Error::failed_precondition(format!(
                            "cluster {} has no primary to clone from",
                            row.name
                        )));
                    };
                    if self.0.fleet.liveness_of(&primary.id, Instant::now()) != Liveness::Up {
                        return refuse(Error::failed_precondition(format!(
                            "the primary {} is down; a new replica is cloned from it",
                            primary.id
                        )));
                    }
                    or_refuse!(self.check_free_node(tx, &r.node)?);
                    if row.replication_password_enc.is_none() {
                        row.replication_password_enc = Some(or_refuse!(self.new_secret()));
                    }
                    row.mode = "primary-replica".into();
                    store::assign_node(tx, &r.node, &row.name, "replica")?;
                    Ok(Ok(()))
                },
            )
        })
    }

    pub async fn remove_node(
        &self,
        caller: &Caller,
        r: pb::RemoveNodeRequest,
    ) -> Result<pb::Operation, Error> {
        let target = format!("cluster {} node {}", r.cluster, r.node);
        self.operation_request(caller, Role::Operator, "node.remove", &target, |who| {
            confirmed("node removal", &r.node, &r.confirm)?;
            self.begin_operation(
                who,
                &r.cluster,
                ops::REMOVE_NODE,
                plan(
                    serde_json::json!({ "node": r.node }),
                    format!(
                        "remove {}: detach it, stop its engine, erase its data",
                        r.node
                    ),
                ),
                |_, row, nodes, _| {
                    let n = or_refuse!(member(nodes, &row.name, &r.node));
                    if nodes.len() == 1 {
                        return refuse(Error::failed_precondition(format!(
                            "{} is the last node of cluster {}; delete the cluster instead \
                             (`corralctl cluster delete {}`)",
                            n.id, row.name, row.name
                        )));
                    }
                    if n.role == "primary" {
                        return refuse(Error::failed_precondition(format!(
                            "{} is the primary of cluster {}; promote another node first \
                             (`corralctl node promote {} NODE --confirm NODE`)",
                            n.id, row.name, row.name
                        )));
                    }
                    let replicas = nodes.iter().filter(|n| n.role == "replica").count();
                    if row.sync && replicas == 1 {
                        return refuse(Error::failed_precondition(format!(
                            "{} is the only replica and cluster {} has sync=on: every commit waits \
                             for it. Add another replica first, or turn sync off \
                             (`corralctl cluster set {} sync=off`)",
                            n.id, row.name, row.name
                        )));
                    }
                    Ok(Ok(()))
                },
            )
        })
    }

    pub async fn promote_node(
        &self,
        caller: &Caller,
        r: pb::PromoteNodeRequest,
    ) -> Result<pb::Operation, Error> {
        let target = format!(
            "cluster {} node {}{}",
            r.cluster,
            r.node,
            if r.force { " (force)" } else { "" }
        );
        self.operation_request(caller, Role::Operator, "node.promote", &target, |who| {
            confirmed("promotion (a switchover pauses writes) of node", &r.node, &r.confirm)?;
            self.begin_operation(
                who,
                &r.cluster,
                ops::PROMOTE,
                plan(
                    serde_json::json!({ "node": r.node, "force": r.force }),
                    format!(
                        "switch over: promote {}{}",
                        r.node,
                        if r.force { " (--force)" } else { "" }
                    ),
                ),
                |_, row, nodes, _| {
                    let n = or_refuse!(member(nodes, &row.name, &r.node));
                    if n.role == "primary" {
                        // A primary of record running as a standby is one
                        // whose promotion did not complete: promoting it
                        // again is the fix (the monitor does it too, unless
                        // auto-failover is off).
                        let standby = self.0.fleet.get(&n.id).is_some_and(|l| {
                            l.engine.replication.is_some_and(|rep| rep.in_recovery)
                        });
                        if !standby {
                            return refuse(Error::failed_precondition(format!(
                                "{} is already the primary of cluster {}",
                                n.id, row.name
                            )));
                        }
                        or_refuse!(require_running(row));
                        return Ok(Ok(()));
                    }
                    or_refuse!(require_running(row));
                    let Some(primary) = nodes.iter().find(|n| n.role == "primary") else {
                        return refuse(Error::failed_precondition(format!(
                            "cluster {} has no primary",
                            row.name
                        )));
                    };
                    let blockers = self.promotion_blockers(n, primary);
                    if !blockers.is_empty() && !r.force {
                        return refuse(Error::failed_precondition(format!(
                            "refusing to promote {}: {}. Nothing was changed; fix that, or pass --force \
                             to promote anyway",
                            n.id,
                            blockers.join("; ")
                        )));
                    }
                    Ok(Ok(()))
                },
            )
        })
    }

    pub async fn reboot_node(
        &self,
        caller: &Caller,
        r: pb::RebootNodeRequest,
    ) -> Result<pb::Operation, Error> {
        let target = format!("cluster {} node {}", r.cluster, r.node);
        self.operation_request(caller, Role::Operator, "node.reboot", &target, |who| {
            self.begin_operation(
                who,
                &r.cluster,
                ops::REBOOT,
                plan(
                    serde_json::json!({ "node": r.node }),
                    format!("restart the engine on {}", r.node),
                ),
                |_, row, nodes, _| {
                    let n = or_refuse!(member(nodes, &row.name, &r.node));
                    if n.role == "primary" && !r.force {
                        return refuse(Error::failed_precondition(format!(
                            "{} is the primary of cluster {}: restarting it pauses writes until it is \
                             back. Pass --force to do it anyway, or promote another node first",
                            n.id, row.name
                        )));
                    }
                    if self.0.fleet.liveness_of(&n.id, Instant::now()) != Liveness::Up {
                        return refuse(Error::failed_precondition(format!(
                            "{} is down (no recent heartbeat); its agent must be running to restart the engine",
                            n.id
                        )));
                    }
                    Ok(Ok(()))
                },
            )
        })
    }

    pub async fn get_credentials(
        &self,
        caller: &Caller,
        req: pb::GetCredentialsRequest,
    ) -> Result<pb::Credentials, Error> {
        let target = format!("cluster {}", req.name);
        let who = self.authorize_audited(caller, Role::Operator, "cluster.credentials", &target)?;
        let name = req.name;
        self.audited(&who, "cluster.credentials", &target, || {
            let row = self.get_cluster_row(&name)?;
            let nodes = self
                .0
                .store
                .read(|c| store::nodes_of_cluster(c, &name))
                .map_err(internal)?;
            let primary = nodes.iter().find(|n| n.role == "primary").ok_or_else(|| {
                Error::failed_precondition(format!("cluster {name} has no primary"))
            })?;
            let host = host_of(&primary.address).to_string();
            let password = self
                .0
                .secrets
                .open(&row.admin_password_enc)
                .map_err(internal)?;
            let bracket = |h: &str| {
                if h.contains(':') {
                    format!("[{h}]:{}", row.port)
                } else {
                    format!("{h}:{}", row.port)
                }
            };
            // Every node, primary first: with target_session_attrs=read-write
            // libpq-based clients find the primary after a switchover.
            let mut hosts = vec![bracket(&host)];
            hosts.extend(
                nodes
                    .iter()
                    .filter(|n| n.role != "primary")
                    .map(|n| bracket(host_of(&n.address))),
            );
            let require_tls = self
                .0
                .store
                .read(|c| crate::cluster_tls::required(c, &name))
                .map_err(internal)?;
            let uri = crate::engines::uri_for(
                &row.engine,
                &row.admin_user,
                &password,
                &hosts,
                &row.database,
                require_tls,
            );
            Ok(pb::Credentials {
                user: row.admin_user,
                password,
                host,
                port: row.port,
                database: row.database,
                uri,
                ca_pem: self.0.ca.cert_pem().to_string(),
            })
        })
    }

    pub async fn list_nodes(
        &self,
        caller: &Caller,
        _req: pb::ListNodesRequest,
    ) -> Result<pb::ListNodesResponse, Error> {
        caller.authorize(Role::Viewer)?;
        let rows = self.0.store.read(store::list_nodes).map_err(internal)?;
        let now = Instant::now();
        Ok(pb::ListNodesResponse {
            nodes: rows.iter().map(|r| self.node_pb(r, now)).collect(),
        })
    }
}
