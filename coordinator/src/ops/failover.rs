//! `failover`: runs after the monitor's transaction has raised the term and
//! made the candidate primary of record ([`crate::failover::monitor`]). Waits out a
//! lease granted just before the raise, promotes the candidate, repoints
//! the replicas that are up, records the timeline.
//!
//! If the coordinator dies between steps: the term raise is already
//! durable, so the old primary is fenced by term and its lease is never
//! renewed; the resumed operation promotes again (a no-op on a primary)
//! and repoints. A replica left unrepointed follows when it next reports
//! (the monitor starts a rejoin).

use super::{failpoint, fmt_ms, Ctx, REPOINT_GIVE_UP};
use crate::fleet::Liveness;
use crate::model::AUTO_FAILOVER;
use crate::store;
use anyhow::{bail, Result};
use std::time::Instant;

impl Ctx<'_> {
    /// Automatic failover, decided by [`crate::failover::decide`] and
    /// recorded (term raised, the candidate made primary of record) before
    /// this runs: promote the candidate, repoint the replicas that are up.
    /// The old primary rejoins as a replica when it comes back (a
    /// [`REJOIN`] operation started by the monitor).
    pub(crate) async fn failover(&self) -> Result<()> {
        let old = self.param_str("old")?;
        let candidate = self.param_str("candidate")?;
        let detected = self.param("detected_at_ms")?.as_i64().unwrap_or(0);
        let lease_ended = self.param("lease_ended_at_ms")?.as_i64().unwrap_or(0);
        let cluster = self.cluster()?;
        let m = self.members()?;
        if m.primary.id != candidate {
            bail!(
                "{candidate} is no longer the primary of record (it is {}); nothing done",
                m.primary.id
            );
        }
        failpoint("failover-before-promote").await;
        // The term is raised: no lease is granted to the old primary any
        // more. One granted just before the raise (a heartbeat answered
        // while the monitor decided) must run out first.
        self.await_lease_end(&cluster, &old).await;
        let status = self.promote_node(&cluster, &candidate, &m, false).await?;
        let promoted = corral_proto::now_ms();
        let held = status.lease.as_ref().is_some_and(|l| l.held);
        self.log(&format!(
            "{candidate} is the primary in term {}{}",
            cluster.term,
            if held {
                " and holds its lease: writes resume"
            } else {
                "; waiting for its lease"
            }
        ));
        let mut repointed = Vec::new();
        for r in m.replicas.iter().filter(|r| r.id != old) {
            if self.coord.fleet.liveness_of(&r.id, Instant::now()) != Liveness::Up {
                self.log(&format!(
                    "{} is down; it will follow {candidate} when it comes back",
                    r.id
                ));
                continue;
            }
            self.log(&format!("{} now follows {candidate}", r.id));
            let req = self.replica_request(&cluster, &m.primary, "")?;
            match self.configure_within(&r.id, req, REPOINT_GIVE_UP).await {
                Ok(()) => repointed.push(r.id.clone()),
                Err(e) => self.log(&format!(
                    "{} could not be repointed yet ({e:#}); it is retried when it reports",
                    r.id
                )),
            }
        }
        let done = corral_proto::now_ms();
        self.log(&format!(
            "{old} will rejoin as a replica of {candidate} ({}) when it comes back",
            crate::engines::rejoin_method(&cluster.engine)
        ));
        let timeline = format!(
            "failover of {} from {old} to {candidate} in term {}: detected at {}, {old}'s lease ended at {} \
             ({} ms before), {candidate} chosen at detection, promoted at {} (+{} ms), replicas repointed at {} \
             (+{} ms: {})",
            cluster.name,
            cluster.term,
            fmt_ms(detected),
            fmt_ms(lease_ended),
            detected - lease_ended,
            fmt_ms(promoted),
            promoted - detected,
            fmt_ms(done),
            done - detected,
            if repointed.is_empty() {
                "none".to_string()
            } else {
                repointed.join(", ")
            }
        );
        self.coord.store.tx(|tx| {
            store::insert_event(
                tx,
                done,
                &candidate,
                &cluster.name,
                "failover",
                &timeline,
                None,
            )?;
            store::insert_audit(
                tx,
                AUTO_FAILOVER,
                "cluster.failover",
                &format!("cluster {} {old} -> {candidate}", cluster.name),
                "ok",
            )
        })?;
        self.log(&timeline);
        Ok(())
    }
}
