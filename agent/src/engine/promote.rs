//! Promote: a replica becomes the primary, under the lease rules of
//! [`super::safety`] (the old primary's confirmation ends first).

use super::record::Stored;
use super::transitions::{self, Action, Step};
use super::{safety, Conflict, Engine};
use anyhow::{bail, Context, Result};
use corral_proto::pb;
use std::sync::Arc;
use std::time::Instant;

/// A Promote request, checked.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub replicas: Vec<String>,
    pub sync: bool,
    pub term: u64,
    pub lease_ms: u32,
    pub heartbeat_ms: u32,
    /// The coordinator stopped the old primary (a planned switchover).
    pub primary_stopped: bool,
}

impl Engine {
    /// Promotes this replica; a node already primary just converges.
    ///
    /// The new term is adopted first, so the replica stops confirming the
    /// old primary; unless the coordinator stopped the old primary itself
    /// (a planned switchover), the promotion then waits until the last
    /// confirmation has expired, so the old primary cannot still hold a
    /// lease through this replica.
    pub async fn promote(self: &Arc<Self>, p: Promotion) -> Result<pb::EngineStatus> {
        let _one_at_a_time = self.steps.lock().await;
        self.check_term(p.term, "promote")?;
        let Some(stored) = self.stored() else {
            bail!(Conflict("no engine is configured on this node".into()));
        };
        let mut cluster = stored.cluster.clone();
        cluster.set_timing(p.lease_ms, p.heartbeat_ms);
        let followed = stored.spec.upstream.as_ref().map(|u| u.node.clone());
        let mut spec = stored.spec.clone();
        spec.role = "primary".into();
        spec.upstream = None;
        spec.replicas = p.replicas;
        spec.sync = p.sync;
        let record = Stored {
            spec: spec.clone(),
            stopped: false,
            last_resync: stored.last_resync.clone(),
            cluster,
        };
        let running = !stored.stopped && self.driver().find_running().is_some();
        let step = Step::Promote { running };
        match transitions::plan(self.holds()?, step) {
            Action::Promote => {
                let began = Instant::now();
                let promoted = async {
                    self.begin_promotion(!p.primary_stopped).await?;
                    // The lease begin_promotion asked for usually arrives within
                    // a heartbeat's round trip.
                    self.lease_within(safety::PROMOTION_LEASE_WAIT).await;
                    // Recorded as the primary before PostgreSQL is asked: a
                    // promotion that completes late (or after an error here) is
                    // then under the lease rules, fenced without a lease. And
                    // the primary's configuration (synchronous_standby_names)
                    // is in force from its first commit.
                    self.set_stored(record.clone())?;
                    self.driver().prepare(&spec).await?;
                    self.driver().promote(&spec).await
                }
                .await;
                self.end_promotion();
                promoted?;
                self.events.push(
                    "promoted",
                    format!(
                        "promoted to primary in {} ms (was following {})",
                        began.elapsed().as_millis(),
                        followed.as_deref().unwrap_or("?")
                    ),
                );
            }
            Action::Keep => {
                self.set_stored(record)?;
                self.driver().prepare(&spec).await?;
            }
            Action::Refuse(why) => bail!(Conflict(why.into())),
            other => return Err(other.unexpected(step)),
        }
        self.ensure_supervised();
        self.wait_running().await?;
        self.driver()
            .converge_slots(&spec)
            .await
            .context("converging replication (the replicas' slots, semi-sync)")?;
        self.await_first_lease().await;
        self.refresh().await;
        Ok(self.status())
    }
}
