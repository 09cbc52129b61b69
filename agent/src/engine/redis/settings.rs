//! The driver's constants and small shared helpers: the server's binary,
//! OS account and limits, and the size of a directory.

use crate::engine::os::Account;
use anyhow::Result;
use std::path::Path;
use std::time::Duration;

/// The server binary. Valkey and KeyDB ship `valkey-server` and
/// `keydb-server`, which take the same configuration and commands.
pub(super) const SERVER_BIN: &str = "redis-server";
/// The OS account the server runs as (never root).
pub(super) const SERVER_USER: &str = "redis";
/// Where the binary is looked for.
pub(super) const BIN_DIRS: &[&str] =
    &["/usr/bin", "/usr/local/bin", "/usr/sbin", "/usr/local/sbin"];

/// The ACL user replicas authenticate as.
pub const REPLICATION_USER: &str = "corral_replication";
/// `min-replicas-to-write` of a fenced node: more replicas than any cluster
/// has, so every write is refused.
pub const FENCE_MIN_REPLICAS: u32 = 1_000_000;
/// How far behind (seconds since its last acknowledgement) a replica may be
/// and still count for `min-replicas-to-write` (Redis's default).
pub(super) const SYNC_MAX_LAG: u32 = 10;
/// How long a clean stop may take before it is reported as failed.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the administrative connection and each command may take.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// A clone that receives nothing for this long has failed.
pub(super) const CLONE_STALL: Duration = Duration::from_secs(60);
/// How long a stop waits for the replicas to acknowledge the last write
/// before it shuts down (which then waits again, up to shutdown-timeout).
pub(super) const WAIT_REPLICAS_MS: u64 = 2_000;
/// The channel a stopping primary publishes to, so that `WAIT` has a
/// position after every client write to wait for (nobody listens).
pub(super) const STOP_CHANNEL: &str = "__corral__:stopping";
/// The longest Unix socket path (sun_path holds 108 bytes with the NUL).
pub(super) const MAX_SOCKET_PATH: usize = 107;

/// The OS account the server runs as: [`SERVER_USER`].
pub(super) fn account() -> Result<Account> {
    Account::lookup(SERVER_USER, "install Redis (apt install redis-server)")
}

/// Total size of the files under `dir`.
pub(super) fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
