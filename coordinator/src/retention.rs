//! How long the audit log, the events and the operation logs are kept.
//!
//! Each has an age and a row cap (`[retention]` in the configuration file);
//! whichever is reached first prunes the oldest rows. Finished operations
//! past their age go with their logs; an unfinished one is never pruned.
//! Pruning runs shortly after start-up and then periodically, off the async
//! runtime, in small batches so heartbeats never wait long for the store.

use crate::durations::duration;
use crate::Coordinator;
use anyhow::Result;
use rusqlite::{params, Connection};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Rows deleted per statement (each batch holds the store briefly).
const BATCH: i64 = 2_000;

/// `[retention]` in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    #[serde(deserialize_with = "duration")]
    pub audit_max_age: Duration,
    pub audit_max_rows: u64,
    #[serde(deserialize_with = "duration")]
    pub events_max_age: Duration,
    pub events_max_rows: u64,
    /// Finished operations and their step logs.
    #[serde(deserialize_with = "duration")]
    pub operations_max_age: Duration,
    /// Step-log rows of finished operations.
    pub operation_log_max_rows: u64,
    /// How often pruning runs.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let days = |d: u64| Duration::from_secs(d * 86_400);
        RetentionConfig {
            audit_max_age: days(365),
            audit_max_rows: 1_000_000,
            events_max_age: days(90),
            events_max_rows: 1_000_000,
            operations_max_age: days(365),
            operation_log_max_rows: 1_000_000,
            interval: Duration::from_secs(600),
        }
    }
}

impl RetentionConfig {
    pub fn validate(&self) -> Result<()> {
        let min = Duration::from_secs(3600);
        for (key, age) in [
            ("audit_max_age", self.audit_max_age),
            ("events_max_age", self.events_max_age),
            ("operations_max_age", self.operations_max_age),
        ] {
            if age < min {
                anyhow::bail!("[retention] {key} must be at least 1h (got {age:?})");
            }
        }
        for (key, rows) in [
            ("audit_max_rows", self.audit_max_rows),
            ("events_max_rows", self.events_max_rows),
            ("operation_log_max_rows", self.operation_log_max_rows),
        ] {
            if rows < 1000 {
                anyhow::bail!("[retention] {key} must be at least 1000 (got {rows})");
            }
        }
        if self.interval < Duration::from_secs(1) {
            anyhow::bail!("[retention] interval must be at least 1s");
        }
        Ok(())
    }
}

/// Rows removed by one pass, per table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub audit: usize,
    pub events: usize,
    pub operations: usize,
    pub operation_log: usize,
}

/// One batch of the rows of `table` (with `id` and `at_ms`) older than
/// `before_ms` or beyond the newest `max_rows`.
fn prune_batch(c: &Connection, table: &str, before_ms: i64, max_rows: u64) -> Result<usize> {
    Ok(c.execute(
        &format!(
            "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE at_ms < ?1 \
             OR id <= (SELECT coalesce(max(id), 0) FROM {table}) - ?2 ORDER BY id LIMIT ?3)"
        ),
        params![before_ms, max_rows as i64, BATCH],
    )?)
}

/// One batch of finished operations last updated before `before_ms`, with
/// their logs; and of log rows of finished operations beyond the newest
/// `max_rows`. Returns (operations, log rows).
fn prune_operations_batch(c: &Connection, before_ms: i64, max_rows: u64) -> Result<(usize, usize)> {
    const FINISHED: &str = "state NOT IN ('pending', 'running')";
    let old = format!(
        "SELECT id FROM operations WHERE {FINISHED} AND updated_at_ms < ?1 ORDER BY updated_at_ms LIMIT ?2"
    );
    let ids: Vec<String> = c
        .prepare(&old)?
        .query_map(params![before_ms, BATCH], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut logs = 0;
    for id in &ids {
        logs += c.execute("DELETE FROM operation_log WHERE op_id = ?1", [id])?;
        c.execute("DELETE FROM operations WHERE id = ?1", [id])?;
    }
    logs += c.execute(
        &format!(
            "DELETE FROM operation_log WHERE id IN (SELECT l.id FROM operation_log l \
             JOIN operations o ON o.id = l.op_id WHERE o.{FINISHED} \
             AND l.id <= (SELECT coalesce(max(id), 0) FROM operation_log) - ?1 \
             ORDER BY l.id LIMIT ?2)"
        ),
        params![max_rows as i64, BATCH],
    )?;
    Ok((ids.len(), logs))
}

/// Prunes every table once, batch by batch, until nothing is left to
/// remove. `now_ms` is the wall clock (ages are of wall-clock timestamps).
pub fn prune(store: &crate::store::Store, config: &RetentionConfig, now_ms: i64) -> Result<Pruned> {
    let before = |age: Duration| now_ms - age.as_millis() as i64;
    let mut p = Pruned::default();
    let tables = [
        (
            "audit",
            config.audit_max_age,
            config.audit_max_rows,
            &mut p.audit,
        ),
        (
            "events",
            config.events_max_age,
            config.events_max_rows,
            &mut p.events,
        ),
    ];
    for (table, age, rows, count) in tables {
        loop {
            let n = store.read(|c| prune_batch(c, table, before(age), rows))?;
            *count += n;
            if n == 0 {
                break;
            }
        }
    }
    loop {
        let (ops, logs) = store.tx(|c| {
            prune_operations_batch(
                c,
                before(config.operations_max_age),
                config.operation_log_max_rows,
            )
        })?;
        p.operations += ops;
        p.operation_log += logs;
        if ops == 0 && logs == 0 {
            break;
        }
    }
    Ok(p)
}

/// Prunes a minute after start-up and then every `interval`; also writes
/// the audit summaries of refused anonymous callers whose minute is over.
pub async fn run(coord: Arc<Coordinator>, config: RetentionConfig) {
    let mut next = tokio::time::Instant::now() + Duration::from_secs(60).min(config.interval);
    let mut summaries = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + config.interval;
                let (c, cfg) = (coord.clone(), config.clone());
                let r = tokio::task::spawn_blocking(move || prune(&c.store, &cfg, corral_proto::now_ms())).await;
                match r {
                    Ok(Ok(p)) if p != Pruned::default() => tracing::info!(?p, "retention: pruned old rows"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        coord.counters.error("retention");
                        tracing::error!("retention: pruning: {e:#}");
                    }
                    Err(e) => tracing::error!("retention: {e}"),
                }
            }
            _ = summaries.tick() => {
                let due = coord.anonymous.due_summaries(std::time::Instant::now());
                if !due.is_empty() {
                    let c = coord.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        for (ip, n) in due {
                            c.store.audit("anonymous", "node.enroll", &format!("source {ip}"), &crate::ratelimit::summary_text(n));
                        }
                    }).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (crate::store::Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "corral-retention-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (
            crate::store::Store::open(&dir.join("corral.db")).unwrap(),
            dir,
        )
    }

    #[test]
    fn old_and_surplus_rows_are_pruned_and_unfinished_operations_kept() {
        let (store, dir) = temp_store();
        let day = 86_400_000i64;
        let now = corral_proto::now_ms();
        let config = RetentionConfig {
            audit_max_rows: 3000,
            ..Default::default()
        };
        store
            .tx(|c| {
                for i in 0..5000i64 {
                    // 100 rows older than a year, the rest recent.
                    let at = if i < 100 { now - 400 * day } else { now - i };
                    c.execute(
                        "INSERT INTO audit (at_ms, who, action, target, result) VALUES (?1, 'w', 'a', 't', 'r')",
                        [at],
                    )?;
                    crate::store::insert_event(c, now - if i < 10 { 100 * day } else { 0 }, "n", "c", "k", "m", None)?;
                }
                for (id, state, age) in [("old-done", "succeeded", 400), ("old-running", "running", 400), ("new-done", "failed", 1)] {
                    c.execute(
                        "INSERT INTO operations (id, cluster, kind, state, params, requested_by, created_at_ms, updated_at_ms) \
                         VALUES (?1, 'c', 'k', ?2, '{}', 'w', ?3, ?3)",
                        params![id, state, now - age * day],
                    )?;
                    c.execute("INSERT INTO operation_log (op_id, at_ms, message) VALUES (?1, ?2, 'step')", params![id, now - age * day])?;
                }
                Ok(())
            })
            .unwrap();
        let p = prune(&store, &config, now).unwrap();
        assert_eq!(
            p.audit, 2000,
            "the cap keeps the newest 3000 (the old 100 among the removed)"
        );
        assert_eq!(p.events, 10);
        assert_eq!((p.operations, p.operation_log), (1, 1));
        let left: Vec<String> = store
            .read(|c| {
                Ok(c.prepare("SELECT id FROM operations ORDER BY id")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?)
            })
            .unwrap();
        assert_eq!(left, ["new-done", "old-running"]);
        assert_eq!(prune(&store, &config, now).unwrap(), Pruned::default());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn limits_below_the_floor_are_refused() {
        let bad = RetentionConfig {
            events_max_rows: 10,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("events_max_rows"));
    }
}
