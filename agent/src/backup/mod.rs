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
pub mod read;
pub mod restore;
pub mod scope;
pub mod target;
pub mod wal;
pub mod wal_config;

pub use key::key_of;

use crate::engine::Engine;
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::archive;
use corral_proto::pb;
use read::read_checked;
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use target::{local_default, Target};
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

/// A name no other scratch directory of this process has.
fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}
