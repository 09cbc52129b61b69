//! `operations` and `operation_log`: every durable operation, its state and
//! the steps it logged.

use super::row::in_order;
use anyhow::Result;
use corral_proto::now_ms;
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, Clone)]
pub struct OperationRow {
    pub id: String,
    pub cluster: String,
    pub kind: String,
    pub state: String,
    pub params: String,
    pub requested_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub error: String,
}

// --------------------------------------------------------------- operations

pub(crate) fn op_from_row(r: &rusqlite::Row) -> rusqlite::Result<OperationRow> {
    in_order!(r => OperationRow {
        id, cluster, kind, state, params, requested_by, created_at_ms, updated_at_ms, error
    })
}

pub(crate) const OP_COLS: &str =
    "id, cluster, kind, state, params, requested_by, created_at_ms, updated_at_ms, error";

pub fn insert_operation(c: &Connection, op: &OperationRow) -> Result<()> {
    c.execute(
        &format!("INSERT INTO operations ({OP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
        params![
            op.id,
            op.cluster,
            op.kind,
            op.state,
            op.params,
            op.requested_by,
            op.created_at_ms,
            op.updated_at_ms,
            op.error
        ],
    )?;
    Ok(())
}

pub fn get_operation(c: &Connection, id: &str) -> Result<Option<OperationRow>> {
    Ok(
        c.prepare_cached(&format!("SELECT {OP_COLS} FROM operations WHERE id = ?1"))?
            .query_row([id], op_from_row)
            .optional()?,
    )
}

pub fn list_operations(c: &Connection, cluster: Option<&str>) -> Result<Vec<OperationRow>> {
    let mut st = c.prepare(&format!(
        "SELECT {OP_COLS} FROM operations WHERE ?1 IS NULL OR cluster = ?1 ORDER BY created_at_ms, id"
    ))?;
    let rows = st
        .query_map([cluster], op_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub fn unfinished_operations(c: &Connection) -> Result<Vec<OperationRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {OP_COLS} FROM operations WHERE state IN ('pending', 'running') ORDER BY created_at_ms, id"
    ))?;
    let rows = st
        .query_map([], op_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// The operation (pending or running) that holds `cluster`, if any.
pub fn unfinished_operation_of(c: &Connection, cluster: &str) -> Result<Option<OperationRow>> {
    Ok(c.prepare_cached(&format!(
        "SELECT {OP_COLS} FROM operations WHERE cluster = ?1 AND state IN ('pending', 'running') \
             ORDER BY created_at_ms, id LIMIT 1"
    ))?
    .query_row([cluster], op_from_row)
    .optional()?)
}

/// The oldest unfinished operation of `cluster` that holds failover
/// decisions back: any but a backup or a verification
/// ([`crate::model::BACKGROUND`]), which run beside a failover.
pub fn holding_operation_of(c: &Connection, cluster: &str) -> Result<Option<OperationRow>> {
    let background = crate::model::BACKGROUND
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(c.prepare_cached(&format!(
        "SELECT {OP_COLS} FROM operations WHERE cluster = ?1 AND state IN ('pending', 'running') \
             AND kind NOT IN ({background}) ORDER BY created_at_ms, id LIMIT 1"
    ))?
    .query_row([cluster], op_from_row)
    .optional()?)
}

pub fn set_operation_state(c: &Connection, id: &str, state: &str, error: &str) -> Result<()> {
    c.execute(
        "UPDATE operations SET state = ?2, error = ?3, updated_at_ms = ?4 WHERE id = ?1",
        params![id, state, error, now_ms()],
    )?;
    Ok(())
}

pub fn log_operation(c: &Connection, id: &str, message: &str) -> Result<()> {
    c.execute(
        "INSERT INTO operation_log (op_id, at_ms, message) VALUES (?1, ?2, ?3)",
        params![id, now_ms(), message],
    )?;
    c.execute(
        "UPDATE operations SET updated_at_ms = ?2 WHERE id = ?1",
        params![id, now_ms()],
    )?;
    Ok(())
}

pub fn operation_log(c: &Connection, id: &str) -> Result<Vec<(i64, String)>> {
    let mut st =
        c.prepare("SELECT at_ms, message FROM operation_log WHERE op_id = ?1 ORDER BY id")?;
    let rows = st
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}
