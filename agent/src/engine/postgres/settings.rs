//! The driver's constants and small shared helpers: the server's OS account
//! and quoting a configuration value.

use crate::engine::os::Account;
use anyhow::Result;

/// The OS account the server runs as: `postgres`.
pub(super) fn account() -> Result<Account> {
    Account::lookup("postgres", "install PostgreSQL (apt install postgresql)")
}

/// A single-quoted postgresql.conf value.
pub(super) fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// The role replicas stream as (and pg_basebackup / pg_rewind connect as).
pub const REPLICATION_USER: &str = "corral_replication";

/// Upper bound of WAL a replication slot may hold back on the primary: a
/// replica that falls further behind (or is dead) loses its slot's WAL and
/// must be resynced, instead of filling the primary's disk.
pub(super) const SLOT_WAL_KEEP: &str = "4GB";
