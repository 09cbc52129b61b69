//! Plain-HTTP health endpoints for load balancers (HAProxy, any L4/L7
//! balancer with HTTP checks), in the manner of Patroni's REST API:
//!
//! - `GET /primary`: 200 only on a primary that holds a valid lease (or
//!   serves no replicas) and answers queries as a primary; 503 otherwise.
//!   A balancer that sends writes only to a node answering 200 here never
//!   sends them to a fenced former primary.
//! - `GET /replica` (optionally `?lag=N`): 200 on a streaming replica whose
//!   replay is within `lag` of what it has received, in the engine's
//!   position unit (PostgreSQL: bytes of WAL, default 16 MiB; MariaDB:
//!   transactions, default 1,000); 503 otherwise.
//! - `GET /health`: 200 when the engine runs and answers.
//! - `GET /metrics`: this node's resource and engine figures for
//!   Prometheus (OpenMetrics text; the same `corral_node_*` and
//!   `corral_engine_*` names as the coordinator's `/metrics`), and the
//!   agent's heartbeat counters.
//!
//! Every answer carries a small JSON body with the node's role, state, term
//! and lease, for people reading it with curl. The endpoints reveal no
//! secrets, so they are served without TLS, like Patroni's.

use crate::engine::Engine;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use corral_proto::pb::{self, EngineState};
use serde::Deserialize;
use std::sync::Arc;

/// Default lag limit of `/replica` for PostgreSQL, in bytes of WAL.
pub const DEFAULT_MAX_LAG_BYTES: u64 = 16 << 20;
/// Default lag limit of `/replica` for MariaDB, in transactions (GTID
/// sequence numbers).
pub const DEFAULT_MAX_LAG_TRANSACTIONS: u64 = 1_000;

/// The default lag limit of `/replica` for `engine`.
fn default_max_lag(engine: &str) -> u64 {
    match engine {
        "mariadb" | "mysql" => DEFAULT_MAX_LAG_TRANSACTIONS,
        _ => DEFAULT_MAX_LAG_BYTES,
    }
}

#[derive(Deserialize)]
struct LagParam {
    lag: Option<u64>,
}

type Answer = (StatusCode, Json<serde_json::Value>);

fn body(s: &pb::EngineStatus, writable: bool) -> serde_json::Value {
    let rep = s.replication.clone().unwrap_or_default();
    let lease = s.lease.clone().unwrap_or_default();
    serde_json::json!({
        "cluster": s.cluster,
        "role": s.role,
        "state": EngineState::try_from(s.state).unwrap_or_default().label(),
        "healthy": s.healthy,
        "writable": writable,
        "term": s.term,
        "in_recovery": rep.in_recovery,
        "streaming": rep.streaming,
        "lsn": rep.lsn,
        "receive_lsn": rep.receive_lsn,
        "lease": {
            "held": lease.held,
            "remaining_ms": lease.remaining_ms,
            "source": lease.source,
            "fenced": lease.fenced,
            "confirmed_primary": lease.confirmed_primary,
            "confirmation_remaining_ms": lease.confirmation_remaining_ms,
        },
    })
}

fn answer(ok: bool, s: &pb::EngineStatus, writable: bool) -> Answer {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body(s, writable)))
}

fn running(s: &pb::EngineStatus) -> bool {
    s.state == EngineState::Running as i32 && s.healthy
}

async fn primary(State(engine): State<Arc<Engine>>) -> Answer {
    let s = engine.status();
    let writable = engine.writable();
    let ok = writable && running(&s) && s.replication.as_ref().is_some_and(|r| !r.in_recovery);
    answer(ok, &s, writable)
}

async fn replica(State(engine): State<Arc<Engine>>, Query(q): Query<LagParam>) -> Answer {
    let s = engine.status();
    let limit = q.lag.unwrap_or_else(|| default_max_lag(&s.engine));
    let ok = s.role == "replica"
        && running(&s)
        && s.replication.as_ref().is_some_and(|r| {
            r.in_recovery && r.streaming && r.receive_lsn.saturating_sub(r.lsn) <= limit
        });
    answer(ok, &s, false)
}

async fn health(State(engine): State<Arc<Engine>>) -> Answer {
    let s = engine.status();
    answer(running(&s), &s, engine.writable())
}

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/primary", get(primary))
        .route("/replica", get(replica))
        .route("/health", get(health))
        .with_state(engine)
}

/// What `/metrics` reads.
#[derive(Clone)]
pub struct Exporter {
    pub engine: Arc<Engine>,
    pub telemetry: Arc<crate::metrics::Telemetry>,
    pub node: String,
}

impl Exporter {
    pub fn render(&self) -> String {
        use corral_proto::exposition::{node_and_engine, Exposition, NodeSeries};
        use std::sync::atomic::Ordering::Relaxed;
        let status = self.engine.status();
        let metrics = self.telemetry.last();
        let mut e = Exposition::default();
        node_and_engine(
            &mut e,
            &[NodeSeries {
                labels: [
                    ("cluster", status.cluster.as_str()),
                    ("node", self.node.as_str()),
                    ("role", status.role.as_str()),
                    ("engine", status.engine.as_str()),
                ],
                metrics: metrics.as_ref(),
                engine: Some(&status),
            }],
        );
        e.counter(
            "corral_agent_heartbeats",
            "Heartbeats the coordinator answered since the agent started.",
        )
        .add(&[], self.telemetry.heartbeats_ok.load(Relaxed) as f64);
        e.counter(
            "corral_agent_heartbeat_failures",
            "Heartbeats refused or unanswered since the agent started.",
        )
        .add(&[], self.telemetry.heartbeats_failed.load(Relaxed) as f64);
        e.render()
    }
}

async fn metrics(State(x): State<Exporter>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            corral_proto::exposition::CONTENT_TYPE,
        )],
        x.render(),
    )
}

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve(
    addr: std::net::SocketAddr,
    engine: Arc<Engine>,
    exporter: Exporter,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for health checks on {addr}"))?;
    tracing::info!(%addr, "health endpoints: /primary /replica /health /metrics");
    let app = router(engine).merge(
        Router::new()
            .route("/metrics", get(metrics))
            .with_state(exporter),
    );
    axum::serve(listener, app)
        .await
        .context("serving the health endpoints")
}
