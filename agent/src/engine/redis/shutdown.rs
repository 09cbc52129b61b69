//! Stopping a server: quiescing it, recording where it stopped, asking it
//! to shut down and waiting for the process.

use super::config::conf_min_replicas;
use super::connection::cmd;
use super::settings::{
    COMMAND_TIMEOUT, FENCE_MIN_REPLICAS, STOP_CHANNEL, STOP_TIMEOUT, WAIT_REPLICAS_MS,
};
use super::Redis;
use crate::engine::os::{log_tail, TAIL_LINES};
use crate::engine::{os, Driver};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

impl Redis {
    /// Before a stop: ends writes, records the replication offset (every
    /// acknowledged write is below it), and waits (briefly) until every
    /// replica has acknowledged it. Returns the offset and whether every
    /// replica has it.
    ///
    /// Writes are refused (`min-replicas-to-write`, in memory only: the
    /// file keeps the configured value), not paused with `CLIENT PAUSE`,
    /// which would also hold back the replicas' acknowledgements (they then
    /// come once a second). `WAIT` waits for the replicas to reach this
    /// connection's last write: a `PUBLISH` (replicated, and not a write, so
    /// not refused) puts it after every client write.
    pub(super) async fn quiesce_and_record(&self, fenced: bool) -> Result<(u64, bool)> {
        if !fenced {
            self.set_min_replicas((FENCE_MIN_REPLICAS, 1))
                .await
                .context("refusing writes before the stop")?;
        }
        let recorded = async {
            let before = self.info(&["replication"]).await?;
            let replicas = before.num("connected_slaves").unwrap_or(0);
            let primary = !before.is_replica();
            if primary && replicas > 0 && !fenced {
                self.run::<()>(cmd("PUBLISH").arg(STOP_CHANNEL).arg(&self.node_id))
                    .await
                    .context("PUBLISH")?;
            }
            let info = self.info(&["replication"]).await?;
            let offset = info
                .num("master_repl_offset")
                .context("INFO replication shows no master_repl_offset")?;
            let record = serde_json::json!({
                "offset": offset,
                "replid": info.get("master_replid").unwrap_or(""),
            });
            corral_proto::pki::write_private(&self.stopped_path(), &record.to_string())?;
            // (A fenced primary's replicas cannot be reached: no waiting.)
            let mut all_acked = !primary || replicas == 0;
            if primary && replicas > 0 && !fenced {
                let acked: u64 = self
                    .run(cmd("WAIT").arg(replicas).arg(WAIT_REPLICAS_MS))
                    .await
                    .context("WAIT for the replicas")?;
                tracing::info!(
                    offset,
                    acked,
                    replicas,
                    "replicas acknowledged before the stop"
                );
                all_acked = acked >= replicas;
            }
            Ok::<_, anyhow::Error>((offset, all_acked))
        }
        .await;
        if recorded.is_err() && !fenced {
            // The stop may still fail: writes resume meanwhile.
            if let Some(want) =
                conf_min_replicas(&std::fs::read_to_string(self.conf_path()).unwrap_or_default())
            {
                let _ = self.set_min_replicas(want).await;
            }
        }
        recorded
    }

    /// Asks the running server to shut down (`SHUTDOWN`, `NOW`: without
    /// waiting for lagging replicas).
    pub(super) async fn ask_shutdown(&self, now: bool) -> Shutdown {
        let mut c = match self.admin().await {
            Ok(c) => c,
            Err(e) => return Shutdown::Unreachable(e),
        };
        let mut q = cmd("SHUTDOWN");
        if now {
            q.arg("NOW");
        }
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, q.query_async::<()>(&mut c)).await;
        self.forget_conn().await;
        match answer {
            // An error reply: it refused, and runs on.
            Ok(Err(e)) if e.code().is_some() => Shutdown::Refused(e.to_string()),
            // The connection closed (it exits), or no answer yet (it waits
            // for its replicas first).
            _ => Shutdown::Stopping,
        }
    }

    /// The pid of a live server started on `conf`, from `pidfile`.
    pub(super) fn running_on(&self, pidfile: &Path, conf: &Path) -> Option<u32> {
        let comm = Path::new(&self.bin)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.bin.clone());
        let pid = os::running_pid(pidfile, &comm)?;
        // The process title names the config file (proc-title-template):
        // a server of another node on this machine is not ours.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        cmdline
            .trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
            .ends_with(&*conf.to_string_lossy())
            .then_some(pid)
    }

    /// Stops our own child cleanly (SIGTERM, repeated while Redis refuses)
    /// and waits for it.
    pub(super) async fn stop_child(&self, child: &mut tokio::process::Child) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        let Some(pid) = child.id() else {
            return Ok(());
        };
        let began = Instant::now();
        loop {
            let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
            match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                Ok(Ok(status)) if status.success() => return Ok(()),
                Ok(Ok(status)) => bail!(
                    "the temporary {} did not stop cleanly ({status}); the end of its log:\n{}",
                    self.bin,
                    log_tail(&self.log_path(), TAIL_LINES)
                ),
                Ok(Err(e)) => return Err(e).context("waiting for the temporary server"),
                Err(_) if began.elapsed() > STOP_TIMEOUT => {
                    let _ = child.kill().await;
                    bail!(
                        "the temporary {} did not stop within {}s; the end of its log:\n{}",
                        self.bin,
                        STOP_TIMEOUT.as_secs(),
                        log_tail(&self.log_path(), TAIL_LINES)
                    )
                }
                Err(_) => {}
            }
        }
    }
}

/// What asking the server to shut down gave.
pub(super) enum Shutdown {
    /// It exits, or waits for its replicas first.
    Stopping,
    /// It answered with an error and runs on.
    Refused(String),
    /// It could not be asked.
    Unreachable(anyhow::Error),
}
