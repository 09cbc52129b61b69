//! The agent's own log file: `<state_dir>/log/agent.log`, rotated by size.
//!
//! Under systemd the agent's stderr goes to journald; this file is the copy
//! the coordinator can ask for (`corralctl logs --agent`) without a shell on
//! the VM. When a write would take the file past its cap it is renamed to
//! `agent.log.1` (replacing the older one) and a new file begun, so the
//! agent never holds more than twice the cap on disk. Each write is one
//! whole formatted event (tracing-subscriber formats a line, then writes it
//! at once), so a line never straddles two files.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tracing_subscriber::fmt::MakeWriter;

/// The file's size cap.
pub const MAX_BYTES: u64 = 16 << 20;

/// Where the agent's log lives under its state directory.
pub fn agent_log(state_dir: &Path) -> PathBuf {
    state_dir.join("log").join("agent.log")
}

pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    /// The open file and its size; None after a rotation whose reopening
    /// failed (the next write tries again).
    file: Mutex<Option<(File, u64)>>,
}

fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let len = f.metadata()?.len();
    Ok((f, len))
}

impl RotatingFile {
    /// Opens (creating) `path` to append to, and its directory (0700: the
    /// log names clusters, nodes and addresses).
    pub fn open(path: PathBuf, max_bytes: u64) -> io::Result<RotatingFile> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let file = open_append(&path)?;
        Ok(RotatingFile {
            path,
            max_bytes,
            file: Mutex::new(Some(file)),
        })
    }

    fn write_record(&self, buf: &[u8]) -> io::Result<()> {
        let mut slot = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let full = slot
            .as_ref()
            .is_some_and(|(_, size)| *size > 0 && size + buf.len() as u64 > self.max_bytes);
        if full {
            // A failed rename leaves the file in place: it grows past the
            // cap rather than losing lines.
            if std::fs::rename(&self.path, super::read::rotated(&self.path)).is_ok() {
                *slot = None;
            }
        }
        if slot.is_none() {
            *slot = Some(open_append(&self.path)?);
        }
        let (file, size) = slot.as_mut().expect("opened above");
        file.write_all(buf)?;
        *size += buf.len() as u64;
        Ok(())
    }
}

/// One event's write.
pub struct Record<'a>(&'a RotatingFile);

impl Write for Record<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_record(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for RotatingFile {
    type Writer = Record<'a>;
    fn make_writer(&'a self) -> Record<'a> {
        Record(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rotates_at_the_cap_keeping_one_old_file() {
        let dir = std::env::temp_dir().join(format!("corral-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = agent_log(&dir);
        let log = RotatingFile::open(path.clone(), 100).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        let line = |i: u32| format!("{i:039}\n"); // 40 bytes
        for i in 0..5 {
            log.make_writer().write_all(line(i).as_bytes()).unwrap();
        }
        // 0 and 1 fit (80 bytes); 2 rotates; 3 fits; 4 rotates again.
        let old = std::fs::read_to_string(super::super::read::rotated(&path)).unwrap();
        assert_eq!(old, format!("{}{}", line(2), line(3)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line(4));
        // A record larger than the cap is written whole.
        log.make_writer()
            .write_all("y".repeat(300).as_bytes())
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().len(), 300);
        // Reopening appends.
        drop(log);
        let log = RotatingFile::open(path.clone(), 1000).unwrap();
        log.make_writer().write_all(b"z\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().len(), 302);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
