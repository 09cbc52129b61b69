//! Where backups are stored: a directory on the node, or an S3-compatible
//! object store (object_store). Objects are written as streams, never
//! staged whole on disk, and appear only once complete.
//!
//! A local target writes a hidden temporary file next to the object
//! (`.NAME.corral-partial-…`, skipped by [`Target::list`]), fsyncs it and
//! renames it into place; any failure removes it. An S3 target hands the
//! producer's bytes, in parts of [`PART_SIZE`], through a small bounded
//! channel to a task uploading them (a single PUT when the object fits in
//! one part, else a multipart upload that is aborted on any failure), so at
//! most a few parts are in memory.
//!
//! Every network operation is bounded in time (connect 5 s, a small retry
//! budget, per-request timeouts), so an unreachable endpoint fails in
//! seconds, and every error names the target (never its credentials), the
//! cause, and where to fix it.

mod local;
mod s3;
#[cfg(test)]
mod tests;
mod upload;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use corral_proto::pb;
use futures::stream::BoxStream;
use futures::StreamExt;
use local::{local_delete, local_list, local_put, open_local};
use s3::S3;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Size of the parts an S3 upload is cut into (S3 wants at least 5 MiB
/// for every part but the last; 10 000 parts of 8 MiB make 80 GiB).
pub const PART_SIZE: usize = 8 << 20;
/// Marks a local temporary file; names containing it are refused.
const PARTIAL_MARK: &str = ".corral-partial-";

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its full name inside the target (what `put_stream` was given).
    pub name: String,
    pub size: u64,
    pub modified_ms: i64,
}

/// An opened backup target.
pub struct Target {
    name: String,
    describe: Arc<str>,
    backend: Backend,
}

enum Backend {
    Local { root: PathBuf },
    S3(S3),
}

/// Debug shows what `describe` shows: never credentials.
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("describe", &&*self.describe)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Opens a target the coordinator described. `local_default` is the
    /// directory of a local target whose path is empty. Checks the
    /// description only (no I/O): a bad one is named with what to fix.
    pub fn open(t: &pb::BackupTarget, local_default: &Path) -> Result<Target> {
        let name = t.name.trim().to_string();
        if name.is_empty() {
            bail!("a backup target has no name: check the coordinator's [backup.targets.NAME] sections");
        }
        let fix = format!("check [backup.targets.{name}] in the coordinator's configuration");
        match t.kind.as_str() {
            "local" => {
                let root = if t.path.is_empty() {
                    local_default.to_path_buf()
                } else {
                    PathBuf::from(&t.path)
                };
                if !root.is_absolute() {
                    bail!(
                        "backup target {name}: the local path {:?} is not absolute: {fix}",
                        root.display().to_string()
                    );
                }
                let describe = format!("{name} (local {})", root.display());
                Ok(Target {
                    name,
                    describe: describe.into(),
                    backend: Backend::Local { root },
                })
            }
            "s3" => {
                let s3 = S3::open(t, &name, &fix)?;
                Ok(Target {
                    name,
                    describe: s3.describe.clone(),
                    backend: Backend::S3(s3),
                })
            }
            other => bail!(
                "backup target {name}: unknown kind {other:?} (expected \"local\" or \"s3\"): {fix}"
            ),
        }
    }

    /// The operator's name of the target and where it points, for messages
    /// (never credentials), e.g. `offsite (s3 http://10.0.0.1:9000 bucket corral)`.
    pub fn describe(&self) -> String {
        self.describe.to_string()
    }

    /// The operator's name of the target.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `produce` on a blocking thread and streams what it writes to
    /// `object`. The object exists afterwards only if `produce` returned Ok
    /// and every byte was stored; otherwise nothing is left under that name
    /// (an S3 multipart upload is aborted, a local temporary file removed).
    /// Returns `produce`'s value and the bytes stored.
    ///
    /// When storing fails, the writer given to `produce` fails (promptly,
    /// with the cause) and the error returned is the storage's.
    pub async fn put_stream<T, F>(&self, object: &str, produce: F) -> Result<(T, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
    {
        check_name(object, "object name").with_context(|| self.context("storing", object))?;
        match &self.backend {
            Backend::Local { root } => {
                let path = root.join(object);
                let context = self.context("storing", object);
                let root = root.clone();
                tokio::task::spawn_blocking(move || local_put(&root, &path, produce))
                    .await
                    .unwrap_or_else(|e| Err(anyhow!("the backup writer stopped: {e}")))
                    .with_context(|| context)
            }
            Backend::S3(s3) => s3.put_stream(object, produce).await,
        }
    }

    /// Streams `object` into `consume`, run on a blocking thread.
    ///
    /// Download errors reach `consume` as I/O errors; when it then fails,
    /// the error returned is the download's. When `consume` returns before
    /// the end, the download stops.
    pub async fn get_stream<T, F>(&self, object: &str, consume: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
    {
        check_name(object, "object name").with_context(|| self.context("reading", object))?;
        match &self.backend {
            Backend::Local { root } => {
                let path = root.join(object);
                let context = self.context("reading", object);
                tokio::task::spawn_blocking(move || {
                    let file = open_local(&path)?;
                    let mut reader = io::BufReader::with_capacity(1 << 20, file);
                    consume(&mut reader)
                })
                .await
                .unwrap_or_else(|e| Err(anyhow!("the backup reader stopped: {e}")))
                .with_context(|| context)
            }
            Backend::S3(s3) => s3.get_stream(object, consume).await,
        }
    }

    /// The object's stored bytes, in chunks (for downloads).
    pub async fn get_chunks(&self, object: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        check_name(object, "object name").with_context(|| self.context("reading", object))?;
        match &self.backend {
            Backend::Local { root } => {
                let path = root.join(object);
                let context = self.context("reading", object);
                let file = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || open_local(&path))
                        .await?
                        .with_context(|| context.clone())?
                };
                let file = tokio::fs::File::from_std(file);
                Ok(futures::stream::try_unfold(file, move |mut file| {
                    let context = context.clone();
                    async move {
                        use tokio::io::AsyncReadExt;
                        let mut buf = Vec::with_capacity(1 << 20);
                        let n = (&mut file)
                            .take(1 << 20)
                            .read_to_end(&mut buf)
                            .await
                            .with_context(|| context)?;
                        Ok(if n == 0 {
                            None
                        } else {
                            Some((Bytes::from(buf), file))
                        })
                    }
                })
                .boxed())
            }
            Backend::S3(s3) => s3.get_chunks(object).await,
        }
    }

    /// Objects whose name starts with `prefix`, sorted by name.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        check_prefix(prefix).with_context(|| self.context("listing", prefix))?;
        let mut found = match &self.backend {
            Backend::Local { root } => {
                let root = root.clone();
                let p = prefix.to_string();
                tokio::task::spawn_blocking(move || local_list(&root, &p))
                    .await?
                    .with_context(|| self.context("listing", prefix))?
            }
            Backend::S3(s3) => s3.list(prefix).await?,
        };
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Deletes every object whose name starts with `prefix` (refused when
    /// empty); returns how many. Idempotent.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        if prefix.is_empty() {
            bail!(
                "backup target {}: refusing to delete with an empty prefix (that would delete everything)",
                self.describe
            );
        }
        let objects = self.list(prefix).await?;
        match &self.backend {
            Backend::Local { root } => {
                let root = root.clone();
                tokio::task::spawn_blocking(move || local_delete(&root, &objects))
                    .await?
                    .with_context(|| self.context("deleting", prefix))
            }
            Backend::S3(s3) => s3.delete(&objects).await,
        }
    }

    fn context(&self, doing: &str, object: &str) -> String {
        format!("backup target {}: {doing} {object:?}", self.describe)
    }
}

/// Checks an object name: relative, `/`-separated, without empty, `.` or
/// `..` parts, control characters or backslashes.
fn check_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty() {
        bail!("the {what} is empty");
    }
    if name.starts_with('/') {
        bail!("the {what} {name:?} starts with \"/\" (names are relative to the target)");
    }
    if name.ends_with('/') {
        bail!("the {what} {name:?} ends with \"/\"");
    }
    for part in name.split('/') {
        if part.is_empty() {
            bail!("the {what} {name:?} has an empty part (\"//\")");
        }
        if part == "." || part == ".." {
            bail!("the {what} {name:?} has a {part:?} part");
        }
        if part.contains(PARTIAL_MARK) {
            bail!("the {what} {name:?} contains {PARTIAL_MARK:?}, reserved for temporary files");
        }
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || *c == '\\') {
        bail!("the {what} {name:?} contains the character {c:?}");
    }
    Ok(())
}

/// A listing prefix: empty, or a name that may end with `/`.
fn check_prefix(prefix: &str) -> Result<()> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() {
        if prefix.is_empty() {
            return Ok(());
        }
        bail!("the prefix {prefix:?} starts with \"/\" (names are relative to the target)");
    }
    check_name(trimmed, "prefix")
}

// ---------------------------------------------------------------------------
// Local directory.

/// Where a local target with no path keeps its objects.
pub fn local_default(state_dir: &Path) -> PathBuf {
    state_dir.join("backups")
}
