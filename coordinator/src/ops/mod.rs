//! Durable operations.
//!
//! Every mutating request becomes a row in `operations` (written in the same
//! transaction as the change it asks for, after checking that no other
//! operation holds the cluster), then runs here in a task of its own, so a
//! caller disconnecting does not cancel it. Each step is written to the
//! operation's log, and steps are idempotent on the agent's side (a clone is
//! not redone once the data is there, a resync carries the operation id, a
//! promotion of a primary is a no-op), so a coordinator that restarts
//! mid-way re-runs the unfinished operation from the top without doing
//! anything twice.
//!
//! - [`runner`]: spawn, resume, outcome, deadlines; [`ctx`]: what steps share.
//! - One file per kind, each with its steps in order and what it
//!   guarantees when the coordinator dies between them: [`create_cluster`],
//!   [`add_node`], [`remove_node`], [`promote`], [`failover`], [`rejoin`],
//!   [`resync`], [`reboot`], [`delete_cluster`], [`set_sync`].
//! - The backup kinds: [`backup`], [`verify_backup`], [`restore`],
//!   [`configure_backups`].

mod add_node;
mod backup;
mod configure_backups;
mod create_cluster;
mod ctx;
mod delete_cluster;
mod failover;
mod promote;
mod reboot;
mod rejoin;
mod remove_node;
mod restore;
mod resync;
mod runner;
mod set_sync;
mod verify_backup;

pub use runner::{new_id, resume_unfinished, spawn};

use crate::store::{NodeRow, OperationRow};
use crate::Coordinator;
use anyhow::{anyhow, Result};
use corral_proto::pb::{self};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::model::{
    ADD_NODE, AUTO_FAILOVER, BACKGROUND, BACKUP, CONFIGURE_BACKUPS, CREATE_CLUSTER, DELETE_CLUSTER,
    FAILOVER, PROMOTE, REBOOT, REJOIN, REMOVE_NODE, RESTORE, RESYNC, SCHEDULER, SET_SYNC,
    VERIFY_BACKUP,
};

/// The longest an operation of `kind` may run before it is given up and
/// fails, releasing the cluster. Generous for those that move data (a clone
/// or a restore of a large database takes hours), short for the ones that
/// only switch roles: a stuck one must not hold failovers back for long.
pub fn deadline(kind: &str) -> Duration {
    const MINUTE: u64 = 60;
    Duration::from_secs(match kind {
        FAILOVER | SET_SYNC => 5 * MINUTE,
        // A switchover waits for each replica to stream (2 min each).
        PROMOTE | REBOOT | REMOVE_NODE => 15 * MINUTE,
        REJOIN | DELETE_CLUSTER | CONFIGURE_BACKUPS => 120 * MINUTE,
        // Clones and restores, sized for terabytes.
        _ => 24 * 60 * MINUTE,
    })
}
/// A resumed operation past its deadline still gets this long to find its
/// steps done (they usually are).
const DEADLINE_FLOOR: Duration = Duration::from_secs(60);

/// Runs an operation's `steps`, failing them at the kind's [`deadline`],
/// counted from the request (`created_at_ms`) so that a resumed operation
/// has only what is left.
async fn within_deadline(
    kind: &str,
    created_at_ms: i64,
    steps: impl Future<Output = Result<()>>,
) -> Result<()> {
    let deadline = deadline(kind);
    let spent = Duration::from_millis((corral_proto::now_ms() - created_at_ms).max(0) as u64);
    let left = deadline.saturating_sub(spent).max(DEADLINE_FLOOR);
    match tokio::time::timeout(left, steps).await {
        Ok(outcome) => outcome,
        Err(_) => Err(anyhow!(
            "gave up: {kind} operations must finish within {} (so that none holds the \
             cluster's failovers for ever); steps the agents started carry on, and the next \
             operation finds them done",
            fmt_duration(deadline)
        )),
    }
}

fn fmt_duration(d: Duration) -> String {
    match d.as_secs() {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// How long an operation keeps retrying an agent it cannot reach.
const AGENT_UNREACHABLE_GIVE_UP: Duration = Duration::from_secs(60);
/// How long a new or resynced replica may take to start streaming once its
/// data is in place.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a failover keeps trying to repoint a replica that is up before
/// leaving it to the monitor (which repoints it when it next reports).
const REPOINT_GIVE_UP: Duration = Duration::from_secs(10);
/// How long a switchover waits for the target to replay the old primary's
/// last WAL before giving up and restarting the old primary.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Progress of the long step of each running operation (in memory: after a
/// restart the agent's next report fills it again).
#[derive(Default)]
pub struct Runner {
    progress: Mutex<HashMap<String, pb::Progress>>,
    /// The task of each running operation, so a failover can preempt a
    /// rejoin (see [`Runner::abort`]).
    tasks: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl Runner {
    /// Stops the task of operation `op` (its state is the caller's to
    /// record). Agent steps it started carry on, detached, and are
    /// idempotent.
    pub fn abort(&self, op: &str) {
        let task = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(op);
        if let Some(t) = task {
            t.abort();
        }
    }

    pub fn progress(&self, op: &str) -> Option<pb::Progress> {
        self.lock().get(op).cloned()
    }

    fn set_progress(&self, op: &str, p: Option<pb::Progress>) {
        match p {
            Some(p) => self.lock().insert(op.to_string(), p),
            None => self.lock().remove(op),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, pb::Progress>> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One running operation and what its steps share.
pub(crate) struct Ctx<'a> {
    pub(crate) coord: &'a Arc<Coordinator>,
    pub(crate) op: &'a OperationRow,
    /// A switchover's pause before the promotion, for its log.
    paused_ms: Mutex<u128>,
}

/// The cluster's members as the store records them.
pub(crate) struct Members {
    pub(crate) primary: NodeRow,
    pub(crate) replicas: Vec<NodeRow>,
}

impl Members {
    pub(crate) fn replica_ids(&self) -> Vec<String> {
        self.replicas.iter().map(|n| n.id.clone()).collect()
    }
}

fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

pub(crate) fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// Test-only pauses between steps, to kill the coordinator at an exact
/// point: `CORRAL_FAILPOINTS=failover-before-promote` makes a failover stop
/// (forever) once the term is raised and recorded, before the promotion.
/// Never set in production; the variable is read only where named.
async fn failpoint(name: &str) {
    let set =
        std::env::var("CORRAL_FAILPOINTS").is_ok_and(|v| v.split(',').any(|f| f.trim() == name));
    if set {
        tracing::warn!("failpoint {name}: pausing here until the process is killed");
        std::future::pending::<()>().await;
    }
}

/// A test-only failure, the first time only in this process:
/// `CORRAL_FAILPOINTS=promote-fails-once` makes the first promotion fail
/// before the agent is asked, leaving the primary of record a standby.
fn failpoint_once(name: &str) -> bool {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let set =
        std::env::var("CORRAL_FAILPOINTS").is_ok_and(|v| v.split(',').any(|f| f.trim() == name));
    set && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
}

/// Unix milliseconds as UTC time of day with milliseconds.
pub(crate) fn fmt_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(|t| {
            format!(
                "{:02}:{:02}:{:02}.{:03}",
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            )
        })
        .unwrap_or_else(|_| ms.to_string())
}

fn slot_label(node: &str) -> String {
    format!("corral_{}", node.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_operation_that_never_finishes_fails_at_its_deadline() {
        let began = tokio::time::Instant::now();
        let now = corral_proto::now_ms();
        let e = within_deadline(FAILOVER, now, std::future::pending())
            .await
            .unwrap_err();
        assert!(format!("{e}").contains("must finish within 5 min"), "{e}");
        assert_eq!(began.elapsed(), deadline(FAILOVER));
        // Resumed after a restart, with most of it spent: what is left,
        // but at least the floor.
        let began = tokio::time::Instant::now();
        let long_ago = now - 10 * 60 * 1000;
        assert!(within_deadline(FAILOVER, long_ago, std::future::pending())
            .await
            .is_err());
        assert_eq!(began.elapsed(), DEADLINE_FLOOR);
        // One that finishes is untouched.
        within_deadline(ADD_NODE, now, async { Ok(()) })
            .await
            .unwrap();
        for kind in [ADD_NODE, RESYNC, RESTORE, CREATE_CLUSTER, BACKUP] {
            assert!(deadline(kind) >= Duration::from_secs(24 * 3600), "{kind}");
        }
    }
}
