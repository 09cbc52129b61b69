//! Restore: a backup object read from its target into a new primary's
//! empty data directory by the engine's driver, and for a point in time,
//! the WAL archive fetched for the engine's recovery. It needs only the
//! engine contract ([`crate::engine::contract`]), never the running
//! engine: `engine/configure.rs` calls it.

use super::read::read_checked;
use super::target::{local_default, Target};
use super::{key_of, scope, wal};
use crate::engine::contract::{Driver, EngineSpec, ProgressFn, Recovery};
use anyhow::{Context, Result};
use corral_proto::pb;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

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
