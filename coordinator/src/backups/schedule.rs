//! Scheduled backups: cron parsing, when a schedule is due, and the loop that
//! starts backup operations and runs retention.

use super::keys;
use super::prune::{prune_pass, prune_wal};
use super::{fmt_duration, fmt_time, new_id, object_name};
use crate::store::backups::*;
use crate::store::{self, ClusterRow};
use crate::Coordinator;
use anyhow::Result;
use rusqlite::Connection;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Parses a cron expression: five fields (minute first), or six with
/// seconds first; UTC.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map_err(|e| {
            format!(
                "invalid cron expression {expr:?}: {e}; use five fields \"minute hour day month \
                 weekday\" in UTC, e.g. \"30 2 * * *\" for 02:30 every day"
            )
        })
}

/// The first time `cron` fires after `after_ms`.
pub fn next_run(cron: &croner::Cron, after_ms: i64) -> Option<i64> {
    let after = chrono::DateTime::from_timestamp_millis(after_ms)?;
    cron.find_next_occurrence(&after, false)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Starts scheduled backups when due and prunes what retention removes,
/// every few seconds, until dropped.
pub async fn run(coord: Arc<Coordinator>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    let mut wal_pruned = std::collections::HashMap::new();
    loop {
        tick.tick().await;
        if let Err(e) = schedule_pass(&coord) {
            tracing::warn!(error = %format!("{e:#}"), "backup schedules");
        }
        if last_prune.elapsed() >= Duration::from_secs(5) {
            last_prune = Instant::now();
            if let Err(e) = prune_pass(&coord).await {
                tracing::warn!(error = %format!("{e:#}"), "backup retention");
            }
            let pruned = match coord.store.read(|c| list(c, None)) {
                Ok(all) => prune_wal(&coord, &all, &mut wal_pruned).await,
                Err(e) => Err(e),
            };
            if let Err(e) = pruned {
                tracing::warn!(error = %format!("{e:#}"), "WAL retention");
            }
        }
    }
}

/// What the scheduler does with a schedule at `now_ms`.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Not yet (or the cron never fires again).
    No,
    /// Start the backup due at this time.
    Start(i64),
    /// Due, but the cluster is busy: try again on the next pass.
    Wait,
    /// Due at this time and still blocked after `missed_after`: record it
    /// as missed (and alert) and move on to the next time.
    Missed(i64),
}

/// Pure: the scheduler's decision for one schedule.
pub fn due(
    cron: &croner::Cron,
    s: &ScheduleRow,
    now_ms: i64,
    busy: bool,
    missed_after_ms: i64,
) -> Due {
    let Some(at) = next_run(cron, s.last_run_ms.max(s.created_at_ms)) else {
        return Due::No;
    };
    match (at <= now_ms, busy) {
        (false, _) => Due::No,
        (true, false) => Due::Start(at),
        (true, true) if now_ms - at > missed_after_ms => Due::Missed(at),
        (true, true) => Due::Wait,
    }
}

fn schedule_pass(coord: &Arc<Coordinator>) -> Result<()> {
    let now = corral_proto::now_ms();
    for s in coord.store.read(schedules)? {
        let cron = match parse_cron(&s.cron) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(cluster = %s.cluster, "{e}");
                continue;
            }
        };
        let missed_after = coord.backups.config.missed_after.as_millis() as i64;
        if due(&cron, &s, now, false, missed_after) == Due::No {
            continue;
        }
        let started = coord.store.tx(|tx| {
            let Some(cluster) = store::get_cluster(tx, &s.cluster)? else {
                return Ok(None);
            };
            let running = store::unfinished_operation_of(tx, &s.cluster)?;
            let busy = running.is_some() || cluster.state != "running";
            match due(&cron, &s, now, busy, missed_after) {
                Due::No | Due::Wait => return Ok(None),
                Due::Missed(at) => {
                    let why = match &running {
                        Some(op) => format!("operation {} ({}) held the cluster", op.id, op.kind),
                        None => format!("the cluster was {}", cluster.state),
                    };
                    let mut s2 = s.clone();
                    s2.last_run_ms = now;
                    put_schedule(tx, &s2)?;
                    store::insert_event(
                        tx,
                        now,
                        "",
                        &s.cluster,
                        "backup_missed",
                        &format!(
                            "the scheduled backup of cluster {} due at {} did not start within {}: \
                             {why}",
                            s.cluster,
                            fmt_time(at),
                            fmt_duration(coord.backups.config.missed_after),
                        ),
                        None,
                    )?;
                    return Ok(None);
                }
                Due::Start(_) => {}
            }
            let mut s2 = s.clone();
            s2.last_run_ms = now;
            put_schedule(tx, &s2)?;
            let op = new_backup_operation(
                tx,
                &cluster,
                kind::SCHEDULED,
                &s.target,
                crate::ops::SCHEDULER,
            )?;
            Ok(Some(op))
        })?;
        if let Some(op) = started {
            tracing::info!(cluster = %s.cluster, op = %op, "scheduled backup started");
            crate::ops::spawn(coord.clone(), op);
        }
    }
    Ok(())
}

/// Records a backup and the operation that takes it; returns the
/// operation's id.
pub fn new_backup_operation(
    tx: &Connection,
    cluster: &ClusterRow,
    backup_kind: &str,
    target: &str,
    who: &str,
) -> Result<String> {
    let now = corral_proto::now_ms();
    let id = new_id();
    let op = store::OperationRow {
        id: crate::ops::new_id(),
        cluster: cluster.name.clone(),
        kind: crate::ops::BACKUP.into(),
        state: store::op_state::PENDING.into(),
        params: serde_json::json!({ "backup": id, "target": target }).to_string(),
        requested_by: who.into(),
        created_at_ms: now,
        updated_at_ms: now,
        error: String::new(),
    };
    put(
        tx,
        &BackupRow {
            id: id.clone(),
            cluster: cluster.name.clone(),
            kind: backup_kind.into(),
            state: state::RUNNING.into(),
            target: target.into(),
            engine: cluster.engine.clone(),
            started_at_ms: now,
            operation: op.id.clone(),
            object: object_name(&cluster.name, &id),
            key_scope: keys::scope_of(cluster),
            ..Default::default()
        },
    )?;
    store::insert_operation(tx, &op)?;
    store::log_operation(
        tx,
        &op.id,
        &format!("requested by {who}: {backup_kind} backup {id} to target {target}"),
    )?;
    Ok(op.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheduler_starts_waits_and_records_misses() {
        let cron = parse_cron("0 * * * *").unwrap(); // hourly
        let hour = 3_600_000;
        let t0 = 1_795_651_200_000; // on the hour
        let s = ScheduleRow {
            cluster: "c".into(),
            cron: "0 * * * *".into(),
            retain_count: 3,
            retain_ms: 0,
            target: "local".into(),
            last_run_ms: t0,
            created_at_ms: t0 - hour,
        };
        assert_eq!(due(&cron, &s, t0 + 10, false, hour), Due::No);
        assert_eq!(
            due(&cron, &s, t0 + hour, false, hour),
            Due::Start(t0 + hour)
        );
        assert_eq!(due(&cron, &s, t0 + hour + 5, true, hour), Due::Wait);
        assert_eq!(
            due(&cron, &s, t0 + 2 * hour + 1, true, hour),
            Due::Missed(t0 + hour)
        );
        // Once recorded (last_run moved to now), the next time is the next hour.
        let s2 = ScheduleRow {
            last_run_ms: t0 + 2 * hour + 1,
            ..s
        };
        assert_eq!(due(&cron, &s2, t0 + 2 * hour + 2, true, hour), Due::No);
    }

    #[test]
    fn cron_five_and_six_fields() {
        let c = parse_cron("30 2 * * *").unwrap();
        // 2026-11-26T00:00:00Z -> 02:30 the same day.
        let t0 = 1_795_651_200_000;
        assert_eq!(next_run(&c, t0), Some(t0 + (2 * 3600 + 30 * 60) * 1000));
        let c = parse_cron("*/5 * * * * *").unwrap();
        assert_eq!(next_run(&c, t0), Some(t0 + 5000));
        let e = parse_cron("every day").unwrap_err();
        assert!(e.contains("invalid cron expression"), "{e}");
    }
}
