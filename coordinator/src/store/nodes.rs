//! `nodes`: every enrolled node, its agent address, and the cluster and role
//! the coordinator assigned it.

use super::row::in_order;
use anyhow::Result;
use corral_proto::now_ms;
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub id: String,
    pub address: String,
    pub cluster: Option<String>,
    pub role: String,
    pub enrolled_at_ms: i64,
    /// When the agent's certificate expires (0: enrolled before this was
    /// recorded).
    pub cert_not_after_ms: i64,
}

// --------------------------------------------------------------------- nodes

fn node_from_row(r: &rusqlite::Row) -> rusqlite::Result<NodeRow> {
    in_order!(r => NodeRow { id, address, cluster, role, enrolled_at_ms, cert_not_after_ms })
}

const NODE_COLS: &str = "id, address, cluster, role, enrolled_at_ms, cert_not_after_ms";

pub fn get_node(c: &Connection, id: &str) -> Result<Option<NodeRow>> {
    Ok(
        c.prepare_cached(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = ?1"))?
            .query_row([id], node_from_row)
            .optional()?,
    )
}

pub fn list_nodes(c: &Connection) -> Result<Vec<NodeRow>> {
    let mut st = c.prepare_cached(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"))?;
    let rows = st
        .query_map([], node_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub fn nodes_of_cluster(c: &Connection, cluster: &str) -> Result<Vec<NodeRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {NODE_COLS} FROM nodes WHERE cluster = ?1 ORDER BY id"
    ))?;
    let rows = st
        .query_map([cluster], node_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub fn insert_node(
    c: &Connection,
    id: &str,
    fingerprint: &str,
    cert_not_after_ms: i64,
) -> Result<()> {
    c.execute(
        "INSERT INTO nodes (id, enrolled_at_ms, cert_fingerprint, cert_not_after_ms) \
         VALUES (?1, ?2, ?3, ?4)",
        params![id, now_ms(), fingerprint, cert_not_after_ms],
    )?;
    Ok(())
}

pub fn set_node_address(c: &Connection, id: &str, address: &str) -> Result<()> {
    c.execute(
        "UPDATE nodes SET address = ?2 WHERE id = ?1",
        params![id, address],
    )?;
    Ok(())
}

pub fn unassign_node(c: &Connection, id: &str) -> Result<()> {
    c.execute(
        "UPDATE nodes SET cluster = NULL, role = '' WHERE id = ?1",
        [id],
    )?;
    Ok(())
}

pub fn assign_node(c: &Connection, id: &str, cluster: &str, role: &str) -> Result<()> {
    c.execute(
        "UPDATE nodes SET cluster = ?2, role = ?3 WHERE id = ?1",
        params![id, cluster, role],
    )?;
    Ok(())
}
