//! The cluster setting `--require-tls` (`cluster create`): clients must
//! reach the engine over TLS (see docs/database-tls.md); without it TLS is
//! offered (PostgreSQL, MariaDB) and replication uses it anyway. Chosen at
//! creation, sent to every node with each ConfigureEngine
//! (`require_client_tls`).
//!
//! Kept in a table of its own (`cluster_tls`, one row per cluster that
//! requires TLS), created on first use: a store written before it exists
//! reads as "not required".

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS cluster_tls (\
     cluster TEXT PRIMARY KEY, require_client_tls INTEGER NOT NULL)";

/// Records the setting of a cluster being created (a name reused after a
/// delete starts from what its creation says).
pub fn set(c: &Connection, cluster: &str, require: bool) -> Result<()> {
    c.execute_batch(SCHEMA)?;
    c.execute(
        "INSERT OR REPLACE INTO cluster_tls (cluster, require_client_tls) VALUES (?1, ?2)",
        rusqlite::params![cluster, require],
    )?;
    Ok(())
}

/// Whether `cluster` requires TLS from its clients.
pub fn required(c: &Connection, cluster: &str) -> Result<bool> {
    let exists: bool = c.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'cluster_tls'",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(false);
    }
    Ok(c.query_row(
        "SELECT require_client_tls FROM cluster_tls WHERE cluster = ?1",
        [cluster],
        |r| r.get::<_, bool>(0),
    )
    .optional()?
    .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_is_not_required_and_a_creation_overrides() {
        let c = Connection::open_in_memory().unwrap();
        assert!(!required(&c, "a").unwrap());
        set(&c, "a", true).unwrap();
        assert!(required(&c, "a").unwrap());
        assert!(!required(&c, "b").unwrap());
        set(&c, "a", false).unwrap();
        assert!(!required(&c, "a").unwrap());
    }
}
