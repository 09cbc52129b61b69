//! CPU load with stress-ng, to show failover decisions hold when the
//! machine is busy: heartbeats arrive late, health checks slow down, and a
//! lease or liveness rule with too little margin misfires.
//!
//! It runs in the root namespace: CPU is shared by every namespace anyway.

use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `stress-ng`; stopped (with every worker) when dropped.
pub struct Stress {
    child: Child,
}

impl Stress {
    /// `workers` processes spinning on the CPU (`stress-ng --cpu N`), for up
    /// to an hour: the limit is only there so a test process that dies
    /// without dropping this does not leave them spinning forever.
    pub fn cpu(workers: usize) -> Result<Stress> {
        let child = Command::new("stress-ng")
            .args([
                "--cpu",
                &workers.to_string(),
                "--timeout",
                "3600s",
                "--quiet",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: stress-ng forks its workers, and
            // killing the group ends them with it even if the parent
            // cannot tell them to stop.
            .process_group(0)
            .spawn()
            .context("starting stress-ng (scripts/install-deps.sh installs it)")?;
        let mut stress = Stress { child };
        // Bad arguments make it exit at once: say so now, not as a test
        // that mysteriously saw no load.
        std::thread::sleep(Duration::from_millis(100));
        if let Some(status) = stress.child.try_wait()? {
            bail!("stress-ng --cpu {workers} exited at once: {status}");
        }
        Ok(stress)
    }

    /// The pid of the stress-ng parent (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Stress {
    fn drop(&mut self) {
        // SIGTERM to the whole group: stress-ng and each worker stop. Only
        // if stress-ng is still there after 5 s is the group killed (while
        // the parent is unreaped its pid, the group id, cannot be reused).
        let group = format!("-{}", self.child.id());
        let signal = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        signal("-TERM");
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(None) if started.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    signal("-KILL");
                    break;
                }
                _ => break,
            }
        }
        let _ = self.child.wait();
    }
}
