//! The local backend: objects are files under the target's directory,
//! written to a hidden temporary file (`.NAME.corral-partial-…`), fsynced
//! and renamed into place, so an object appears only once complete.

use super::{ObjectInfo, PARTIAL_MARK};
use anyhow::{anyhow, Context, Result};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

fn mkdirs(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

pub(super) fn open_local(path: &Path) -> Result<fs::File> {
    fs::File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow!("no such object ({})", path.display())
        } else {
            anyhow::Error::new(e).context(format!("opening {}", path.display()))
        }
    })
}

/// Removes the temporary file unless disarmed (also when `produce` panics).
struct Partial {
    path: Option<PathBuf>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The file a local object is written to; keeps its first error (the
/// cause, when `produce` hides it behind its own) and counts bytes.
struct FileSink {
    file: fs::File,
    written: u64,
    error: Option<(io::ErrorKind, String)>,
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some((kind, msg)) = &self.error {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        match self.file.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.error = Some((e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

static PARTIAL_SEQ: AtomicU64 = AtomicU64::new(0);

pub(super) fn local_put<T>(
    root: &Path,
    path: &Path,
    produce: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<(T, u64)> {
    let dir = path.parent().unwrap_or(root);
    mkdirs(dir).with_context(|| format!("creating the directory {}", dir.display()))?;
    let base = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{base}{PARTIAL_MARK}{}-{}",
        std::process::id(),
        PARTIAL_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut partial = Partial {
        path: Some(tmp.clone()),
    };
    let sink = FileSink {
        file,
        written: 0,
        error: None,
    };
    let mut writer = io::BufWriter::with_capacity(1 << 20, sink);
    let produced = produce(&mut writer);
    let flushed = writer.flush();
    let sink = writer.into_inner().map_err(|e| e.into_error());
    let stored_error = match &sink {
        Ok(s) => s.error.clone(),
        Err(e) => Some((e.kind(), e.to_string())),
    };
    // The storage's own error is the cause, whatever produce made of it.
    if let Some((kind, msg)) = stored_error {
        return Err(anyhow::Error::new(io::Error::new(kind, msg)))
            .with_context(|| format!("writing {}", tmp.display()));
    }
    let value = produced?;
    flushed.with_context(|| format!("writing {}", tmp.display()))?;
    let sink = sink?;
    sink.file
        .sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    drop(sink.file);
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    partial.path = None;
    // Make the rename durable; a failure here is not worth losing the object.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((value, sink.written))
}

pub(super) fn local_list(root: &Path, prefix: &str) -> Result<Vec<ObjectInfo>> {
    // Walk only the directory the prefix's complete parts lead to.
    let (dir, dir_name) = match prefix.rfind('/') {
        Some(i) => (root.join(&prefix[..i]), format!("{}/", &prefix[..i])),
        None => (root.to_path_buf(), String::new()),
    };
    let mut found = Vec::new();
    let mut stack = vec![(dir, dir_name)];
    while let Some((dir, name)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("reading {}", dir.display())))
            }
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let full = format!("{name}{file_name}");
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("reading {}", entry.path().display())))
                }
            };
            if meta.is_dir() {
                // Descend only where names can still start with the prefix.
                let dir_full = format!("{full}/");
                if dir_full.starts_with(prefix) || prefix.starts_with(&dir_full) {
                    stack.push((entry.path(), dir_full));
                }
            } else if meta.is_file()
                && !file_name.contains(PARTIAL_MARK)
                && full.starts_with(prefix)
            {
                let modified_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as i64);
                found.push(ObjectInfo {
                    name: full,
                    size: meta.len(),
                    modified_ms,
                });
            }
        }
    }
    Ok(found)
}

pub(super) fn local_delete(root: &Path, objects: &[ObjectInfo]) -> Result<u64> {
    let mut deleted = 0;
    for o in objects {
        let path = root.join(&o.name);
        match fs::remove_file(&path) {
            Ok(()) => deleted += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("removing {}", path.display())))
            }
        }
        // Remove the directories left empty, up to the root.
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == root || !d.starts_with(root) || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }
    Ok(deleted)
}

// ---------------------------------------------------------------------------
// S3.
