//! The failover decision: a pure function of what the coordinator observes
//! of a cluster and of the time (STYLE.md: decisions are pure, table-tested;
//! side effects live in the executor, [`crate::ops`], and the loop that
//! feeds it, [`monitor`]).
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

mod decide;
pub mod monitor;

pub use decide::{decide, next_change};
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

#[cfg(test)]
mod tests;
