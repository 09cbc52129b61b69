//! Backups on the node: taking them (the engine's own stream, compressed
//! and encrypted by [`corral_proto::archive`], streamed to a [`target`]),
//! verifying and reading them back, restoring, and PostgreSQL's continuous
//! WAL archiving ([`wal`]).
//!
//! The key (the cluster's own, derived by the coordinator) comes with each
//! request from the coordinator and is kept in memory only for the
//! request, except for WAL archiving, which runs without the coordinator:
//! its target and key are kept in `wal-archive.json` (0600, root) in the
//! agent's state directory. Each request's target names the cluster it is
//! about, and [`scope`] refuses objects outside that cluster's prefixes.

pub mod key;
pub mod scope;
pub mod target;
pub mod wal;
pub mod wal_config;

pub use key::key_of;

use crate::engine::{Driver, Engine, EngineSpec, ProgressFn, Recovery};
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::archive;
use corral_proto::pb;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use target::Target;
use tokio::sync::watch;

/// A backup's outcome, shared by every caller waiting for it.
type Outcome = Option<Result<pb::BackupResult, String>>;

/// Backups taken by this agent: running ones and recent results, so a
/// retried TakeBackup waits for (or returns) the first one instead of
/// taking a second.
pub struct Backups {
    engine: Arc<Engine>,
    node: String,
    state_dir: PathBuf,
    runs: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
}

/// Results kept for retries.
const KEEP_RESULTS: usize = 64;

/// Where a local target with no path keeps its objects.
pub fn local_default(state_dir: &Path) -> PathBuf {
    state_dir.join("backups")
}

impl Backups {
    pub fn new(engine: Arc<Engine>, node: String, state_dir: PathBuf) -> Arc<Backups> {
        Arc::new(Backups {
            engine,
            node,
            state_dir,
            runs: Mutex::new(HashMap::new()),
        })
    }

    pub fn target(&self, t: Option<&pb::BackupTarget>) -> Result<Target> {
        let t = t.context("the request names no backup target")?;
        Target::open(t, &local_default(&self.state_dir))
    }

    /// The target, once `name` is checked to lie in its cluster scope.
    fn scoped(&self, t: Option<&pb::BackupTarget>, name: &str) -> Result<Target> {
        if let Some(t) = t {
            scope::check(t, name)?;
        }
        self.target(t)
    }

    /// TakeBackup: starts the backup `req.id` unless it runs or ran, then
    /// waits for its outcome. The backup goes on if the caller goes away.
    pub async fn take(self: &Arc<Self>, req: pb::TakeBackupRequest) -> Result<pb::BackupResult> {
        if req.id.is_empty() || req.object.is_empty() {
            bail!("a backup needs an id and an object name");
        }
        let mut rx = {
            let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            match runs.get(&req.id) {
                Some(rx) => rx.clone(),
                None => {
                    if runs.len() >= KEEP_RESULTS {
                        runs.retain(|_, rx| rx.borrow().is_none());
                    }
                    let (tx, rx) = watch::channel(None);
                    runs.insert(req.id.clone(), rx.clone());
                    let me = self.clone();
                    tokio::spawn(async move {
                        let out = me.run(req).await.map_err(|e| format!("{e:#}"));
                        let _ = tx.send(Some(out));
                    });
                    rx
                }
            }
        };
        let out = rx
            .wait_for(|o| o.is_some())
            .await
            .map_err(|_| anyhow!("the backup task ended without an outcome"))?
            .clone();
        out.expect("waited for Some").map_err(|e| anyhow!(e))
    }

    async fn run(&self, req: pb::TakeBackupRequest) -> Result<pb::BackupResult> {
        let key = key_of(&req.key)?;
        let status = self.engine.status();
        let spec = self
            .engine
            .spec()
            .context("this node runs no engine, so there is nothing to back up")?;
        if spec.cluster != req.cluster {
            bail!(
                "this node serves cluster {:?}, not {:?}",
                spec.cluster,
                req.cluster
            );
        }
        if status.state != pb::EngineState::Running as i32 {
            bail!(
                "the engine is not running ({}), so it cannot be backed up",
                status.message
            );
        }
        if let Some(t) = &req.target {
            scope::check_own(t, &spec.cluster, &req.object)?;
        }
        let target = self.target(req.target.as_ref())?;
        let driver = self.engine.driver();
        let started_at_ms = corral_proto::now_ms();
        let header = archive::Header {
            meta: serde_json::json!({
                "kind": "backup",
                "id": req.id,
                "cluster": spec.cluster,
                "engine": spec.engine,
                "node": self.node,
                "role": spec.role,
                "started_at_ms": started_at_ms,
            }),
        };
        let message = format!("backing up to {}", target.describe());
        tracing::info!(id = %req.id, object = %req.object, "{message}");
        let engine = self.engine.clone();
        let task_message = message.clone();
        let progress = move |done: u64, total: u64| {
            engine.set_task(Some(pb::Progress {
                kind: "backup".into(),
                done_bytes: done,
                total_bytes: total,
                message: task_message.clone(),
                started_at_ms,
            }))
        };
        progress(0, 0);
        let spec2 = spec.clone();
        let outcome = target
            .put_stream(&req.object, move |out| {
                let mut w = archive::Writer::new(out, &key, header)?;
                let info = driver.backup(&spec2, &mut w, &progress)?;
                let summary = w.finish()?;
                Ok((info, summary))
            })
            .await;
        self.engine.set_task(None);
        let ((info, summary), stored) =
            outcome.with_context(|| format!("backing up to {}", target.describe()))?;
        if stored != summary.stored_bytes {
            bail!(
                "the target stored {stored} bytes of a {} byte backup",
                summary.stored_bytes
            );
        }
        let finished_at_ms = corral_proto::now_ms();
        tracing::info!(id = %req.id, plain = summary.plain_bytes, stored, "backup done");
        Ok(pb::BackupResult {
            id: req.id,
            engine: spec.engine,
            version: info.version,
            node: self.node.clone(),
            started_at_ms,
            finished_at_ms,
            plain_bytes: summary.plain_bytes,
            stored_bytes: summary.stored_bytes,
            sha256: summary.sha256_hex,
            position: info.position,
            key_id: archive::key_id(&key),
            object: req.object,
            position_time_ms: if info.position_time_ms > 0 {
                info.position_time_ms
            } else {
                finished_at_ms
            },
            role: spec.role,
            start_wal: info.start_wal,
        })
    }

    /// VerifyBackup: reads the object through the key into the engine's
    /// own check, in a scratch directory.
    pub async fn verify(&self, req: pb::VerifyBackupRequest) -> Result<pb::VerifyBackupResponse> {
        let key = key_of(&req.key)?;
        let target = self.scoped(req.target.as_ref(), &req.object)?;
        let driver = self
            .engine
            .driver_for(&req.engine)
            .with_context(|| format!("verifying a backup of {}", req.engine))?;
        let scratch = self.state_dir.join(format!("verify-{}", unique()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let sc = scratch.clone();
        let expected = req.sha256.clone();
        let object = req.object.clone();
        let outcome = target
            .get_stream(&req.object, move |input| {
                read_checked(input, &key, &expected, &object, |r| driver.verify(r, &sc))
            })
            .await;
        let _ = std::fs::remove_dir_all(&scratch);
        let (summary, counts) = outcome?;
        Ok(pb::VerifyBackupResponse {
            plain_bytes: counts.plain,
            stored_bytes: counts.stored,
            summary,
        })
    }

    /// DeleteBackupObjects: every object under the prefix, or (with
    /// `wal_before`) the archived WAL segments no backup needs any more.
    pub async fn delete(&self, req: pb::DeleteBackupObjectsRequest) -> Result<u64> {
        if req.prefix.is_empty() {
            bail!("refusing to delete with an empty prefix (it would mean every object)");
        }
        let target = self.scoped(req.target.as_ref(), &req.prefix)?;
        if req.wal_before.is_empty() {
            return target.delete_prefix(&req.prefix).await;
        }
        if !wal::is_segment(&req.wal_before) {
            bail!("{:?} is not a WAL segment file name", req.wal_before);
        }
        let mut deleted = 0;
        for o in target.list(&req.prefix).await? {
            let name = o.name.strip_prefix(&req.prefix).unwrap_or(&o.name);
            if wal::is_segment(name) && *name < *req.wal_before {
                deleted += target.delete_prefix(&o.name).await?;
            }
        }
        Ok(deleted)
    }

    /// ReadBackupObject: the raw bytes, or (with a key) the decrypted
    /// stream, which stops with an error at the first damaged chunk.
    pub async fn read(
        &self,
        req: pb::ReadBackupObjectRequest,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>> {
        let target = self.scoped(req.target.as_ref(), &req.object)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        if req.key.is_empty() {
            use futures::StreamExt;
            let mut chunks = target.get_chunks(&req.object).await?;
            tokio::spawn(async move {
                while let Some(c) = chunks.next().await {
                    let end = c.is_err();
                    if tx.send(c.map_err(|e| format!("{e:#}"))).await.is_err() || end {
                        break;
                    }
                }
            });
            return Ok(rx);
        }
        let key = key_of(&req.key)?;
        let object = req.object.clone();
        tokio::spawn(async move {
            let tx2 = tx.clone();
            let name = object.clone();
            let r = target
                .get_stream(&name, move |input| {
                    let mut reader = archive::Reader::new(input, &key)
                        .map_err(|e| anyhow!("reading backup object {object}: {e}"))?;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = reader
                            .read(&mut buf)
                            .map_err(|e| anyhow!("backup object {object} is damaged: {e}"))?;
                        if n == 0 {
                            return Ok(());
                        }
                        if tx2
                            .blocking_send(Ok(bytes::Bytes::copy_from_slice(&buf[..n])))
                            .is_err()
                        {
                            return Ok(()); // the reader went away
                        }
                    }
                })
                .await;
            if let Err(e) = r {
                let _ = tx.send(Err(format!("{e:#}"))).await;
            }
        });
        Ok(rx)
    }
}

/// Bytes read from a stored object and out of it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub stored: u64,
    pub plain: u64,
}

/// Counts and hashes what passes through.
struct Hashing<'a, R> {
    inner: R,
    hash: &'a mut Sha256,
    bytes: &'a mut u64,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        *self.bytes += n as u64;
        Ok(n)
    }
}

/// Decrypts and keeps the first error, so that whatever the consumer
/// (a tar process, a driver) makes of a broken stream, the report names
/// the damaged chunk.
struct Checked<'a, R: Read> {
    inner: &'a mut archive::Reader<R>,
    first_error: Option<String>,
    plain: u64,
}

impl<R: Read> Read for Checked<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.plain += n as u64;
                Ok(n)
            }
            Err(e) => {
                if self.first_error.is_none() {
                    self.first_error = Some(e.to_string());
                }
                Err(e)
            }
        }
    }
}

/// Reads the stored object `input` through `key` into `consume`, then
/// checks that the whole object was sound: every chunk authenticated to
/// the end, and (when `expected` is given) its sha256 as recorded at
/// backup time. A damaged object is reported as such, naming where,
/// whatever `consume` made of it.
pub fn read_checked<T>(
    input: &mut dyn Read,
    key: &[u8; 32],
    expected: &str,
    object: &str,
    consume: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<(T, Counts)> {
    let mut hash = Sha256::new();
    let mut stored = 0u64;
    let hashing = Hashing {
        inner: input,
        hash: &mut hash,
        bytes: &mut stored,
    };
    let damaged = |what: String| {
        anyhow!(
            "backup object {object} is damaged: {what}; it cannot be restored (another \
             backup can: `corralctl backup list`)"
        )
    };
    let mut reader = archive::Reader::new(hashing, key).map_err(|e| match e {
        archive::Error::WrongKey { .. } => anyhow!(
            "backup object {object} was encrypted with another key ({e}); the coordinator's \
             backup key file must be the one it was taken with"
        ),
        e => damaged(e.to_string()),
    })?;
    let mut checked = Checked {
        inner: &mut reader,
        first_error: None,
        plain: 0,
    };
    let out = consume(&mut checked);
    if let Some(e) = checked.first_error.take() {
        return Err(damaged(e));
    }
    let out = out?;
    // The consumer may stop at the end of its format (a tar's end marker);
    // the rest must still authenticate, up to the final chunk.
    let rest = std::io::copy(&mut checked, &mut std::io::sink());
    if let Some(e) = checked.first_error.take() {
        return Err(damaged(e));
    }
    rest.map_err(|e| damaged(e.to_string()))?;
    let plain = checked.plain;
    drop(reader);
    let sha = hex::encode(hash.finalize());
    if !expected.is_empty() && sha != expected {
        return Err(damaged(format!(
            "its sha256 is {sha}, but {expected} was recorded when it was taken"
        )));
    }
    Ok((out, Counts { stored, plain }))
}

/// Fills the empty data directory of a new primary from a backup (and, for
/// a point in time, the WAL archive). Blocking parts run on a blocking
/// thread; `progress` gets the stored bytes read.
pub async fn restore(
    driver: Arc<dyn Driver>,
    spec: &EngineSpec,
    source: &pb::RestoreSource,
    state_dir: &Path,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> Result<()> {
    let key = key_of(&source.key)?;
    let described = source
        .target
        .as_ref()
        .context("the restore names no target")?;
    scope::check(described, &source.object)?;
    let target = Target::open(described, &local_default(state_dir))?;
    let mut recovery = None;
    let wal_dir = state_dir.join("restore-wal");
    if source.to_time_ms > 0 {
        let wal = source
            .wal
            .as_ref()
            .context("a point-in-time restore needs the source's WAL archive")?;
        if let Some(t) = &wal.target {
            scope::check(t, &wal.prefix)?;
        }
        let _ = std::fs::remove_dir_all(&wal_dir);
        wal::fetch_all(wal, &wal_dir, state_dir, &source.start_wal).await?;
        recovery = Some(Recovery {
            to_time_ms: source.to_time_ms,
            wal_dir: wal_dir.clone(),
        });
    }
    let spec = spec.clone();
    let expected = source.sha256.clone();
    let object = source.object.clone();
    let total = source.stored_bytes;
    let outcome = target
        .get_stream(&source.object, move |input| {
            let mut counting = Progressing {
                inner: input,
                done: 0,
                total,
                progress: &progress,
            };
            read_checked(&mut counting, &key, &expected, &object, |r| {
                driver.restore(&spec, r, recovery.as_ref())
            })
        })
        .await;
    let _ = std::fs::remove_dir_all(&wal_dir);
    outcome.map(|_| ())
}

/// Reports the stored bytes read (of `total`, 0 when unknown).
struct Progressing<'a, R: ?Sized> {
    inner: &'a mut R,
    done: u64,
    total: u64,
    progress: ProgressFn<'a>,
}

impl<R: Read + ?Sized> Read for Progressing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done % (8 << 20) < n as u64 {
            (self.progress)(self.done, self.total.max(self.done));
        }
        Ok(n)
    }
}

/// A name no other scratch directory of this process has.
fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn archive_of(data: &[u8], key: &[u8; 32]) -> (Vec<u8>, String) {
        let mut out = Vec::new();
        let mut w = archive::Writer::new(
            &mut out,
            key,
            archive::Header {
                meta: serde_json::json!({}),
            },
        )
        .unwrap();
        w.write_all(data).unwrap();
        let s = w.finish().unwrap();
        (out, s.sha256_hex)
    }

    #[test]
    fn read_checked_passes_a_sound_object_and_counts_it() {
        let key = [7u8; 32];
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (obj, sha) = archive_of(&data, &key);
        let (got, counts) = read_checked(&mut &obj[..], &key, &sha, "o", |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            Ok(v)
        })
        .unwrap();
        assert_eq!(got, data);
        assert_eq!(counts.stored, obj.len() as u64);
        assert_eq!(counts.plain, data.len() as u64);
    }

    #[test]
    fn a_changed_byte_is_named_even_when_the_consumer_hides_it() {
        let key = [7u8; 32];
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let (mut obj, sha) = archive_of(&data, &key);
        let at = obj.len() / 2;
        obj[at] ^= 1;
        // A consumer that swallows read errors (as a tar process would
        // report "broken pipe") still yields an error naming the damage.
        let err = read_checked(&mut &obj[..], &key, &sha, "backups/c/b1", |r| {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("backup object backups/c/b1 is damaged"),
            "{err}"
        );
        assert!(err.contains("chunk"), "{err}");
    }

    #[test]
    fn a_consumer_stopping_early_does_not_skip_the_check_of_the_rest() {
        let key = [9u8; 32];
        let data = vec![1u8; 3 << 20];
        let (mut obj, sha) = archive_of(&data, &key);
        let last = obj.len() - 3;
        obj[last] ^= 0x40;
        let err = read_checked(&mut &obj[..], &key, &sha, "o", |r| {
            let mut first = [0u8; 10];
            r.read_exact(&mut first)?;
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn a_recorded_checksum_that_differs_is_refused() {
        let key = [3u8; 32];
        let (obj, _) = archive_of(b"hello", &key);
        let err = read_checked(&mut &obj[..], &key, &"0".repeat(64), "o", |r| {
            std::io::copy(r, &mut std::io::sink())?;
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("was recorded when it was taken"), "{err}");
    }

    #[test]
    fn a_wrong_key_says_so() {
        let (obj, sha) = archive_of(b"hello", &[1u8; 32]);
        let err = read_checked(&mut &obj[..], &[2u8; 32], &sha, "o", |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another key"), "{err}");
    }
}
