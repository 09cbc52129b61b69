//! Backups, the coordinator's side: the key, the record of every backup,
//! schedules and retention, and the operations that take, verify and
//! restore backups through the agents.
//!
//! The agents do the I/O: a backup streams from the engine of the node
//! that takes it (a healthy replica when there is one) straight to the
//! target, compressed and encrypted with the cluster's key (derived from
//! the coordinator's master key, see [`crate::backup_keys`]), which travels
//! with each request over mutual TLS, only to nodes of that cluster, and is
//! never stored on a node (except for WAL archiving, see the agent's
//! `backup::wal`).
//!
//! Objects: `backups/<cluster>/<id>.cbk` for a backup,
//! `wal/<cluster>/<created_at_ms>/k1/<file>` for PostgreSQL's archived WAL
//! (one directory per cluster incarnation, so a cluster re-created with a
//! former name never mixes its WAL with the old one's; without `k1/`: WAL
//! archived with the master key before per-cluster keys).

use crate::backup_keys;
use crate::config::BackupConfig;
use crate::fleet::Liveness;
use crate::store::{self, ClusterRow, NodeRow};
use crate::Coordinator;
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use rusqlite::Connection;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::store::backups::*;

/// Parses a cron expression: five fields (minute first), or six with
/// seconds first; UTC.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map_err(|e| {
            format!(
                "invalid cron expression {expr:?}: {e}; use five fields \"minute hour day month \
                 weekday\" in UTC, e.g. \"30 2 * * *\" for 02:30 every day"
            )
        })
}

/// The first time `cron` fires after `after_ms`.
pub fn next_run(cron: &croner::Cron, after_ms: i64) -> Option<i64> {
    let after = chrono::DateTime::from_timestamp_millis(after_ms)?;
    cron.find_next_occurrence(&after, false)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Which backups retention removes: pure, for tests. Among `backups` (of
/// one cluster), scheduled ones that succeeded are kept newest first up to
/// `retain_count` (0: no count limit) and while younger than `retain_ms`
/// (0: no age limit), and the newest is always kept. Manual backups stay
/// until deleted; final backups go at their expiry; failed records (which
/// have no object) after `failed_keep_ms`.
pub fn to_prune(
    backups: &[BackupRow],
    retain_count: u32,
    retain_ms: i64,
    now_ms: i64,
    failed_keep_ms: i64,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut good: Vec<&BackupRow> = backups
        .iter()
        .filter(|b| b.state == state::SUCCEEDED && b.kind == kind::SCHEDULED)
        .collect();
    good.sort_by(|a, b| b.started_at_ms.cmp(&a.started_at_ms).then(b.id.cmp(&a.id)));
    for (i, b) in good.iter().enumerate() {
        if i == 0 {
            continue; // the newest is never pruned
        }
        let over_count = retain_count > 0 && i >= retain_count as usize;
        let too_old = retain_ms > 0 && now_ms - b.started_at_ms > retain_ms;
        if over_count || too_old {
            out.push(b.id.clone());
        }
    }
    for b in backups {
        let expired = b.expires_at_ms > 0 && b.expires_at_ms <= now_ms;
        let old_failure = b.state == state::FAILED && now_ms - b.started_at_ms > failed_keep_ms;
        if (expired || old_failure) && !out.contains(&b.id) && b.state != state::RUNNING {
            out.push(b.id.clone());
        }
    }
    out
}

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

    /// The key for `scope` ([`backup_keys::derive`]); the master key
    /// itself only for the empty scope of backups taken before per-cluster
    /// keys.
    pub fn for_scope(&self, scope: &str) -> Vec<u8> {
        backup_keys::derive(&self.key, scope).to_vec()
    }

    /// The key `cluster`'s new backups and WAL are encrypted with.
    pub fn for_cluster(&self, cluster: &ClusterRow) -> Vec<u8> {
        self.for_scope(&backup_keys::scope_of(cluster))
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
        crate::backup_credentials::target_for(&self.config, name, cluster)
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
    backup_keys::pick_reader(&up, &b.id, &b.cluster, &b.node, target.kind == "local")
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

/// One WAL archive's pruning horizon: (cluster, target, prefix, oldest
/// segment kept).
pub type Horizon = (String, String, String, String);

/// Pure: for each WAL archive (cluster, target, prefix) the backups use,
/// the oldest segment any of its succeeded backups starts in; archived
/// segments before it serve no restore. An archive with a backup whose
/// start is unknown is left out (nothing of it is pruned).
pub fn wal_horizons(backups: &[BackupRow]) -> Vec<Horizon> {
    let mut oldest: std::collections::BTreeMap<(&str, &str, &str), Option<&str>> =
        Default::default();
    for b in backups {
        if b.state != state::SUCCEEDED || b.wal_prefix.is_empty() {
            continue;
        }
        let entry = oldest
            .entry((
                b.cluster.as_str(),
                b.wal_target.as_str(),
                b.wal_prefix.as_str(),
            ))
            .or_insert(Some(b.start_wal.as_str()));
        *entry = match (*entry, b.start_wal.as_str()) {
            (None, _) | (_, "") => None,
            (Some(o), s) => Some(o.min(s)),
        };
    }
    oldest
        .into_iter()
        .filter_map(|((c, t, p), o)| {
            o.filter(|o| !o.is_empty())
                .map(|o| (c.to_string(), t.to_string(), p.to_string(), o.to_string()))
        })
        .collect()
}

/// Deletes the archived WAL no backup needs (see [`wal_horizons`]), in
/// shared (s3) WAL archives, through a node of the archive's cluster (or a
/// node in no cluster) that is up.
async fn prune_wal(
    coord: &Arc<Coordinator>,
    backups: &[BackupRow],
    done: &mut std::collections::HashMap<String, String>,
) -> Result<()> {
    for (cluster, target_name, prefix, before) in wal_horizons(backups) {
        if done.get(&prefix) == Some(&before) {
            continue;
        }
        let target = coord.backups.target_for(&target_name, &cluster)?;
        if target.kind != "s3" {
            continue; // a local WAL archive is spread over the nodes
        }
        let now = Instant::now();
        let Some(node) = coord
            .store
            .read(store::list_nodes)?
            .into_iter()
            .filter(|n| backup_keys::may_read(n, &cluster))
            .max_by_key(|n| {
                (
                    coord.fleet.liveness_of(&n.id, now) == Liveness::Up,
                    n.cluster.as_deref() == Some(cluster.as_str()),
                )
            })
            .filter(|n| coord.fleet.liveness_of(&n.id, now) == Liveness::Up)
        else {
            continue;
        };
        let mut client = coord.agents.client(&node.id, &node.address)?;
        let r = client
            .delete_backup_objects(pb::DeleteBackupObjectsRequest {
                target: Some(target),
                prefix: prefix.clone(),
                wal_before: before.clone(),
            })
            .await
            .map_err(|s| {
                anyhow!(
                    "pruning WAL under {prefix} through {}: {}",
                    node.id,
                    s.message()
                )
            })?
            .into_inner();
        if r.deleted > 0 {
            tracing::info!(prefix = %prefix, before = %before, deleted = r.deleted, "pruned archived WAL no backup needs");
        }
        done.insert(prefix, before);
    }
    Ok(())
}

/// Failed backups' records are kept this long (their objects never exist).
const FAILED_KEEP_MS: i64 = 30 * 86_400_000;

/// Starts scheduled backups when due and prunes what retention removes,
/// every few seconds, until dropped.
pub async fn run(coord: Arc<Coordinator>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    let mut wal_pruned = std::collections::HashMap::new();
    loop {
        tick.tick().await;
        if let Err(e) = schedule_pass(&coord) {
            tracing::warn!(error = %format!("{e:#}"), "backup schedules");
        }
        if last_prune.elapsed() >= Duration::from_secs(5) {
            last_prune = Instant::now();
            if let Err(e) = prune_pass(&coord).await {
                tracing::warn!(error = %format!("{e:#}"), "backup retention");
            }
            let pruned = match coord.store.read(|c| list(c, None)) {
                Ok(all) => prune_wal(&coord, &all, &mut wal_pruned).await,
                Err(e) => Err(e),
            };
            if let Err(e) = pruned {
                tracing::warn!(error = %format!("{e:#}"), "WAL retention");
            }
        }
    }
}

/// What the scheduler does with a schedule at `now_ms`.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Not yet (or the cron never fires again).
    No,
    /// Start the backup due at this time.
    Start(i64),
    /// Due, but the cluster is busy: try again on the next pass.
    Wait,
    /// Due at this time and still blocked after `missed_after`: record it
    /// as missed (and alert) and move on to the next time.
    Missed(i64),
}

/// Pure: the scheduler's decision for one schedule.
pub fn due(
    cron: &croner::Cron,
    s: &ScheduleRow,
    now_ms: i64,
    busy: bool,
    missed_after_ms: i64,
) -> Due {
    let Some(at) = next_run(cron, s.last_run_ms.max(s.created_at_ms)) else {
        return Due::No;
    };
    match (at <= now_ms, busy) {
        (false, _) => Due::No,
        (true, false) => Due::Start(at),
        (true, true) if now_ms - at > missed_after_ms => Due::Missed(at),
        (true, true) => Due::Wait,
    }
}

fn schedule_pass(coord: &Arc<Coordinator>) -> Result<()> {
    let now = corral_proto::now_ms();
    for s in coord.store.read(schedules)? {
        let cron = match parse_cron(&s.cron) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(cluster = %s.cluster, "{e}");
                continue;
            }
        };
        let missed_after = coord.backups.config.missed_after.as_millis() as i64;
        if due(&cron, &s, now, false, missed_after) == Due::No {
            continue;
        }
        let started = coord.store.tx(|tx| {
            let Some(cluster) = store::get_cluster(tx, &s.cluster)? else {
                return Ok(None);
            };
            let running = store::unfinished_operation_of(tx, &s.cluster)?;
            let busy = running.is_some() || cluster.state != "running";
            match due(&cron, &s, now, busy, missed_after) {
                Due::No | Due::Wait => return Ok(None),
                Due::Missed(at) => {
                    let why = match &running {
                        Some(op) => format!("operation {} ({}) held the cluster", op.id, op.kind),
                        None => format!("the cluster was {}", cluster.state),
                    };
                    let mut s2 = s.clone();
                    s2.last_run_ms = now;
                    put_schedule(tx, &s2)?;
                    store::insert_event(
                        tx,
                        now,
                        "",
                        &s.cluster,
                        "backup_missed",
                        &format!(
                            "the scheduled backup of cluster {} due at {} did not start within {}: \
                             {why}",
                            s.cluster,
                            fmt_time(at),
                            fmt_duration(coord.backups.config.missed_after),
                        ),
                        None,
                    )?;
                    return Ok(None);
                }
                Due::Start(_) => {}
            }
            let mut s2 = s.clone();
            s2.last_run_ms = now;
            put_schedule(tx, &s2)?;
            let op = new_backup_operation(
                tx,
                &cluster,
                kind::SCHEDULED,
                &s.target,
                crate::ops::SCHEDULER,
            )?;
            Ok(Some(op))
        })?;
        if let Some(op) = started {
            tracing::info!(cluster = %s.cluster, op = %op, "scheduled backup started");
            crate::ops::spawn(coord.clone(), op);
        }
    }
    Ok(())
}

/// Records a backup and the operation that takes it; returns the
/// operation's id.
pub fn new_backup_operation(
    tx: &Connection,
    cluster: &ClusterRow,
    backup_kind: &str,
    target: &str,
    who: &str,
) -> Result<String> {
    let now = corral_proto::now_ms();
    let id = new_id();
    let op = store::OperationRow {
        id: crate::ops::new_id(),
        cluster: cluster.name.clone(),
        kind: crate::ops::BACKUP.into(),
        state: store::op_state::PENDING.into(),
        params: serde_json::json!({ "backup": id, "target": target }).to_string(),
        requested_by: who.into(),
        created_at_ms: now,
        updated_at_ms: now,
        error: String::new(),
    };
    put(
        tx,
        &BackupRow {
            id: id.clone(),
            cluster: cluster.name.clone(),
            kind: backup_kind.into(),
            state: state::RUNNING.into(),
            target: target.into(),
            engine: cluster.engine.clone(),
            started_at_ms: now,
            operation: op.id.clone(),
            object: object_name(&cluster.name, &id),
            key_scope: backup_keys::scope_of(cluster),
            ..Default::default()
        },
    )?;
    store::insert_operation(tx, &op)?;
    store::log_operation(
        tx,
        &op.id,
        &format!("requested by {who}: {backup_kind} backup {id} to target {target}"),
    )?;
    Ok(op.id)
}

async fn prune_pass(coord: &Arc<Coordinator>) -> Result<()> {
    let now = corral_proto::now_ms();
    let (all, scheds) = coord.store.read(|c| Ok((list(c, None)?, schedules(c)?)))?;
    let mut clusters: Vec<&str> = all.iter().map(|b| b.cluster.as_str()).collect();
    clusters.sort();
    clusters.dedup();
    for cluster in clusters {
        let of: Vec<BackupRow> = all
            .iter()
            .filter(|b| b.cluster == cluster)
            .cloned()
            .collect();
        let (count, age) = scheds
            .iter()
            .find(|s| s.cluster == cluster)
            .map(|s| (s.retain_count, s.retain_ms))
            .unwrap_or((0, 0));
        for id in to_prune(&of, count, age, now, FAILED_KEEP_MS) {
            let Some(b) = of.iter().find(|b| b.id == id) else {
                continue;
            };
            match delete_backup(coord, b).await {
                Ok(()) => {
                    tracing::info!(backup = %b.id, cluster, kind = %b.kind, "retention removed a backup")
                }
                Err(e) => {
                    tracing::warn!(backup = %b.id, error = %format!("{e:#}"), "retention could not remove a backup; retrying later")
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, at: i64, kind: &str, state: &str) -> BackupRow {
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
    fn retention_keeps_the_newest_by_count_and_age() {
        let all = vec![
            b("a", 100, kind::SCHEDULED, state::SUCCEEDED),
            b("b", 200, kind::SCHEDULED, state::SUCCEEDED),
            b("c", 300, kind::MANUAL, state::SUCCEEDED),
            b("d", 400, kind::SCHEDULED, state::SUCCEEDED),
            b("e", 500, kind::SCHEDULED, state::FAILED),
            b("f", 600, kind::SCHEDULED, state::RUNNING),
        ];
        // Three scheduled ones succeeded (a, b, d); the manual c is not
        // counted and never pruned.
        let mut p = to_prune(&all, 2, 0, 1000, i64::MAX);
        p.sort();
        assert_eq!(p, vec!["a"]);
        assert!(to_prune(&all, 3, 0, 1000, i64::MAX).is_empty());
        let mut p = to_prune(&all, 0, 750, 1000, i64::MAX);
        p.sort();
        assert_eq!(p, vec!["a", "b"]);
        // Everything old: the newest scheduled one stays.
        let mut p = to_prune(&all, 0, 1, 10_000, i64::MAX);
        p.sort();
        assert_eq!(p, vec!["a", "b"]);
        // Failed records go after their keep time; running never.
        let p = to_prune(&all, 0, 0, 10_000, 100);
        assert_eq!(p, vec!["e"]);
    }

    #[test]
    fn wal_is_kept_from_the_oldest_backup_of_each_archive() {
        let with = |id: &str, state: &str, prefix: &str, start: &str| BackupRow {
            wal_target: "s3".into(),
            wal_prefix: prefix.into(),
            start_wal: start.into(),
            ..b(id, 1, kind::SCHEDULED, state)
        };
        let all = vec![
            with(
                "a",
                state::SUCCEEDED,
                "wal/c/1/",
                "000000010000000000000009",
            ),
            with(
                "b",
                state::SUCCEEDED,
                "wal/c/1/",
                "000000010000000000000004",
            ),
            with("c", state::FAILED, "wal/c/1/", ""),
            with(
                "d",
                state::SUCCEEDED,
                "wal/c/2/",
                "000000020000000000000010",
            ),
            with(
                "e",
                state::SUCCEEDED,
                "wal/x/1/",
                "000000010000000000000002",
            ),
            with("f", state::SUCCEEDED, "wal/x/1/", ""),
            with("g", state::SUCCEEDED, "", ""),
        ];
        let h = |p: &str, s: &str| {
            (
                "c".to_string(),
                "s3".to_string(),
                p.to_string(),
                s.to_string(),
            )
        };
        assert_eq!(
            wal_horizons(&all),
            vec![
                h("wal/c/1/", "000000010000000000000004"),
                h("wal/c/2/", "000000020000000000000010"),
            ]
        );
    }

    #[test]
    fn final_backups_live_until_their_expiry() {
        let mut f = b("f", 100, kind::FINAL, state::SUCCEEDED);
        f.expires_at_ms = 5_000;
        let all = vec![f, b("x", 200, kind::SCHEDULED, state::SUCCEEDED)];
        assert!(to_prune(&all, 1, 1, 4_999, i64::MAX).is_empty());
        assert_eq!(to_prune(&all, 1, 1, 5_000, i64::MAX), vec!["f"]);
    }

    #[test]
    fn the_scheduler_starts_waits_and_records_misses() {
        let cron = parse_cron("0 * * * *").unwrap(); // hourly
        let hour = 3_600_000;
        let t0 = 1_795_651_200_000; // on the hour
        let s = ScheduleRow {
            cluster: "c".into(),
            cron: "0 * * * *".into(),
            retain_count: 3,
            retain_ms: 0,
            target: "local".into(),
            last_run_ms: t0,
            created_at_ms: t0 - hour,
        };
        assert_eq!(due(&cron, &s, t0 + 10, false, hour), Due::No);
        assert_eq!(
            due(&cron, &s, t0 + hour, false, hour),
            Due::Start(t0 + hour)
        );
        assert_eq!(due(&cron, &s, t0 + hour + 5, true, hour), Due::Wait);
        assert_eq!(
            due(&cron, &s, t0 + 2 * hour + 1, true, hour),
            Due::Missed(t0 + hour)
        );
        // Once recorded (last_run moved to now), the next time is the next hour.
        let s2 = ScheduleRow {
            last_run_ms: t0 + 2 * hour + 1,
            ..s
        };
        assert_eq!(due(&cron, &s2, t0 + 2 * hour + 2, true, hour), Due::No);
    }

    #[test]
    fn cron_five_and_six_fields() {
        let c = parse_cron("30 2 * * *").unwrap();
        // 2026-11-26T00:00:00Z -> 02:30 the same day.
        let t0 = 1_795_651_200_000;
        assert_eq!(next_run(&c, t0), Some(t0 + (2 * 3600 + 30 * 60) * 1000));
        let c = parse_cron("*/5 * * * * *").unwrap();
        assert_eq!(next_run(&c, t0), Some(t0 + 5000));
        let e = parse_cron("every day").unwrap_err();
        assert!(e.contains("invalid cron expression"), "{e}");
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
            key_scope: backup_keys::scope_for("a", 1),
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
