//! The API agents call: enrollment and heartbeats.

use crate::fleet::host_of;
use crate::fleet::Live;
use crate::limits;
use crate::ratelimit::AuditNow;
use crate::store;
use crate::Coordinator;
use anyhow::anyhow;
use corral_proto::identity::{peer_identity, Identity};
use corral_proto::pb;
use corral_proto::token::JoinToken;
use corral_proto::{names, now_ms};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

pub struct Upcalls(pub Arc<Coordinator>);

/// How long an enrollment waits for one of the coordinator's enrollment
/// slots before it is refused as busy.
const ENROLL_WAIT: Duration = Duration::from_secs(5);

/// Why an enrollment was refused; each maps to a gRPC code and a message
/// that tells the operator what to do.
#[derive(Debug, thiserror::Error)]
enum EnrollRefusal {
    #[error("{0}")]
    Malformed(String),
    #[error(
        "this join token pins CA {token_ca}, but this coordinator's CA is {ours}: the token was \
         made by another coordinator; create one here with `corralctl token create`"
    )]
    OtherCa { token_ca: String, ours: String },
    #[error("unknown join token: create one with `corralctl token create`")]
    UnknownToken,
    #[error("join token already used by node {node}: tokens are single-use; create a new one with `corralctl token create`")]
    TokenUsed { node: String },
    #[error("join token expired {ago}s ago: create a new one with `corralctl token create`")]
    TokenExpired { ago: i64 },
    #[error(
        "node id {0:?} is already enrolled: choose another --node-id (a node's identity is \
         its certificate; a second agent cannot take it over)"
    )]
    NodeExists(String),
}

impl From<EnrollRefusal> for Status {
    fn from(r: EnrollRefusal) -> Status {
        let msg = r.to_string();
        match r {
            EnrollRefusal::Malformed(_) => Status::invalid_argument(msg),
            EnrollRefusal::NodeExists(_) => Status::already_exists(msg),
            _ => Status::permission_denied(msg),
        }
    }
}

#[tonic::async_trait]
impl pb::agent_upcalls_server::AgentUpcalls for Upcalls {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let coord = self.0.clone();
        let identity = peer_identity(&req).ok();
        let who = identity
            .as_ref()
            .map(|i| i.who())
            .unwrap_or_else(|| "anonymous".into());
        // Callers without a certificate are limited per source address
        // before anything else is done for them.
        let anonymous = identity
            .is_none()
            .then(|| req.remote_addr().map(|a| a.ip().to_canonical()))
            .flatten();
        if let Some(ip) = anonymous {
            if let Err(wait) = coord.anonymous.take(ip, Instant::now()) {
                let msg = format!(
                    "too many enrollment attempts from {ip} without a certificate: retry in \
                     {}s (the limit is [limits] anonymous_per_minute in the coordinator's \
                     configuration)",
                    wait.as_secs().max(1)
                );
                let (c, target, m) = (coord.clone(), format!("source {ip}"), msg.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    audit_refusal(&c, Some(ip), &who, &target, &m)
                })
                .await;
                return Err(Status::resource_exhausted(msg));
            }
        }
        // A few at once, each waiting its turn for a while (enrolling takes
        // milliseconds): many callers cannot fill the blocking threads.
        let slot = tokio::time::timeout(ENROLL_WAIT, coord.enroll_slots.acquire()).await;
        let Ok(Ok(_slot)) = slot else {
            return Err(Status::resource_exhausted(
                "the coordinator is busy with other enrollments: retry in a few seconds",
            ));
        };
        let req = req.into_inner();
        let c = coord.clone();
        let (result, req) = tokio::task::spawn_blocking(move || {
            let result = limits::check_enroll(&req)
                .map_err(|e| EnrollRefusal::Malformed(e).into())
                .and_then(|()| enroll(&c, &req));
            let target = format!("node {}", target_id(&req.node_id));
            match &result {
                Ok(cert) => {
                    tracing::info!(node = %req.node_id, "node enrolled");
                    if let Ok(fp) = corral_proto::pki::fingerprint_pem(cert) {
                        c.trust.enrolled(&req.node_id, &fp);
                    }
                    c.store.audit(&who, "node.enroll", &target, "ok");
                }
                Err(e) => audit_refusal(&c, anonymous, &who, &target, &format!("{e}")),
            }
            (result, req)
        })
        .await
        .map_err(|e| Status::internal(format!("enrolling: {e}")))?;
        let cert = result.map_err(|e| match e.downcast::<EnrollRefusal>() {
            Ok(r) => Status::from(r),
            Err(e) => Status::internal(format!("enrolling: {e:#}")),
        })?;
        Ok(Response::new(pb::EnrollResponse {
            certificate_pem: cert,
            ca_pem: coord.ca.cert_pem().to_string(),
            node_id: req.node_id,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        // The store is a blocking SQLite file: kept off the runtime's
        // threads, so a slow disk delays no other call.
        let coord = self.0.clone();
        let result = tokio::task::spawn_blocking(move || heartbeat(&coord, req))
            .await
            .unwrap_or_else(|e| Err(Status::internal(format!("answering the heartbeat: {e}"))));
        let counters = &self.0.counters;
        counters.heartbeats.fetch_add(1, Relaxed);
        if result.is_err() {
            counters.heartbeat_errors.fetch_add(1, Relaxed);
        }
        result
    }

    async fn renew_certificate(
        &self,
        req: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let caller = super::status::caller_of(&req);
        let renewed = crate::service::identities::renew_node(&self.0, &caller, req.into_inner())?;
        Ok(Response::new(renewed))
    }
}

/// Records a heartbeat (liveness, metrics history, agent events) and
/// answers with the node's assignment.
fn heartbeat(
    coord: &Arc<Coordinator>,
    req: Request<pb::HeartbeatRequest>,
) -> Result<Response<pb::HeartbeatResponse>, Status> {
    let node = match peer_identity(&req) {
        Ok(Identity::Node(id)) => id,
        Ok(other) => {
            let status = Status::permission_denied(format!(
                "heartbeats come from node agents; certificate {other} is not a node certificate"
            ));
            tracing::warn!(peer = %other, "heartbeat refused: {}", status.message());
            return Err(status);
        }
        Err(status) => {
            tracing::warn!("heartbeat refused: {}", status.message());
            return Err(status);
        }
    };
    let received = Instant::now();
    let source = req.remote_addr().map(|a| a.ip().to_canonical());
    let hb = req.into_inner();
    let previous = coord.fleet.get(&node);
    // The store is consulted only when something durable changes: the
    // first heartbeat after a start (is this node still enrolled?), a new
    // address, or events to record. A steady heartbeat writes nothing.
    let known_address = previous.as_ref().map(|p| p.address.as_str());
    if known_address != Some(hb.agent_address.as_str()) {
        let row = coord
            .store
            .read(|c| store::get_node(c, &node))
            .map_err(|e| Status::internal(format!("{e:#}")))?
            .ok_or_else(|| {
                Status::permission_denied(format!("node {node} is not enrolled here"))
            })?;
        if row.address != hb.agent_address {
            // Best effort: the live view has the new address either way,
            // and a full disk must not cost the node its assignment.
            if let Err(e) = coord
                .store
                .read(|c| store::set_node_address(c, &node, &hb.agent_address))
            {
                coord.counters.error("heartbeat_address");
                tracing::warn!(node = %node, "recording the node's new address: {e:#}");
            }
        }
    }
    let interval = Duration::from_millis(u64::from(hb.interval_ms.clamp(50, 60_000)));
    let engine = hb.engine.unwrap_or_default();
    // The assignment (and the lease in it) first: storing events is best
    // effort and comes after, so a store that cannot write (disk full)
    // costs events a delay, never the primary its lease.
    let assignment = assign(coord, &node, &engine, received)
        .map_err(|e| Status::internal(format!("reading the node's assignment: {e:#}")))?;
    let acked = record_events(coord, &node, &hb.events);
    let at_ms = now_ms();
    // A sample comes about once a second: the history takes each one, the
    // live view keeps the last until the next.
    let metrics = match hb.metrics {
        Some(m) => {
            coord
                .history
                .record(&node, crate::history::Sample::of(at_ms, &m, &engine));
            m
        }
        None => coord.fleet.metrics_of(&node).unwrap_or_default(),
    };
    coord.fleet.record(
        &node,
        Live {
            last_seen: received,
            last_seen_ms: at_ms,
            interval,
            address: hb.agent_address,
            source,
            metrics,
            engine,
            engine_at: received,
        },
    );
    Ok(Response::new(pb::HeartbeatResponse {
        acked_event_seq: acked,
        assignment,
    }))
}

/// Stores the agent's events (at most [`limits::MAX_EVENTS_PER_HEARTBEAT`],
/// each cut to its limits) and returns the highest sequence number stored,
/// which the agent may forget; 0 when nothing could be stored (the agent
/// sends them again with its next heartbeat). A failure is logged and
/// counted, never the heartbeat's.
fn record_events(coord: &Coordinator, node: &str, events: &[pb::AgentEvent]) -> u64 {
    let events = limits::bounded_events(events);
    if events.is_empty() {
        return 0;
    }
    let stored = coord.store.tx(|tx| {
        let cluster = store::get_node(tx, node)?
            .and_then(|n| n.cluster)
            .unwrap_or_default();
        let mut max = 0;
        for ev in &events {
            store::insert_event(
                tx,
                ev.at_ms,
                node,
                &cluster,
                &ev.kind,
                &ev.message,
                Some(ev.seq),
            )?;
            max = max.max(ev.seq);
        }
        Ok(max)
    });
    match stored {
        Ok(max) => {
            for ev in &events {
                tracing::info!(node = %node, kind = %ev.kind, "agent event: {}", ev.message);
            }
            max
        }
        Err(e) => {
            coord.counters.error("heartbeat_events");
            tracing::warn!(node = %node, "storing {} agent events (kept by the agent for its next heartbeat): {e:#}", events.len());
            0
        }
    }
}

/// A refused enrollment in the audit log and the coordinator's log: for a
/// caller without a certificate, a few rows a minute per source address
/// and one summary row for the rest.
fn audit_refusal(coord: &Coordinator, source: Option<IpAddr>, who: &str, target: &str, why: &str) {
    let now = match source {
        Some(ip) => {
            let (now, summary) = coord.anonymous.refused(ip, Instant::now());
            if let Some(n) = summary {
                coord.store.audit(
                    who,
                    "node.enroll",
                    &format!("source {ip}"),
                    &crate::ratelimit::summary_text(n),
                );
            }
            now
        }
        None => AuditNow::Row,
    };
    if now == AuditNow::Row {
        tracing::warn!(target_node = %target, "enrollment refused: {why}");
        coord
            .store
            .audit(who, "node.enroll", target, &format!("refused: {why}"));
    }
}

/// A node id as it is shown in the audit log: as is when it is a valid
/// name, else a short escaped prefix.
fn target_id(id: &str) -> String {
    if names::validate("node", id).is_ok() {
        id.to_string()
    } else {
        limits::shown(id)
    }
}

/// What the coordinator tells a node of a cluster in answer to a heartbeat
/// received at `received`: term, role, timing, and for the primary of
/// record its replicas' agents and, while its engine runs, a lease
/// (recorded in the fleet, so the failover decision knows how long it may
/// run).
fn assign(
    coord: &Coordinator,
    node: &str,
    engine: &pb::EngineStatus,
    received: Instant,
) -> anyhow::Result<Option<pb::Assignment>> {
    // One hold of the store for reading the role and recording the grant:
    // a failover raises the term and moves the role in a transaction of the
    // same store, so a grant is either recorded before it (and waited out
    // by the failover) or not made at all.
    coord.store.read(|conn| {
        let Some(row) = store::get_node(conn, node)? else {
            return Ok(None);
        };
        let Some(cluster) = row.cluster.as_deref() else {
            return Ok(None);
        };
        let Some(c) = store::get_cluster(conn, cluster)? else {
            return Ok(None);
        };
        let members = store::nodes_of_cluster(conn, cluster)?;
        let contacts: Vec<_> = members.iter().map(|m| coord.fleet.contact(&m.id)).collect();
        let address = |i: usize| {
            contacts[i]
                .as_ref()
                .map(|(a, _)| a.clone())
                .unwrap_or_else(|| members[i].address.clone())
        };
        let applied_allowlist =
            engine.cluster == c.name && engine.allowlist_version == c.allowlist_version;
        // Each member with the certificates it may present to its peers.
        let peer = |i: usize| {
            let fingerprints = coord.trust.read().fingerprints_of(&members[i].id);
            pb::PeerAddress {
                node: members[i].id.clone(),
                address: address(i),
                fingerprints,
            }
        };
        let mut a = pb::Assignment {
            cluster: c.name.clone(),
            term: c.term,
            role: row.role.clone(),
            heartbeat_interval_ms: c.heartbeat_ms,
            lease_duration_ms: c.lease_ms,
            // Sent until the agent reports it applied this version.
            allowlist: if applied_allowlist {
                Vec::new()
            } else {
                store::allowlist_of(conn, &c.name)?
            },
            allowlist_omitted: applied_allowlist,
            allowlist_version: c.allowlist_version,
            // The cluster's own nodes reach each other's engines whatever
            // the allowlist says (replication, clones, pg_rewind).
            always_allowed: (0..members.len())
                .filter_map(|i| member_ip(&address(i), contacts[i].as_ref().and_then(|c| c.1)))
                .map(|ip| ip.to_string())
                .collect(),
            members: (0..members.len())
                .filter(|&i| members[i].id != node)
                .map(peer)
                .collect(),
            ..Default::default()
        };
        if row.role != "primary" {
            return Ok(Some(a));
        }
        a.peers = a.members.clone();
        // The primary of record gets its lease while its engine runs as a
        // healthy primary, and already while it is being promoted, so that
        // it holds the lease the moment its promotion completes (a lease on
        // a standby lets it write nothing). A standby of record that is not
        // being promoted, or an engine that stopped answering, gets none:
        // its lease runs out and the monitor acts.
        let as_primary = engine.role == "primary"
            && engine.healthy
            && engine.replication.as_ref().is_some_and(|r| !r.in_recovery);
        let runs = engine.cluster == c.name
            && engine.state == pb::EngineState::Running as i32
            && (as_primary || engine.promoting);
        if runs {
            a.lease_ms = c.lease_ms;
            coord.fleet.record_grant(node, received + c.lease());
            if c.sync {
                if let Some(r) = &engine.replication {
                    coord.fleet.saw_sync_standbys(
                        &c.name,
                        c.term,
                        r.standbys
                            .iter()
                            .map(|s| (s.name.as_str(), s.sync_state.as_str())),
                    );
                }
            }
        }
        Ok(Some(a))
    })
}

/// Checks the token and the requested id, signs the CSR, and records the node
/// and the token's use in one transaction: a refusal changes nothing.
fn enroll(coord: &Coordinator, req: &pb::EnrollRequest) -> anyhow::Result<String> {
    let token = JoinToken::parse(&req.token).map_err(EnrollRefusal::Malformed)?;
    if token.ca_fingerprint != coord.ca_fingerprint {
        return Err(EnrollRefusal::OtherCa {
            token_ca: token.ca_fingerprint,
            ours: coord.ca_fingerprint.clone(),
        }
        .into());
    }
    names::validate("node", &req.node_id).map_err(EnrollRefusal::Malformed)?;
    let hash = token.secret_hash();
    coord.store.tx(|tx| {
        let row = store::get_token(tx, &hash)?.ok_or(EnrollRefusal::UnknownToken)?;
        if let Some(node) = row.used_by_node.filter(|_| row.used_at_ms.is_some()) {
            return Err(EnrollRefusal::TokenUsed { node }.into());
        }
        let now = now_ms();
        if row.expires_at_ms <= now {
            return Err(EnrollRefusal::TokenExpired {
                ago: (now - row.expires_at_ms) / 1000,
            }
            .into());
        }
        if store::get_node(tx, &req.node_id)?.is_some() {
            return Err(EnrollRefusal::NodeExists(req.node_id.clone()).into());
        }
        let cert = coord
            .ca
            .sign_csr(
                &req.csr_pem,
                &Identity::Node(req.node_id.clone()),
                coord.lifetimes.node,
            )
            .map_err(|e| EnrollRefusal::Malformed(format!("{e:#}")))?;
        let fp = corral_proto::pki::fingerprint_pem(&cert).map_err(|e| anyhow!("{e:#}"))?;
        let not_after = corral_proto::pki::not_after_ms(&cert).map_err(|e| anyhow!("{e:#}"))?;
        store::insert_node(tx, &req.node_id, &fp, not_after)?;
        store::use_token(tx, &hash, &req.node_id)?;
        Ok(cert)
    })
}

/// The address a member's engine traffic comes from, for the allowlist's
/// always-allowed set: the host of its agent address when that is an IP
/// address; for a host name, the address its heartbeats come from (the
/// agent resolves nothing on the fence's path, and a name may not resolve
/// on the node the way it does here).
fn member_ip(address: &str, source: Option<std::net::IpAddr>) -> Option<std::net::IpAddr> {
    match host_of(address).parse::<std::net::IpAddr>() {
        Ok(ip) => Some(ip.to_canonical()),
        Err(_) => source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ip_prefers_the_registered_address_and_falls_back_to_the_source() {
        let from: Option<std::net::IpAddr> = Some("10.9.9.9".parse().unwrap());
        let ip = |a: &str, s| member_ip(a, s).map(|ip| ip.to_string());
        assert_eq!(ip("10.231.1.2:7400", from).as_deref(), Some("10.231.1.2"));
        assert_eq!(ip("[fd31::1:2]:7400", None).as_deref(), Some("fd31::1:2"));
        assert_eq!(
            ip("[::ffff:10.0.0.5]:7400", None).as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(ip("db1.internal:7400", from).as_deref(), Some("10.9.9.9"));
        assert_eq!(ip("db1.internal:7400", None), None);
    }
}
