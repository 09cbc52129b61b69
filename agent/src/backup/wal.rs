//! PostgreSQL's continuous WAL archiving, for point-in-time recovery.
//!
//! The engine's archive_command only copies each finished segment into the
//! driver's spool directory ([`crate::engine::Driver::wal_spool`]): it is
//! quick and needs neither the key nor the network. This module's uploader
//! sends each spooled file, compressed and encrypted, to the cluster's WAL
//! target as `<prefix><file name>`, and removes it from the spool only once
//! stored. A target that is down makes the spool grow, never loses WAL.
//!
//! Its target and key come with the primary's ConfigureEngine and are kept
//! in `wal-archive.json` (0600) so that archiving goes on across agent
//! restarts without the coordinator.

use super::key_of;
use super::target::local_default;
use super::target::Target;
pub use super::wal_config::{load, save};
use crate::engine::Engine;
use anyhow::{bail, Context, Result};
use corral_proto::archive;
use corral_proto::pb;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether `name` is a WAL segment file name (24 hex digits).
pub fn is_segment(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The uploader's state: what it last stored, and a way to wake it.
#[derive(Default)]
pub struct Archiver {
    last_uploaded: Mutex<String>,
    last_error: Mutex<Option<String>>,
    wake: tokio::sync::Notify,
}

impl Archiver {
    /// Uploads spooled WAL every second (or when woken) for as long as the
    /// agent runs.
    pub async fn run(self: Arc<Self>, engine: Arc<Engine>, state_dir: PathBuf) {
        loop {
            if let Err(e) = self.pass(&engine, &state_dir).await {
                let msg = format!("{e:#}");
                let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("archiving WAL: {msg}; retrying every second");
                    *last = Some(msg);
                }
            } else {
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Uploads what is in the spool, oldest first.
    async fn pass(&self, engine: &Engine, state_dir: &Path) -> Result<()> {
        let Some(spool) = engine.driver().wal_spool() else {
            return Ok(());
        };
        let mut names: Vec<String> = match std::fs::read_dir(&spool) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".part") && !n.starts_with('.'))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", spool.display())),
        };
        if names.is_empty() {
            return Ok(());
        }
        let Some(wal) = load(state_dir)? else {
            // Archiving was turned off (the cluster's schedule removed):
            // what was spooled before has nowhere to go.
            for name in &names {
                let _ = std::fs::remove_file(spool.join(name));
            }
            tracing::info!(
                files = names.len(),
                "WAL archiving is off; dropped the segments still spooled"
            );
            return Ok(());
        };
        let (key, target) = open_archive(&wal, state_dir)?;
        // History files first: a timeline's history must be in the archive
        // before its segments are of any use.
        names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
        for name in names {
            let path = spool.join(&name);
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let header = archive::Header {
                meta: serde_json::json!({ "kind": "wal", "file": name }),
            };
            let object = format!("{}{name}", wal.prefix);
            target
                .put_stream(&object, move |out| {
                    let mut w = archive::Writer::new(out, &key, header)?;
                    w.write_all(&data)?;
                    w.finish()?;
                    Ok(())
                })
                .await
                .with_context(|| format!("storing {name} in {}", target.describe()))?;
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            if is_segment(&name) {
                let mut last = self.last_uploaded.lock().unwrap_or_else(|p| p.into_inner());
                if name > *last {
                    *last = name;
                }
            }
        }
        Ok(())
    }

    /// Closes the primary's current segment and waits until it is stored.
    pub async fn flush(&self, engine: &Engine, term: u64) -> Result<String> {
        let spec = engine
            .spec()
            .context("this node runs no engine, so it has no WAL")?;
        if spec.role != "primary" || !spec.wal_archive {
            bail!("this node is not a primary archiving its WAL");
        }
        let status = engine.status();
        if term != 0 && status.term > term {
            bail!(
                "this node is at term {}, newer than the request's {term}",
                status.term
            );
        }
        let segment = engine.driver().switch_wal(&spec).await?;
        let began = Instant::now();
        let limit = Duration::from_secs(60);
        loop {
            self.wake.notify_one();
            if *self.last_uploaded.lock().unwrap_or_else(|p| p.into_inner()) >= segment {
                return Ok(segment);
            }
            if began.elapsed() > limit {
                let why = self
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "the engine has not archived it yet".into());
                bail!(
                    "WAL segment {segment} was not stored within {}s: {why}",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Fetches the archived WAL files under `wal.prefix` into `dir`
/// (decrypted, under their own names, readable by the postgres user), for
/// a point-in-time restore: every timeline history file, and the segments
/// from `from` on (every segment when `from` is empty).
/// The archive's key and target.
fn open_archive(wal: &pb::WalArchive, state_dir: &Path) -> Result<([u8; 32], Target)> {
    let key = key_of(&wal.key)?;
    let described = wal
        .target
        .as_ref()
        .context("WAL archive without a target")?;
    Ok((key, Target::open(described, &local_default(state_dir))?))
}

pub async fn fetch_all(
    wal: &pb::WalArchive,
    dir: &Path,
    state_dir: &Path,
    from: &str,
) -> Result<usize> {
    let (key, target) = open_archive(wal, state_dir)?;
    let pg = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .context("there is no `postgres` user on this machine")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    nix::unistd::chown(dir, Some(pg.uid), Some(pg.gid))
        .with_context(|| format!("chown {}", dir.display()))?;
    let objects = target.list(&wal.prefix).await?;
    if objects.is_empty() {
        bail!(
            "the WAL archive {} in {} is empty: no point in time can be recovered",
            wal.prefix,
            target.describe()
        );
    }
    let mut n = 0;
    for o in objects {
        let name = o
            .name
            .strip_prefix(&wal.prefix)
            .unwrap_or(&o.name)
            .to_string();
        if name.contains('/') || name.is_empty() || (is_segment(&name) && *name < *from) {
            continue;
        }
        let path = dir.join(&name);
        let object = o.name.clone();
        let (uid, gid) = (pg.uid, pg.gid);
        target
            .get_stream(&o.name, move |input| {
                let mut reader = archive::Reader::new(input, &key)
                    .map_err(|e| anyhow::anyhow!("archived WAL {object}: {e}"))?;
                let mut file = std::fs::File::create(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                std::io::copy(&mut reader, &mut file)
                    .map_err(|e| anyhow::anyhow!("archived WAL {object} is damaged: {e}"))?;
                file.sync_all()?;
                nix::unistd::chown(&path, Some(uid), Some(gid))?;
                Ok(())
            })
            .await?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names() {
        assert!(is_segment("000000010000000000000003"));
        assert!(!is_segment("00000002.history"));
        assert!(!is_segment("000000010000000000000003.part"));
    }
}
