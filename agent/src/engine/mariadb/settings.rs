//! The driver's constants and small shared helpers: the server's OS
//! account, its binaries, the config-file path check.

use crate::engine::os;
use crate::engine::os::Account;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The account replicas stream as (and clone with).
pub const REPLICATION_USER: &str = "corral_replication";
/// The file in the data directory that marks it a replica's.
pub(super) const REPLICA_MARKER: &str = "corral-replica";
/// The binary log's base name, relative to the data directory.
pub(super) const BINLOG: &str = "binlog";
/// How long a stopping server may take.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting and each health query.
pub(super) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Live changes made while fencing: a hung server must not hold the fence up.
pub(super) const FENCE_TIMEOUT: Duration = Duration::from_secs(3);
/// Semi-sync wait in ms: a year, i.e. never fall back to asynchronous
/// replication. (Not the variable's maximum: the server adds it to the
/// clock in nanoseconds.)
pub(super) const SEMI_SYNC_TIMEOUT_MS: u64 = 365 * 24 * 3600 * 1000;
/// The SQL mode of the agent's own sessions: whatever the global mode
/// becomes, backslashes stay escapes in the string literals we build.
pub(super) const AGENT_SQL_MODE: &str =
    "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION";
/// A replica whose replication stopped on an I/O error is restarted at
/// most this often (errors that persist would otherwise flood the log).
pub(super) const RESTART_REPLICATION_EVERY: Duration = Duration::from_secs(5);

/// The OS account the server runs as: `mysql`.
pub(super) fn account() -> Result<Account> {
    Account::lookup("mysql", "install MariaDB (apt install mariadb-server)")
}

/// A MariaDB program, from the usual places.
pub(super) fn binary(name: &str) -> Result<PathBuf> {
    os::find_program(
        name,
        &["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"],
        "install MariaDB's server and client (apt install mariadb-server mariadb-client)",
    )
}

/// A path spliced into my.cnf: option files have no quoting that `!include`
/// honours, so a path must not need any.
pub(super) fn check_cnf_path(p: &Path) -> Result<()> {
    let s = p.to_string_lossy();
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || "\"'\\#;".contains(c))
    {
        bail!(
            "{s:?}: the state directory's path must not contain spaces, quotes, backslashes, \
             '#' or ';' (MariaDB's option files cannot quote it)"
        );
    }
    Ok(())
}
