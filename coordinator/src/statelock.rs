//! One coordinator per state directory.
//!
//! Two coordinators on the same store would both grant leases and both
//! start failovers: the second one to start must not run. The first takes
//! an exclusive `flock` on `lock` in the state directory and writes its pid
//! there; the lock is the kernel's, so it is released when the process
//! dies, however it dies (no stale lock file to remove by hand).

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Held for as long as the coordinator runs.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock of `state_dir`, or says which process holds it.
    pub fn take(state_dir: &Path) -> Result<StateLock> {
        let path = state_dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => "another coordinator".to_string(),
                    pid => format!("another coordinator (pid {pid})"),
                };
                bail!(
                    "{holder} already runs on the state directory {}: it holds {}; stop it \
                     first, or give this one another --state-dir (two coordinators on one \
                     store would both grant leases)",
                    state_dir.display(),
                    path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        // The pid is only there to be named to a second coordinator: a
        // full disk must not keep this one from starting.
        let pid = (|| {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()
        })();
        if let Err(e) = pid {
            tracing::warn!("writing this coordinator's pid to {}: {e}", path.display());
        }
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_directory_and_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::take(dir.path()).unwrap();
        // A second open file description conflicts like a second process.
        let e = StateLock::take(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        let again = StateLock::take(dir.path()).expect("the lock is free once released");
        drop(again);
    }
}
