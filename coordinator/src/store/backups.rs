//! `backups`, `backup_schedules` and the WAL archive locations: the record
//! of every backup and schedule (the backups themselves live in the
//! targets, see [`crate::backups`]).

use super::row::in_order;
use super::ClusterRow;
use anyhow::Result;
use rusqlite::{params, Connection, OptionalExtension, Row};

pub mod kind {
    pub const MANUAL: &str = "manual";
    pub const SCHEDULED: &str = "scheduled";
    pub const FINAL: &str = "final";
}

pub mod state {
    pub const RUNNING: &str = "running";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
}

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS backups (
    id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL DEFAULT '',
    engine TEXT NOT NULL,
    version TEXT NOT NULL DEFAULT '',
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER NOT NULL DEFAULT 0,
    plain_bytes INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL DEFAULT '',
    position TEXT NOT NULL DEFAULT '',
    position_time_ms INTEGER NOT NULL DEFAULT 0,
    expires_at_ms INTEGER NOT NULL DEFAULT 0,
    operation TEXT NOT NULL DEFAULT '',
    object TEXT NOT NULL,
    key_id TEXT NOT NULL DEFAULT '',
    wal_target TEXT NOT NULL DEFAULT '',
    wal_prefix TEXT NOT NULL DEFAULT '',
    verified_at_ms INTEGER NOT NULL DEFAULT 0,
    verify_summary TEXT NOT NULL DEFAULT '',
    verify_ok INTEGER NOT NULL DEFAULT 0,
    start_wal TEXT NOT NULL DEFAULT '',
    key_scope TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS backups_by_cluster ON backups(cluster, started_at_ms);
-- Where a cluster's WAL is archived when not the default (after an
-- in-place restore, which starts a new archive). backup_wal held the
-- archives written with the master key (before per-cluster keys); they are
-- read through the prefixes their backups recorded, never written again.
CREATE TABLE IF NOT EXISTS backup_wal (
    cluster TEXT PRIMARY KEY,
    prefix TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS backup_wal_keyed (
    cluster TEXT PRIMARY KEY,
    prefix TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS backup_schedules (
    cluster TEXT PRIMARY KEY,
    cron TEXT NOT NULL,
    retain_count INTEGER NOT NULL,
    retain_ms INTEGER NOT NULL,
    target TEXT NOT NULL,
    last_run_ms INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
";

/// One backup as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupRow {
    pub id: String,
    pub cluster: String,
    pub kind: String,
    pub state: String,
    pub reason: String,
    pub target: String,
    pub node: String,
    pub role: String,
    pub engine: String,
    pub version: String,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    pub sha256: String,
    pub position: String,
    pub position_time_ms: i64,
    pub expires_at_ms: i64,
    pub operation: String,
    pub object: String,
    pub key_id: String,
    /// PostgreSQL: the WAL archive (target, prefix) the cluster was
    /// writing when the backup was taken; empty: no point-in-time recovery.
    pub wal_target: String,
    pub wal_prefix: String,
    pub verified_at_ms: i64,
    pub verify_summary: String,
    pub verify_ok: bool,
    /// PostgreSQL: the WAL segment the backup starts in.
    pub start_wal: String,
    /// What its key was derived for ([`crate::backups::keys`]); empty: the
    /// master key (backups taken before per-cluster keys).
    pub key_scope: String,
}

const COLS: &str = "id, cluster, kind, state, reason, target, node, role, engine, version, \
    started_at_ms, finished_at_ms, plain_bytes, stored_bytes, sha256, position, position_time_ms, \
    expires_at_ms, operation, object, key_id, wal_target, wal_prefix, verified_at_ms, \
    verify_summary, verify_ok, start_wal, key_scope";

fn from_row(r: &Row) -> rusqlite::Result<BackupRow> {
    in_order!(r => BackupRow {
        id, cluster, kind, state, reason, target, node, role, engine, version, started_at_ms,
        finished_at_ms, plain_bytes, stored_bytes, sha256, position, position_time_ms,
        expires_at_ms, operation, object, key_id, wal_target, wal_prefix, verified_at_ms,
        verify_summary, verify_ok, start_wal, key_scope
    })
}

/// Inserts or replaces `b`.
pub fn put(c: &Connection, b: &BackupRow) -> Result<()> {
    c.prepare_cached(&format!(
        "INSERT OR REPLACE INTO backups ({COLS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
          ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)"
    ))?
    .execute(params![
        b.id,
        b.cluster,
        b.kind,
        b.state,
        b.reason,
        b.target,
        b.node,
        b.role,
        b.engine,
        b.version,
        b.started_at_ms,
        b.finished_at_ms,
        b.plain_bytes as i64,
        b.stored_bytes as i64,
        b.sha256,
        b.position,
        b.position_time_ms,
        b.expires_at_ms,
        b.operation,
        b.object,
        b.key_id,
        b.wal_target,
        b.wal_prefix,
        b.verified_at_ms,
        b.verify_summary,
        b.verify_ok,
        b.start_wal,
        b.key_scope,
    ])?;
    Ok(())
}

pub fn get(c: &Connection, id: &str) -> Result<Option<BackupRow>> {
    Ok(
        c.prepare_cached(&format!("SELECT {COLS} FROM backups WHERE id = ?1"))?
            .query_row([id], from_row)
            .optional()?,
    )
}

/// Backups of `cluster` (every cluster when None), oldest first.
pub fn list(c: &Connection, cluster: Option<&str>) -> Result<Vec<BackupRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLS} FROM backups WHERE ?1 IS NULL OR cluster = ?1 ORDER BY started_at_ms, id"
    ))?;
    let rows = st.query_map([cluster], from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn remove(c: &Connection, id: &str) -> Result<()> {
    c.execute("DELETE FROM backups WHERE id = ?1", [id])?;
    Ok(())
}

/// A cluster's backup schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleRow {
    pub cluster: String,
    pub cron: String,
    pub retain_count: u32,
    pub retain_ms: i64,
    pub target: String,
    /// The scheduled time last started (or recorded as missed).
    pub last_run_ms: i64,
    pub created_at_ms: i64,
}

pub fn schedule_of(c: &Connection, cluster: &str) -> Result<Option<ScheduleRow>> {
    Ok(c.prepare_cached(
        "SELECT cluster, cron, retain_count, retain_ms, target, last_run_ms, created_at_ms \
         FROM backup_schedules WHERE cluster = ?1",
    )?
    .query_row([cluster], schedule_from_row)
    .optional()?)
}

fn schedule_from_row(r: &Row) -> rusqlite::Result<ScheduleRow> {
    in_order!(r => ScheduleRow {
        cluster, cron, retain_count, retain_ms, target, last_run_ms, created_at_ms
    })
}

pub fn schedules(c: &Connection) -> Result<Vec<ScheduleRow>> {
    let mut st = c.prepare_cached(
        "SELECT cluster, cron, retain_count, retain_ms, target, last_run_ms, created_at_ms \
         FROM backup_schedules ORDER BY cluster",
    )?;
    let rows = st.query_map([], schedule_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn put_schedule(c: &Connection, s: &ScheduleRow) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO backup_schedules \
         (cluster, cron, retain_count, retain_ms, target, last_run_ms, created_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            s.cluster,
            s.cron,
            s.retain_count,
            s.retain_ms,
            s.target,
            s.last_run_ms,
            s.created_at_ms
        ],
    )?;
    Ok(())
}

pub fn remove_schedule(c: &Connection, cluster: &str) -> Result<()> {
    c.execute("DELETE FROM backup_schedules WHERE cluster = ?1", [cluster])?;
    Ok(())
}

/// Where `cluster` archives its WAL: `wal/<name>/<created_at_ms>/k1/`,
/// or the new archive an in-place restore started. (Archives written with
/// the master key, before per-cluster keys, are `wal/<name>/<created>/`
/// and its `restored-…/`: never written again, so that no archive mixes
/// two keys.)
pub fn wal_prefix(c: &Connection, cluster: &ClusterRow) -> Result<String> {
    let set: Option<String> = c
        .prepare_cached("SELECT prefix FROM backup_wal_keyed WHERE cluster = ?1")?
        .query_row([&cluster.name], |r| r.get(0))
        .optional()?;
    Ok(set.unwrap_or_else(|| format!("wal/{}/{}/k1/", cluster.name, cluster.created_at_ms)))
}

pub fn set_wal_prefix(c: &Connection, cluster: &str, prefix: &str) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO backup_wal_keyed (cluster, prefix) VALUES (?1, ?2)",
        params![cluster, prefix],
    )?;
    Ok(())
}

/// Forgets a deleted cluster's schedule and WAL archive location (the
/// objects stay until their backups expire).
pub fn forget_cluster(c: &Connection, cluster: &str) -> Result<()> {
    remove_schedule(c, cluster)?;
    c.execute("DELETE FROM backup_wal WHERE cluster = ?1", [cluster])?;
    c.execute("DELETE FROM backup_wal_keyed WHERE cluster = ?1", [cluster])?;
    Ok(())
}
