//! The operator API, called by `corralctl`.
//!
//! Every request is authorised by the role in the caller's certificate
//! (viewer < operator < admin). Every mutating request, and every read of a
//! secret, leaves an audit row with its result, refusals included.

use crate::fleet::Liveness;
use crate::store::{self, ClusterRow, NodeRow, OperationRow};
use crate::{ops, Coordinator};
use corral_proto::identity::{peer_identity, Identity, Role};
use corral_proto::pb;
use corral_proto::{names, now_ms};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct OperatorApi(pub Arc<Coordinator>);

/// The engines this build can run, and the modes it supports.
pub const ENGINES: &[&str] = &["postgres"];
pub const MODES: &[&str] = &["single"];

/// Token lifetime bounds: long enough to provision a VM, short enough that a
/// leaked token soon stops mattering.
const DEFAULT_TOKEN_TTL_S: u32 = 3600;
const MAX_TOKEN_TTL_S: u32 = 7 * 24 * 3600;

/// Checks that the caller is an operator with at least role `min`; a
/// refusal is logged.
fn authorize<T>(req: &Request<T>, min: Role) -> Result<(String, Role), Status> {
    let refused = |who: String, status: Status| {
        tracing::warn!(peer = %who, "operator API refused: {}", status.message());
        Err(status)
    };
    match peer_identity(req) {
        Ok(Identity::Operator { role, name }) if role >= min => Ok((name, role)),
        Ok(Identity::Operator { role, name }) => refused(
            name.clone(),
            Status::permission_denied(format!(
                "operator {name} has role {role}; this needs role {min} or higher"
            )),
        ),
        Ok(other) => refused(
            other.who(),
            Status::permission_denied(format!(
                "the operator API needs an operator certificate; certificate {other} is not one"
            )),
        ),
        Err(status) => refused("anonymous".into(), status),
    }
}

/// Who the caller claims to be, for the audit trail of a refused request.
fn caller<T>(req: &Request<T>) -> String {
    match peer_identity(req) {
        Ok(Identity::Operator { name, .. }) => name,
        Ok(other) => other.who(),
        Err(_) => "anonymous".into(),
    }
}

fn internal(e: anyhow::Error) -> Status {
    tracing::error!(error = %format!("{e:#}"), "operator API");
    Status::internal(format!("{e:#}"))
}

impl OperatorApi {
    /// [`authorize`], with a refusal also written to the audit trail: for
    /// mutating requests and reads of secrets.
    fn authorize_audited<T>(
        &self,
        req: &Request<T>,
        min: Role,
        action: &str,
        target: &str,
    ) -> Result<String, Status> {
        authorize(req, min)
            .map(|(who, _)| who)
            .inspect_err(|status| {
                let result = format!("refused: {}", status.message());
                self.0.store.audit(&caller(req), action, target, &result);
            })
    }

    /// Runs `f` and writes its outcome to the audit trail.
    fn audited<T>(
        &self,
        who: &str,
        action: &str,
        target: &str,
        f: impl FnOnce() -> Result<T, Status>,
    ) -> Result<T, Status> {
        let r = f();
        let result = match &r {
            Ok(_) => "ok".to_string(),
            Err(s) if s.code() == tonic::Code::Internal => format!("failed: {}", s.message()),
            Err(s) => format!("refused: {}", s.message()),
        };
        self.0.store.audit(who, action, target, &result);
        r
    }

    fn node_pb(&self, row: &NodeRow, now: Instant) -> pb::Node {
        let live = self.0.fleet.get(&row.id);
        let address = live
            .as_ref()
            .map(|l| l.address.clone())
            .unwrap_or_else(|| row.address.clone());
        pb::Node {
            id: row.id.clone(),
            address: host_of(&address).to_string(),
            cluster: row.cluster.clone().unwrap_or_default(),
            role: row.role.clone(),
            state: self.0.fleet.liveness_of(&row.id, now).as_str().to_string(),
            last_heartbeat_ms: live.as_ref().map(|l| l.last_seen_ms).unwrap_or(0),
            metrics: live.as_ref().map(|l| l.metrics),
            engine: live.map(|l| l.engine),
            enrolled_at_ms: row.enrolled_at_ms,
        }
    }

    fn cluster_pb(&self, row: &ClusterRow) -> Result<pb::Cluster, Status> {
        let nodes = self
            .0
            .store
            .read(|c| store::nodes_of_cluster(c, &row.name))
            .map_err(internal)?;
        let now = Instant::now();
        Ok(pb::Cluster {
            name: row.name.clone(),
            engine: row.engine.clone(),
            mode: row.mode.clone(),
            state: row.state.clone(),
            created_at_ms: row.created_at_ms,
            nodes: nodes.iter().map(|n| self.node_pb(n, now)).collect(),
            port: row.port,
            database: row.database.clone(),
        })
    }

    fn operation_pb(&self, row: OperationRow) -> Result<pb::Operation, Status> {
        let log = self
            .0
            .store
            .read(|c| store::operation_log(c, &row.id))
            .map_err(internal)?;
        Ok(pb::Operation {
            id: row.id,
            cluster: row.cluster,
            kind: row.kind,
            state: row.state,
            created_at_ms: row.created_at_ms,
            updated_at_ms: row.updated_at_ms,
            requested_by: row.requested_by,
            error: row.error,
            log: log
                .into_iter()
                .map(|(at_ms, message)| pb::OperationLogEntry { at_ms, message })
                .collect(),
        })
    }

    fn get_cluster_row(&self, name: &str) -> Result<ClusterRow, Status> {
        names::validate("cluster", name).map_err(Status::invalid_argument)?;
        self.0
            .store
            .read(|c| store::get_cluster(c, name))
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no cluster named {name:?}: see `corralctl cluster list`"
                ))
            })
    }

    /// Validates a create request against the current state and records the
    /// cluster, the node assignment, the operation and nothing else, in one
    /// transaction. Any refusal leaves the store untouched.
    fn create_cluster_tx(
        &self,
        who: &str,
        req: &pb::CreateClusterRequest,
    ) -> Result<OperationRow, Status> {
        names::validate("cluster", &req.name).map_err(Status::invalid_argument)?;
        if !ENGINES.contains(&req.engine.as_str()) {
            return Err(Status::invalid_argument(format!(
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
            return Err(Status::invalid_argument(format!(
                "unsupported mode {mode:?}: this version supports {}",
                MODES.join(", ")
            )));
        }
        let [node] = req.nodes.as_slice() else {
            return Err(Status::invalid_argument(format!(
                "a single-node cluster needs exactly one --node, got {}",
                req.nodes.len()
            )));
        };
        names::validate("node", node).map_err(Status::invalid_argument)?;
        if self.0.fleet.liveness_of(node, Instant::now()) != Liveness::Up {
            // Checked before the transaction too, for a clear message; an
            // unknown node falls through to the not-found error below.
            if self
                .0
                .store
                .read(|c| store::get_node(c, node))
                .map_err(internal)?
                .is_some()
            {
                return Err(Status::failed_precondition(format!(
                    "node {node} is not up (no recent heartbeat): check its agent, then retry"
                )));
            }
        }
        let password = corral_proto::random_password(32).map_err(internal)?;
        let sealed = self.0.secrets.seal(&password).map_err(internal)?;
        let now = now_ms();
        let op = OperationRow {
            id: ops::new_id(),
            cluster: req.name.clone(),
            kind: ops::CREATE_CLUSTER.into(),
            state: store::op_state::PENDING.into(),
            params: serde_json::json!({ "node": node }).to_string(),
            requested_by: who.into(),
            created_at_ms: now,
            updated_at_ms: now,
            error: String::new(),
        };
        let mut refusal = None;
        self.0
            .store
            .tx(|tx| {
                let r = (|| {
                    if store::get_cluster(tx, &req.name)?.is_some() {
                        return Ok(Err(Status::already_exists(format!(
                            "a cluster named {:?} already exists: choose another name",
                            req.name
                        ))));
                    }
                    let Some(n) = store::get_node(tx, node)? else {
                        return Ok(Err(Status::not_found(format!(
                            "unknown node {node:?}: see `corralctl node list` for enrolled nodes"
                        ))));
                    };
                    if let Some(c) = n.cluster {
                        return Ok(Err(Status::failed_precondition(format!(
                            "node {node} already belongs to cluster {c}: a node serves one cluster"
                        ))));
                    }
                    store::insert_cluster(
                        tx,
                        &ClusterRow {
                            name: req.name.clone(),
                            engine: req.engine.clone(),
                            mode: mode.into(),
                            state: "creating".into(),
                            port: 5432,
                            database: "defaultdb".into(),
                            admin_user: "admin".into(),
                            admin_password_enc: sealed.clone(),
                            created_at_ms: now,
                        },
                    )?;
                    store::assign_node(tx, node, &req.name, "primary")?;
                    store::insert_operation(tx, &op)?;
                    store::log_operation(
                        tx,
                        &op.id,
                        &format!("requested by {who}: {} on node {node}", req.engine),
                    )?;
                    Ok(Ok(()))
                })();
                match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(status)) => {
                        refusal = Some(status);
                        anyhow::bail!("refused")
                    }
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| refusal.take().unwrap_or_else(|| internal(e)))?;
        Ok(op)
    }
}

/// "10.0.0.1:7401" -> "10.0.0.1"; "[fd31::1]:7401" -> "fd31::1".
pub fn host_of(address: &str) -> &str {
    match address.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => address,
    }
}

#[tonic::async_trait]
impl pb::operator_server::Operator for OperatorApi {
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let (name, role) = authorize(&req, Role::Viewer)?;
        Ok(Response::new(pb::WhoAmIResponse {
            name,
            role: role.to_string(),
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let ttl = req.get_ref().ttl_seconds;
        let (action, target) = ("token.create", format!("ttl {ttl}s"));
        let who = self.authorize_audited(&req, Role::Admin, action, &target)?;
        self.audited(&who, action, &target, || {
            let ttl = if ttl == 0 { DEFAULT_TOKEN_TTL_S } else { ttl };
            if ttl > MAX_TOKEN_TTL_S {
                return Err(Status::invalid_argument(format!(
                    "token lifetime {ttl}s is too long: at most {MAX_TOKEN_TTL_S}s (7 days)"
                )));
            }
            let token = corral_proto::token::JoinToken::generate(&self.0.ca_fingerprint)
                .map_err(internal)?;
            let expires = now_ms() + i64::from(ttl) * 1000;
            self.0
                .store
                .read(|c| store::insert_token(c, &token.secret_hash(), &who, expires))
                .map_err(internal)?;
            Ok(Response::new(pb::CreateJoinTokenResponse {
                token: token.to_string(),
                expires_at_ms: expires,
            }))
        })
    }

    async fn create_cluster(
        &self,
        req: Request<pb::CreateClusterRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let target = format!("cluster {}", req.get_ref().name);
        let who = self.authorize_audited(&req, Role::Operator, "cluster.create", &target)?;
        let req = req.into_inner();
        let op = self.audited(&who, "cluster.create", &target, || {
            self.create_cluster_tx(&who, &req)
        })?;
        tracing::info!(cluster = %req.name, op = %op.id, "cluster create accepted");
        ops::spawn(self.0.clone(), op.id.clone());
        Ok(Response::new(self.operation_pb(op)?))
    }

    async fn list_clusters(
        &self,
        req: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        authorize(&req, Role::Viewer)?;
        let rows = self.0.store.read(store::list_clusters).map_err(internal)?;
        let clusters = rows
            .iter()
            .map(|r| self.cluster_pb(r))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListClustersResponse { clusters }))
    }

    async fn get_cluster(
        &self,
        req: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::Cluster>, Status> {
        authorize(&req, Role::Viewer)?;
        let row = self.get_cluster_row(&req.get_ref().name)?;
        Ok(Response::new(self.cluster_pb(&row)?))
    }

    async fn get_credentials(
        &self,
        req: Request<pb::GetCredentialsRequest>,
    ) -> Result<Response<pb::Credentials>, Status> {
        let target = format!("cluster {}", req.get_ref().name);
        let who = self.authorize_audited(&req, Role::Operator, "cluster.credentials", &target)?;
        let name = req.into_inner().name;
        self.audited(&who, "cluster.credentials", &target, || {
            let row = self.get_cluster_row(&name)?;
            let nodes = self
                .0
                .store
                .read(|c| store::nodes_of_cluster(c, &name))
                .map_err(internal)?;
            let primary = nodes.iter().find(|n| n.role == "primary").ok_or_else(|| {
                Status::failed_precondition(format!("cluster {name} has no primary"))
            })?;
            let host = host_of(&primary.address).to_string();
            let password = self
                .0
                .secrets
                .open(&row.admin_password_enc)
                .map_err(internal)?;
            let host_in_uri = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            let uri = format!(
                "postgresql://{}:{}@{}:{}/{}",
                row.admin_user, password, host_in_uri, row.port, row.database
            );
            Ok(Response::new(pb::Credentials {
                user: row.admin_user,
                password,
                host,
                port: row.port,
                database: row.database,
                uri,
            }))
        })
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        authorize(&req, Role::Viewer)?;
        let rows = self.0.store.read(store::list_nodes).map_err(internal)?;
        let now = Instant::now();
        Ok(Response::new(pb::ListNodesResponse {
            nodes: rows.iter().map(|r| self.node_pb(r, now)).collect(),
        }))
    }

    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        authorize(&req, Role::Viewer)?;
        let id = &req.get_ref().id;
        let row = self
            .0
            .store
            .read(|c| store::get_operation(c, id))
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no operation {id:?}: see `corralctl operation list`"
                ))
            })?;
        Ok(Response::new(self.operation_pb(row)?))
    }

    async fn list_operations(
        &self,
        req: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        authorize(&req, Role::Viewer)?;
        let cluster = Some(req.get_ref().cluster.as_str()).filter(|c| !c.is_empty());
        let rows = self
            .0
            .store
            .read(|c| store::list_operations(c, cluster))
            .map_err(internal)?;
        let operations = rows
            .into_iter()
            .map(|r| self.operation_pb(r))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListOperationsResponse { operations }))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        authorize(&req, Role::Admin)?;
        let limit = match req.get_ref().limit {
            0 => 1000,
            n => n,
        };
        let rows = self
            .0
            .store
            .read(|c| store::list_audit(c, limit))
            .map_err(internal)?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: rows
                .into_iter()
                .map(|r| pb::AuditEntry {
                    id: r.id,
                    at_ms: r.at_ms,
                    who: r.who,
                    action: r.action,
                    target: r.target,
                    result: r.result,
                })
                .collect(),
        }))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        authorize(&req, Role::Viewer)?;
        let r = req.get_ref();
        let node = Some(r.node.as_str()).filter(|s| !s.is_empty());
        let cluster = Some(r.cluster.as_str()).filter(|s| !s.is_empty());
        let limit = if r.limit == 0 { 200 } else { r.limit };
        let rows = self
            .0
            .store
            .read(|c| store::list_events(c, node, cluster, limit))
            .map_err(internal)?;
        Ok(Response::new(pb::ListEventsResponse {
            events: rows
                .into_iter()
                .map(|e| pb::Event {
                    id: e.id,
                    at_ms: e.at_ms,
                    node: e.node,
                    cluster: e.cluster,
                    kind: e.kind,
                    message: e.message,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(super::host_of("10.0.0.1:7401"), "10.0.0.1");
        assert_eq!(super::host_of("[fd31::1]:7401"), "fd31::1");
        assert_eq!(super::host_of("vm1"), "vm1");
    }
}
