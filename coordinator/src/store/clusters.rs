//! `clusters`: a cluster's engine, mode, lifecycle state, settings, term,
//! lease and allowlist (with its change history).

use super::row::in_order;
use anyhow::{Context, Result};
use corral_proto::now_ms;
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, Clone)]
pub struct ClusterRow {
    pub name: String,
    pub engine: String,
    pub mode: String,
    pub state: String,
    pub port: u32,
    pub database: String,
    pub admin_user: String,
    pub admin_password_enc: Vec<u8>,
    pub created_at_ms: i64,
    pub sync: bool,
    pub termination_protection: bool,
    /// None for clusters created before replication existed; generated on
    /// first need.
    pub replication_password_enc: Option<Vec<u8>>,
    /// Raised, in the same transaction that records the new primary, before
    /// every promotion; agents refuse commands from an older term.
    pub term: u64,
    /// Whether the coordinator promotes a replica on its own when the
    /// primary is lost (off: it only raises the alarm).
    pub auto_failover: bool,
    /// The primary's lease length and the agents' heartbeat period.
    pub lease_ms: u32,
    pub heartbeat_ms: u32,
    /// The lease length before the last change, and when it changed: a
    /// lease granted just before may still run that long (a coordinator
    /// restarted meanwhile must not assume the new, shorter one).
    pub prev_lease_ms: u32,
    pub lease_changed_at_ms: i64,
    /// The version of the IP allowlist, raised at every change. The entries
    /// themselves (possibly 10,000) are read only where they are needed,
    /// with [`allowlist_of`]: clusters are read at every heartbeat and every
    /// failover judgement.
    pub allowlist_version: u64,
}

impl ClusterRow {
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.lease_ms))
    }

    /// Sets the lease length, remembering the previous one.
    pub fn set_lease(&mut self, lease_ms: u32, now_ms: i64) {
        if lease_ms != self.lease_ms {
            self.prev_lease_ms = self.lease_ms;
            self.lease_changed_at_ms = now_ms;
            self.lease_ms = lease_ms;
        }
    }
}

// ------------------------------------------------------------------ clusters

fn cluster_from_row(r: &rusqlite::Row) -> rusqlite::Result<ClusterRow> {
    in_order!(r => ClusterRow {
        name, engine, mode, state, port, database, admin_user, admin_password_enc, created_at_ms,
        sync, termination_protection, replication_password_enc, term, auto_failover, lease_ms,
        heartbeat_ms, prev_lease_ms, lease_changed_at_ms, allowlist_version
    })
}

const CLUSTER_COLS: &str = "name, engine, mode, state, port, database, admin_user, \
     admin_password_enc, created_at_ms, sync, termination_protection, replication_password_enc, \
     term, auto_failover, lease_ms, heartbeat_ms, prev_lease_ms, lease_changed_at_ms, \
     allowlist_version";

pub fn get_cluster(c: &Connection, name: &str) -> Result<Option<ClusterRow>> {
    Ok(c.prepare_cached(&format!(
        "SELECT {CLUSTER_COLS} FROM clusters WHERE name = ?1"
    ))?
    .query_row([name], cluster_from_row)
    .optional()?)
}

pub fn list_clusters(c: &Connection) -> Result<Vec<ClusterRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {CLUSTER_COLS} FROM clusters ORDER BY name"
    ))?;
    let rows = st
        .query_map([], cluster_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub fn insert_cluster(c: &Connection, row: &ClusterRow) -> Result<()> {
    c.execute(
        &format!(
            "INSERT INTO clusters ({CLUSTER_COLS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
             ?19)"
        ),
        params![
            row.name,
            row.engine,
            row.mode,
            row.state,
            row.port,
            row.database,
            row.admin_user,
            row.admin_password_enc,
            row.created_at_ms,
            row.sync,
            row.termination_protection,
            row.replication_password_enc,
            row.term as i64,
            row.auto_failover,
            row.lease_ms,
            row.heartbeat_ms,
            row.prev_lease_ms,
            row.lease_changed_at_ms,
            row.allowlist_version as i64
        ],
    )?;
    Ok(())
}

/// Updates the settings an operator may change, and the lazily generated
/// replication password. The term is not among them: see [`raise_term`].
pub fn update_cluster(c: &Connection, row: &ClusterRow) -> Result<()> {
    c.execute(
        "UPDATE clusters SET mode = ?2, state = ?3, sync = ?4, termination_protection = ?5, \
         replication_password_enc = ?6, auto_failover = ?7, lease_ms = ?8, heartbeat_ms = ?9, \
         prev_lease_ms = ?10, lease_changed_at_ms = ?11 WHERE name = ?1",
        params![
            row.name,
            row.mode,
            row.state,
            row.sync,
            row.termination_protection,
            row.replication_password_enc,
            row.auto_failover,
            row.lease_ms,
            row.heartbeat_ms,
            row.prev_lease_ms,
            row.lease_changed_at_ms
        ],
    )?;
    Ok(())
}

/// The cluster's allowlist entries (canonical; empty: open, or no such
/// cluster).
pub fn allowlist_of(c: &Connection, cluster: &str) -> Result<Vec<String>> {
    let text: Option<String> = c
        .query_row(
            "SELECT allowlist FROM clusters WHERE name = ?1",
            [cluster],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match text {
        Some(t) => serde_json::from_str(&t).context("reading a stored allowlist")?,
        None => Vec::new(),
    })
}

/// Replaces the cluster's allowlist, raising its version, and records the
/// change (who, old and new lists) in the same transaction. Returns the
/// new version.
pub fn set_allowlist(
    c: &Connection,
    cluster: &str,
    who: &str,
    old: &[String],
    new: &[String],
) -> Result<u64> {
    c.execute(
        "UPDATE clusters SET allowlist = ?2, allowlist_version = allowlist_version + 1 \
         WHERE name = ?1",
        params![cluster, serde_json::to_string(new)?],
    )?;
    let version: i64 = c.query_row(
        "SELECT allowlist_version FROM clusters WHERE name = ?1",
        [cluster],
        |r| r.get(0),
    )?;
    c.execute(
        "INSERT INTO allowlist_changes (cluster, at_ms, who, version, old_entries, new_entries) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            cluster,
            now_ms(),
            who,
            version,
            serde_json::to_string(old)?,
            serde_json::to_string(new)?
        ],
    )?;
    Ok(version as u64)
}

/// A recorded allowlist change.
pub struct AllowlistChangeRow {
    pub at_ms: i64,
    pub who: String,
    pub version: u64,
    pub old: Vec<String>,
    pub new: Vec<String>,
}

pub fn allowlist_changes(c: &Connection, cluster: &str) -> Result<Vec<AllowlistChangeRow>> {
    let mut st = c.prepare(
        "SELECT at_ms, who, version, old_entries, new_entries FROM allowlist_changes \
         WHERE cluster = ?1 ORDER BY id",
    )?;
    let rows = st
        .query_map([cluster], |r| {
            Ok(AllowlistChangeRow {
                at_ms: r.get(0)?,
                who: r.get(1)?,
                version: r.get::<_, i64>(2)? as u64,
                old: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
                new: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Raises the cluster's term by one and makes `primary` its primary (the
/// node that was primary becomes a replica), in the caller's transaction:
/// the new term is on disk before any agent hears of it. Returns the term.
pub fn raise_term(c: &Connection, cluster: &str, primary: &str) -> Result<u64> {
    c.execute(
        "UPDATE clusters SET term = term + 1 WHERE name = ?1",
        [cluster],
    )?;
    c.execute(
        "UPDATE nodes SET role = 'replica' WHERE cluster = ?1 AND role = 'primary' AND id <> ?2",
        params![cluster, primary],
    )?;
    c.execute(
        "UPDATE nodes SET role = 'primary' WHERE cluster = ?1 AND id = ?2",
        params![cluster, primary],
    )?;
    let term: i64 = c.query_row(
        "SELECT term FROM clusters WHERE name = ?1",
        [cluster],
        |r| r.get(0),
    )?;
    Ok(term as u64)
}

/// Removes the cluster; its nodes become free. Operations and the audit
/// trail keep their rows (they name the cluster, they do not reference it).
pub fn delete_cluster(c: &Connection, name: &str) -> Result<()> {
    c.execute(
        "UPDATE nodes SET cluster = NULL, role = '' WHERE cluster = ?1",
        [name],
    )?;
    c.execute("DELETE FROM clusters WHERE name = ?1", [name])?;
    Ok(())
}

pub fn set_cluster_state(c: &Connection, name: &str, state: &str) -> Result<()> {
    c.execute(
        "UPDATE clusters SET state = ?2 WHERE name = ?1",
        params![name, state],
    )?;
    Ok(())
}
