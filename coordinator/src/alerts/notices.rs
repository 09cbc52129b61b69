//! One-shot notices: the events (failovers, failed operations, finished
//! long operations) that on-call hears of once.

use crate::notify::{Alert, Severity, Status};
use crate::store;
use std::collections::BTreeMap;

/// How long Alertmanager should show a one-shot notice (a failover that
/// completed, an operation that failed) before it counts as resolved.
pub(super) const NOTICE_MS: i64 = 5 * 60 * 1000;

/// The notice an event makes, if any.
pub fn notice_of(ev: &store::EventRow, engine: &str) -> Option<Alert> {
    let (name, severity, summary) = match ev.kind.as_str() {
        "failover_started" => (
            "failover_started",
            Severity::Warning,
            format!("failover of cluster {} started", ev.cluster),
        ),
        "failover" => (
            "failover_completed",
            Severity::Info,
            format!("failover of cluster {} completed", ev.cluster),
        ),
        "failover_blocked" => (
            "failover_refused",
            Severity::Critical,
            format!(
                "cluster {} lost its primary and no failover is safe",
                ev.cluster
            ),
        ),
        "failover_needed" => (
            "failover_needed",
            Severity::Critical,
            format!(
                "cluster {} lost its primary and auto-failover is off",
                ev.cluster
            ),
        ),
        "operation_failed" => (
            "operation_failed",
            Severity::Warning,
            format!("{} of cluster {} failed", operation_kind(ev), ev.cluster),
        ),
        "operation_completed" => (
            "operation_completed",
            Severity::Info,
            format!("{} of cluster {} completed", operation_kind(ev), ev.cluster),
        ),
        "backup_failed" => (
            "backup_failed",
            Severity::Critical,
            format!("a backup of cluster {} failed", ev.cluster),
        ),
        "backup_missed" => (
            "backup_missed",
            Severity::Critical,
            format!("a scheduled backup of cluster {} did not run", ev.cluster),
        ),
        _ => return None,
    };
    let mut labels = BTreeMap::from([("cluster".to_string(), ev.cluster.clone())]);
    if !ev.node.is_empty() {
        labels.insert("node".into(), ev.node.clone());
    }
    if !engine.is_empty() {
        labels.insert("engine".into(), engine.to_string());
    }
    Some(Alert {
        name: name.to_string(),
        fingerprint: format!("{name}/{}/event-{}", ev.cluster, ev.id),
        status: Status::Firing,
        severity,
        labels,
        summary,
        description: ev.message.clone(),
        starts_at_ms: ev.at_ms,
        ends_at_ms: Some(ev.at_ms + NOTICE_MS),
        repeat: 0,
    })
}

/// The operation an `operation_*` event is about: the first word of its
/// message (see `ops::run`), e.g. `resync`.
fn operation_kind(ev: &store::EventRow) -> &str {
    ev.message
        .split_whitespace()
        .next()
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .unwrap_or("an operation")
}
