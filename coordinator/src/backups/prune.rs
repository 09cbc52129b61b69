//! Backup retention: which backups a schedule's count and age remove, and
//! which archived WAL no remaining backup needs.

use super::delete_backup;
use super::keys;
use crate::fleet::Liveness;
use crate::store::backups::*;
use crate::store::{self};
use crate::Coordinator;
use anyhow::{anyhow, Result};
use corral_proto::pb;
use std::sync::Arc;
use std::time::Instant;

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
pub(super) async fn prune_wal(
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
            .filter(|n| keys::may_read(n, &cluster))
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

pub(super) async fn prune_pass(coord: &Arc<Coordinator>) -> Result<()> {
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

    use crate::backups::tests::b;

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
}
