//! The operator API, called by `corralctl`.
//!
//! Every request is authorised by the role in the caller's certificate
//! (viewer < operator < admin). Every mutating request, and every read of a
//! secret, leaves an audit row with its result, refusals included. Reading
//! a node's logs counts as a read of a secret: a failed statement is logged
//! with its text, values (and passwords) included.

use crate::fleet::Liveness;
use crate::store::{self, ClusterRow, NodeRow, OperationRow};
use crate::{allowlist, listing, ops, Coordinator};
use corral_proto::identity::{peer_identity, Identity, Role};
use corral_proto::pb;
use corral_proto::{names, now_ms};
use rusqlite::Transaction;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct OperatorApi(pub Arc<Coordinator>);

/// The engines this build can run, and the modes it supports.
pub use crate::engines::ENGINES;
pub const MODES: &[&str] = &["single", "primary-replica"];

/// A planned switchover is refused (without --force) to a replica further
/// behind than this: it would lengthen the pause while it catches up.
pub const MAX_PROMOTE_LAG_BYTES: i64 = 16 << 20;

/// How a replica is doing, from its primary's point of view.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    /// "streaming", "sync", "catching up", "not streaming"; "" for a primary.
    pub state: String,
    /// -1 when unknown.
    pub lag_bytes: i64,
    pub lag_ms: i64,
}

/// Token lifetime bounds: long enough to provision a VM, short enough that a
/// leaked token soon stops mattering.
const DEFAULT_TOKEN_TTL_S: u32 = 3600;
const MAX_TOKEN_TTL_S: u32 = 7 * 24 * 3600;

/// Checks that the caller is an operator with at least role `min`; a
/// refusal is logged.
pub(crate) fn authorize<T>(req: &Request<T>, min: Role) -> Result<(String, Role), Status> {
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

pub(crate) fn internal(e: anyhow::Error) -> Status {
    tracing::error!(error = %format!("{e:#}"), "operator API");
    Status::internal(format!("{e:#}"))
}

impl OperatorApi {
    /// [`authorize`], with a refusal also written to the audit trail: for
    /// mutating requests and reads of secrets.
    pub(crate) fn authorize_audited<T>(
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
    pub(crate) fn audited<T>(
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

    /// The replication state of `node` as its cluster's primary reports it.
    /// Reads the store: not for use inside a store transaction.
    pub fn replica_view(&self, row: &NodeRow) -> ReplicaView {
        let primary = row.cluster.as_ref().and_then(|cluster| {
            self.0
                .store
                .read(|c| store::nodes_of_cluster(c, cluster))
                .ok()
                .and_then(|nodes| nodes.into_iter().find(|n| n.role == "primary"))
        });
        self.replica_view_from(row, primary.map(|p| p.id).as_deref())
    }

    /// [`Self::replica_view`] given the primary's id: the live view only.
    fn replica_view_from(&self, row: &NodeRow, primary: Option<&str>) -> ReplicaView {
        if row.role != "replica" {
            return ReplicaView {
                state: String::new(),
                lag_bytes: -1,
                lag_ms: -1,
            };
        }
        let primary_rep = primary
            .and_then(|p| self.0.fleet.get(p))
            .and_then(|l| l.engine.replication);
        let own = self.0.fleet.get(&row.id).and_then(|l| l.engine.replication);
        replica_view(&row.id, primary_rep.as_ref(), own.as_ref())
    }

    fn node_pb(&self, row: &NodeRow, now: Instant) -> pb::Node {
        let view = self.replica_view(row);
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
            lag_bytes: view.lag_bytes,
            lag_ms: view.lag_ms,
            replication: view.state,
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
            sync: row.sync,
            termination_protection: row.termination_protection,
            term: row.term,
            auto_failover: row.auto_failover,
            lease_ms: row.lease_ms,
            heartbeat_interval_ms: row.heartbeat_ms,
            failover_status: self.0.judgements.get(&row.name).unwrap_or_default(),
        })
    }

    fn operation_pb(&self, row: OperationRow) -> Result<pb::Operation, Status> {
        let progress = self.0.ops.progress(&row.id);
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
            progress,
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

    /// Runs `f` in one transaction; `f` answers Ok(Err(status)) to refuse,
    /// which rolls everything back and returns that status.
    pub(crate) fn refusable_tx<T>(
        &self,
        f: impl FnOnce(&Transaction) -> anyhow::Result<Result<T, Status>>,
    ) -> Result<T, Status> {
        let mut refusal = None;
        self.0
            .store
            .tx(|tx| match f(tx)? {
                Ok(v) => Ok(v),
                Err(status) => {
                    refusal = Some(status);
                    anyhow::bail!("refused")
                }
            })
            .map_err(|e| refusal.take().unwrap_or_else(|| internal(e)))
    }

    /// Checks that a node exists, is up and belongs to no cluster.
    fn check_free_node(&self, tx: &Transaction, node: &str) -> anyhow::Result<Result<(), Status>> {
        if let Err(e) = names::validate("node", node) {
            return Ok(Err(Status::invalid_argument(e)));
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
        if self.0.fleet.liveness_of(node, Instant::now()) != Liveness::Up {
            return Ok(Err(Status::failed_precondition(format!(
                "node {node} is not up (no recent heartbeat): check its agent, then retry"
            ))));
        }
        Ok(Ok(()))
    }

    /// Validates a create request against the current state and records the
    /// cluster, the node assignments, the operation and nothing else, in one
    /// transaction. Any refusal leaves the store untouched.
    fn create_cluster_tx(
        &self,
        who: &str,
        req: &pb::CreateClusterRequest,
        restore: Option<(&str, i64)>,
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
        match (mode, req.nodes.len()) {
            ("single", 1) => {}
            ("single", n) => {
                return Err(Status::invalid_argument(format!(
                    "a single-node cluster needs exactly one node, got {n}; for replicas use \
                     --mode primary-replica"
                )))
            }
            (_, 0) => {
                return Err(Status::invalid_argument(
                    "a primary-replica cluster needs at least one node (the first is the primary)",
                ))
            }
            _ => {}
        }
        for (i, n) in req.nodes.iter().enumerate() {
            names::validate("node", n).map_err(Status::invalid_argument)?;
            if req.nodes[..i].contains(n) {
                return Err(Status::invalid_argument(format!(
                    "node {n} is listed twice: each node holds one copy of the data"
                )));
            }
        }
        if req.sync && req.nodes.len() < 2 {
            return Err(Status::invalid_argument(
                "--sync needs at least one replica to wait for: list two or more nodes",
            ));
        }
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
                return Ok(Err(Status::already_exists(format!(
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

    fn new_secret(&self) -> Result<Vec<u8>, Status> {
        let password = corral_proto::random_password(32).map_err(internal)?;
        self.0.secrets.seal(&password).map_err(internal)
    }

    /// Records operation `kind` on `cluster` after `check` accepts it, in
    /// one transaction that also makes sure no other operation holds the
    /// cluster. `check` sees the cluster and its nodes and may update them.
    fn begin_operation(
        &self,
        who: &str,
        cluster: &str,
        kind: &str,
        plan: Plan,
        check: impl FnOnce(
            &Transaction,
            &mut ClusterRow,
            &[NodeRow],
            &mut Plan,
        ) -> anyhow::Result<Result<(), Status>>,
    ) -> Result<OperationRow, Status> {
        names::validate("cluster", cluster).map_err(Status::invalid_argument)?;
        let now = now_ms();
        let mut plan = plan;
        self.refusable_tx(|tx| {
            let Some(mut row) = store::get_cluster(tx, cluster)? else {
                return Ok(Err(Status::not_found(format!(
                    "no cluster named {cluster:?}: see `corralctl cluster list`"
                ))));
            };
            // Telling the nodes where WAL goes can run beside a backup.
            let running = if kind == ops::CONFIGURE_BACKUPS {
                store::holding_operation_of(tx, cluster)?
            } else {
                store::unfinished_operation_of(tx, cluster)?
            };
            if let Some(running) = running {
                return Ok(Err(busy(&running)));
            }
            let nodes = store::nodes_of_cluster(tx, cluster)?;
            if let Err(s) = check(tx, &mut row, &nodes, &mut plan)? {
                return Ok(Err(s));
            }
            let op = OperationRow {
                id: ops::new_id(),
                cluster: cluster.into(),
                kind: kind.into(),
                state: store::op_state::PENDING.into(),
                params: plan.params.to_string(),
                requested_by: who.into(),
                created_at_ms: now,
                updated_at_ms: now,
                error: String::new(),
            };
            store::update_cluster(tx, &row)?;
            store::insert_operation(tx, &op)?;
            store::log_operation(tx, &op.id, &format!("requested by {who}: {}", plan.summary))?;
            Ok(Ok(op))
        })
    }

    /// Runs an operation request: authorised, audited, recorded, started.
    fn start_operation(
        &self,
        who: &str,
        action: &str,
        target: &str,
        record: impl FnOnce() -> Result<OperationRow, Status>,
    ) -> Result<Response<pb::Operation>, Status> {
        let op = self.audited(who, action, target, record)?;
        tracing::info!(op = %op.id, kind = %op.kind, cluster = %op.cluster, "operation accepted");
        ops::spawn(self.0.clone(), op.id.clone());
        Ok(Response::new(self.operation_pb(op)?))
    }

    /// Whether `node` looks fit to become the primary, from the live view.
    fn promotion_blockers(&self, node: &NodeRow, primary: &NodeRow) -> Vec<String> {
        let mut why = Vec::new();
        let now = Instant::now();
        if self.0.fleet.liveness_of(&node.id, now) != Liveness::Up {
            why.push(format!("{} is not up (no recent heartbeat)", node.id));
        }
        let engine = self.0.fleet.get(&node.id).map(|l| l.engine);
        match engine {
            Some(e) if e.state == pb::EngineState::Running as i32 && e.healthy => {}
            Some(e) => why.push(format!(
                "{}'s engine is {} ({})",
                node.id,
                pb::EngineState::try_from(e.state)
                    .unwrap_or_default()
                    .label(),
                if e.message.is_empty() {
                    "not healthy"
                } else {
                    e.message.as_str()
                }
            )),
            None => why.push(format!("{}'s engine has not reported", node.id)),
        }
        let view = self.replica_view_from(node, Some(&primary.id));
        if !matches!(view.state.as_str(), "streaming" | "sync") {
            why.push(format!(
                "{} is not streaming from {} ({})",
                node.id,
                primary.id,
                if view.state.is_empty() {
                    "unknown"
                } else {
                    view.state.as_str()
                }
            ));
        } else if view.lag_bytes < 0 {
            why.push(format!(
                "{} has not yet reported how far it has replayed",
                node.id
            ));
        } else if view.lag_bytes > MAX_PROMOTE_LAG_BYTES {
            why.push(format!(
                "{} is {} bytes behind the primary (limit {MAX_PROMOTE_LAG_BYTES})",
                node.id, view.lag_bytes
            ));
        }
        if self.0.fleet.liveness_of(&primary.id, now) != Liveness::Up {
            why.push(format!(
                "the primary {} is down, so a planned switchover cannot stop it first; writes it \
                 acknowledged that did not reach {} would be lost",
                primary.id, node.id
            ));
        }
        why
    }
}

/// What an operation will do: its parameters and a line for its log.
struct Plan {
    params: serde_json::Value,
    summary: String,
}

fn plan(params: serde_json::Value, summary: impl Into<String>) -> Plan {
    Plan {
        params,
        summary: summary.into(),
    }
}

/// The refusal for a request on a cluster another operation holds.
fn busy(running: &OperationRow) -> Status {
    Status::failed_precondition(format!(
        "operation {} ({}) is {} on cluster {} (requested by {}); wait for it to finish \
         (`corralctl operation show {}`) and retry",
        running.id, running.kind, running.state, running.cluster, running.requested_by, running.id
    ))
}

/// The confirmation a destructive request must carry.
pub(crate) fn confirmed(what: &str, name: &str, confirm: &str) -> Result<(), Status> {
    if confirm == name {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "this {what} is destructive: repeat the {} name to confirm (--confirm {name})",
            if what.contains("node") {
                "node"
            } else {
                "cluster"
            }
        )))
    }
}

fn refuse<T>(status: Status) -> anyhow::Result<Result<T, Status>> {
    Ok(Err(status))
}

/// Inside a [`OperatorApi::refusable_tx`] check: the value, or return the
/// refusal.
macro_rules! or_refuse {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(status) => return Ok(Err(status)),
        }
    };
}

fn require_running(row: &ClusterRow) -> Result<(), Status> {
    if row.state == "running" {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "cluster {} is {}, not running: see `corralctl operation list --cluster {}`",
            row.name, row.state, row.name
        )))
    }
}

fn alert_pb(a: crate::notify::Alert, state: &str) -> pb::AlertInfo {
    pb::AlertInfo {
        name: a.name,
        fingerprint: a.fingerprint,
        state: state.to_string(),
        severity: a.severity.as_str().to_string(),
        labels: a.labels.into_iter().collect(),
        summary: a.summary,
        description: a.description,
        started_at_ms: a.starts_at_ms,
        ended_at_ms: a.ends_at_ms.unwrap_or_default(),
        repeats: a.repeat,
    }
}

fn member<'a>(nodes: &'a [NodeRow], cluster: &str, node: &str) -> Result<&'a NodeRow, Status> {
    names::validate("node", node).map_err(Status::invalid_argument)?;
    nodes.iter().find(|n| n.id == node).ok_or_else(|| {
        Status::not_found(format!(
            "node {node:?} is not a member of cluster {cluster}: see `corralctl cluster show {cluster}`"
        ))
    })
}

/// Pure: how replica `node` is doing, from its primary's replication report
/// (and its own, when the primary does not see it).
pub fn replica_view(
    node: &str,
    primary: Option<&pb::Replication>,
    own: Option<&pb::Replication>,
) -> ReplicaView {
    let Some(p) = primary.filter(|p| !p.in_recovery) else {
        return ReplicaView {
            state: "not streaming".into(),
            lag_bytes: -1,
            lag_ms: -1,
        };
    };
    match p.standbys.iter().find(|s| s.name == node) {
        Some(s) => ReplicaView {
            state: match (s.state.as_str(), s.sync_state.as_str()) {
                ("streaming", "sync" | "quorum") => "sync".into(),
                ("streaming", _) => "streaming".into(),
                ("catchup", _) | ("startup", _) | ("backup", _) => "catching up".into(),
                (other, _) => other.to_string(),
            },
            // 0 until the standby's first feedback message (PostgreSQL),
            // or always (MariaDB's primary does not know its replicas'
            // positions): the replica's own report, else unknown.
            lag_bytes: if s.replay_lsn != 0 {
                p.lsn.saturating_sub(s.replay_lsn) as i64
            } else {
                own.filter(|o| o.in_recovery && o.lsn > 0)
                    .map(|o| p.lsn.saturating_sub(o.lsn) as i64)
                    .unwrap_or(-1)
            },
            lag_ms: s.replay_lag_ms as i64,
        },
        None => ReplicaView {
            state: "not streaming".into(),
            lag_bytes: own
                .filter(|o| o.in_recovery && o.lsn > 0)
                .map(|o| p.lsn.saturating_sub(o.lsn) as i64)
                .unwrap_or(-1),
            lag_ms: -1,
        },
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
    type LogsStream = crate::logs::LogsStream;

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
            self.create_cluster_tx(&who, &req, None)
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

    async fn set_cluster(
        &self,
        req: Request<pb::SetClusterRequest>,
    ) -> Result<Response<pb::SetClusterResponse>, Status> {
        let r = req.get_ref().clone();
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
        let target = format!("cluster {} {}", r.name, changes.join(" "));
        let who = self.authorize_audited(&req, Role::Operator, "cluster.set", &target)?;
        let outcome = self.audited(&who, "cluster.set", &target, || {
            if changes.is_empty() {
                return Err(Status::invalid_argument(
                    "nothing to set: give sync=on|off, termination-protection=on|off, \
                     auto-failover=on|off, lease=DURATION and/or heartbeat=DURATION",
                ));
            }
            let current = self.get_cluster_row(&r.name)?;
            // Settings the store holds and agents pick up from their next
            // heartbeat's answer: no operation needed.
            let flags = |row: &mut ClusterRow| -> Result<(), Status> {
                if let Some(v) = r.termination_protection {
                    row.termination_protection = v;
                }
                if let Some(v) = r.auto_failover {
                    row.auto_failover = v;
                }
                let lease = r.lease_ms.unwrap_or(row.lease_ms);
                let heartbeat = r.heartbeat_interval_ms.unwrap_or(row.heartbeat_ms);
                corral_proto::lease::validate(lease, heartbeat)
                    .map_err(|e| Status::invalid_argument(format!("{e}; nothing was changed")))?;
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
                        return refuse(Status::failed_precondition(format!(
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
        Ok(Response::new(pb::SetClusterResponse {
            cluster: Some(self.cluster_pb(&row)?),
            operation,
        }))
    }

    async fn delete_cluster(
        &self,
        req: Request<pb::DeleteClusterRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = format!("cluster {}", r.name);
        let who = self.authorize_audited(&req, Role::Operator, "cluster.delete", &target)?;
        self.start_operation(&who, "cluster.delete", &target, || {
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
                &who,
                &r.name,
                ops::DELETE_CLUSTER,
                plan(params, summary),
                |_, row, _, _| {
                    if row.termination_protection {
                        return refuse(Status::failed_precondition(format!(
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

    async fn resync_cluster(
        &self,
        req: Request<pb::ResyncClusterRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = if r.node.is_empty() {
            format!("cluster {}", r.name)
        } else {
            format!("cluster {} node {}", r.name, r.node)
        };
        let who = self.authorize_audited(&req, Role::Operator, "cluster.resync", &target)?;
        self.start_operation(&who, "cluster.resync", &target, || {
            confirmed("resync", &r.name, &r.confirm)?;
            self.begin_operation(
                &who,
                &r.name,
                ops::RESYNC,
                plan(serde_json::json!({}), ""),
                |_, row, nodes, plan| {
                    if nodes.len() < 2 {
                        return refuse(Status::failed_precondition(format!(
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
                            return refuse(Status::failed_precondition(format!(
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

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = format!("cluster {} node {}", r.cluster, r.node);
        let who = self.authorize_audited(&req, Role::Operator, "node.add", &target)?;
        self.start_operation(&who, "node.add", &target, || {
            self.begin_operation(
                &who,
                &r.cluster,
                ops::ADD_NODE,
                plan(
                    serde_json::json!({ "node": r.node }),
                    format!("add {} as a replica", r.node),
                ),
                |tx, row, nodes, _| {
                    or_refuse!(require_running(row));
                    let Some(primary) = nodes.iter().find(|n| n.role == "primary") else {
                        return refuse(Status::failed_precondition(format!(
                            "cluster {} has no primary to clone from",
                            row.name
                        )));
                    };
                    if self.0.fleet.liveness_of(&primary.id, Instant::now()) != Liveness::Up {
                        return refuse(Status::failed_precondition(format!(
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

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = format!("cluster {} node {}", r.cluster, r.node);
        let who = self.authorize_audited(&req, Role::Operator, "node.remove", &target)?;
        self.start_operation(&who, "node.remove", &target, || {
            confirmed("node removal", &r.node, &r.confirm)?;
            self.begin_operation(
                &who,
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
                        return refuse(Status::failed_precondition(format!(
                            "{} is the last node of cluster {}; delete the cluster instead \
                             (`corralctl cluster delete {}`)",
                            n.id, row.name, row.name
                        )));
                    }
                    if n.role == "primary" {
                        return refuse(Status::failed_precondition(format!(
                            "{} is the primary of cluster {}; promote another node first \
                             (`corralctl node promote {} NODE --confirm NODE`)",
                            n.id, row.name, row.name
                        )));
                    }
                    let replicas = nodes.iter().filter(|n| n.role == "replica").count();
                    if row.sync && replicas == 1 {
                        return refuse(Status::failed_precondition(format!(
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

    async fn promote_node(
        &self,
        req: Request<pb::PromoteNodeRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = format!(
            "cluster {} node {}{}",
            r.cluster,
            r.node,
            if r.force { " (force)" } else { "" }
        );
        let who = self.authorize_audited(&req, Role::Operator, "node.promote", &target)?;
        self.start_operation(&who, "node.promote", &target, || {
            confirmed("promotion (a switchover pauses writes) of node", &r.node, &r.confirm)?;
            self.begin_operation(
                &who,
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
                            return refuse(Status::failed_precondition(format!(
                                "{} is already the primary of cluster {}",
                                n.id, row.name
                            )));
                        }
                        or_refuse!(require_running(row));
                        return Ok(Ok(()));
                    }
                    or_refuse!(require_running(row));
                    let Some(primary) = nodes.iter().find(|n| n.role == "primary") else {
                        return refuse(Status::failed_precondition(format!(
                            "cluster {} has no primary",
                            row.name
                        )));
                    };
                    let blockers = self.promotion_blockers(n, primary);
                    if !blockers.is_empty() && !r.force {
                        return refuse(Status::failed_precondition(format!(
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

    async fn reboot_node(
        &self,
        req: Request<pb::RebootNodeRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = format!("cluster {} node {}", r.cluster, r.node);
        let who = self.authorize_audited(&req, Role::Operator, "node.reboot", &target)?;
        self.start_operation(&who, "node.reboot", &target, || {
            self.begin_operation(
                &who,
                &r.cluster,
                ops::REBOOT,
                plan(
                    serde_json::json!({ "node": r.node }),
                    format!("restart the engine on {}", r.node),
                ),
                |_, row, nodes, _| {
                    let n = or_refuse!(member(nodes, &row.name, &r.node));
                    if n.role == "primary" && !r.force {
                        return refuse(Status::failed_precondition(format!(
                            "{} is the primary of cluster {}: restarting it pauses writes until it is \
                             back. Pass --force to do it anyway, or promote another node first",
                            n.id, row.name
                        )));
                    }
                    if self.0.fleet.liveness_of(&n.id, Instant::now()) != Liveness::Up {
                        return refuse(Status::failed_precondition(format!(
                            "{} is down (no recent heartbeat); its agent must be running to restart the engine",
                            n.id
                        )));
                    }
                    Ok(Ok(()))
                },
            )
        })
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
            Ok(Response::new(pb::Credentials {
                user: row.admin_user,
                password,
                host,
                port: row.port,
                database: row.database,
                uri,
                ca_pem: self.0.ca.cert_pem().to_string(),
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
        let r = req.get_ref();
        let cluster = Some(r.cluster.as_str()).filter(|c| !c.is_empty());
        let limit = listing::page_size(r.limit, listing::DEFAULT_OPERATIONS);
        let (rows, next) = self
            .0
            .store
            .read(|c| listing::operations(c, cluster, limit, &r.before))
            .map_err(|e| match e.downcast::<listing::UnknownCursor>() {
                Ok(u) => Status::invalid_argument(u.to_string()),
                Err(e) => internal(e),
            })?;
        let operations = rows
            .into_iter()
            .map(|r| self.operation_pb(r))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListOperationsResponse {
            operations,
            next_before: next.unwrap_or_default(),
        }))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        authorize(&req, Role::Admin)?;
        let r = req.get_ref();
        let limit = listing::page_size(r.limit, listing::DEFAULT_AUDIT);
        let (rows, next) = self
            .0
            .store
            .read(|c| listing::audit(c, limit, r.before))
            .map_err(internal)?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: rows.into_iter().map(listing::audit_pb).collect(),
            next_before: next.unwrap_or_default(),
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
        let limit = listing::page_size(r.limit, listing::DEFAULT_EVENTS);
        let (rows, next) = self
            .0
            .store
            .read(|c| listing::events(c, node, cluster, limit, r.before))
            .map_err(internal)?;
        Ok(Response::new(pb::ListEventsResponse {
            events: rows.into_iter().map(listing::event_pb).collect(),
            next_before: next.unwrap_or_default(),
        }))
    }

    async fn get_node_metrics(
        &self,
        req: Request<pb::GetNodeMetricsRequest>,
    ) -> Result<Response<pb::NodeMetrics>, Status> {
        authorize(&req, Role::Viewer)?;
        let r = req.into_inner();
        self.get_cluster_row(&r.cluster)?;
        let nodes = self
            .0
            .store
            .read(|c| store::nodes_of_cluster(c, &r.cluster))
            .map_err(internal)?;
        member(&nodes, &r.cluster, &r.node)?;
        let now = corral_proto::now_ms();
        let since = if r.since_ms == 0 {
            now - 3_600_000
        } else {
            r.since_ms
        };
        if since < now - crate::history::AGG_KEEP_MS {
            return Err(Status::invalid_argument(format!(
                "history goes back 7 days; ask for --since 7d or less (asked for {}h)",
                (now - since) / 3_600_000
            )));
        }
        let history = self.0.history.clone();
        let node = r.node.clone();
        let series = tokio::task::spawn_blocking(move || history.query(&node, since, now))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(internal)?;
        let points = series
            .points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let v = |k: usize| f64::from(p.v[k]);
                let max = series.max.get(i);
                pb::MetricsPoint {
                    at_ms: p.at_ms,
                    cpu_percent: v(0),
                    memory_used_bytes: v(1),
                    memory_total_bytes: v(2),
                    disk_used_bytes: v(3),
                    disk_total_bytes: v(4),
                    net_rx_bytes_per_sec: v(5),
                    net_tx_bytes_per_sec: v(6),
                    load1: v(7),
                    connections: v(8),
                    lag_seconds: v(9),
                    max_cpu_percent: max.map_or(v(0), |m| f64::from(m[0])),
                    max_lag_seconds: max.map_or(v(9), |m| f64::from(m[9])),
                }
            })
            .collect();
        Ok(Response::new(pb::NodeMetrics {
            cluster: r.cluster,
            node: r.node,
            resolution_ms: series.resolution_ms,
            points,
        }))
    }

    async fn list_alerts(
        &self,
        req: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        authorize(&req, Role::Viewer)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: self
                .0
                .alerts
                .active()
                .into_iter()
                .map(|a| alert_pb(a, "firing"))
                .collect(),
            channels: self
                .0
                .alerts
                .notifier
                .stats()
                .into_iter()
                .map(|c| pb::ChannelInfo {
                    name: c.name,
                    kind: c.kind.to_string(),
                    queued: c.queued as u64,
                    delivered: c.delivered,
                    failed_attempts: c.failed_attempts,
                    dropped: c.dropped,
                    last_error: c.last_error.unwrap_or_default(),
                    last_success_ms: c.last_success_ms.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn list_alert_history(
        &self,
        req: Request<pb::ListAlertHistoryRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        authorize(&req, Role::Viewer)?;
        let r = req.get_ref();
        let cluster = Some(r.cluster.as_str()).filter(|s| !s.is_empty());
        if let Some(c) = cluster {
            self.get_cluster_row(c)?;
        }
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        };
        let rows = self
            .0
            .store
            .read(|c| store::alert_history(c, cluster, limit))
            .map_err(internal)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: rows
                .into_iter()
                .map(|r| alert_pb(r.alert, &r.state))
                .collect(),
            channels: Vec::new(),
        }))
    }

    async fn get_allowlist(
        &self,
        req: Request<pb::GetAllowlistRequest>,
    ) -> Result<Response<pb::Allowlist>, Status> {
        authorize(&req, Role::Viewer)?;
        let row = self.get_cluster_row(&req.get_ref().cluster)?;
        Ok(Response::new(self.allowlist_pb(&row, String::new())?))
    }

    async fn set_allowlist(
        &self,
        req: Request<pb::SetAllowlistRequest>,
    ) -> Result<Response<pb::Allowlist>, Status> {
        let r = req.get_ref().clone();
        let target = format!(
            "cluster {} {} {} entr{}{}",
            r.cluster,
            r.change,
            r.entries.len(),
            if r.entries.len() == 1 { "y" } else { "ies" },
            if r.force { " (force)" } else { "" }
        );
        let action = "cluster.allowlist";
        let who = self.authorize_audited(&req, Role::Operator, action, &target)?;
        // Where the request came from, for the lockout guard.
        let from = req.remote_addr().map(|a| a.ip().to_canonical());
        let mut summary = String::new();
        let row = self.audited(&who, action, &target, || {
            let how = allowlist::Change::parse(&r.change).map_err(Status::invalid_argument)?;
            let entries = allowlist::parse_entries(&r.entries)
                .map_err(|e| Status::invalid_argument(format!("{e}; nothing was changed")))?;
            names::validate("cluster", &r.cluster).map_err(Status::invalid_argument)?;
            self.refusable_tx(|tx| {
                let Some(row) = store::get_cluster(tx, &r.cluster)? else {
                    return refuse(Status::not_found(format!(
                        "no cluster named {:?}: see `corralctl cluster list`",
                        r.cluster
                    )));
                };
                let current = allowlist::from_stored(&store::allowlist_of(tx, &r.cluster)?);
                let next =
                    or_refuse!(allowlist::change(&current, how, &entries)
                        .map_err(Status::invalid_argument));
                if next == current {
                    summary = "unchanged: the list already says that".into();
                    return Ok(Ok(row));
                }
                if !r.force {
                    match from {
                        // corralctl on the coordinator's own host: the
                        // coordinator is always allowed on the nodes.
                        Some(ip) if ip.is_loopback() => {}
                        Some(ip) if allowlist::locks_out(&next, ip) => {
                            return refuse(Status::failed_precondition(format!(
                                "this change would lock out {ip}, the address this request came \
                                 from: add it (e.g. `corralctl cluster allowlist add {} {ip}`) \
                                 or pass --force; nothing was changed",
                                r.cluster
                            )))
                        }
                        None if !next.is_empty() => {
                            return refuse(Status::failed_precondition(
                                "cannot tell which address this request came from, so cannot \
                                 check it is not locked out: pass --force to apply anyway",
                            ))
                        }
                        _ => {}
                    }
                }
                let old: Vec<String> = current.iter().map(allowlist::canonical).collect();
                let new: Vec<String> = next.iter().map(allowlist::canonical).collect();
                let version = store::set_allowlist(tx, &r.cluster, &who, &old, &new)?;
                summary = format!(
                    "version {version}: {} -> {}",
                    allowlist::summary(&current, 20),
                    allowlist::summary(&next, 20)
                );
                store::insert_audit(
                    tx,
                    &who,
                    "cluster.allowlist.change",
                    &format!("cluster {} {summary}", r.cluster),
                    "ok",
                )?;
                Ok(Ok(store::get_cluster(tx, &r.cluster)?.unwrap_or(row)))
            })
        })?;
        tracing::info!(cluster = %row.name, "allowlist: {summary}");
        Ok(Response::new(self.allowlist_pb(&row, summary)?))
    }

    async fn list_allowlist_changes(
        &self,
        req: Request<pb::ListAllowlistChangesRequest>,
    ) -> Result<Response<pb::ListAllowlistChangesResponse>, Status> {
        authorize(&req, Role::Viewer)?;
        let row = self.get_cluster_row(&req.get_ref().cluster)?;
        let rows = self
            .0
            .store
            .read(|c| store::allowlist_changes(c, &row.name))
            .map_err(internal)?;
        Ok(Response::new(pb::ListAllowlistChangesResponse {
            changes: rows
                .into_iter()
                .map(|c| pb::AllowlistChange {
                    at_ms: c.at_ms,
                    who: c.who,
                    version: c.version,
                    old_entries: c.old,
                    new_entries: c.new,
                })
                .collect(),
        }))
    }

    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = req.get_ref().clone();
        let source = match pb::LogSource::try_from(r.source) {
            Ok(pb::LogSource::Agent) => "agent",
            _ => "engine",
        };
        let target = format!("cluster {} node {} {source} log", r.cluster, r.node);
        let who = self.authorize_audited(&req, Role::Operator, "node.logs", &target)?;
        let outcome = crate::logs::relay(&self.0, r).await;
        // One row per request, when the stream opens (or is refused), not
        // when it ends: a follow may last hours.
        self.audited(&who, "node.logs", &target, || outcome)
            .map(Response::new)
    }

    type DownloadBackupStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn backup_now(
        &self,
        req: Request<pb::BackupNowRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = format!("cluster {}", r.cluster);
        let who = self.authorize_audited(&req, Role::Operator, "backup.now", &target)?;
        self.start_operation(&who, "backup.now", &target, || {
            let target_name = self.backup_target_of(&r.cluster, &r.target)?;
            names::validate("cluster", &r.cluster).map_err(Status::invalid_argument)?;
            let id = self.refusable_tx(|tx| {
                let Some(row) = store::get_cluster(tx, &r.cluster)? else {
                    return refuse(Status::not_found(format!(
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
                    &who,
                )?))
            })?;
            self.0
                .store
                .read(|c| store::get_operation(c, &id))
                .map_err(internal)?
                .ok_or_else(|| Status::internal("the backup operation vanished"))
        })
    }

    async fn list_backups(
        &self,
        req: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        authorize(&req, Role::Viewer)?;
        let cluster = req.get_ref().cluster.clone();
        if !cluster.is_empty() {
            names::validate("cluster", &cluster).map_err(Status::invalid_argument)?;
        }
        let rows = self
            .0
            .store
            .read(|c| crate::backups::list(c, (!cluster.is_empty()).then_some(cluster.as_str())))
            .map_err(internal)?;
        Ok(Response::new(pb::ListBackupsResponse {
            backups: rows.iter().map(|b| self.backup_pb(b)).collect(),
        }))
    }

    async fn get_backup(
        &self,
        req: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        authorize(&req, Role::Viewer)?;
        let b = self.backup_row(&req.get_ref().id)?;
        Ok(Response::new(self.backup_pb(&b)))
    }

    async fn delete_backup(
        &self,
        req: Request<pb::DeleteBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let r = req.get_ref().clone();
        let target = format!("backup {}", r.id);
        let who = self.authorize_audited(&req, Role::Operator, "backup.delete", &target)?;
        let b = self.audited(&who, "backup.delete", &target, || {
            let b = self.backup_row(&r.id)?;
            if r.confirm != r.id {
                return Err(Status::invalid_argument(format!(
                    "deleting a backup is final: repeat its id to confirm (--confirm {})",
                    r.id
                )));
            }
            if b.state == crate::backups::state::RUNNING {
                return Err(Status::failed_precondition(format!(
                    "backup {} is still running; wait for it (`corralctl operation show {}`)",
                    b.id, b.operation
                )));
            }
            Ok(b)
        })?;
        crate::backups::delete_backup(&self.0, &b)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}; the backup is kept, retry")))?;
        Ok(Response::new(self.backup_pb(&b)))
    }

    async fn download_backup(
        &self,
        req: Request<pb::DownloadBackupRequest>,
    ) -> Result<Response<Self::DownloadBackupStream>, Status> {
        let r = req.get_ref().clone();
        let target = format!("backup {}{}", r.id, if r.raw { " (raw)" } else { "" });
        let who = self.authorize_audited(&req, Role::Operator, "backup.download", &target)?;
        let (b, node) = self.audited(&who, "backup.download", &target, || {
            let b = self.backup_row(&r.id)?;
            if b.state != crate::backups::state::SUCCEEDED {
                return Err(Status::failed_precondition(format!(
                    "backup {} is {}: only a succeeded backup can be downloaded",
                    b.id, b.state
                )));
            }
            let node = crate::backups::reader_node(&self.0, &b)
                .map_err(|e| Status::unavailable(format!("{e:#}")))?;
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
        Ok(Response::new(Box::pin(stream)))
    }

    async fn verify_backup(
        &self,
        req: Request<pb::VerifyBackupOperatorRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = format!("backup {}", r.id);
        let who = self.authorize_audited(&req, Role::Operator, "backup.verify", &target)?;
        self.start_operation(&who, "backup.verify", &target, || {
            let b = self.backup_row(&r.id)?;
            if b.state != crate::backups::state::SUCCEEDED {
                return Err(Status::failed_precondition(format!(
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
                requested_by: who.clone(),
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

    async fn restore_backup(
        &self,
        req: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.get_ref().clone();
        let target = if r.into_new_cluster.is_empty() {
            format!("cluster {} from backup {}", r.cluster, r.id)
        } else {
            format!("new cluster {} from backup {}", r.into_new_cluster, r.id)
        };
        let who = self.authorize_audited(&req, Role::Operator, "backup.restore", &target)?;
        let b = self.audited(&who, "backup.restore", &target, || {
            let b = self.backup_row(&r.id)?;
            if !r.cluster.is_empty() && b.cluster != r.cluster {
                return Err(Status::invalid_argument(format!(
                    "backup {} is of cluster {}, not {}",
                    b.id, b.cluster, r.cluster
                )));
            }
            if b.state != crate::backups::state::SUCCEEDED {
                return Err(Status::failed_precondition(format!(
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
                if b.engine != "postgres" {
                    return Err(Status::invalid_argument(
                        "--to-time needs PostgreSQL: other engines restore to the end of a backup",
                    ));
                }
                if b.wal_prefix.is_empty() {
                    return Err(Status::failed_precondition(format!(
                        "backup {} was taken while the cluster archived no WAL (no backup \
                         schedule), so it restores only to its end; drop --to-time",
                        b.id
                    )));
                }
                if r.to_time_ms < b.position_time_ms {
                    return Err(Status::invalid_argument(format!(
                        "--to-time {} is before backup {} was consistent ({}): choose an \
                         earlier backup (`corralctl backup list {}`)",
                        crate::backups::fmt_time(r.to_time_ms),
                        b.id,
                        crate::backups::fmt_time(b.position_time_ms),
                        b.cluster
                    )));
                }
                if r.to_time_ms > now_ms() {
                    return Err(Status::invalid_argument(format!(
                        "--to-time {} is in the future",
                        crate::backups::fmt_time(r.to_time_ms)
                    )));
                }
            }
            if r.into_new_cluster.is_empty() {
                return Ok(b);
            }
            if r.nodes.is_empty() {
                return Err(Status::invalid_argument(
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
                return Err(Status::failed_precondition(format!(
                    "backup {} is in node {}'s own local target, so only {} can restore it: \
                     make {} the new cluster's first node (free it first if it serves a \
                     cluster), or back up to a shared target (s3, or a local path every \
                     node mounts)",
                    b.id, b.node, b.node, b.node
                )));
            }
            Ok(b)
        })?;
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
                            return refuse(Status::invalid_argument(format!(
                                "backup {} is of a {} cluster; {} runs {}",
                                b.id, b.engine, row.name, row.engine
                            )));
                        }
                        if row.state == "creating" || row.state == "deleting" {
                            return refuse(Status::failed_precondition(format!(
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
        Ok(Response::new(self.operation_pb(op)?))
    }

    async fn set_backup_schedule(
        &self,
        req: Request<pb::SetBackupScheduleRequest>,
    ) -> Result<Response<pb::BackupSchedule>, Status> {
        let r = req.get_ref().clone();
        let target = format!(
            "cluster {} cron={:?} retain={}/{}ms target={}",
            r.cluster, r.cron, r.retain_count, r.retain_ms, r.target
        );
        let who = self.authorize_audited(&req, Role::Operator, "backup.schedule", &target)?;
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
                crate::backups::parse_cron(&r.cron).map_err(Status::invalid_argument)?;
                if r.retain_ms < 0 {
                    return Err(Status::invalid_argument("--retain must not be negative"));
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
        self.schedule_pb(&r.cluster).map(Response::new)
    }

    async fn get_backup_schedule(
        &self,
        req: Request<pb::GetBackupScheduleRequest>,
    ) -> Result<Response<pb::BackupSchedule>, Status> {
        authorize(&req, Role::Viewer)?;
        let cluster = req.get_ref().cluster.clone();
        self.get_cluster_row(&cluster)?;
        self.schedule_pb(&cluster).map(Response::new)
    }
}

impl OperatorApi {
    fn backup_row(&self, id: &str) -> Result<crate::backups::BackupRow, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "give a backup id (`corralctl backup list`)",
            ));
        }
        self.0
            .store
            .read(|c| crate::backups::get(c, id))
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no backup {id:?}: see `corralctl backup list` (expired and deleted backups \
                     are gone)"
                ))
            })
    }

    fn backup_pb(&self, b: &crate::backups::BackupRow) -> pb::Backup {
        let mut p = crate::backups::to_pb(b);
        if b.state == crate::backups::state::RUNNING {
            p.progress = self.0.ops.progress(&b.operation);
        }
        p
    }

    /// The target a backup of `cluster` goes to: the one asked for, else
    /// the schedule's, else the built-in local one; it must be configured.
    fn backup_target_of(&self, cluster: &str, asked: &str) -> Result<String, Status> {
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
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(name)
    }

    fn schedule_pb(&self, cluster: &str) -> Result<pb::BackupSchedule, Status> {
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

    /// `row`'s allowlist and where each of its nodes stands.
    fn allowlist_pb(&self, row: &ClusterRow, message: String) -> Result<pb::Allowlist, Status> {
        let (nodes, entries) = self
            .0
            .store
            .read(|c| {
                Ok((
                    store::nodes_of_cluster(c, &row.name)?,
                    store::allowlist_of(c, &row.name)?,
                ))
            })
            .map_err(internal)?;
        let now = Instant::now();
        Ok(pb::Allowlist {
            cluster: row.name.clone(),
            entries,
            version: row.allowlist_version,
            nodes: nodes
                .iter()
                .map(|n| {
                    let applied = self
                        .0
                        .fleet
                        .get(&n.id)
                        .map(|l| l.engine.allowlist_version)
                        .unwrap_or(0);
                    pb::AllowlistNode {
                        node: n.id.clone(),
                        applied_version: applied,
                        current: applied == row.allowlist_version,
                        state: self.0.fleet.liveness_of(&n.id, now).as_str().to_string(),
                    }
                })
                .collect(),
            message,
        })
    }
}

fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(standbys: Vec<pb::Standby>) -> pb::Replication {
        pb::Replication {
            lsn: 1000,
            standbys,
            ..Default::default()
        }
    }

    fn standby(name: &str, state: &str, sync: &str, replay: u64) -> pb::Standby {
        pb::Standby {
            name: name.into(),
            state: state.into(),
            sync_state: sync.into(),
            replay_lsn: replay,
            replay_lag_ms: 7,
            ..Default::default()
        }
    }

    #[test]
    fn replica_views() {
        let own = pb::Replication {
            in_recovery: true,
            lsn: 400,
            ..Default::default()
        };
        // (primary's report, replica's own, expected state, bytes, ms)
        let cases = [
            (
                Some(primary(vec![standby("r", "streaming", "async", 900)])),
                None,
                "streaming",
                100,
                7,
            ),
            (
                Some(primary(vec![standby("r", "streaming", "quorum", 1000)])),
                None,
                "sync",
                0,
                7,
            ),
            (
                Some(primary(vec![standby("r", "catchup", "async", 10)])),
                None,
                "catching up",
                990,
                7,
            ),
            // Connected, but no feedback yet: lag unknown, not 1000.
            (
                Some(primary(vec![standby("r", "streaming", "async", 0)])),
                None,
                "streaming",
                -1,
                7,
            ),
            // No position from the primary (MariaDB): its own.
            (
                Some(primary(vec![standby("r", "streaming", "async", 0)])),
                Some(own.clone()),
                "streaming",
                600,
                7,
            ),
            // The primary does not see it: lag from its own position.
            (
                Some(primary(vec![standby("x", "streaming", "async", 900)])),
                Some(own.clone()),
                "not streaming",
                600,
                -1,
            ),
            (Some(primary(vec![])), None, "not streaming", -1, -1),
            (None, Some(own.clone()), "not streaming", -1, -1),
        ];
        for (p, o, state, bytes, ms) in cases {
            let v = replica_view("r", p.as_ref(), o.as_ref());
            assert_eq!(
                (v.state.as_str(), v.lag_bytes, v.lag_ms),
                (state, bytes, ms),
                "{p:?} {o:?}"
            );
        }
    }

    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(super::host_of("10.0.0.1:7401"), "10.0.0.1");
        assert_eq!(super::host_of("[fd31::1]:7401"), "fd31::1");
        assert_eq!(super::host_of("vm1"), "vm1");
    }
}
