//! The failover decision: a pure function of what the coordinator observes
//! of a cluster and of the time (STYLE.md: decisions are pure, table-tested;
//! side effects live in the executor, [`crate::ops`], and the loop that
//! feeds it, [`crate::monitor`]).
//!
//! The primary is judged lost only when the evidence says so:
//!
//! 1. every lease the coordinator granted it has run out by the
//!    coordinator's own clock, plus a safety margin (the agent fenced itself
//!    before its own, earlier, end of the same lease), and so has every
//!    other node's possible lease;
//! 2. its replicas do not all confirm it (a primary cut off from the
//!    coordinator but not from its replicas keeps its lease through them,
//!    and keeps serving: a coordinator outage or partition must not take
//!    writes down; one replica missing is enough to end that lease).
//!
//! Then the candidate is the healthy replica following the primary with the
//! most recent position (an order on received, then replayed position,
//! then the node id), as measured after the primary's last possible write
//! (the end of its coordinator lease, or of the last lease its replicas
//! gave it, whichever is later: positions are final, a fenced primary sends
//! nothing more). In sync mode only a replica holding every acknowledged
//! commit qualifies: the most advanced of all replicas that may have
//! acknowledged commits, every one of which must have reported; otherwise
//! nothing is promoted and on-call is paged. In async mode a candidate
//! further behind the primary's last known position (its own report, or
//! what it last told a replica) than the limit is refused for the same
//! reason.

use std::cmp::Ordering;
use std::fmt;
use std::time::{Duration, Instant};

/// What the coordinator knows of one node of the cluster.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: String,
    /// Heartbeats arrive (liveness "up").
    pub up: bool,
    /// The engine runs and answered its last health check.
    pub healthy: bool,
    /// A standby (replica data), by its own report.
    pub in_recovery: bool,
    /// Its WAL receiver streams from an upstream.
    pub streaming: bool,
    /// Replica: the node its spec follows.
    pub upstream: String,
    /// Replica: the upstream's WAL position as it last told this replica.
    pub upstream_lsn: u64,
    /// When its last successful health check ran (heartbeat receipt minus
    /// the check's age); positions are as of then.
    pub checked_at: Option<Instant>,
    /// Replica: last WAL position received (flushed) and replayed.
    /// Primary: its current WAL position as last reported.
    pub received: u64,
    pub replayed: u64,
    /// Until when a lease the coordinator granted this node may run (with
    /// what a previous coordinator process may have granted as a floor).
    pub lease_until: Instant,
    /// Replica: the primary it confirms and until when.
    pub confirms: Option<(String, Instant)>,
}

/// The cluster as the coordinator sees it at one moment.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub cluster: String,
    pub auto_failover: bool,
    pub sync: bool,
    pub lease: Duration,
    pub margin: Duration,
    /// Async mode: the most a promotion may lose, in the engine's position
    /// unit (bytes of WAL, transactions).
    pub max_lag: u64,
    /// That unit, for messages: "bytes" or "transactions".
    pub unit: &'static str,
    pub primary: NodeView,
    pub replicas: Vec<NodeView>,
    /// Sync mode: replicas that may hold acknowledged commits (None: any).
    pub ackers: Option<Vec<String>>,
    /// The kind of an operation holding the cluster, if any.
    pub operation: Option<String>,
}

/// Why the coordinator does nothing yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// An operation holds the cluster.
    Operation(String),
    /// The primary is silent, but its lease may still run.
    LeaseRunning { node: String, left: Duration },
    /// The primary is silent to the coordinator, but every replica
    /// confirms it.
    ConfirmedBy {
        replicas: Vec<String>,
        left: Duration,
    },
    /// A healthy replica has not reported a position measured after the
    /// primary's lease ended.
    FreshPositions(Vec<String>),
}

/// The outcome of one look at a cluster; `Display` is the sentence logged
/// once per change and shown by `corralctl cluster show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The primary holds its lease.
    Healthy {
        primary: String,
    },
    Wait {
        primary: String,
        why: Wait,
    },
    /// Promote `candidate`.
    Failover {
        old: String,
        candidate: String,
        /// Async mode: how far the candidate is behind the primary's last
        /// known position (writes that may be lost), in `unit`.
        behind: u64,
        unit: &'static str,
        /// When the old primary's lease ended (by the coordinator's clock).
        lease_ended: Instant,
    },
    /// The primary is lost and nothing may be promoted: stay read-only and
    /// page on-call.
    Blocked {
        primary: String,
        reason: String,
    },
    /// The primary is lost but auto-failover is off: only the alarm.
    Off {
        primary: String,
        candidate: Option<String>,
    },
    /// The primary of record runs as a standby: its promotion did not
    /// complete (it failed, or its operation was cut short). Promote it
    /// again.
    Repromote {
        primary: String,
    },
}

impl Decision {
    /// Whether this calls for on-call's attention (a critical alert).
    pub fn is_alarm(&self) -> bool {
        matches!(self, Decision::Blocked { .. } | Decision::Off { .. })
    }

    /// A short kind, stable across figures changing (to log changes once).
    pub fn kind(&self) -> String {
        match self {
            Decision::Healthy { .. } => "healthy".into(),
            Decision::Wait { why, .. } => match why {
                Wait::Operation(k) => format!("wait-operation-{k}"),
                Wait::LeaseRunning { .. } => "wait-lease".into(),
                Wait::ConfirmedBy { .. } => "wait-confirmed".into(),
                Wait::FreshPositions(_) => "wait-positions".into(),
            },
            Decision::Failover { candidate, .. } => format!("failover-{candidate}"),
            Decision::Blocked { reason, .. } => format!("blocked-{reason}"),
            Decision::Off { .. } => "off".into(),
            Decision::Repromote { .. } => "repromote".into(),
        }
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Healthy { primary } => write!(f, "primary {primary} holds its lease"),
            Decision::Wait { primary, why } => match why {
                Wait::Operation(kind) => write!(
                    f,
                    "operation {kind} holds the cluster; failover decisions wait for it (primary {primary})"
                ),
                Wait::LeaseRunning { node, left } => write!(
                    f,
                    "primary {primary} is silent; no promotion while {node}'s lease may still run ({} ms left with the margin)",
                    ms(*left)
                ),
                Wait::ConfirmedBy { replicas, left } => write!(
                    f,
                    "primary {primary} is unreachable from the coordinator but its replicas ({}) \
                     confirm it (for {} ms more at least): it keeps serving, no failover",
                    replicas.join(", "),
                    ms(*left)
                ),
                Wait::FreshPositions(nodes) => write!(
                    f,
                    "primary {primary} is lost; waiting for {} to report a position measured after its lease ended",
                    nodes.join(", ")
                ),
            },
            Decision::Failover {
                old,
                candidate,
                behind,
                unit,
                ..
            } => {
                write!(f, "primary {old} is lost: promoting {candidate}")?;
                if *behind > 0 {
                    write!(
                        f,
                        " ({behind} {unit} behind {old}'s last report: writes acknowledged after that are lost)"
                    )?;
                }
                Ok(())
            }
            Decision::Blocked { primary, reason } => write!(
                f,
                "primary {primary} is lost and no replica may be promoted: {reason}. The cluster stays \
                 read-only; fix that, or promote a node by hand (`corralctl node promote --force`)"
            ),
            Decision::Repromote { primary } => write!(
                f,
                "primary {primary} of record runs as a standby (its promotion did not complete): \
                 promoting it again"
            ),
            Decision::Off {
                primary,
                candidate,
            } => {
                write!(f, "primary {primary} is lost and auto-failover is off")?;
                match candidate {
                    Some(c) => write!(
                        f,
                        "; {c} could take over (`corralctl node promote CLUSTER {c} --confirm {c} --force`)"
                    ),
                    None => write!(f, "; no replica is fit to take over"),
                }
            }
        }
    }
}

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
    let primary = view.primary.id.clone();
    if let Some(kind) = &view.operation {
        return Decision::Wait {
            primary,
            why: Wait::Operation(kind.clone()),
        };
    }
    // 1. The primary's lease, by the coordinator's clock, plus the margin.
    let lease_end = view.primary.lease_until;
    if now < lease_end + view.margin {
        let p = &view.primary;
        if p.up && p.healthy && !p.in_recovery {
            return Decision::Healthy { primary };
        }
        return Decision::Wait {
            primary: primary.clone(),
            why: Wait::LeaseRunning {
                node: primary,
                left: (lease_end + view.margin) - now,
            },
        };
    }
    // 2. Every replica still confirming the primary proves it alive (and
    // holding a lease through them). One that does not is enough: the
    // primary cannot renew its lease without it.
    let confirmation = |r: &NodeView| match &r.confirms {
        Some((p, until)) if *p == primary => Some(*until),
        _ => None,
    };
    let all_confirm = view
        .replicas
        .iter()
        .map(|r| confirmation(r).filter(|until| *until > now))
        .collect::<Option<Vec<Instant>>>();
    if let Some(untils) = all_confirm.filter(|u| !u.is_empty()) {
        let soonest = untils.iter().min().copied().unwrap_or(now);
        return Decision::Wait {
            primary,
            why: Wait::ConfirmedBy {
                replicas: view.replicas.iter().map(|r| r.id.clone()).collect(),
                left: soonest - now,
            },
        };
    }
    // 3. A primary of record that is a standby is one whose promotion did
    // not complete. It was the candidate: when it was chosen the old
    // primary's lease had run out and the term was raised, so nobody has
    // taken a write since and it still holds every acknowledged one. It is
    // promoted again, once every other node's possible lease has run out.
    let p = &view.primary;
    if p.up && p.healthy && p.in_recovery {
        if let Some(why) = other_lease_running(view, &primary, now) {
            return Decision::Wait { primary, why };
        }
        if !view.auto_failover {
            return Decision::Off {
                candidate: Some(primary.clone()),
                primary,
            };
        }
        return Decision::Repromote { primary };
    }
    // The primary's last possible write: the end of its coordinator lease,
    // or of the last lease a round of confirmations gave it. A round needs
    // every replica, so that lease ended by the earliest of their
    // confirmations, less the margin a replica holds its confirmation
    // beyond the lease; with one replica never confirming, there was none.
    let replica_lease_end = view
        .replicas
        .iter()
        .map(confirmation)
        .collect::<Option<Vec<Instant>>>()
        .and_then(|u| u.into_iter().min())
        .map(|until| until.checked_sub(view.margin).unwrap_or(until));
    let writes_end = replica_lease_end.map_or(lease_end, |e| e.max(lease_end));
    // 4. The primary is lost. Who could take over?
    let fit: Vec<&NodeView> = view
        .replicas
        .iter()
        .filter(|r| r.up && r.healthy && r.in_recovery && r.upstream == primary)
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
        // Every replica that may hold an acknowledged commit must have
        // reported a final position; the candidate is the furthest of them.
        // Which replicas acknowledged is known only while the coordinator
        // heard the primary: if the primary served on through its replicas'
        // confirmations, any replica may have.
        let ackers = view.ackers.as_ref().filter(|_| writes_end <= lease_end);
        let missing: Vec<String> = view
            .replicas
            .iter()
            .filter(|r| ackers.is_none_or(|a| a.contains(&r.id)))
            .filter(|r| !fresh.iter().any(|f| f.id == r.id))
            .filter(|r| !stale.contains(&r.id))
            .map(|r| r.id.clone())
            .collect();
        if !missing.is_empty() {
            let reason = format!(
                "sync mode: {} may hold acknowledged commits and cannot report its position \
                 (down, unhealthy or not following {primary}), so promoting another replica \
                 could lose them",
                missing.join(", ")
            );
            return Decision::Blocked { primary, reason };
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
    // In sync mode the furthest replica holds every acknowledged commit,
    // whatever the primary wrote after; in async mode that is what is lost.
    // The primary's position: its last report, or what it last told a
    // replica (later, when the coordinator could not hear it).
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
        lease_ended: lease_end,
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

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(2000);
    const MARGIN: Duration = Duration::from_millis(500);

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A replica of vm1 that reported a position checked at t0 + `checked`
    /// ms, and whose own leases (if it ever had any) ended at t0.
    fn node(t0: Instant, id: &str, received: u64, checked: u64) -> NodeView {
        NodeView {
            id: id.into(),
            up: true,
            healthy: true,
            in_recovery: true,
            streaming: true,
            upstream: "vm1".into(),
            upstream_lsn: 0,
            checked_at: Some(t0 + ms(checked)),
            received,
            replayed: received,
            lease_until: t0,
            confirms: None,
        }
    }

    /// Primary vm1 last granted a lease at t0 + `granted`, replicas vm2 and vm3.
    fn view(t0: Instant, granted: u64) -> ClusterView {
        let mut p = node(t0, "vm1", 1000, granted);
        p.in_recovery = false;
        p.upstream.clear();
        p.lease_until = t0 + ms(granted) + LEASE;
        ClusterView {
            cluster: "orders".into(),
            auto_failover: true,
            sync: false,
            lease: LEASE,
            margin: MARGIN,
            max_lag: 1 << 20,
            unit: "bytes",
            primary: p,
            replicas: vec![node(t0, "vm2", 1000, 0), node(t0, "vm3", 1000, 0)],
            ackers: None,
            operation: None,
        }
    }

    /// The primary (granted at t0 + 1000, lease to t0 + 3000) died: down,
    /// replicas reported fresh positions at t0 + 3100.
    fn dead_primary(t0: Instant) -> ClusterView {
        let mut v = view(t0, 1000);
        v.primary.up = false;
        for r in &mut v.replicas {
            r.checked_at = Some(t0 + ms(3100));
            r.streaming = false;
        }
        v
    }

    fn failover_to(d: &Decision) -> Option<&str> {
        match d {
            Decision::Failover { candidate, .. } => Some(candidate),
            _ => None,
        }
    }

    #[test]
    fn decision_table() {
        let t0 = Instant::now();
        type Edit = Box<dyn Fn(&mut ClusterView)>;
        let confirm = move |until: u64| Some(("vm1".to_string(), t0 + ms(until)));
        // (name, edit of the dead-primary view, now (ms after t0), expected kind)
        let cases: Vec<(&str, Edit, u64, &str)> =
            vec![
            ("healthy primary", Box::new(move |v| *v = view(t0, 3000)), 3600, "healthy"),
            (
                "primary dead, lease still running",
                Box::new(|_| {}),
                2900,
                "wait-lease",
            ),
            (
                "primary dead, inside the margin",
                Box::new(|_| {}),
                3400,
                "wait-lease",
            ),
            (
                "primary dead, lease and margin over: promote",
                Box::new(|_| {}),
                3600,
                "failover-vm2",
            ),
            (
                "two replicas with different positions: the furthest",
                Box::new(|v| v.replicas[1].received = 1500),
                3600,
                "failover-vm3",
            ),
            (
                "equal received, more replayed wins",
                Box::new(|v| v.replicas[0].replayed = 900),
                3600,
                "failover-vm3",
            ),
            (
                "primary partitioned from the coordinator only: every replica confirms it",
                Box::new(move |v| {
                    v.replicas[0].confirms = confirm(5000);
                    v.replicas[1].confirms = confirm(4800);
                }),
                3600,
                "wait-confirmed",
            ),
            (
                "one replica still confirms, the other does not: no lease through them",
                Box::new(move |v| v.replicas[0].confirms = confirm(5000)),
                5600,
                "failover-vm2",
            ),
            (
                "expired confirmations prove nothing",
                Box::new(move |v| {
                    v.replicas[0].confirms = confirm(3500);
                    v.replicas[1].confirms = confirm(3500);
                }),
                3600,
                "failover-vm2",
            ),
            (
                "confirmations of another primary prove nothing",
                Box::new(move |v| {
                    for r in &mut v.replicas {
                        r.confirms = Some(("vm9".into(), t0 + ms(5000)));
                    }
                }),
                3600,
                "failover-vm2",
            ),
            (
                "positions measured before the last lease the replicas gave ended are not final",
                Box::new(move |v| {
                    // Confirmed until 4500: that lease ended at 4000.
                    v.replicas[0].confirms = confirm(4500);
                    v.replicas[1].confirms = confirm(4500);
                }),
                4600,
                "wait-positions",
            ),
            (
                "... and are once measured after it",
                Box::new(move |v| {
                    for r in &mut v.replicas {
                        r.confirms = confirm(4500);
                        r.checked_at = Some(t0 + ms(4100));
                    }
                }),
                4600,
                "failover-vm2",
            ),
            (
                "replica dead, primary fine",
                Box::new(move |v| {
                    *v = view(t0, 3000);
                    v.replicas[1].up = false;
                }),
                3600,
                "healthy",
            ),
            (
                "dead replica is skipped",
                Box::new(|v| {
                    v.replicas[1].received = 1500;
                    v.replicas[1].up = false;
                }),
                3600,
                "failover-vm2",
            ),
            (
                "a replica following another node is not a candidate",
                Box::new(|v| {
                    v.replicas[0].upstream = "vm9".into();
                    v.replicas[0].received = 1500;
                }),
                3600,
                "failover-vm3",
            ),
            (
                "positions measured before the lease ended are not final",
                Box::new(move |v| v.replicas[0].checked_at = Some(t0 + ms(2900))),
                3600,
                "wait-positions",
            ),
            (
                "all replicas lagging past the limit",
                Box::new(|v| {
                    v.primary.received = 10 << 20;
                }),
                3600,
                "blocked-every replica lags past the limit",
            ),
            (
                "the primary's position as a replica last heard it counts too",
                Box::new(|v| v.replicas[1].upstream_lsn = 10 << 20),
                3600,
                "blocked-every replica lags past the limit",
            ),
            (
                "no replica fit",
                Box::new(|v| {
                    v.replicas[0].up = false;
                    v.replicas[1].healthy = false;
                }),
                3600,
                "blocked-vm2 down; vm3 its engine is not healthy",
            ),
            (
                "auto-failover off: only the alarm",
                Box::new(|v| v.auto_failover = false),
                3600,
                "off",
            ),
            (
                "an operation holds the cluster",
                Box::new(|v| v.operation = Some("add_node".into())),
                3600,
                "wait-operation-add_node",
            ),
            (
                "a former primary's lease still running",
                Box::new(move |v| v.replicas[1].lease_until = t0 + ms(4000)),
                3600,
                "wait-lease",
            ),
            (
                "a longer lease granted before the lease was shortened still runs",
                Box::new(move |v| v.primary.lease_until = t0 + ms(11_000)),
                3600,
                "wait-lease",
            ),
            (
                "a standby of record (promotion failed) is not a healthy primary",
                Box::new(move |v| {
                    *v = view(t0, 3000);
                    v.primary.in_recovery = true;
                }),
                3600,
                "wait-lease",
            ),
            (
                "... and once no lease may run, it is promoted again",
                Box::new(move |v| {
                    *v = view(t0, 3000);
                    v.primary.in_recovery = true;
                }),
                5600,
                "repromote",
            ),
            (
                "... but not while a former primary's lease may run",
                Box::new(move |v| {
                    *v = view(t0, 3000);
                    v.primary.in_recovery = true;
                    v.replicas[0].lease_until = t0 + ms(6000);
                }),
                5600,
                "wait-lease",
            ),
            (
                "... nor with auto-failover off (the alarm names it)",
                Box::new(move |v| {
                    *v = view(t0, 3000);
                    v.primary.in_recovery = true;
                    v.auto_failover = false;
                }),
                5600,
                "off",
            ),
            (
                "a standby of record that is down is a lost primary",
                Box::new(move |v| {
                    v.primary.in_recovery = true;
                }),
                3600,
                "failover-vm2",
            ),
        ];
        for (name, edit, now, want) in cases {
            let mut v = dead_primary(t0);
            edit(&mut v);
            let d = decide(&v, t0 + ms(now));
            assert!(
                d.kind().starts_with(want),
                "{name}: got {:?} ({d}), want {want}",
                d.kind()
            );
            // Every outcome reads as a sentence naming the primary.
            assert!(d.to_string().contains("vm1"), "{name}: {d}");
        }
    }

    #[test]
    fn sync_mode_promotes_only_a_replica_holding_every_acknowledged_commit() {
        let t0 = Instant::now();
        let at = t0 + ms(3600);
        // Both replicas reported: the furthest holds every acknowledged commit.
        let mut v = dead_primary(t0);
        v.sync = true;
        v.replicas[1].received = 1200;
        assert_eq!(failover_to(&decide(&v, at)), Some("vm3"));
        // vm3 may have acknowledged commits and is down: vm2 may lack them.
        v.replicas[1].up = false;
        let d = decide(&v, at);
        assert!(
            matches!(&d, Decision::Blocked { reason, .. } if reason.contains("vm3 may hold acknowledged commits")),
            "{d}"
        );
        assert!(d.is_alarm());
        // ... unless vm3 was never a synchronous standby in this term.
        v.ackers = Some(vec!["vm2".into()]);
        assert_eq!(failover_to(&decide(&v, at)), Some("vm2"));
        // ... as far as the coordinator knows: if the primary served on
        // through its replicas' confirmations, any replica may have.
        let mut late = v.clone();
        for r in &mut late.replicas {
            r.confirms = Some(("vm1".into(), t0 + ms(4000)));
            r.checked_at = Some(t0 + ms(3600));
        }
        assert!(
            matches!(decide(&late, t0 + ms(4100)), Decision::Blocked { .. }),
            "{}",
            decide(&late, t0 + ms(4100))
        );
        // Sync mode ignores the lag limit: the furthest replica holds
        // every acknowledged commit whatever the primary wrote after.
        v.primary.received = 100 << 20;
        assert_eq!(failover_to(&decide(&v, at)), Some("vm2"));
        // A potential acker whose position is not yet final: wait for it.
        let mut v = dead_primary(t0);
        v.sync = true;
        v.replicas[1].checked_at = Some(t0 + ms(2000));
        assert!(matches!(
            decide(&v, at),
            Decision::Wait {
                why: Wait::FreshPositions(_),
                ..
            }
        ));
    }

    #[test]
    fn flapping_heartbeats_never_fail_over() {
        let t0 = Instant::now();
        let mut v = view(t0, 0);
        // Heartbeats answered with gaps of up to 2.4 s (under lease +
        // margin), the primary seen down in between.
        let mut granted = 0u64;
        for gap in [300u64, 2400, 100, 1900, 2400, 500, 2300] {
            for step in (0..gap).step_by(50) {
                v.primary.up = step < 1000;
                let d = decide(&v, t0 + ms(granted + step));
                assert!(
                    failover_to(&d).is_none() && !d.is_alarm(),
                    "gap {gap} at +{step}: {d}"
                );
            }
            granted += gap;
            v.primary.lease_until = t0 + ms(granted) + LEASE;
        }
    }

    #[test]
    fn sentences_say_what_happens() {
        let t0 = Instant::now();
        let d = decide(&dead_primary(t0), t0 + ms(3600));
        assert_eq!(d.to_string(), "primary vm1 is lost: promoting vm2");
        let mut v = dead_primary(t0);
        for r in &mut v.replicas {
            r.confirms = Some(("vm1".into(), t0 + ms(5000)));
        }
        assert!(decide(&v, t0 + ms(3600))
            .to_string()
            .contains("its replicas (vm2, vm3) confirm it"));
    }
}
