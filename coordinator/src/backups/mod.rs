//! Backups, the coordinator's side: the key, the record of every backup,
//! schedules and retention, and the operations that take, verify and
//! restore backups through the agents.
//!
//! The agents do the I/O: a backup streams from the engine of the node
//! that takes it (a healthy replica when there is one) straight to the
//! target, compressed and encrypted with the cluster's key (derived from
//! the coordinator's master key, see [`crate::backups::keys`]), which travels
//! with each request over mutual TLS, only to nodes of that cluster, and is
//! never stored on a node (except for WAL archiving, see the agent's
//! `backup::wal`).
//!
//! Objects: `backups/<cluster>/<id>.cbk` for a backup,
//! `wal/<cluster>/<created_at_ms>/k1/<file>` for PostgreSQL's archived WAL
//! (one directory per cluster incarnation, so a cluster re-created with a
//! former name never mixes its WAL with the old one's; without `k1/`: WAL
//! archived with the master key before per-cluster keys).

use crate::config::BackupConfig;
use crate::fleet::Liveness;
use crate::store::{self, ClusterRow, NodeRow};
use crate::Coordinator;
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod credentials;
pub mod keys;
mod prune;
mod schedule;
pub mod upgrade;

pub use crate::store::backups::*;
pub use prune::{to_prune, wal_horizons, Horizon};
pub use schedule::{due, new_backup_operation, next_run, parse_cron, run, Due};

/// The coordinator's backup key.
pub struct BackupKey {
    key: [u8; 32],
    pub id: String,
}

impl BackupKey {
    /// Reads the key file, or creates it (0600) when there is none.
    pub fn load_or_create(path: &Path) -> Result<BackupKey> {
        let key = match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|_| {
                    anyhow!(
                        "{} is not a backup key (64 hex digits); restore the file from your copy",
                        path.display()
                    )
                })?;
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                    anyhow!(
                        "{} holds {} bytes, not 32; restore the file from your copy",
                        path.display(),
                        bytes.len()
                    )
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                corral_proto::os_random(&mut key)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                corral_proto::pki::write_private(path, &format!("{}\n", hex::encode(key)))?;
                tracing::warn!(
                    key_file = %path.display(),
                    "created the backup key: keep a copy apart from this machine; without it no backup can be read"
                );
                key
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(BackupKey {
            id: corral_proto::archive::key_id(&key),
            key,
        })
    }

    /// The key for `scope` ([`keys::derive`]); the master key
    /// itself only for the empty scope of backups taken before per-cluster
    /// keys.
    pub fn for_scope(&self, scope: &str) -> Vec<u8> {
        keys::derive(&self.key, scope).to_vec()
    }

    /// The key `cluster`'s new backups and WAL are encrypted with.
    pub fn for_cluster(&self, cluster: &ClusterRow) -> Vec<u8> {
        self.for_scope(&keys::scope_of(cluster))
    }

    /// The key backup `b` was encrypted with.
    pub fn for_backup(&self, b: &BackupRow) -> Vec<u8> {
        self.for_scope(&b.key_scope)
    }
}

/// The backup side of the coordinator.
pub struct Backups {
    pub config: BackupConfig,
    pub key: BackupKey,
}

impl Backups {
    pub fn open(config: BackupConfig, state_dir: &Path) -> Result<Backups> {
        let path = config
            .key_file
            .clone()
            .unwrap_or_else(|| state_dir.join("backup.key"));
        Ok(Backups {
            key: BackupKey::load_or_create(&path)?,
            config,
        })
    }

    /// The target `name` as configured (for its kind; never sent to a
    /// node: see [`Backups::target_for`]).
    pub fn target(&self, name: &str) -> Result<pb::BackupTarget> {
        self.config.target(name)
    }

    /// The target `name` as a node gets it for objects of `cluster`: with
    /// that cluster's own credentials if it has some, and scoped, so that
    /// the agent refuses any object outside that cluster's prefixes.
    pub fn target_for(&self, name: &str, cluster: &str) -> Result<pb::BackupTarget> {
        credentials::target_for(&self.config, name, cluster)
    }
}

/// Unix milliseconds as an RFC 3339 UTC time.
pub fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// A duration as the configuration writes it: "15d", "36h", "90s".
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s > 0 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

pub fn new_id() -> String {
    let mut r = [0u8; 3];
    let _ = corral_proto::os_random(&mut r);
    format!("bk-{:x}-{}", corral_proto::now_ms(), hex::encode(r))
}

pub fn object_name(cluster: &str, id: &str) -> String {
    format!("backups/{cluster}/{id}.cbk")
}

/// In a failed in-place restore's error once the nodes were erased: the
/// cluster is marked failed (its data is gone until a restore succeeds).
pub const DATA_ERASED: &str = "the cluster's nodes were erased for the restore";

/// Where the WAL of `cluster` is archived (PostgreSQL with a schedule):
/// the schedule's target.
pub fn wal_archive_of(coord: &Coordinator, cluster: &ClusterRow) -> Result<Option<pb::WalArchive>> {
    if cluster.engine != "postgres" {
        return Ok(None);
    }
    let Some((s, prefix)) = coord.store.read(|c| {
        Ok(match schedule_of(c, &cluster.name)? {
            Some(s) => Some((s, wal_prefix(c, cluster)?)),
            None => None,
        })
    })?
    else {
        return Ok(None);
    };
    Ok(Some(pb::WalArchive {
        target: Some(coord.backups.target_for(&s.target, &cluster.name)?),
        key: coord.backups.key.for_cluster(cluster),
        prefix,
    }))
}

pub fn to_pb(b: &BackupRow) -> pb::Backup {
    pb::Backup {
        id: b.id.clone(),
        cluster: b.cluster.clone(),
        kind: b.kind.clone(),
        state: b.state.clone(),
        reason: b.reason.clone(),
        target: b.target.clone(),
        node: b.node.clone(),
        role: b.role.clone(),
        engine: b.engine.clone(),
        version: b.version.clone(),
        started_at_ms: b.started_at_ms,
        finished_at_ms: b.finished_at_ms,
        plain_bytes: b.plain_bytes,
        stored_bytes: b.stored_bytes,
        sha256: b.sha256.clone(),
        position: b.position.clone(),
        position_time_ms: b.position_time_ms,
        expires_at_ms: b.expires_at_ms,
        operation: b.operation.clone(),
        verified_at_ms: b.verified_at_ms,
        verify_summary: b.verify_summary.clone(),
        verify_ok: b.verify_ok,
        key_id: b.key_id.clone(),
        start_wal: b.start_wal.clone(),
        progress: None,
    }
}

/// The node a backup of `cluster` is taken from: the healthy replica
/// furthest ahead, else a healthy primary.
pub fn source_node(coord: &Coordinator, nodes: &[NodeRow]) -> Result<NodeRow> {
    let now = Instant::now();
    let healthy = |n: &NodeRow| {
        coord.fleet.liveness_of(&n.id, now) == Liveness::Up
            && coord.fleet.get(&n.id).is_some_and(|l| {
                l.engine.state == pb::EngineState::Running as i32 && l.engine.healthy
            })
    };
    let lag = |n: &NodeRow| {
        coord
            .fleet
            .get(&n.id)
            .and_then(|l| l.engine.stats.get("lag_seconds").copied())
            .unwrap_or(f64::MAX)
    };
    let mut replicas: Vec<&NodeRow> = nodes
        .iter()
        .filter(|n| n.role == "replica" && healthy(n))
        .collect();
    replicas.sort_by(|a, b| lag(a).total_cmp(&lag(b)));
    if let Some(r) = replicas.first() {
        return Ok((*r).clone());
    }
    nodes
        .iter()
        .find(|n| n.role == "primary" && healthy(n))
        .cloned()
        .ok_or_else(|| {
            anyhow!("no node of the cluster is up with a healthy engine, so no backup can be taken")
        })
}

/// A node that can read `b`'s objects: the node that took it when the
/// target is local; for a shared target, that node or another node of the
/// backup's cluster, else a node in no cluster. Never a node of another
/// cluster: it would be handed this cluster's key and objects.
pub fn reader_node(coord: &Coordinator, b: &BackupRow) -> Result<NodeRow> {
    let target = coord.backups.target(&b.target)?;
    let now = Instant::now();
    let up: Vec<NodeRow> = coord
        .store
        .read(store::list_nodes)?
        .into_iter()
        .filter(|n| coord.fleet.liveness_of(&n.id, now) == Liveness::Up)
        .collect();
    keys::pick_reader(&up, &b.id, &b.cluster, &b.node, target.kind == "local")
}

/// Deletes backup `b`'s objects through a node that can reach them, then
/// its record.
pub async fn delete_backup(coord: &Arc<Coordinator>, b: &BackupRow) -> Result<()> {
    if b.state == state::RUNNING {
        bail!("backup {} is still running", b.id);
    }
    if !b.object.is_empty() && b.state == state::SUCCEEDED {
        let node = reader_node(coord, b)?;
        let address = node.address.clone();
        let mut client = coord.agents.client(&node.id, &address)?;
        client
            .delete_backup_objects(pb::DeleteBackupObjectsRequest {
                target: Some(coord.backups.target_for(&b.target, &b.cluster)?),
                prefix: b.object.clone(),
                wal_before: String::new(),
            })
            .await
            .map_err(|s| anyhow!("deleting {} through {}: {}", b.object, node.id, s.message()))?;
    }
    coord.store.read(|c| remove(c, &b.id))?;
    tracing::info!(backup = %b.id, cluster = %b.cluster, "backup deleted");
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rusqlite::Connection;

    pub(crate) fn b(id: &str, at: i64, kind: &str, state: &str) -> BackupRow {
        BackupRow {
            id: id.into(),
            cluster: "c".into(),
            kind: kind.into(),
            state: state.into(),
            started_at_ms: at,
            ..Default::default()
        }
    }

    #[test]
    fn the_key_file_is_created_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("corral-bk-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("backup.key");
        let k1 = BackupKey::load_or_create(&path).unwrap();
        let k2 = BackupKey::load_or_create(&path).unwrap();
        assert_eq!(k1.for_scope(""), k2.for_scope(""));
        assert_eq!(k1.id, k2.id);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "zz").unwrap();
        let e = BackupKey::load_or_create(&path).err().unwrap().to_string();
        assert!(e.contains("not a backup key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_from_before_cluster_keys_opens_and_its_backups_keep_the_master_key() {
        let dir = corral_proto::unique_temp_dir("corral-bk-legacy").unwrap();
        let path = dir.join("corral.db");
        {
            // The backups table as coordinators before per-cluster keys
            // wrote it: no key_scope column.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&SCHEMA.replace(",\n    key_scope TEXT NOT NULL DEFAULT ''", ""))
                .unwrap();
            let cols: Vec<String> = c
                .prepare("SELECT name FROM pragma_table_info('backups')")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert!(!cols.contains(&"key_scope".to_string()), "{cols:?}");
            c.execute(
                "INSERT INTO backups (id, cluster, kind, state, target, engine, started_at_ms, \
                 object) VALUES ('bk-old', 'a', 'manual', 'succeeded', 's3', 'postgres', 1, \
                 'backups/a/bk-old.cbk')",
                [],
            )
            .unwrap();
        }
        let store = crate::store::Store::open(&path).unwrap();
        let old = store.read(|c| get(c, "bk-old")).unwrap().unwrap();
        assert_eq!(old.key_scope, "");
        let key = BackupKey::load_or_create(&dir.join("backup.key")).unwrap();
        // Old backups were encrypted with the master key: an archive made
        // with it opens with the key handed for that backup.
        let mut sealed = Vec::new();
        let mut w = corral_proto::archive::Writer::new(
            &mut sealed,
            &key.key,
            corral_proto::archive::Header {
                meta: serde_json::json!({}),
            },
        )
        .unwrap();
        std::io::Write::write_all(&mut w, b"old rows").unwrap();
        w.finish().unwrap();
        let handed: [u8; 32] = key.for_backup(&old).try_into().unwrap();
        let mut plain = Vec::new();
        std::io::Read::read_to_end(
            &mut corral_proto::archive::Reader::new(&sealed[..], &handed).unwrap(),
            &mut plain,
        )
        .unwrap();
        assert_eq!(plain, b"old rows");
        // A new backup of the cluster gets the cluster's derived key.
        let new = BackupRow {
            key_scope: keys::scope_for("a", 1),
            ..old.clone()
        };
        assert_ne!(key.for_backup(&new), key.for_backup(&old));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rows_round_trip() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        let mut r = b("bk-1", 10, kind::MANUAL, state::SUCCEEDED);
        r.plain_bytes = 5 << 30;
        r.verify_ok = true;
        put(&c, &r).unwrap();
        assert_eq!(get(&c, "bk-1").unwrap(), Some(r.clone()));
        assert_eq!(list(&c, Some("c")).unwrap(), vec![r.clone()]);
        assert!(list(&c, Some("d")).unwrap().is_empty());
        assert_eq!(list(&c, None).unwrap().len(), 1);
        remove(&c, "bk-1").unwrap();
        assert!(get(&c, "bk-1").unwrap().is_none());
    }
}
