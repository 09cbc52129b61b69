//! `promote`, the planned switchover: stop the old primary, wait for the
//! target to replay its last checkpoint, raise the term (the target becomes
//! primary of record), promote the target, point everyone else at it.
//! Also the promotion steps the failover shares.
//!
//! If the coordinator dies before the term is raised: the old primary is
//! still of record, and the resumed operation runs the switchover again
//! (stopping a stopped engine is a no-op; a target that cannot catch up
//! gets the old primary restarted). After the raise: the target is already
//! of record; the resumed operation waits for any lease the old primary
//! may hold to run out, then promotes (idempotent). No two nodes hold a
//! lease in the same term.

use super::{failpoint_once, lsn, Ctx, Members, AGENT_UNREACHABLE_GIVE_UP, CATCH_UP_TIMEOUT};
use crate::fleet::Liveness;
use crate::store;
use crate::store::{ClusterRow, NodeRow};
use anyhow::{bail, Context, Result};
use corral_proto::pb;
use std::time::{Duration, Instant};

impl Ctx<'_> {
    pub(crate) async fn promote(&self) -> Result<()> {
        let target = self.param_str("node")?;
        let force = self.param("force")?.as_bool().unwrap_or(false);
        let cluster = self.cluster()?;
        let m = self.members()?;
        let old = m.primary.clone();
        // Whether the old primary's engine is known to be stopped (a
        // resumed operation cannot tell: the target then waits for its
        // confirmation of the old primary to expire).
        let mut old_stopped = false;
        if old.id != target {
            old_stopped = self.switch_over(&cluster, &old, &target, &m, force).await?;
            let term = self.coord.store.tx(|tx| {
                let term = store::raise_term(tx, &cluster.name, &target)?;
                store::log_operation(
                    tx,
                    &self.op.id,
                    &format!("term raised to {term}: {target} is the primary of record"),
                )?;
                Ok(term)
            })?;
            self.coord.fleet.term_started(&cluster.name, term);
            if !old_stopped {
                // Not stopped (forced, unreachable): it may be alive and
                // hold a lease; no grant can follow the raise.
                self.await_lease_end(&cluster, &old.id).await;
            }
        } else {
            self.log(&format!(
                "{target} is already the primary of record (resumed after a coordinator restart)"
            ));
            // Whoever was primary before may not have been stopped (a forced
            // promotion): let any lease it may hold run out.
            for r in &m.replicas {
                self.await_lease_end(&cluster, &r.id).await;
            }
        }
        let cluster = self.cluster()?;
        let m = self.members()?;
        let paused = Instant::now();
        self.promote_node(&cluster, &target, &m, old_stopped)
            .await?;
        if old_stopped {
            self.log(&format!(
                "{target} is the primary; writes were paused for {} ms",
                paused.elapsed().as_millis() + self.stop_to_catch_up_ms()
            ));
        }
        // Everyone else follows the new primary: the former primary (rewound
        // if it wrote anything the new one never received) and the replicas.
        // A node that is down follows when it comes back (the monitor
        // rejoins it).
        let mut following = Vec::new();
        for r in &m.replicas {
            if self.coord.fleet.liveness_of(&r.id, Instant::now()) != Liveness::Up {
                self.log(&format!(
                    "{} is down; it will follow {target} when it comes back",
                    r.id
                ));
                continue;
            }
            self.log(&format!("{} now follows {target}", r.id));
            self.configure(&r.id, self.replica_request(&cluster, &m.primary, "")?)
                .await
                .with_context(|| {
                    format!(
                        "{} could not follow the new primary; resync it with `corralctl cluster resync {} --node {}`",
                        r.id, cluster.name, r.id
                    )
                })?;
            following.push(r.id.clone());
        }
        for r in &following {
            self.wait_streaming(&target, r).await?;
        }
        Ok(())
    }

    /// Milliseconds from stopping the old primary to the target having
    /// caught up, as recorded by [`Self::switch_over`].
    pub(crate) fn stop_to_catch_up_ms(&self) -> u128 {
        *self.paused_ms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every lease `old` may hold has run out, plus the margin.
    pub(crate) async fn await_lease_end(&self, cluster: &ClusterRow, old: &str) {
        let lease = cluster.lease();
        let end =
            self.coord.fleet.lease_until_of(old, cluster) + corral_proto::lease::margin(lease);
        let wait = end.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            self.log(&format!(
                "waiting {} ms for {old}'s lease to run out (plus the margin)",
                wait.as_millis()
            ));
            tokio::time::sleep(wait).await;
        }
    }

    /// Promotes `target` (the primary of record, term already raised):
    /// idempotent, so a resumed operation simply calls it again.
    pub(crate) async fn promote_node(
        &self,
        cluster: &ClusterRow,
        target: &str,
        m: &Members,
        old_stopped: bool,
    ) -> Result<pb::EngineStatus> {
        self.log(&format!("promoting {target} in term {}", cluster.term));
        if failpoint_once("promote-fails-once") {
            bail!("failpoint promote-fails-once: the promotion of {target} failed");
        }
        let r = pb::PromoteRequest {
            replicas: m.replica_ids(),
            sync: cluster.sync,
            term: cluster.term,
            lease_duration_ms: cluster.lease_ms,
            heartbeat_interval_ms: cluster.heartbeat_ms,
            primary_stopped: old_stopped,
        };
        let status = self
            .call(target, "promoting", |mut c| {
                let r = r.clone();
                async move { c.promote(r).await }
            })
            .await?;
        self.coord.fleet.set_engine(target, status.clone());
        Ok(status)
    }

    /// Stops `old`, waits for `target` to have every write. Returns whether
    /// the old primary was stopped (false: --force with `old` unreachable).
    pub(crate) async fn switch_over(
        &self,
        cluster: &ClusterRow,
        old: &NodeRow,
        target: &str,
        m: &Members,
        force: bool,
    ) -> Result<bool> {
        self.log(&format!(
            "stopping the primary {} ({}); writes pause from here",
            old.id,
            crate::engines::clean_stop(&cluster.engine)
        ));
        let paused = Instant::now();
        let term = cluster.term;
        // Forced, with the primary down: do not spend a minute retrying it.
        let give_up =
            if force && self.coord.fleet.liveness_of(&old.id, Instant::now()) != Liveness::Up {
                Duration::from_secs(2)
            } else {
                AGENT_UNREACHABLE_GIVE_UP
            };
        let stop = self
            .call_within(
                &old.id,
                "stopping the primary",
                give_up,
                |mut c| async move { c.stop_engine(pb::StopEngineRequest { term }).await },
            )
            .await;
        let checkpoint = match stop {
            Ok(s) => {
                self.log(&format!(
                    "{} stopped ({}) at checkpoint {}",
                    old.id,
                    s.cluster_state,
                    lsn(s.checkpoint_lsn)
                ));
                Some(s.checkpoint_lsn)
            }
            Err(e) if force => {
                self.log(&format!(
                    "could not stop {} ({e:#}); --force: promoting {target} anyway. \
                     Writes acknowledged by {} after {target}'s last replayed position are not on {target}; \
                     {} is fenced by the new term as soon as it hears of it",
                    old.id, old.id, old.id
                ));
                // It may still be alive and hold a lease: the promotion
                // waits for it (after the term is raised, see `promote`).
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(ckpt) = checkpoint {
            let began = Instant::now();
            loop {
                let s = self.status(target).await?;
                let replayed = s.replication.as_ref().map(|r| r.lsn).unwrap_or(0);
                if crate::engines::caught_up(&cluster.engine, replayed, ckpt) {
                    self.log(&format!(
                        "{target} has replayed every write ({} > checkpoint {})",
                        lsn(replayed),
                        lsn(ckpt)
                    ));
                    break;
                }
                if began.elapsed() > CATCH_UP_TIMEOUT {
                    self.log(&format!(
                        "{target} did not catch up within {}s (at {}, needs {}); restarting {} as the primary",
                        CATCH_UP_TIMEOUT.as_secs(),
                        lsn(replayed),
                        lsn(ckpt),
                        old.id
                    ));
                    self.configure(
                        &old.id,
                        self.primary_request(cluster, m.replica_ids(), cluster.sync, false)?,
                    )
                    .await?;
                    bail!(
                        "switchover abandoned: {target} did not receive every write; {} is the primary again",
                        old.id
                    );
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        *self.paused_ms.lock().unwrap_or_else(|p| p.into_inner()) = paused.elapsed().as_millis();
        Ok(checkpoint.is_some())
    }
}
