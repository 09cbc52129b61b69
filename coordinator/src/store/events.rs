//! `audit` (who asked for what, and the result) and `events` (what agents
//! and the liveness monitor observed).

use super::row::in_order;
use anyhow::Result;
use corral_proto::now_ms;
use rusqlite::{params, Connection};

pub fn insert_audit(
    c: &Connection,
    who: &str,
    action: &str,
    target: &str,
    result: &str,
) -> Result<()> {
    c.execute(
        "INSERT INTO audit (at_ms, who, action, target, result) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now_ms(), who, action, target, result],
    )?;
    Ok(())
}

// -------------------------------------------------------------- audit, events

pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub who: String,
    pub action: String,
    pub target: String,
    pub result: String,
}

pub struct EventRow {
    pub id: i64,
    pub at_ms: i64,
    pub node: String,
    pub cluster: String,
    pub kind: String,
    pub message: String,
}

/// Stores an event; an agent event already stored (same node and sequence
/// number, e.g. re-sent after a lost acknowledgement) is ignored.
pub fn insert_event(
    c: &Connection,
    at_ms: i64,
    node: &str,
    cluster: &str,
    kind: &str,
    message: &str,
    agent_seq: Option<u64>,
) -> Result<()> {
    c.execute(
        "INSERT OR IGNORE INTO events (at_ms, node, cluster, kind, message, agent_seq) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            at_ms,
            node,
            cluster,
            kind,
            message,
            agent_seq.map(|s| s as i64)
        ],
    )?;
    Ok(())
}

pub(crate) fn event_from_row(r: &rusqlite::Row) -> rusqlite::Result<EventRow> {
    in_order!(r => EventRow { id, at_ms, node, cluster, kind, message })
}

pub fn last_event_id(c: &Connection) -> Result<i64> {
    Ok(c.query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| r.get(0))?)
}

/// Events after id `after`, oldest first, at most `limit`.
pub fn events_after(c: &Connection, after: i64, limit: u32) -> Result<Vec<EventRow>> {
    let mut st = c.prepare_cached(
        "SELECT id, at_ms, node, cluster, kind, message FROM events WHERE id > ?1 \
         ORDER BY id LIMIT ?2",
    )?;
    let rows = st
        .query_map(params![after, limit], event_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}
