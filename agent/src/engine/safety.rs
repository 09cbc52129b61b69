//! Failover safety on the node: terms, the primary's lease, replicas'
//! confirmations and the fence (DESIGN.md, "Safety model for failover").
//!
//! - **Terms.** Every command from the coordinator carries the cluster's
//!   term; the agent persists the highest it has seen and refuses a command
//!   carrying a lower one, so a message delayed from before a failover
//!   cannot undo it.
//! - **Lease.** A primary that serves replicas may accept writes only while
//!   it holds a lease ([`crate::lease`]). The coordinator renews it in its
//!   answer to each heartbeat; while the coordinator is unreachable, a
//!   round in which every replica confirmed the primary renews it
//!   ([`crate::peers`]).
//! - **Fence.** The guardian ([`Engine::guard`], in [`super::fence`])
//!   fences a primary whose lease is about to end, and keeps the kernel's
//!   lease gate open while the lease is renewed.
//! - **Confirmations.** A replica confirms only the primary its own spec
//!   follows, in a term not older than its own, and refuses to be promoted
//!   until its last confirmation has expired. A restarted agent does not
//!   know what it confirmed before, so it assumes it just did.

use super::record::Stored;
use super::transitions::{self, Guard};
use super::{Conflict, Engine};
use crate::lease::{self, BootTime, Source};
use anyhow::Result;
use corral_proto::lease::{fence_ahead, margin};
use corral_proto::pb;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a new primary waits for its first lease before answering the
/// coordinator (it asks with an immediate heartbeat).
const FIRST_LEASE_WAIT: Duration = Duration::from_secs(3);

/// How long a replica being promoted waits for the lease it asked for
/// before it records itself as the primary: usually one heartbeat's round
/// trip. Without it the guardian may fence the new primary for the few
/// milliseconds until the lease arrives (harmless, but it ends sessions).
/// Past this it goes on and is fenced until the lease comes, as before.
pub(super) const PROMOTION_LEASE_WAIT: Duration = Duration::from_millis(300);

impl Engine {
    pub(super) fn lock_lease(&self) -> std::sync::MutexGuard<'_, lease::Lease> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster's term and timing as this node knows them.
    pub fn cluster_state(&self) -> Option<super::ClusterState> {
        self.stored().map(|s| s.cluster)
    }

    /// The lease part of the status, as of now.
    pub(crate) fn lease_status(&self) -> pb::LeaseStatus {
        let now = BootTime::now();
        let l = self.lock_lease();
        let (confirmed_primary, confirmation_remaining_ms) = l
            .confirmation(now)
            .map(|(p, d)| (p.to_string(), d.as_millis() as u32))
            .unwrap_or_default();
        pb::LeaseStatus {
            held: l.held(now),
            remaining_ms: l.remaining(now).as_millis() as u32,
            source: l.source.map(|s| s.as_str().to_string()).unwrap_or_default(),
            fenced: self.fenced_now.load(Ordering::SeqCst),
            confirmed_primary,
            confirmation_remaining_ms,
        }
    }

    /// Whether the node, as `stored` describes it, must be fenced at `now`.
    pub(super) fn should_fence(&self, stored: &Stored, now: BootTime) -> bool {
        self.fence_needed(stored, now) == Guard::Fenced
    }

    /// The fence the node, as `stored` describes it, needs at `now`
    /// ([`transitions::guard`]).
    pub(super) fn fence_needed(&self, stored: &Stored, now: BootTime) -> Guard {
        let primary = stored.spec.role == "primary";
        let confirmed = primary && !required_confirmers(stored).is_empty();
        let lease_ending = confirmed
            && self
                .lock_lease()
                .must_fence(now, fence_ahead(stored.cluster.lease()));
        transitions::guard(primary, confirmed, lease_ending)
    }

    /// Whether this node may take writes now: a primary holding its lease
    /// (or serving no replicas), not fenced. What `/primary` answers.
    pub fn writable(&self) -> bool {
        let Some(stored) = self.stored() else {
            return false;
        };
        stored.spec.role == "primary"
            && !stored.stopped
            && !self.should_fence(&stored, BootTime::now())
            && !self.lease_status().fenced
    }

    /// Refuses a command carrying a term older than ours; adopts a newer
    /// one. Term 0 means "not given" (kept for older coordinators).
    pub(super) fn check_term(&self, term: u64, what: &str) -> Result<()> {
        let Some(stored) = self.stored() else {
            return Ok(());
        };
        let mine = stored.cluster.term;
        if term != 0 && term < mine {
            anyhow::bail!(Conflict(format!(
                "refusing {what} from term {term}: this node has already seen term {mine} \
                 (a newer failover or promotion happened since the command was sent)"
            )));
        }
        if term > mine {
            self.modify_cluster_state(|c| c.term = c.term.max(term))?;
            tracing::info!(term, "adopted a newer cluster term");
        }
        Ok(())
    }

    /// Records the lease as it is now (for an agent restarted in this boot).
    /// A renewal that only extends the lease saved less than a quarter of a
    /// lease ago is not written: the file then holds an earlier end, which
    /// a restarted agent takes for the end (it fences sooner, never later).
    fn save_lease(&self) {
        let l = self.lock_lease().clone();
        let quarter = self
            .stored()
            .map_or(Duration::ZERO, |s| s.cluster.lease() / 4);
        let mut saved = self.lease_saved.lock().unwrap_or_else(|p| p.into_inner());
        let extends = saved.as_ref().is_some_and(|(at, s)| {
            at.elapsed() < quarter
                && s.source == l.source
                && s.until <= l.until
                // A confirmation of the same primary, extended: a restarted
                // replica assumes a fresh one anyway.
                && match (&s.confirmed, &l.confirmed) {
                    (None, None) => true,
                    (Some((p, a)), Some((q, b))) => p == q && a <= b,
                    _ => false,
                }
        });
        if extends {
            return;
        }
        match lease::save(&self.state_dir, &l) {
            Ok(()) => *saved = Some((Instant::now(), l)),
            Err(e) => tracing::warn!("saving lease.json: {e:#}"),
        }
    }

    /// At agent start: a replica may have confirmed its primary just before
    /// the restart, so it refuses promotion as if it had.
    pub(super) fn assume_recent_confirmation(&self, stored: &Stored) {
        if stored.spec.role != "replica" {
            return;
        }
        if let Some(up) = &stored.spec.upstream {
            let l = stored.cluster.lease();
            self.lock_lease()
                .confirm(&up.node, BootTime::now(), l + margin(l));
        }
    }

    /// Takes in the coordinator's answer to a heartbeat sent at `asked_at`:
    /// term, timing, peers, and the lease granted or revoked.
    pub fn on_assignment(&self, a: &pb::Assignment, asked_at: BootTime) {
        let Some(mut stored) = self.stored() else {
            return;
        };
        if a.cluster != stored.spec.cluster {
            return;
        }
        if a.term < stored.cluster.term {
            tracing::warn!(
                coordinator_term = a.term,
                term = stored.cluster.term,
                "the coordinator's answer carries an older term than this node's; ignoring it"
            );
            return;
        }
        let updated = self.modify_cluster_state(|c| {
            c.term = c.term.max(a.term);
            c.set_timing(a.lease_duration_ms, a.heartbeat_interval_ms);
            // A replica keeps no peers (a stale list would be asked for
            // confirmations the day it is promoted).
            // The list is left out once this node reported applying its
            // version: keep the stored one.
            if !a.allowlist_omitted && *c.allowlist != a.allowlist {
                c.allowlist = std::sync::Arc::new(a.allowlist.clone());
            }
            if !a.allowlist_omitted {
                c.allowlist_version = a.allowlist_version;
            }
            c.always_allowed = a.always_allowed.clone();
            c.peers = if a.role == "primary" {
                a.peers
                    .iter()
                    .map(|p| (p.node.clone(), p.address.clone()))
                    .collect()
            } else {
                Default::default()
            };
        });
        // The allowlist or the cluster's members may have changed.
        self.guard_wake.notify_one();
        match updated {
            Ok(Some(s)) => stored = s,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("recording the cluster's term and peers: {e:#}");
                return;
            }
        }
        // A replica being promoted takes its lease already, so it holds it
        // the moment the promotion completes.
        if stored.spec.role != "primary" && !self.promoting.load(Ordering::SeqCst) {
            return;
        }
        if a.role == "primary" && a.lease_ms > 0 {
            let len = Duration::from_millis(u64::from(a.lease_ms));
            self.lock_lease().grant(asked_at, len, Source::Coordinator);
            self.save_lease();
            self.guard_wake.notify_one();
        } else if a.role != "primary" && stored.spec.role == "primary" {
            let had = self.lock_lease().held(BootTime::now());
            self.lock_lease().revoke();
            self.save_lease();
            if had {
                self.events.push(
                    "lease_revoked",
                    format!(
                        "the coordinator assigns this node the role {:?} in term {}: \
                         it is no longer the primary and fences itself",
                        a.role, a.term
                    ),
                );
            }
            self.guard_wake.notify_one();
        }
    }

    /// Who to ask for confirmations, for a primary serving replicas whose
    /// engine runs: (cluster, term, lease, [(replica, agent address)]). None
    /// when there is no round to run; Err names a replica without address.
    pub fn confirmation_round(&self) -> Option<Result<Round, String>> {
        let stored = self.stored()?;
        let (state, healthy) = self
            .status
            .lock()
            .map(|s| (s.state, s.healthy))
            .unwrap_or_default();
        let required = required_confirmers(&stored);
        // Only an engine that runs and answers is worth keeping writable.
        if stored.spec.role != "primary"
            || required.is_empty()
            || stored.stopped
            || state != pb::EngineState::Running as i32
            || !healthy
        {
            return None;
        }
        let mut peers = Vec::new();
        for r in required {
            match stored.cluster.peers.get(&r) {
                Some(addr) if !addr.is_empty() => peers.push((r.clone(), addr.clone())),
                _ => return Some(Err(r)),
            }
        }
        Some(Ok(Round {
            cluster: stored.spec.cluster.clone(),
            term: stored.cluster.term,
            lease: stored.cluster.lease(),
            peers,
        }))
    }

    /// Every replica confirmed a round of `term` asked at `asked_at`. Taken
    /// only if the node is still the primary in that term (a revoke or a
    /// newer term may have arrived while the round ran).
    pub fn confirmed_by_replicas(&self, asked_at: BootTime, lease: Duration, term: u64) {
        let current = self
            .stored()
            .is_some_and(|s| s.spec.role == "primary" && s.cluster.term == term);
        if !current {
            return;
        }
        let was_held = self.lock_lease().held(BootTime::now());
        self.lock_lease().grant(asked_at, lease, Source::Replicas);
        self.save_lease();
        if !was_held {
            self.guard_wake.notify_one();
        }
    }

    /// A replica answered with a newer term: somebody else may have been
    /// promoted, so this primary stops holding its lease (the safe way to
    /// be wrong). The term itself is not adopted: terms come from the
    /// coordinator only, and a peer could claim any number (a term far in
    /// the future would make this node refuse every real command).
    pub fn superseded(&self, term: u64, by: &str) {
        let mine = self.stored().map_or(0, |s| s.cluster.term);
        if term <= mine {
            return;
        }
        self.lock_lease().revoke();
        self.save_lease();
        self.events.push(
            "lease_revoked",
            format!(
                "replica {by} says it is in term {term} (this node: {mine}): another node may \
                 have been promoted; fencing until the coordinator says otherwise"
            ),
        );
        self.guard_wake.notify_one();
    }

    /// A replica's answer to its primary's confirmation request.
    pub fn confirm_primary(
        &self,
        caller: &str,
        req: &pb::ConfirmPrimaryRequest,
    ) -> pb::ConfirmPrimaryResponse {
        let refuse = |term: u64, reason: String| pb::ConfirmPrimaryResponse {
            confirmed: false,
            term,
            reason,
        };
        let Some(stored) = self.stored() else {
            return refuse(0, "this node runs no engine".into());
        };
        let term = stored.cluster.term;
        if stored.spec.cluster != req.cluster {
            return refuse(
                term,
                format!("this node serves cluster {:?}", stored.spec.cluster),
            );
        }
        if stored.spec.role != "replica" {
            return refuse(
                term,
                format!("this node is the cluster's {}", stored.spec.role),
            );
        }
        let follows = stored.spec.upstream.as_ref().map(|u| u.node.as_str());
        if follows != Some(caller) {
            return refuse(
                term,
                format!(
                    "this replica follows {}, not {caller}",
                    follows.unwrap_or("nobody")
                ),
            );
        }
        if req.term < term {
            return refuse(
                term,
                format!("term {} is older than this node's term {term}", req.term),
            );
        }
        if req.term > term {
            // Terms come from the coordinator only (it repoints replicas in
            // the new term before their new primary asks them); a peer
            // cannot move this node's term.
            return refuse(
                term,
                format!(
                    "term {} is newer than this node's term {term}: this node takes terms \
                     from the coordinator only",
                    req.term
                ),
            );
        }
        let lease_ms = req.lease_ms.clamp(
            corral_proto::lease::MIN_LEASE_MS,
            corral_proto::lease::MAX_LEASE_MS,
        );
        let l = Duration::from_millis(u64::from(lease_ms));
        // Under the lease lock: a promotion sets `promoting` under the same
        // lock, so a confirmation is either seen by it or refused.
        let mut lease = self.lock_lease();
        if self.promoting.load(Ordering::SeqCst) {
            return refuse(term, "this replica is being promoted".into());
        }
        lease.confirm(caller, BootTime::now(), l + margin(l));
        pb::ConfirmPrimaryResponse {
            confirmed: true,
            term,
            reason: String::new(),
        }
    }

    /// Stops confirming anyone, then waits until the last confirmation has
    /// expired: from then on the old primary cannot hold a lease through
    /// this replica. Undone by [`Engine::end_promotion`].
    pub(super) async fn begin_promotion(&self, wait: bool) -> Result<()> {
        let holding = {
            let lease = self.lock_lease();
            self.promoting.store(true, Ordering::SeqCst);
            // Ask for the lease now; it arrives while the promotion runs.
            self.heartbeat_wake.notify_one();
            lease
                .confirmation(BootTime::now())
                .map(|(p, d)| (p.to_string(), d))
        };
        let Some((primary, left)) = holding.filter(|_| wait) else {
            return Ok(());
        };
        tracing::info!(
            "waiting {} ms for this replica's confirmation of {primary} to expire before promoting",
            left.as_millis()
        );
        let began = Instant::now();
        loop {
            let left = self
                .lock_lease()
                .confirmation(BootTime::now())
                .map(|(_, d)| d);
            let Some(left) = left else { break };
            if began.elapsed() > Duration::from_secs(120) {
                anyhow::bail!(
                    "this replica's confirmation of its primary has not expired after 120 s"
                );
            }
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
        self.events.push(
            "confirmation_expired",
            format!(
                "waited {} ms for the confirmation of {primary} to expire before promoting",
                began.elapsed().as_millis()
            ),
        );
        Ok(())
    }

    /// Becoming a replica: a lease held as a primary no longer applies.
    pub(super) fn drop_lease(&self) {
        let held = self.lock_lease().until.is_some();
        if held {
            self.lock_lease().revoke();
            self.save_lease();
        }
    }

    /// Leaving the cluster: no lease, no confirmation.
    pub(super) fn lock_lease_reset(&self) {
        *self.lock_lease() = lease::Lease::default();
        self.save_lease();
    }

    pub(super) fn end_promotion(&self) {
        let _lease = self.lock_lease();
        self.promoting.store(false, Ordering::SeqCst);
        // The confirmation is of the old primary; it no longer applies.
    }

    /// A new primary asks for its lease at once and waits a little for it,
    /// so the coordinator's next step finds it writable.
    pub(super) async fn await_first_lease(&self) {
        let Some(stored) = self.stored() else { return };
        if stored.spec.role != "primary" || stored.spec.replicas.is_empty() {
            return;
        }
        if self.lease_within(FIRST_LEASE_WAIT).await {
            self.enforce().await;
            return;
        }
        tracing::warn!(
            "no lease after {} s as the new primary; staying fenced until the coordinator grants one",
            FIRST_LEASE_WAIT.as_secs()
        );
    }

    /// Waits up to `limit` for a lease, asking for one with a heartbeat
    /// now and then; whether one is held.
    pub(super) async fn lease_within(&self, limit: Duration) -> bool {
        let began = Instant::now();
        let mut asked = None::<Instant>;
        while began.elapsed() < limit {
            if self.lock_lease().held(BootTime::now()) {
                return true;
            }
            // Ask again now and then: the coordinator may grant only once
            // it has recorded this node as the primary.
            if asked.is_none_or(|a| a.elapsed() > Duration::from_millis(200)) {
                self.heartbeat_wake.notify_one();
                asked = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.lock_lease().held(BootTime::now())
    }
}

/// Whom a primary needs confirmations from to keep its lease without the
/// coordinator: its replicas by its spec and every other member the
/// coordinator last named (a member whose removal has not completed, a
/// replica being added): any of them might be the one promoted.
fn required_confirmers(stored: &Stored) -> Vec<String> {
    let mut all: std::collections::BTreeSet<String> =
        stored.spec.replicas.iter().cloned().collect();
    all.extend(stored.cluster.peers.keys().cloned());
    all.into_iter().collect()
}

/// One confirmation round of a primary.
#[derive(Debug, Clone)]
pub struct Round {
    pub cluster: String,
    pub term: u64,
    pub lease: Duration,
    /// (replica node id, its agent's host:port).
    pub peers: Vec<(String, String)>,
}
