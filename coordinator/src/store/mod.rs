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
use rusqlite::{Connection, Transaction};
use std::path::Path;
use std::sync::Mutex;

mod alerts;
pub mod backups;
pub mod certificates;
mod clusters;
mod events;
mod nodes;
mod operations;
pub(crate) mod row;
mod schema;
mod tokens;

use schema::{migrate, SCHEMA};

pub use alerts::*;
pub use clusters::*;
pub use events::*;
pub use nodes::*;
pub use operations::*;
pub use tokens::*;

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
        conn.execute_batch(backups::SCHEMA)
            .context("creating the backup tables")?;
        conn.execute_batch(certificates::SCHEMA)
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

#[cfg(test)]
mod tests;
