//! The decision itself: [`decide`] walks the evidence in the order the
//! module header gives (the lease, the replicas' confirmations, an unfinished
//! promotion, then the candidate and the sync-mode and lag rules).

use super::{ClusterView, Decision, NodeView, Wait};
use std::cmp::Ordering;
use std::time::Instant;

/// Candidate order: the most received WAL first, then the most replayed,
/// then the lowest node id (so ties are broken the same way every time).
fn rank(a: &NodeView, b: &NodeView) -> Ordering {
    b.received
        .cmp(&a.received)
        .then(b.replayed.cmp(&a.replayed))
        .then(a.id.cmp(&b.id))
}

/// Decides what to do about `view` at `now`.
pub fn decide(view: &ClusterView, now: Instant) -> Decision {
    if let Some(decision) = primary_not_lost(view, now) {
        return decision;
    }
    let primary = view.primary.id.clone();
    let writes_end = last_possible_write(view);
    // 4. The primary is lost. Who could take over?
    let (fresh, stale) = positions(view, writes_end);
    let candidate = fresh.first().copied();
    if !view.auto_failover {
        return Decision::Off {
            primary,
            candidate: candidate.map(|c| c.id.clone()),
        };
    }
    // Every other node's possible lease (a former primary's) has run out.
    if let Some(why) = other_lease_running(view, candidate.map_or("", |c| c.id.as_str()), now) {
        return Decision::Wait { primary, why };
    }
    if view.sync {
        if let Some(blocked) = sync_unreported(view, &fresh, &stale, writes_end) {
            return blocked;
        }
    }
    if !stale.is_empty() {
        return Decision::Wait {
            primary,
            why: Wait::FreshPositions(stale),
        };
    }
    let Some(c) = candidate else {
        return Decision::Blocked {
            primary,
            reason: unfit(view),
        };
    };
    promote_unless_lagging(view, c)
}

/// The next moment `decide` may answer differently without anything new
/// being heard: the end (plus the margin) of the primary's lease or of
/// another node's, or of a replica's confirmation. The monitor judges the
/// cluster again then, not only at its next pass, so a failover starts the
/// moment the lease has provably ended.
pub fn next_change(view: &ClusterView, now: Instant) -> Option<Instant> {
    let leases = std::iter::once(&view.primary)
        .chain(&view.replicas)
        .map(|n| n.lease_until + view.margin);
    let confirmations = view.replicas.iter().filter_map(|r| confirmation(view, r));
    leases.chain(confirmations).filter(|t| *t > now).min()
}

/// Until when replica `r` confirms the primary of record, if it does.
fn confirmation(view: &ClusterView, r: &NodeView) -> Option<Instant> {
    match &r.confirms {
        Some((p, until)) if *p == view.primary.id => Some(*until),
        _ => None,
    }
}

/// Steps 1 to 3: the decision while the primary is not (yet) lost — an
/// operation running, its lease running, every replica confirming it, or
/// an unfinished promotion to redo. `None` when the primary is lost.
fn primary_not_lost(view: &ClusterView, now: Instant) -> Option<Decision> {
    let primary = view.primary.id.clone();
    if let Some(kind) = &view.operation {
        return Some(Decision::Wait {
            primary,
            why: Wait::Operation(kind.clone()),
        });
    }
    // 1. The primary's lease, by the coordinator's clock, plus the margin.
    let lease_end = view.primary.lease_until;
    if now < lease_end + view.margin {
        let p = &view.primary;
        if p.up && p.healthy && !p.in_recovery {
            return Some(Decision::Healthy { primary });
        }
        return Some(Decision::Wait {
            primary: primary.clone(),
            why: Wait::LeaseRunning {
                node: primary,
                left: (lease_end + view.margin) - now,
            },
        });
    }
    // 2. Every replica still confirming the primary proves it alive (and
    // holding a lease through them). One that does not is enough: the
    // primary cannot renew its lease without it.
    let all_confirm = view
        .replicas
        .iter()
        .map(|r| confirmation(view, r).filter(|until| *until > now))
        .collect::<Option<Vec<Instant>>>();
    if let Some(untils) = all_confirm.filter(|u| !u.is_empty()) {
        let soonest = untils.iter().min().copied().unwrap_or(now);
        return Some(Decision::Wait {
            primary,
            why: Wait::ConfirmedBy {
                replicas: view.replicas.iter().map(|r| r.id.clone()).collect(),
                left: soonest - now,
            },
        });
    }
    // 3. A primary of record that is a standby is one whose promotion did
    // not complete. It was the candidate: when it was chosen the old
    // primary's lease had run out and the term was raised, so nobody has
    // taken a write since and it still holds every acknowledged one. It is
    // promoted again, once every other node's possible lease has run out.
    let p = &view.primary;
    if p.up && p.healthy && p.in_recovery {
        if let Some(why) = other_lease_running(view, &primary, now) {
            return Some(Decision::Wait { primary, why });
        }
        if !view.auto_failover {
            return Some(Decision::Off {
                candidate: Some(primary.clone()),
                primary,
            });
        }
        return Some(Decision::Repromote { primary });
    }
    None
}

/// The primary's last possible write: the end of its coordinator lease,
/// or of the last lease a round of confirmations gave it. A round needs
/// every replica, so that lease ended by the earliest of their
/// confirmations, less the margin a replica holds its confirmation
/// beyond the lease; with one replica never confirming, there was none.
fn last_possible_write(view: &ClusterView) -> Instant {
    let lease_end = view.primary.lease_until;
    let replica_lease_end = view
        .replicas
        .iter()
        .map(|r| confirmation(view, r))
        .collect::<Option<Vec<Instant>>>()
        .and_then(|u| u.into_iter().min())
        .map(|until| until.checked_sub(view.margin).unwrap_or(until));
    replica_lease_end.map_or(lease_end, |e| e.max(lease_end))
}

/// The healthy standbys following the primary, split into those whose
/// position was measured after `writes_end` (best candidate first) and the
/// ids of those whose last position may not be final.
fn positions(view: &ClusterView, writes_end: Instant) -> (Vec<&NodeView>, Vec<String>) {
    let primary = &view.primary.id;
    let fit: Vec<&NodeView> = view
        .replicas
        .iter()
        .filter(|r| r.up && r.healthy && r.in_recovery && r.upstream == *primary)
        .collect();
    let stale: Vec<String> = fit
        .iter()
        .filter(|r| r.checked_at.is_none_or(|t| t <= writes_end))
        .map(|r| r.id.clone())
        .collect();
    let mut fresh: Vec<&NodeView> = fit
        .into_iter()
        .filter(|r| r.checked_at.is_some_and(|t| t > writes_end))
        .collect();
    fresh.sort_by(|a, b| rank(a, b));
    (fresh, stale)
}

/// Sync mode: every replica that may hold an acknowledged commit must have
/// reported a final position; the candidate is the furthest of them.
/// Which replicas acknowledged is known only while the coordinator heard
/// the primary: if the primary served on through its replicas'
/// confirmations, any replica may have. `Some(Blocked)` when one has not.
fn sync_unreported(
    view: &ClusterView,
    fresh: &[&NodeView],
    stale: &[String],
    writes_end: Instant,
) -> Option<Decision> {
    let primary = view.primary.id.clone();
    let ackers = view
        .ackers
        .as_ref()
        .filter(|_| writes_end <= view.primary.lease_until);
    let missing: Vec<String> = view
        .replicas
        .iter()
        .filter(|r| ackers.is_none_or(|a| a.contains(&r.id)))
        .filter(|r| !fresh.iter().any(|f| f.id == r.id))
        .filter(|r| !stale.contains(&r.id))
        .map(|r| r.id.clone())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let reason = format!(
        "sync mode: {} may hold acknowledged commits and cannot report its position \
         (down, unhealthy or not following {primary}), so promoting another replica \
         could lose them",
        missing.join(", ")
    );
    Some(Decision::Blocked { primary, reason })
}

/// The failover to `c`, unless (in async mode) it is further behind the
/// primary's last known position than the limit. In sync mode the furthest
/// replica holds every acknowledged commit, whatever the primary wrote
/// after; in async mode that is what is lost. The primary's position: its
/// last report, or what it last told a replica (later, when the
/// coordinator could not hear it).
fn promote_unless_lagging(view: &ClusterView, c: &NodeView) -> Decision {
    let primary = view.primary.id.clone();
    let primary_at = view
        .replicas
        .iter()
        .map(|r| r.upstream_lsn)
        .fold(view.primary.received, u64::max);
    let behind = if view.sync {
        0
    } else {
        primary_at.saturating_sub(c.received)
    };
    let unit = view.unit;
    if behind > view.max_lag {
        return Decision::Blocked {
            primary,
            reason: format!(
                "every replica lags past the limit: the best, {}, is {behind} {unit} behind the \
                 primary's last known position (limit {} {unit}); promoting it would lose the \
                 writes in between",
                c.id, view.max_lag
            ),
        };
    }
    Decision::Failover {
        old: primary,
        candidate: c.id.clone(),
        behind,
        unit,
        lease_ended: view.primary.lease_until,
    }
}

/// The latest-ending lease a replica other than `except` may still hold
/// (plus the margin): a former primary's, before a new one is promoted.
fn other_lease_running(view: &ClusterView, except: &str, now: Instant) -> Option<Wait> {
    view.replicas
        .iter()
        .filter(|r| r.id != except)
        .map(|r| (r, r.lease_until + view.margin))
        .filter(|(_, end)| *end > now)
        .max_by_key(|(_, end)| *end)
        .map(|(node, end)| Wait::LeaseRunning {
            node: node.id.clone(),
            left: end - now,
        })
}

/// Why no replica is fit, one reason per replica.
fn unfit(view: &ClusterView) -> String {
    if view.replicas.is_empty() {
        return "the cluster has no replica".into();
    }
    let reasons: Vec<String> = view
        .replicas
        .iter()
        .map(|r| {
            let why = if !r.up {
                "down"
            } else if !r.healthy {
                "its engine is not healthy"
            } else if !r.in_recovery {
                "it is not a standby (a former primary not yet rejoined)"
            } else if r.upstream != view.primary.id {
                "it does not follow the primary"
            } else {
                "no recent position"
            };
            format!("{} {why}", r.id)
        })
        .collect();
    reasons.join("; ")
}
