//! Cloning: the temporary server that syncs from an upstream, and waiting
//! for its copy.

use super::acl::AGENT_USER;
use super::connection::{cmd, connect};
use super::info::Info;
use super::settings::{CLONE_STALL, COMMAND_TIMEOUT};
use super::Redis;
use crate::engine::os::{log_tail, TAIL_LINES};
use crate::engine::{Driver, ProgressFn, Upstream};
use ::redis::aio::MultiplexedConnection;
use anyhow::{bail, Result};
use std::time::{Duration, Instant};

impl Redis {
    /// Ends a temporary clone server left by an interrupted clone.
    pub(super) async fn kill_clone_server(&self) {
        use nix::sys::signal::{kill, Signal};
        let Some(pid) = self.running_on(&self.clone_pid_path(), &self.clone_conf_path()) else {
            return;
        };
        tracing::info!(pid, "ending the temporary server of an interrupted clone");
        let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        let began = Instant::now();
        while super::super::process_alive(pid) && began.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_file(self.clone_pid_path());
    }

    /// Watches the temporary clone server until it holds a complete copy
    /// (synced, loaded, its first AOF written), reporting progress.
    pub(super) async fn await_clone(
        &self,
        child: &mut tokio::process::Child,
        up: &Upstream,
        password: &str,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        let socket = self.clone_socket();
        let mut conn: Option<MultiplexedConnection> = None;
        let mut last_change = Instant::now();
        let mut last_seen = (String::new(), 0u64);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the temporary {} exited ({status}) before the copy was complete; the end of \
                     its log ({}):\n{}",
                    self.bin,
                    self.log_path().display(),
                    log_tail(&self.log_path(), TAIL_LINES)
                );
            }
            if conn.is_none() {
                conn = connect(&socket, AGENT_USER, password).await.ok();
            }
            let mut text = None;
            if let Some(c) = conn.as_mut() {
                let mut q = cmd("INFO");
                q.arg("replication").arg("persistence");
                match tokio::time::timeout(COMMAND_TIMEOUT, q.query_async::<String>(c)).await {
                    Ok(Ok(t)) => text = Some(t),
                    _ => conn = None,
                }
            }
            if let Some(text) = text {
                let info = Info::parse(&text);
                let link = info.get("master_link_status").unwrap_or("").to_string();
                let read = info.num("master_sync_read_bytes").unwrap_or(0);
                if info.get("master_sync_in_progress") == Some("1") {
                    // Diskless transfers do not know their size: -1, i.e. 0.
                    progress(read, info.num("master_sync_total_bytes").unwrap_or(0));
                }
                let rewriting = info.get("aof_rewrite_in_progress") == Some("1")
                    || info.get("aof_rewrite_scheduled") == Some("1");
                // The AOF is off during the sync and restarted (by writing
                // it whole) right after: done once that is written.
                let done = link == "up"
                    && info.get("master_sync_in_progress") == Some("0")
                    && info.get("loading") == Some("0")
                    && info.get("aof_enabled") == Some("1")
                    && !rewriting;
                if done {
                    return Ok(());
                }
                // Synced and writing its first AOF: local work, no deadline
                // (an exit is caught above).
                if (link.clone(), read) != last_seen || (link == "up" && rewriting) {
                    last_change = Instant::now();
                }
                last_seen = (link, read);
            }
            if last_change.elapsed() > CLONE_STALL {
                bail!(
                    "nothing received from {} ({}:{}) for {}s; the end of the log ({}):\n{}",
                    up.node,
                    up.host,
                    up.port,
                    CLONE_STALL.as_secs(),
                    self.log_path().display(),
                    log_tail(&self.log_path(), TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
