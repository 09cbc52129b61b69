//! The coordinator's plain-HTTP listener (`--http-listen`): Prometheus
//! metrics at `/metrics` and a liveness probe at `/healthz`.
//!
//! Metrics reveal cluster and node names but no secrets; bind it to an
//! address only your monitoring reaches (the default is loopback).
//!
//! Names follow Prometheus conventions: the unit in the name, `_total` on
//! counters, labels `cluster`, `node`, `role` and `engine` on every node
//! and engine series. Each scrape reads the live fleet and the store once.

use crate::fleet::Liveness;
use crate::{store, Coordinator};
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use corral_proto::exposition::{node_and_engine, Exposition, NodeSeries, CONTENT_TYPE};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The coordinator's own counters, since this process started.
#[derive(Default)]
pub struct Counters {
    pub heartbeats: AtomicU64,
    /// Heartbeats refused (unknown node, wrong certificate) or failed.
    pub heartbeat_errors: AtomicU64,
    pub failovers: AtomicU64,
    /// Finished operations by (kind, result).
    operations: Mutex<BTreeMap<(String, String), u64>>,
    /// Errors by where they happened (logged each time).
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    pub fn operation_finished(&self, kind: &str, result: &str) {
        *lock(&self.operations)
            .entry((kind.to_string(), result.to_string()))
            .or_default() += 1;
    }

    pub fn error(&self, at: &'static str) {
        *lock(&self.errors).entry(at).or_default() += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the HTTP listener {listen} (--http-listen)"))
}

/// Serves until the task is dropped.
pub async fn serve(coord: Arc<Coordinator>, listener: tokio::net::TcpListener) -> Result<()> {
    let listen = listener.local_addr()?;
    tracing::info!(%listen, "metrics at http://{listen}/metrics");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(coord);
    axum::serve(listener, app)
        .await
        .with_context(|| format!("serving HTTP on {listen}"))
}

async fn metrics(State(coord): State<Arc<Coordinator>>) -> Response {
    match tokio::task::spawn_blocking(move || render(&coord)).await {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the store: {e:#}\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The whole exposition.
pub fn render(coord: &Coordinator) -> Result<String> {
    let (clusters, nodes, backups) = coord.store.read(|c| {
        Ok((
            store::list_clusters(c)?,
            store::list_nodes(c)?,
            crate::backups::list(c, None)?,
        ))
    })?;
    let engines: HashMap<&str, &str> = clusters
        .iter()
        .map(|c| (c.name.as_str(), c.engine.as_str()))
        .collect();
    let mut e = Exposition::default();
    node_families(coord, &mut e, &nodes, &engines);
    cluster_families(&mut e, &clusters);
    backup_families(&mut e, &backups);
    coordinator_families(coord, &mut e, nodes.len());
    Ok(e.render())
}

fn node_families(
    coord: &Coordinator,
    e: &mut Exposition,
    nodes: &[store::NodeRow],
    engines: &HashMap<&str, &str>,
) {
    struct Row<'a> {
        labels: [(&'static str, &'a str); 4],
        up: bool,
        age_s: Option<f64>,
        live: Option<crate::fleet::Live>,
    }
    let now = Instant::now();
    let rows: Vec<Row> = nodes
        .iter()
        .map(|n| {
            let cluster = n.cluster.as_deref().unwrap_or("");
            let live = coord.fleet.get(&n.id);
            Row {
                labels: [
                    ("cluster", cluster),
                    ("node", n.id.as_str()),
                    ("role", n.role.as_str()),
                    ("engine", engines.get(cluster).copied().unwrap_or("")),
                ],
                up: coord.fleet.liveness_of(&n.id, now) == Liveness::Up,
                age_s: live
                    .as_ref()
                    .map(|l| now.saturating_duration_since(l.last_seen).as_secs_f64()),
                live,
            }
        })
        .collect();
    let f = e.gauge(
        "corral_node_up",
        "1 while the node's agent sends heartbeats, 0 once three are missed.",
    );
    for r in &rows {
        f.add(&r.labels, if r.up { 1.0 } else { 0.0 });
    }
    let f = e.gauge(
        "corral_node_heartbeat_age_seconds",
        "Time since the node's last heartbeat.",
    );
    for r in &rows {
        if let Some(age) = r.age_s {
            f.add(&r.labels, age);
        }
    }
    let series: Vec<NodeSeries> = rows
        .iter()
        .map(|r| NodeSeries {
            labels: r.labels,
            metrics: r.live.as_ref().map(|l| &l.metrics),
            engine: r.live.as_ref().map(|l| &l.engine),
        })
        .collect();
    node_and_engine(e, &series);
}

fn cluster_families(e: &mut Exposition, clusters: &[store::ClusterRow]) {
    let f = e.gauge(
        "corral_cluster_info",
        "A cluster's engine, mode and state (1).",
    );
    for c in clusters {
        f.add(
            &[
                ("cluster", c.name.as_str()),
                ("engine", c.engine.as_str()),
                ("mode", c.mode.as_str()),
                ("state", c.state.as_str()),
                ("sync", if c.sync { "true" } else { "false" }),
            ],
            1.0,
        );
    }
    let f = e.gauge(
        "corral_cluster_term",
        "The cluster's term, raised at every promotion.",
    );
    for c in clusters {
        f.add(&[("cluster", c.name.as_str())], c.term as f64);
    }
}

/// Backup health per cluster (deleted clusters' kept backups included):
/// when the last backup succeeded and how big it was, and how many
/// backups are recorded in each state.
fn backup_families(e: &mut Exposition, backups: &[crate::backups::BackupRow]) {
    use crate::backups::state;
    let mut last: std::collections::BTreeMap<&str, &crate::backups::BackupRow> = Default::default();
    let mut counts: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for b in backups {
        *counts
            .entry((b.cluster.as_str(), b.state.as_str()))
            .or_default() += 1;
        if b.state == state::SUCCEEDED
            && last
                .get(b.cluster.as_str())
                .is_none_or(|l| l.finished_at_ms < b.finished_at_ms)
        {
            last.insert(b.cluster.as_str(), b);
        }
    }
    let f = e.gauge(
        "corral_backup_last_success_timestamp_seconds",
        "When the cluster's newest succeeded backup finished (Unix time).",
    );
    for (cluster, b) in &last {
        f.add(&[("cluster", cluster)], b.finished_at_ms as f64 / 1000.0);
    }
    let f = e.gauge(
        "corral_backup_last_success_stored_bytes",
        "Stored (compressed, encrypted) size of the cluster's newest succeeded backup.",
    );
    for (cluster, b) in &last {
        f.add(&[("cluster", cluster)], b.stored_bytes as f64);
    }
    let f = e.gauge(
        "corral_backups",
        "Backups recorded, by cluster and state (running, succeeded, failed).",
    );
    for ((cluster, st), n) in &counts {
        f.add(&[("cluster", cluster), ("state", st)], *n as f64);
    }
}

fn coordinator_families(coord: &Coordinator, e: &mut Exposition, nodes: usize) {
    let c = &coord.counters;
    e.counter(
        "corral_coordinator_heartbeats",
        "Heartbeats received from agents since the coordinator started.",
    )
    .add(&[], c.heartbeats.load(Relaxed) as f64);
    e.counter(
        "corral_coordinator_heartbeat_errors",
        "Heartbeats refused or failed since the coordinator started.",
    )
    .add(&[], c.heartbeat_errors.load(Relaxed) as f64);
    e.counter(
        "corral_coordinator_failovers",
        "Failovers completed since the coordinator started.",
    )
    .add(&[], c.failovers.load(Relaxed) as f64);
    let f = e.counter(
        "corral_coordinator_operations",
        "Operations finished since the coordinator started, by kind and result.",
    );
    for ((kind, result), n) in lock(&c.operations).iter() {
        f.add(&[("kind", kind), ("result", result)], *n as f64);
    }
    let f = e.counter(
        "corral_coordinator_errors",
        "Errors logged by the coordinator since it started, by where they happened.",
    );
    for (at, n) in lock(&c.errors).iter() {
        f.add(&[("at", at)], *n as f64);
    }
    e.gauge("corral_coordinator_nodes", "Nodes enrolled.")
        .add(&[], nodes as f64);
    let a = &coord.alerts;
    let firing = a.active();
    let f = e.gauge("corral_alerts_firing", "Alerts firing now, by severity.");
    for sev in ["critical", "warning", "info"] {
        let n = firing.iter().filter(|x| x.severity.as_str() == sev).count();
        f.add(&[("severity", sev)], n as f64);
    }
    let f = e.gauge("corral_alert", "Each alert firing now (1).");
    for x in &firing {
        let mut labels: Vec<(&str, &str)> = vec![
            ("alertname", x.name.as_str()),
            ("severity", x.severity.as_str()),
        ];
        labels.extend(x.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        f.add(&labels, 1.0);
    }
    e.counter(
        "corral_coordinator_alert_evaluations",
        "Alert rule evaluations since the coordinator started.",
    )
    .add(&[], a.evaluations.load(Relaxed) as f64);
    e.counter(
        "corral_coordinator_alert_evaluation_seconds",
        "Time spent evaluating alert rules since the coordinator started.",
    )
    .add(&[], a.total_evaluation_us.load(Relaxed) as f64 / 1e6);
    e.gauge(
        "corral_coordinator_last_alert_evaluation_seconds",
        "How long the last alert evaluation took.",
    )
    .add(&[], a.last_evaluation_us.load(Relaxed) as f64 / 1e6);
    let stats = a.notifier.stats();
    let f = e.counter(
        "corral_coordinator_notifications_delivered",
        "Notifications delivered, by channel.",
    );
    for s in &stats {
        f.add(
            &[("channel", s.name.as_str()), ("kind", s.kind)],
            s.delivered as f64,
        );
    }
    let f = e.counter(
        "corral_coordinator_notification_failed_attempts",
        "Delivery attempts that failed (each is retried with backoff), by channel.",
    );
    for s in &stats {
        f.add(
            &[("channel", s.name.as_str()), ("kind", s.kind)],
            s.failed_attempts as f64,
        );
    }
    let f = e.counter(
        "corral_coordinator_notifications_dropped",
        "Notifications given up on (queue full or retried too long), by channel.",
    );
    for s in &stats {
        f.add(
            &[("channel", s.name.as_str()), ("kind", s.kind)],
            s.dropped as f64,
        );
    }
    let f = e.gauge(
        "corral_coordinator_notification_queue_length",
        "Notifications waiting for delivery, by channel.",
    );
    for s in &stats {
        f.add(
            &[("channel", s.name.as_str()), ("kind", s.kind)],
            s.queued as f64,
        );
    }
}
