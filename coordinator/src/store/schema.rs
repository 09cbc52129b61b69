//! The schema: every table `CREATE`d if missing, and the columns added since
//! the first release, added in place so an older store opens and keeps
//! everything.

use anyhow::{Context, Result};
use rusqlite::Connection;

pub(super) const SCHEMA: &str = r#"
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

pub(super) fn migrate(conn: &Connection) -> Result<()> {
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
