//! The coordinator's durable state, in one SQLite file.
//!
//! What is stored, because it must survive a restart:
//! - `clusters`: name, engine, mode, lifecycle state, settings (sync,
//!   termination protection) and the admin and replication credentials
//!   (passwords encrypted, see [`crate::secrets`]).
//! - `nodes`: every enrolled node, its last known agent address, and the
//!   cluster and role the coordinator *assigned* it.
//! - `join_tokens`: SHA-256 of each token's secret, expiry, and who used it.
//! - `operations` + `operation_log`: every mutating action, its steps and
//!   outcome, so a restarted coordinator resumes or fails it, never doubles it.
//! - `audit`: who asked for what, when, and the result, refusals included.
//! - `events`: what agents and the liveness monitor observed (engine
//!   restarts, nodes going down/up).
//!
//! What is NOT stored, because heartbeats rebuild it within a second: whether
//! a node is up, its metrics and its engine's current status (see
//! [`crate::fleet`]). Heartbeats therefore write nothing on the hot path.

use anyhow::{Context, Result};
use corral_proto::now_ms;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::path::Path;
use std::sync::Mutex;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS clusters (
    name TEXT PRIMARY KEY,
    engine TEXT NOT NULL,
    mode TEXT NOT NULL,
    state TEXT NOT NULL,
    port INTEGER NOT NULL,
    database TEXT NOT NULL,
    admin_user TEXT NOT NULL,
    admin_password_enc BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL DEFAULT '',
    cluster TEXT REFERENCES clusters(name),
    role TEXT NOT NULL DEFAULT '',
    enrolled_at_ms INTEGER NOT NULL,
    cert_fingerprint TEXT NOT NULL
);
-- Every heartbeat and every failover-monitor pass reads a cluster's members.
CREATE INDEX IF NOT EXISTS nodes_by_cluster ON nodes(cluster);
CREATE TABLE IF NOT EXISTS join_tokens (
    secret_hash TEXT PRIMARY KEY,
    created_by TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_at_ms INTEGER,
    used_by_node TEXT
);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS operations_by_cluster ON operations(cluster, created_at_ms);
CREATE INDEX IF NOT EXISTS operations_unfinished ON operations(state);
CREATE TABLE IF NOT EXISTS operation_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op_id TEXT NOT NULL REFERENCES operations(id),
    at_ms INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operation_log_by_op ON operation_log(op_id, id);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    result TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS allowlist_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    who TEXT NOT NULL,
    version INTEGER NOT NULL,
    old_entries TEXT NOT NULL,
    new_entries TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS allowlist_changes_by_cluster ON allowlist_changes(cluster, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    node TEXT NOT NULL,
    cluster TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    agent_seq INTEGER,
    UNIQUE (node, agent_seq)
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    name TEXT NOT NULL,
    severity TEXT NOT NULL,
    -- firing, resolved, or notice (a one-shot event)
    state TEXT NOT NULL,
    labels TEXT NOT NULL,
    summary TEXT NOT NULL,
    description TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    ended_at_ms INTEGER,
    repeats INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alerts_firing ON alerts(state, fingerprint);
"#;

/// Columns added after the first release: (table, column, definition).
/// Added in place when missing, so a store written by an older coordinator
/// opens and keeps everything.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("clusters", "sync", "INTEGER NOT NULL DEFAULT 0"),
    (
        "clusters",
        "termination_protection",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    ("clusters", "replication_password_enc", "BLOB"),
    ("clusters", "term", "INTEGER NOT NULL DEFAULT 1"),
    ("clusters", "auto_failover", "INTEGER NOT NULL DEFAULT 1"),
    ("clusters", "lease_ms", "INTEGER NOT NULL DEFAULT 2000"),
    ("clusters", "heartbeat_ms", "INTEGER NOT NULL DEFAULT 500"),
    ("clusters", "prev_lease_ms", "INTEGER NOT NULL DEFAULT 0"),
    (
        "clusters",
        "lease_changed_at_ms",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    ("clusters", "allowlist", "TEXT NOT NULL DEFAULT '[]'"),
    (
        "clusters",
        "allowlist_version",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    ("nodes", "cert_not_after_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("backups", "key_scope", "TEXT NOT NULL DEFAULT ''"),
];

fn migrate(conn: &Connection) -> Result<()> {
    for (table, column, def) in ADDED_COLUMNS {
        let exists: bool = conn.query_row(
            &format!("SELECT count(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |r| r.get(0),
        )?;
        if !exists {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))
                .with_context(|| format!("adding {table}.{column}"))?;
            tracing::info!(table, column, "store schema upgraded");
        }
    }
    Ok(())
}

/// Operation states. `pending` and `running` are resumed after a restart.
pub mod op_state {
    pub const PENDING: &str = "pending";
    pub const RUNNING: &str = "running";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
}

pub struct Store {
    conn: Mutex<Connection>,
}

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

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub expires_at_ms: i64,
    pub used_at_ms: Option<i64>,
    pub used_by_node: Option<String>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        // WAL: readers never wait for the writer; synchronous=FULL: a committed
        // operation or audit row survives a power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // The hot reads (a cluster's members at every heartbeat and monitor
        // pass) are prepared once and kept.
        conn.set_prepared_statement_cache_capacity(64);
        conn.execute_batch(SCHEMA).context("creating the schema")?;
        conn.execute_batch(crate::backups::SCHEMA)
            .context("creating the backup tables")?;
        conn.execute_batch(crate::revocation::SCHEMA)
            .context("creating the certificate tables")?;
        migrate(&conn).context("upgrading the schema")?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Runs `f` in one transaction: everything it writes lands, or nothing.
    pub fn tx<T>(&self, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    pub fn audit(&self, who: &str, action: &str, target: &str, result: &str) {
        let r = self.read(|c| {
            insert_audit(c, who, action, target, result)?;
            Ok(())
        });
        if let Err(e) = r {
            // The audit trail is important but not worth failing the caller for
            // a row that could not be written: log loudly instead.
            tracing::error!(error = %e, who, action, target, result, "could not write audit row");
        }
    }
}

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

// ------------------------------------------------------------------ clusters

fn cluster_from_row(r: &rusqlite::Row) -> rusqlite::Result<ClusterRow> {
    Ok(ClusterRow {
        name: r.get(0)?,
        engine: r.get(1)?,
        mode: r.get(2)?,
        state: r.get(3)?,
        port: r.get(4)?,
        database: r.get(5)?,
        admin_user: r.get(6)?,
        admin_password_enc: r.get(7)?,
        created_at_ms: r.get(8)?,
        sync: r.get(9)?,
        termination_protection: r.get(10)?,
        replication_password_enc: r.get(11)?,
        term: r.get::<_, i64>(12)? as u64,
        auto_failover: r.get(13)?,
        lease_ms: r.get(14)?,
        heartbeat_ms: r.get(15)?,
        prev_lease_ms: r.get(16)?,
        lease_changed_at_ms: r.get(17)?,
        allowlist_version: r.get::<_, i64>(18)? as u64,
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

// --------------------------------------------------------------------- nodes

fn node_from_row(r: &rusqlite::Row) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        id: r.get(0)?,
        address: r.get(1)?,
        cluster: r.get(2)?,
        role: r.get(3)?,
        enrolled_at_ms: r.get(4)?,
        cert_not_after_ms: r.get(5)?,
    })
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

// -------------------------------------------------------------- join tokens

pub fn insert_token(c: &Connection, hash: &str, by: &str, expires_at_ms: i64) -> Result<()> {
    c.execute(
        "INSERT INTO join_tokens (secret_hash, created_by, created_at_ms, expires_at_ms) \
         VALUES (?1, ?2, ?3, ?4)",
        params![hash, by, now_ms(), expires_at_ms],
    )?;
    Ok(())
}

pub fn get_token(c: &Connection, hash: &str) -> Result<Option<TokenRow>> {
    Ok(c.query_row(
        "SELECT expires_at_ms, used_at_ms, used_by_node FROM join_tokens WHERE secret_hash = ?1",
        [hash],
        |r| {
            Ok(TokenRow {
                expires_at_ms: r.get(0)?,
                used_at_ms: r.get(1)?,
                used_by_node: r.get(2)?,
            })
        },
    )
    .optional()?)
}

pub fn use_token(c: &Connection, hash: &str, node: &str) -> Result<()> {
    c.execute(
        "UPDATE join_tokens SET used_at_ms = ?2, used_by_node = ?3 WHERE secret_hash = ?1",
        params![hash, now_ms(), node],
    )?;
    Ok(())
}

// --------------------------------------------------------------- operations

pub(crate) fn op_from_row(r: &rusqlite::Row) -> rusqlite::Result<OperationRow> {
    Ok(OperationRow {
        id: r.get(0)?,
        cluster: r.get(1)?,
        kind: r.get(2)?,
        state: r.get(3)?,
        params: r.get(4)?,
        requested_by: r.get(5)?,
        created_at_ms: r.get(6)?,
        updated_at_ms: r.get(7)?,
        error: r.get(8)?,
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
    Ok(EventRow {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        node: r.get(2)?,
        cluster: r.get(3)?,
        kind: r.get(4)?,
        message: r.get(5)?,
    })
}

// -------------------------------------------------------------------- alerts

/// Records an alert that fired (`firing`) or a one-shot notice (`notice`).
pub fn insert_alert(c: &Connection, a: &crate::notify::Alert, state: &str) -> Result<()> {
    c.execute(
        "INSERT INTO alerts (fingerprint, name, severity, state, labels, summary, description, \
         started_at_ms, ended_at_ms, repeats) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            a.fingerprint,
            a.name,
            a.severity.as_str(),
            state,
            serde_json::to_string(&a.labels)?,
            a.summary,
            a.description,
            a.starts_at_ms,
            a.ends_at_ms,
            a.repeat
        ],
    )?;
    Ok(())
}

pub fn alert_repeated(c: &Connection, fingerprint: &str, repeats: u32) -> Result<()> {
    c.execute(
        "UPDATE alerts SET repeats = ?2 WHERE state = 'firing' AND fingerprint = ?1",
        params![fingerprint, repeats],
    )?;
    Ok(())
}

pub fn alert_resolved(c: &Connection, fingerprint: &str, at_ms: i64) -> Result<()> {
    c.execute(
        "UPDATE alerts SET state = 'resolved', ended_at_ms = ?2 \
         WHERE state = 'firing' AND fingerprint = ?1",
        params![fingerprint, at_ms],
    )?;
    Ok(())
}

/// A row of the alert history.
#[derive(Debug, Clone)]
pub struct AlertRow {
    pub alert: crate::notify::Alert,
    pub state: String,
}

fn alert_from_row(r: &rusqlite::Row) -> rusqlite::Result<AlertRow> {
    use crate::notify::{Severity, Status};
    let state: String = r.get(3)?;
    let labels: String = r.get(4)?;
    let severity = match r.get::<_, String>(2)?.as_str() {
        "critical" => Severity::Critical,
        "warning" => Severity::Warning,
        _ => Severity::Info,
    };
    Ok(AlertRow {
        alert: crate::notify::Alert {
            fingerprint: r.get(0)?,
            name: r.get(1)?,
            severity,
            status: if state == "firing" {
                Status::Firing
            } else {
                Status::Resolved
            },
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            summary: r.get(5)?,
            description: r.get(6)?,
            starts_at_ms: r.get(7)?,
            ends_at_ms: r.get(8)?,
            repeat: r.get(9)?,
        },
        state,
    })
}

const ALERT_COLS: &str = "fingerprint, name, severity, state, labels, summary, description, \
                          started_at_ms, ended_at_ms, repeats";

/// The alerts firing when the coordinator last stopped.
pub fn firing_alerts(c: &Connection) -> Result<Vec<crate::notify::Alert>> {
    let mut st = c.prepare(&format!(
        "SELECT {ALERT_COLS} FROM alerts WHERE state = 'firing' ORDER BY id"
    ))?;
    let rows = st
        .query_map([], alert_from_row)?
        .map(|r| r.map(|a| a.alert))
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// The newest `limit` alerts and notices (of `cluster`), oldest first.
pub fn alert_history(c: &Connection, cluster: Option<&str>, limit: u32) -> Result<Vec<AlertRow>> {
    let mut st = c.prepare(&format!(
        "SELECT {ALERT_COLS} FROM (SELECT * FROM alerts \
         WHERE ?1 IS NULL OR json_extract(labels, '$.cluster') = ?1 \
         ORDER BY id DESC LIMIT ?2) ORDER BY id"
    ))?;
    let rows = st
        .query_map(params![cluster, limit], alert_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Forgets alerts that ended, and notices, before `before_ms`; firing
/// alerts stay whatever their age.
pub fn prune_alert_history(c: &Connection, before_ms: i64) -> Result<usize> {
    Ok(c.execute(
        "DELETE FROM alerts WHERE state != 'firing' AND coalesce(ended_at_ms, started_at_ms) < ?1",
        [before_ms],
    )?)
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

#[cfg(test)]
mod tests {

    #[test]
    fn backups_do_not_hold_failover_decisions() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        let op = |id: &str, kind: &str, at: i64| OperationRow {
            id: id.into(),
            cluster: "c".into(),
            kind: kind.into(),
            state: op_state::RUNNING.into(),
            params: "{}".into(),
            requested_by: "t".into(),
            created_at_ms: at,
            updated_at_ms: at,
            error: String::new(),
        };
        insert_operation(&c, &op("o1", crate::model::BACKUP, 1)).unwrap();
        insert_operation(&c, &op("o2", crate::model::VERIFY_BACKUP, 2)).unwrap();
        assert!(holding_operation_of(&c, "c").unwrap().is_none());
        // Other operations still wait for them.
        assert_eq!(unfinished_operation_of(&c, "c").unwrap().unwrap().id, "o1");
        insert_operation(&c, &op("o3", crate::model::RESYNC, 3)).unwrap();
        assert_eq!(holding_operation_of(&c, "c").unwrap().unwrap().id, "o3");
    }

    use super::*;

    fn store() -> (Store, std::path::PathBuf) {
        let dir = corral_proto::unique_temp_dir("corral-store").unwrap();
        (Store::open(&dir.join("corral.db")).unwrap(), dir)
    }

    #[test]
    fn a_failed_transaction_leaves_nothing() {
        let (s, dir) = store();
        let r: Result<()> = s.tx(|tx| {
            insert_node(tx, "vm1", "fp", 0)?;
            anyhow::bail!("refused halfway")
        });
        assert!(r.is_err());
        assert!(s.read(|c| get_node(c, "vm1")).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn alerts_fire_repeat_resolve_and_are_pruned() {
        use crate::notify::{Alert, Severity, Status};
        let (s, dir) = store();
        let alert = |name: &str, cluster: &str, at: i64| Alert {
            name: name.into(),
            fingerprint: format!("{name}/{cluster}/vm1"),
            status: Status::Firing,
            severity: Severity::Critical,
            labels: [("cluster".to_string(), cluster.to_string())].into(),
            summary: "s".into(),
            description: "d".into(),
            starts_at_ms: at,
            ends_at_ms: None,
            repeat: 0,
        };
        s.tx(|tx| {
            insert_alert(tx, &alert("engine_down", "c1", 10), "firing")?;
            insert_alert(tx, &alert("disk_usage_warning", "c2", 20), "firing")?;
            insert_alert(tx, &alert("operation_completed", "c1", 30), "notice")?;
            alert_repeated(tx, "engine_down/c1/vm1", 2)?;
            alert_resolved(tx, "disk_usage_warning/c2/vm1", 40)
        })
        .unwrap();
        let firing = s.read(firing_alerts).unwrap();
        assert_eq!(firing.len(), 1);
        assert_eq!(firing[0].repeat, 2);
        assert_eq!(firing[0].labels["cluster"], "c1");
        assert_eq!(firing[0].severity, Severity::Critical);
        let c1 = s.read(|c| alert_history(c, Some("c1"), 10)).unwrap();
        let names: Vec<_> = c1
            .iter()
            .map(|r| (r.alert.name.as_str(), r.state.as_str()))
            .collect();
        assert_eq!(
            names,
            [("engine_down", "firing"), ("operation_completed", "notice")]
        );
        let all = s.read(|c| alert_history(c, None, 10)).unwrap();
        assert_eq!(all[1].alert.ends_at_ms, Some(40));
        // Pruning keeps what fires, whatever its age.
        assert_eq!(s.read(|c| prune_alert_history(c, 1_000)).unwrap(), 2);
        assert_eq!(s.read(|c| alert_history(c, None, 10)).unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn duplicate_agent_events_are_stored_once() {
        let (s, dir) = store();
        s.read(|c| {
            insert_event(c, 1, "vm1", "", "engine_exited", "x", Some(7))?;
            insert_event(c, 1, "vm1", "", "engine_exited", "x", Some(7))?;
            insert_event(c, 1, "vm2", "", "engine_exited", "x", Some(7))?;
            Ok(())
        })
        .unwrap();
        assert_eq!(
            s.read(|c| crate::listing::events(c, None, None, 10, 0))
                .unwrap()
                .0
                .len(),
            2
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_store_from_before_replication_is_upgraded() {
        let dir = corral_proto::unique_temp_dir("corral-store-old").unwrap();
        let path = dir.join("corral.db");
        {
            // The clusters table as the first release wrote it.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE clusters (name TEXT PRIMARY KEY, engine TEXT NOT NULL, \
                 mode TEXT NOT NULL, state TEXT NOT NULL, port INTEGER NOT NULL, \
                 database TEXT NOT NULL, admin_user TEXT NOT NULL, \
                 admin_password_enc BLOB NOT NULL, created_at_ms INTEGER NOT NULL);
                 INSERT INTO clusters VALUES ('old', 'postgres', 'single', 'running', 5432, \
                 'defaultdb', 'admin', x'00', 1);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let row = s.read(|c| get_cluster(c, "old")).unwrap().unwrap();
        assert!(!row.sync && !row.termination_protection);
        assert!(row.replication_password_enc.is_none());
        drop(s);
        // Opening again changes nothing.
        let s = Store::open(&path).unwrap();
        assert!(s.read(|c| get_cluster(c, "old")).unwrap().is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reopening_keeps_everything() {
        let (s, dir) = store();
        s.tx(|tx| {
            insert_node(tx, "vm1", "fp", 0)?;
            insert_audit(tx, "alice", "node.enroll", "vm1", "ok")
        })
        .unwrap();
        drop(s);
        let s = Store::open(&dir.join("corral.db")).unwrap();
        assert!(s.read(|c| get_node(c, "vm1")).unwrap().is_some());
        assert_eq!(
            s.read(|c| crate::listing::audit(c, 10, 0)).unwrap().0.len(),
            1
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
