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

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use corral_proto::pb;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Size of the parts an S3 upload is cut into (S3 wants at least 5 MiB
/// for every part but the last; 10 000 parts of 8 MiB make 80 GiB).
pub const PART_SIZE: usize = 8 << 20;
/// Parts queued between the producer and the uploader.
const QUEUED_PARTS: usize = 1;
/// Parts being uploaded at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Connecting to an S3 endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole requests without a payload (list, delete, starting, aborting an
/// upload), retries included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Total time object_store may spend retrying one request.
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for the next piece of a download.
const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Completing a multipart upload (the server may assemble the parts).
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
/// Marks a local temporary file; names containing it are refused.
const PARTIAL_MARK: &str = ".corral-partial-";
/// The slowest upload rate tolerated for a part, in bytes per second.
const MIN_UPLOAD_RATE: u64 = 128 << 10;

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

fn mkdirs(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn open_local(path: &Path) -> Result<fs::File> {
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

fn local_put<T>(
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

fn local_list(root: &Path, prefix: &str) -> Result<Vec<ObjectInfo>> {
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

fn local_delete(root: &Path, objects: &[ObjectInfo]) -> Result<u64> {
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

#[derive(Clone)]
struct S3 {
    /// For requests without a payload: every request is bounded in time.
    ctl: Arc<AmazonS3>,
    /// For uploads and downloads, which may take long: object_store's
    /// request timeout is off, each step is bounded here instead.
    data: Arc<AmazonS3>,
    /// Key prefix inside the bucket ("" or without surrounding slashes).
    prefix: Arc<str>,
    bucket: Arc<str>,
    describe: Arc<str>,
    /// The operator's name (the coordinator's [backup.targets.NAME]).
    name: Arc<str>,
}

/// How a stream of parts ended on the uploader's side.
enum Msg {
    Part(Bytes),
    /// `produce` returned Ok and everything was sent.
    Done,
}

/// How an upload ended without storing the object.
enum Stop {
    /// The producer stopped (failed or panicked) or put_stream was dropped.
    Producer,
    /// The upload itself failed: the cause.
    Failed(anyhow::Error),
}

/// The upload's failure, for the producer's writer.
#[derive(Default)]
struct Failure(Mutex<Option<String>>);

impl Failure {
    fn set(&self, msg: String) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(msg);
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The writer `produce` gets: cuts the stream in parts and hands them to
/// the uploader; fails as soon as the upload has failed.
struct PartWriter {
    tx: mpsc::Sender<Msg>,
    buf: Vec<u8>,
    failure: Arc<Failure>,
}

impl PartWriter {
    fn failed(&self) -> io::Error {
        io::Error::other(
            self.failure
                .get()
                .unwrap_or_else(|| "the upload stopped".to_string()),
        )
    }

    fn send(&mut self, msg: Msg) -> io::Result<()> {
        self.tx.blocking_send(msg).map_err(|_| self.failed())
    }

    fn send_part(&mut self) -> io::Result<()> {
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(PART_SIZE));
        self.send(Msg::Part(Bytes::from(part)))
    }

    fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        self.send(Msg::Done)
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.tx.is_closed() {
            return Err(self.failed());
        }
        let n = data.len().min(PART_SIZE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PART_SIZE {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Parts go out whole (S3's minimum part size); Done sends the rest.
        if self.tx.is_closed() {
            return Err(self.failed());
        }
        Ok(())
    }
}

/// The time a part of `len` bytes may take to upload.
fn upload_timeout(len: usize) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs(len as u64 / MIN_UPLOAD_RATE)
}

impl S3 {
    fn open(t: &pb::BackupTarget, name: &str, fix: &str) -> Result<S3> {
        if t.bucket.is_empty() {
            bail!("backup target {name}: an s3 target needs a bucket: {fix}");
        }
        let endpoint = t.endpoint.trim().trim_end_matches('/').to_string();
        if !endpoint.is_empty() {
            let Some((scheme, rest)) = endpoint.split_once("://") else {
                bail!(
                    "backup target {name}: the endpoint must be an http:// or https:// URL: {fix}"
                );
            };
            if rest.split('/').next().unwrap_or("").contains('@') {
                bail!(
                    "backup target {name}: the endpoint must not hold credentials \
                     (use access_key_id and secret_access_key): {fix}"
                );
            }
            match scheme {
                "https" => {}
                "http" if t.allow_http => {}
                "http" => bail!(
                    "backup target {name}: the endpoint {endpoint} is plain http; \
                     set allow_http = true to allow it: {fix}"
                ),
                _ => bail!(
                    "backup target {name}: the endpoint {endpoint} must be an http:// or https:// URL: {fix}"
                ),
            }
        }
        if t.access_key_id.is_empty() || t.secret_access_key.is_empty() {
            bail!("backup target {name}: an s3 target needs access_key_id and secret_access_key: {fix}");
        }
        let prefix = t.path.trim_matches('/').to_string();
        if !prefix.is_empty() {
            check_name(&prefix, "path (key prefix)")
                .with_context(|| format!("backup target {name}: {fix}"))?;
        }
        let region = if t.region.is_empty() {
            "us-east-1"
        } else {
            &t.region
        };
        let mut describe = format!("{name} (s3 ");
        if endpoint.is_empty() {
            describe += &format!("region {region}");
        } else {
            describe += &endpoint;
        }
        describe += &format!(" bucket {}", t.bucket);
        if !prefix.is_empty() {
            describe += &format!(" prefix {prefix}");
        }
        describe += ")";
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: RETRY_TIMEOUT,
        };
        let build = |options: ClientOptions| {
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&t.bucket)
                .with_region(region)
                .with_access_key_id(&t.access_key_id)
                .with_secret_access_key(&t.secret_access_key)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(t.allow_http)
                .with_retry(retry.clone())
                .with_client_options(
                    options
                        .with_allow_http(t.allow_http)
                        .with_connect_timeout(CONNECT_TIMEOUT),
                );
            if !endpoint.is_empty() {
                b = b.with_endpoint(&endpoint);
            }
            // The builder's errors quote configuration, never the secret.
            b.build()
                .map_err(|e| anyhow!("backup target {describe}: {e}: {fix}"))
                .map(Arc::new)
        };
        let ctl = build(ClientOptions::new().with_timeout(REQUEST_TIMEOUT))?;
        let data = build(ClientOptions::new().with_timeout_disabled())?;
        Ok(S3 {
            ctl,
            data,
            prefix: prefix.into(),
            bucket: t.bucket.clone().into(),
            describe: describe.into(),
            name: name.into(),
        })
    }

    fn key(&self, name: &str) -> Result<StorePath> {
        let key = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        };
        StorePath::parse(&key).map_err(|e| anyhow!("the object name {name:?} is not valid: {e}"))
    }

    /// The name of a listed key relative to the target.
    fn name_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(key)
        } else {
            key.strip_prefix(&*self.prefix)?.strip_prefix('/')
        }
    }

    /// Explains an object_store error: the target, what was done, the
    /// cause, and what to check.
    fn error(&self, doing: &str, object: &str, e: &object_store::Error) -> anyhow::Error {
        let mut chain = Vec::new();
        let mut http_kind = None;
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
                http_kind.get_or_insert(h.kind());
            }
            chain.push(err.to_string());
            source = err.source();
        }
        let all = chain.join(" | ");
        let root = chain.last().cloned().unwrap_or_default();
        let code = xml_field(&all, "Code");
        let message = xml_field(&all, "Message");
        let server_says = match (&code, &message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.clone(),
            _ => root.clone(),
        };
        use object_store::client::HttpErrorKind;
        let what = format!("backup target {}: {doing} {object:?}", self.describe);
        let check = format!(
            "check the endpoint and credentials in the coordinator's [backup.targets.{}]",
            self.name
        );
        let status = |s: &str| all.contains(&format!("status code: {s}"));
        let cause = match code.as_deref() {
            Some("NoSuchBucket") => format!(
                "the bucket {:?} does not exist ({server_says}); the bucket must exist \
                 (Corral does not create it): create it or {check}",
                self.bucket
            ),
            Some(
                "SignatureDoesNotMatch"
                | "InvalidAccessKeyId"
                | "NotSignedUp"
                | "InvalidSecurity"
                | "AccessDenied"
                | "InvalidToken"
                | "ExpiredToken"
                | "AuthorizationHeaderMalformed",
            ) => format!("the endpoint refused the credentials ({server_says}): {check}"),
            Some("NoSuchKey") => format!("no such object ({server_says})"),
            _ if matches!(
                e,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ) || status("403")
                || status("401") =>
            {
                format!(
                    "the endpoint refused the credentials or their rights ({server_says}): {check}"
                )
            }
            _ if matches!(e, object_store::Error::NotFound { .. }) => {
                format!("not found ({server_says})")
            }
            _ => match http_kind {
                Some(HttpErrorKind::Connect) => {
                    format!("cannot connect to the endpoint ({root}): {check}")
                }
                Some(HttpErrorKind::Timeout) => {
                    format!("the endpoint did not answer in time ({root}): {check}")
                }
                _ => format!("{server_says}: {check}"),
            },
        };
        anyhow!("{what}: {cause}")
    }

    fn timed_out(&self, doing: &str, object: &str, after: Duration) -> anyhow::Error {
        anyhow!(
            "backup target {}: {doing} {object:?}: no answer from the endpoint within {}s: \
             check the endpoint and credentials in the coordinator's [backup.targets.{}]",
            self.describe,
            after.as_secs(),
            self.name
        )
    }

    /// Runs a request with a time bound, explaining its error.
    async fn bounded<T>(
        &self,
        doing: &str,
        object: &str,
        limit: Duration,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(doing, object, &e)),
            Err(_) => Err(self.timed_out(doing, object, limit)),
        }
    }

    async fn put_stream<T, F>(&self, object: &str, produce: F) -> Result<(T, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
    {
        let key = self.key(object)?;
        let (tx, rx) = mpsc::channel(QUEUED_PARTS);
        let failure = Arc::new(Failure::default());
        // Dropped when put_stream is: the uploader then aborts.
        let (_cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let uploader = {
            let s3 = self.clone();
            let object = object.to_string();
            let failure = failure.clone();
            tokio::spawn(async move { s3.upload(&object, key, rx, cancel_rx, &failure).await })
        };
        let mut writer = PartWriter {
            tx,
            buf: Vec::with_capacity(PART_SIZE),
            failure,
        };
        let produced = tokio::task::spawn_blocking(move || {
            let value = produce(&mut writer)?;
            writer.finish()?;
            Ok::<_, anyhow::Error>(value)
        })
        .await;
        let uploaded = uploader
            .await
            .map_err(|e| anyhow!("backup target {}: the uploader stopped: {e}", self.describe))?;
        let produced = produced.map_err(|e| {
            anyhow!(
                "backup target {}: the backup writer stopped: {e}",
                self.describe
            )
        })?;
        match (produced, uploaded) {
            (Ok(value), Ok(stored)) => Ok((value, stored)),
            (_, Err(Stop::Failed(e))) => Err(e),
            (Err(e), _) => Err(e.context(format!(
                "backup target {}: storing {object:?} (nothing stored)",
                self.describe
            ))),
            (Ok(_), Err(Stop::Producer)) => Err(anyhow!(
                "backup target {}: storing {object:?}: the upload stopped",
                self.describe
            )),
        }
    }

    async fn upload(
        &self,
        object: &str,
        key: StorePath,
        mut rx: mpsc::Receiver<Msg>,
        mut cancel: oneshot::Receiver<()>,
        failure: &Failure,
    ) -> Result<u64, Stop> {
        let result = self
            .upload_parts(object, &key, &mut rx, &mut cancel, failure)
            .await;
        if let Err(Stop::Failed(e)) = &result {
            failure.set(format!("{e}"));
        }
        // The producer's next write fails now.
        rx.close();
        result
    }

    async fn upload_parts(
        &self,
        object: &str,
        key: &StorePath,
        rx: &mut mpsc::Receiver<Msg>,
        cancel: &mut oneshot::Receiver<()>,
        failure: &Failure,
    ) -> Result<u64, Stop> {
        async fn next(
            rx: &mut mpsc::Receiver<Msg>,
            cancel: &mut oneshot::Receiver<()>,
        ) -> Result<Msg, Stop> {
            tokio::select! {
                m = rx.recv() => m.ok_or(Stop::Producer),
                _ = cancel => Err(Stop::Producer),
            }
        }
        let put_whole = |part: Bytes| async move {
            let len = part.len();
            self.bounded(
                "storing",
                object,
                upload_timeout(len),
                self.data.put(key, PutPayload::from(part)),
            )
            .await
            .map(|_| len as u64)
            .map_err(Stop::Failed)
        };
        let first = match next(rx, cancel).await? {
            Msg::Done => return put_whole(Bytes::new()).await,
            Msg::Part(b) => b,
        };
        let second = match next(rx, cancel).await? {
            Msg::Done => return put_whole(first).await,
            Msg::Part(b) => b,
        };
        let mut upload = self
            .bounded(
                "starting the upload of",
                object,
                REQUEST_TIMEOUT,
                self.data.put_multipart(key),
            )
            .await
            .map_err(Stop::Failed)?;
        let mut total = 0u64;
        let mut in_flight = FuturesUnordered::new();
        let mut send_part = |upload: &mut Box<dyn object_store::MultipartUpload>, part: Bytes| {
            total += part.len() as u64;
            let limit = upload_timeout(part.len());
            let put = upload.put_part(PutPayload::from(part));
            async move { tokio::time::timeout(limit, put).await.map_err(|_| limit) }
        };
        in_flight.push(send_part(&mut upload, first));
        in_flight.push(send_part(&mut upload, second));
        let part_done = |r: Result<object_store::Result<()>, Duration>| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Stop::Failed(self.error("uploading a part of", object, &e))),
            Err(limit) => Err(Stop::Failed(self.timed_out(
                "uploading a part of",
                object,
                limit,
            ))),
        };
        let sent: Result<(), Stop> = async {
            loop {
                while in_flight.len() >= PARTS_IN_FLIGHT {
                    if let Some(r) = in_flight.next().await {
                        part_done(r)?;
                    }
                }
                tokio::select! {
                    biased;
                    Some(r) = in_flight.next(), if !in_flight.is_empty() => part_done(r)?,
                    m = next(rx, cancel) => match m? {
                        Msg::Part(b) => in_flight.push(send_part(&mut upload, b)),
                        Msg::Done => break,
                    },
                }
            }
            while let Some(r) = in_flight.next().await {
                part_done(r)?;
            }
            Ok(())
        }
        .await;
        drop(in_flight);
        let result = match sent {
            Ok(()) => self
                .bounded(
                    "completing the upload of",
                    object,
                    COMPLETE_TIMEOUT,
                    upload.complete(),
                )
                .await
                .map(|_| total)
                .map_err(Stop::Failed),
            Err(stop) => Err(stop),
        };
        if let Err(stop) = &result {
            // Let the producer stop, with the cause, before the abort's
            // round trip.
            if let Stop::Failed(e) = stop {
                failure.set(format!("{e}"));
            }
            rx.close();
            if let Err(e) = self
                .bounded(
                    "aborting the upload of",
                    object,
                    REQUEST_TIMEOUT,
                    upload.abort(),
                )
                .await
            {
                tracing::warn!(
                    "{e:#} (the bucket may keep the parts until its lifecycle rules remove them)"
                );
            }
        }
        result
    }

    async fn get(&self, object: &str) -> Result<BoxStream<'static, object_store::Result<Bytes>>> {
        let key = self.key(object)?;
        let got = self
            .bounded("reading", object, REQUEST_TIMEOUT, self.data.get(&key))
            .await?;
        Ok(got.into_stream())
    }

    /// The download's chunks, each awaited at most READ_IDLE_TIMEOUT.
    fn chunks(
        &self,
        object: &str,
        stream: BoxStream<'static, object_store::Result<Bytes>>,
    ) -> BoxStream<'static, Result<Bytes>> {
        let s3 = self.clone();
        let object = object.to_string();
        futures::stream::try_unfold(stream, move |mut stream| {
            let s3 = s3.clone();
            let object = object.clone();
            async move {
                match tokio::time::timeout(READ_IDLE_TIMEOUT, stream.next()).await {
                    Ok(None) => Ok(None),
                    Ok(Some(Ok(b))) => Ok(Some((b, stream))),
                    Ok(Some(Err(e))) => Err(s3.error("reading", &object, &e)),
                    Err(_) => Err(s3.timed_out("reading", &object, READ_IDLE_TIMEOUT)),
                }
            }
        })
        .boxed()
    }

    async fn get_chunks(&self, object: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let stream = self.get(object).await?;
        Ok(self.chunks(object, stream))
    }

    async fn get_stream<T, F>(&self, object: &str, consume: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
    {
        let mut chunks = self.chunks(object, self.get(object).await?);
        let (tx, rx) = mpsc::channel::<Result<Bytes, Arc<anyhow::Error>>>(16);
        let forwarder = tokio::spawn(async move {
            while let Some(chunk) = chunks.next().await {
                let failed = chunk.is_err();
                if tx.send(chunk.map_err(Arc::new)).await.is_err() || failed {
                    break;
                }
            }
        });
        let mut reader = ChunkReader {
            rx,
            chunk: Bytes::new(),
            error: None,
        };
        let consumed = tokio::task::spawn_blocking(move || {
            let r = consume(&mut reader);
            (r, reader.error)
        })
        .await;
        // consume may have stopped early: stop the download.
        forwarder.abort();
        let (consumed, download_error) = consumed.map_err(|e| {
            anyhow!(
                "backup target {}: the backup reader stopped: {e}",
                self.describe
            )
        })?;
        match (consumed, download_error) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(e)) => Err(anyhow!("{e}")),
            (Err(e), None) => Err(e.context(format!(
                "backup target {}: reading {object:?}",
                self.describe
            ))),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // object_store lists by whole path parts: list the directory of the
        // prefix and keep the names starting with it.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let dir_key = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(dir.to_string()),
            (false, true) => Some(self.prefix.to_string()),
            (false, false) => Some(format!("{}/{dir}", self.prefix)),
        };
        let dir_key = dir_key
            .map(|k| StorePath::parse(&k).map_err(|e| anyhow!("bad prefix {prefix:?}: {e}")))
            .transpose()?;
        let mut stream = self.ctl.list(dir_key.as_ref());
        let mut found = Vec::new();
        loop {
            let limit = REQUEST_TIMEOUT + RETRY_TIMEOUT;
            let item = match tokio::time::timeout(limit, stream.next()).await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => return Err(self.timed_out("listing", prefix, limit)),
            };
            let meta = item.map_err(|e| self.error("listing", prefix, &e))?;
            let Some(name) = self.name_of(meta.location.as_ref()) else {
                continue;
            };
            if name.starts_with(prefix) {
                found.push(ObjectInfo {
                    name: name.to_string(),
                    size: meta.size,
                    modified_ms: meta.last_modified.timestamp_millis(),
                });
            }
        }
        Ok(found)
    }

    async fn delete(&self, objects: &[ObjectInfo]) -> Result<u64> {
        // Eight at a time. (A plain loop over batches rather than
        // `buffer_unordered` over a borrowing closure, whose future the
        // compiler cannot prove Send for every lifetime inside a spawned
        // task.)
        let mut deleted = 0;
        for batch in objects.chunks(8) {
            let pending: Vec<_> = batch.iter().map(|o| self.delete_one(&o.name)).collect();
            for r in futures::future::join_all(pending).await {
                r?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    async fn delete_one(&self, name: &str) -> Result<()> {
        let key = self.key(name)?;
        match self.ctl.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("deleting", name, &e)),
        }
    }
}

/// `<Field>value</Field>` in an S3 error body.
fn xml_field(text: &str, field: &str) -> Option<String> {
    let start = text.find(&format!("<{field}>"))? + field.len() + 2;
    let end = start + text[start..].find(&format!("</{field}>"))?;
    Some(text[start..end].to_string())
}

/// The `Read` `consume` gets: the download's chunks, arriving through a
/// bounded channel; a download error becomes an I/O error (kept, so that
/// the error returned is the download's).
struct ChunkReader {
    rx: mpsc::Receiver<Result<Bytes, Arc<anyhow::Error>>>,
    chunk: Bytes,
    error: Option<Arc<anyhow::Error>>,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = &self.error {
            return Err(io::Error::other(e.to_string()));
        }
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => {
                    let err = io::Error::other(e.to_string());
                    self.error = Some(e);
                    return Err(err);
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3_desc() -> pb::BackupTarget {
        pb::BackupTarget {
            name: "offsite".into(),
            kind: "s3".into(),
            path: "/corral/prod/".into(),
            endpoint: "http://10.0.0.1:9000/".into(),
            bucket: "backups".into(),
            region: String::new(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "sekrit-do-not-print".into(),
            allow_http: true,
            scope: String::new(),
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "a/b.c", "pg/2024-01-01T00:00:00Z.corral", "x-y_z/1"] {
            check_name(ok, "name").unwrap();
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/../b",
            "./a",
            "a/.",
            "a\\b",
            "a\nb",
            "a/.b.corral-partial-1-2",
        ] {
            assert!(check_name(bad, "name").is_err(), "{bad:?} accepted");
        }
        check_prefix("").unwrap();
        check_prefix("pg/").unwrap();
        check_prefix("pg/2024").unwrap();
        assert!(check_prefix("/").is_err());
        assert!(check_prefix("../").is_err());
    }

    #[test]
    fn describe_and_debug_hide_credentials() {
        let t = Target::open(&s3_desc(), Path::new("/unused")).unwrap();
        assert_eq!(
            t.describe(),
            "offsite (s3 http://10.0.0.1:9000 bucket backups prefix corral/prod)"
        );
        let debug = format!("{t:?}");
        assert!(!debug.contains("sekrit"), "{debug}");
        assert!(!debug.contains("AKIDEXAMPLE"), "{debug}");
        assert_eq!(t.name(), "offsite");
    }

    #[test]
    fn bad_descriptions_are_explained() {
        type Change = fn(&mut pb::BackupTarget);
        let cases: Vec<(Change, &str)> = vec![
            (|t| t.kind = "ftp".into(), "unknown kind"),
            (|t| t.bucket.clear(), "needs a bucket"),
            (|t| t.allow_http = false, "allow_http"),
            (|t| t.secret_access_key.clear(), "secret_access_key"),
            (
                |t| t.endpoint = "10.0.0.1:9000".into(),
                "http:// or https://",
            ),
            (
                |t| t.endpoint = "http://u:sekrit@h:1".into(),
                "must not hold credentials",
            ),
            (|t| t.path = "a/../b".into(), "\"..\""),
            (|t| t.name.clear(), "no name"),
        ];
        for (change, expect) in cases {
            let mut d = s3_desc();
            change(&mut d);
            let e = format!("{:#}", Target::open(&d, Path::new("/x")).unwrap_err());
            assert!(e.contains(expect), "{e:?} lacks {expect:?}");
            assert!(!e.contains("sekrit"), "{e}");
        }
        let local = pb::BackupTarget {
            name: "here".into(),
            kind: "local".into(),
            path: "relative/dir".into(),
            ..Default::default()
        };
        let e = Target::open(&local, Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not absolute"), "{e}");
        let local = pb::BackupTarget {
            path: String::new(),
            ..local
        };
        let t = Target::open(&local, Path::new("/var/lib/corral/backups")).unwrap();
        assert_eq!(t.describe(), "here (local /var/lib/corral/backups)");
    }

    #[test]
    fn xml_fields() {
        let body =
            "<Error><Code>NoSuchBucket</Code><Message>The bucket does not exist</Message></Error>";
        assert_eq!(xml_field(body, "Code").as_deref(), Some("NoSuchBucket"));
        assert_eq!(
            xml_field(body, "Message").as_deref(),
            Some("The bucket does not exist")
        );
        assert_eq!(xml_field(body, "Key"), None);
    }

    #[tokio::test]
    async fn empty_prefix_delete_is_refused() {
        let t = Target::open(
            &pb::BackupTarget {
                name: "here".into(),
                kind: "local".into(),
                path: "/nonexistent-corral-test".into(),
                ..Default::default()
            },
            Path::new("/x"),
        )
        .unwrap();
        let e = t.delete_prefix("").await.unwrap_err().to_string();
        assert!(e.contains("empty prefix"), "{e}");
        assert!(t.list("").await.unwrap().is_empty());
        let e = format!("{:#}", t.put_stream("../x", |_| Ok(())).await.unwrap_err());
        assert!(e.contains("\"..\""), "{e}");
    }
}
