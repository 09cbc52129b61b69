//! ConfigureEngine: converging the node to a spec. The node's data decides
//! the way ([`super::transitions`]): initialise, restore, clone, rewind or
//! keep; then the configuration, the engine, and for a primary its roles,
//! database and replication slots.

use super::contract::{EngineSpec, Upstream};
use super::record::{ClusterState, Stored};
use super::spec::Request;
use super::transitions::{self, Action, Holds, Step};
use super::{Conflict, Engine};
use anyhow::{bail, Context, Result};
use corral_proto::pb::{self, EngineState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a replica pointed at a new primary may take to stream from it
/// before it is rewound.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(5);

impl Engine {
    /// Makes the node run `req.spec`: idempotent, and refused (nothing
    /// changed) when the node serves something else.
    pub async fn configure(self: &Arc<Self>, req: Request) -> Result<pb::ConfigureEngineResponse> {
        let _one_at_a_time = self.steps.lock().await;
        *self.last_clone.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let current = self.stored();
        self.admit(&req, current.as_ref())?;
        let mut cluster = self.stored().map(|c| c.cluster).unwrap_or_default();
        cluster.term = cluster.term.max(req.term);
        cluster.set_timing(req.lease_ms, req.heartbeat_ms);
        self.driver().save_secrets(&req.secrets)?;
        match req.spec.role.as_str() {
            "primary" => self
                .converge_primary(&req, current.as_ref(), cluster)
                .await
                .map_err(|e| self.with_firewall_cause(e))?,
            _ => {
                self.converge_replica(&req, current.as_ref(), cluster)
                    .await?
            }
        }
        self.refresh().await;
        let clone = self
            .last_clone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        Ok(pb::ConfigureEngineResponse {
            status: Some(self.status()),
            clone_ms: clone.as_ref().map(|c| c.1).unwrap_or(0),
            clone: clone.map(|c| c.0),
        })
    }

    /// The refusals that come before anything changes: another cluster, a
    /// different engine, port, admin user or database, a stale term, an
    /// engine kept stopped because its firewall cannot be applied. Then the
    /// driver of a new node is chosen.
    fn admit(&self, req: &Request, current: Option<&Stored>) -> Result<()> {
        let spec = &req.spec;
        if let Some(c) = current {
            let cur = &c.spec;
            if cur.cluster != spec.cluster {
                bail!(Conflict(format!(
                    "this node already runs cluster {:?}; remove it from that cluster first",
                    cur.cluster
                )));
            }
            if (&cur.engine, cur.port, &cur.admin_user, &cur.database)
                != (&spec.engine, spec.port, &spec.admin_user, &spec.database)
            {
                bail!(Conflict(format!(
                    "this node already runs cluster {:?} as {} on port {}; changing the engine, port, \
                     admin user or database is not supported",
                    cur.cluster, cur.engine, cur.port
                )));
            }
        }
        self.check_term(req.term, "configure")?;
        if let Some(why) = self.start_refused() {
            bail!(Conflict(format!(
                "the engine is {why}; fix nftables on this node (the agent's log says what \
                 fails), then retry"
            )));
        }
        // The engine cannot change while a cluster is stored (refused
        // above), so this only ever picks the driver of a new node.
        self.select_driver(&spec.engine)
    }

    /// What the node's data directory holds, for [`transitions::plan`].
    pub(super) fn holds(&self) -> Result<Holds> {
        Ok(if !self.driver().has_data() {
            Holds::Nothing
        } else if self.driver().data_is_standby()? {
            Holds::StandbyData
        } else {
            Holds::PrimaryData
        })
    }

    /// Makes the node a replica of `req.spec.upstream`: the data as the
    /// table says (keep, clone, erase and clone, rewind), then the engine,
    /// and a rewind when a repointed replica does not stream from its new
    /// upstream.
    async fn converge_replica(
        self: &Arc<Self>,
        req: &Request,
        current: Option<&Stored>,
        cluster: ClusterState,
    ) -> Result<()> {
        let spec = &req.spec;
        let upstream = spec
            .upstream
            .clone()
            .context("a replica needs an upstream")?;
        let last_resync = current.map(|c| c.last_resync.clone()).unwrap_or_default();
        let resync = !req.resync_id.is_empty() && req.resync_id != last_resync;
        let step = Step::BeReplica { resync };
        let holds = match self.holds() {
            Ok(h) => h,
            // A resync erases the data whatever it is: data the driver
            // cannot read (what a resync may be repairing) is no obstacle.
            Err(_) if resync && self.driver().has_data() => Holds::PrimaryData,
            Err(e) => return Err(e),
        };
        let action = transitions::plan(holds, step);
        if action == Action::EraseAndClone {
            self.events.push(
                "resync_started",
                format!(
                    "erasing this replica's data to clone it again from {}",
                    upstream.node
                ),
            );
            self.stop_locked().await?;
            self.driver().wipe().await.context("erasing the data")?;
        }
        // A replica holds no lease (a former primary's is void).
        self.drop_lease();
        let repointed = current.is_some_and(|c| c.spec.upstream.as_ref() != Some(&upstream));
        match action {
            Action::Keep => {}
            Action::Clone | Action::EraseAndClone => {
                self.stop_locked().await?;
                self.clone_data(spec, &upstream).await?;
            }
            Action::Rewind => {
                self.events.push(
                    "rejoin_started",
                    format!(
                        "this node's data was a primary's; rewinding it to follow {}",
                        upstream.node
                    ),
                );
                self.stop_locked().await?;
                self.rewind_or_reclone(spec, &upstream).await?;
            }
            Action::Refuse(why) => bail!(Conflict(why.into())),
            other => return Err(other.unexpected(step)),
        }
        let resync_done = if req.resync_id.is_empty() {
            last_resync
        } else {
            req.resync_id.clone()
        };
        self.record(req, resync_done, cluster)?;
        self.prepare_and_run(spec).await?;
        if repointed && !self.streams_from(&upstream, FOLLOW_TIMEOUT).await {
            // It received WAL the new primary never had (a failover
            // lost the old primary's last writes): rewind it.
            self.events.push(
                "rejoin_started",
                format!(
                    "not streaming from {} {}s after repointing; rewinding",
                    upstream.node,
                    FOLLOW_TIMEOUT.as_secs()
                ),
            );
            self.stop_locked().await?;
            self.rewind_or_reclone(spec, &upstream).await?;
            self.prepare_and_run(spec).await?;
        }
        self.driver()
            .converge_slots(spec)
            .await
            .context("converging the replica's replication settings")
    }

    /// Makes stopped data follow `upstream`: pg_rewind, and when that
    /// fails, a fresh clone (the old data is kept until the clone is
    /// complete, so a failed clone leaves the node as it was).
    async fn rewind_or_reclone(&self, spec: &EngineSpec, upstream: &Upstream) -> Result<()> {
        match self.driver().rejoin(spec, upstream).await {
            Ok(()) => {
                self.events
                    .push("rejoined", format!("made to follow {}", upstream.node));
                Ok(())
            }
            Err(e) => {
                self.events.push(
                    "rewind_failed",
                    format!(
                        "could not make the data follow {}: {e:#}; cloning the data again",
                        upstream.node
                    ),
                );
                self.clone_data(spec, upstream)
                    .await
                    .context("cloning again after a failed rewind")
            }
        }
    }

    /// Whether the running replica streams from `upstream` within `timeout`.
    async fn streams_from(&self, upstream: &Upstream, timeout: Duration) -> bool {
        let began = Instant::now();
        while began.elapsed() < timeout {
            self.refresh().await;
            let s = self.status();
            let ok = s.state == EngineState::Running as i32
                && s.replication.as_ref().is_some_and(|r| {
                    r.in_recovery && r.streaming && r.upstream_host == upstream.host
                });
            if ok {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Records `req` as what the node runs (engine.json, and where WAL is
    /// archived), before the engine is started on it.
    fn record(&self, req: &Request, last_resync: String, cluster: ClusterState) -> Result<()> {
        crate::backup::wal_config::save(&self.state_dir, req.wal_archive.as_ref())
            .context("recording where WAL is archived")?;
        self.set_stored(Stored {
            spec: req.spec.clone(),
            stopped: false,
            last_resync,
            cluster,
        })
    }

    /// Makes the node the primary: the data as the table says (keep,
    /// initialise, restore), then the engine, its roles and database, the
    /// replicas' slots, and the first lease.
    async fn converge_primary(
        self: &Arc<Self>,
        req: &Request,
        current: Option<&Stored>,
        cluster: ClusterState,
    ) -> Result<()> {
        let spec = &req.spec;
        let step = Step::BePrimary {
            initialize: req.initialize,
            restore: req.restore.is_some(),
        };
        match transitions::plan(self.holds()?, step) {
            Action::Keep => {}
            Action::Initialize => self.driver().initialize().await?,
            Action::Restore => {
                let source = req.restore.as_ref().context("a restore needs a source")?;
                self.restore(spec, source).await?
            }
            Action::Refuse(why) => bail!(Conflict(why.into())),
            other => return Err(other.unexpected(step)),
        }
        let last_resync = current.map(|c| c.last_resync.clone()).unwrap_or_default();
        self.record(req, last_resync, cluster)?;
        self.prepare_and_run(spec).await?;
        self.driver()
            .bootstrap(spec, &req.secrets)
            .await
            .context("creating the admin and replication roles and the database")?;
        self.driver()
            .converge_slots(spec)
            .await
            .context("converging replication (the replicas' slots, semi-sync)")?;
        self.await_first_lease().await;
        Ok(())
    }

    async fn prepare_and_run(self: &Arc<Self>, spec: &EngineSpec) -> Result<()> {
        if let Err(e) = self.driver().prepare(spec).await {
            self.fail(&format!("preparing {}: {e:#}", spec.engine));
            return Err(e);
        }
        self.ensure_supervised();
        self.wait_running().await
    }

    /// Fills the empty data directory of a new primary from a backup. On
    /// failure nothing is left: the node holds no data, as before.
    async fn restore(&self, spec: &EngineSpec, source: &pb::RestoreSource) -> Result<()> {
        let started_at_ms = corral_proto::now_ms();
        let message = if source.to_time_ms > 0 {
            format!(
                "restoring backup {} and recovering to {}",
                source.object,
                chrono::DateTime::from_timestamp_millis(source.to_time_ms)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    .unwrap_or_else(|| source.to_time_ms.to_string())
            )
        } else {
            format!("restoring backup {}", source.object)
        };
        self.events.push("restore_started", &message);
        self.update(|s| {
            s.state = EngineState::Initializing as i32;
            s.message = message.clone();
        });
        let status = Arc::new(Mutex::new(None::<pb::Progress>));
        let st = status.clone();
        let msg = message.clone();
        let progress = move |done: u64, total: u64| {
            *st.lock().unwrap_or_else(|p| p.into_inner()) = Some(pb::Progress {
                kind: "restore".into(),
                done_bytes: done,
                total_bytes: total,
                message: msg.clone(),
                started_at_ms,
            });
        };
        let r = {
            let run = crate::backup::restore::restore(
                self.driver(),
                spec,
                source,
                &self.state_dir,
                progress,
            );
            tokio::pin!(run);
            loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        let p = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        if p.is_some() {
                            self.set_task(p);
                        }
                    }
                }
            }
        };
        self.set_task(None);
        match r {
            Ok(()) => {
                self.events.push(
                    "restore_finished",
                    format!(
                        "restored backup {} in {:.1}s",
                        source.object,
                        (corral_proto::now_ms() - started_at_ms) as f64 / 1000.0
                    ),
                );
                Ok(())
            }
            Err(e) => {
                let _ = self.driver().wipe().await;
                self.fail(&format!("restoring {}: {e:#}", source.object));
                Err(e.context(format!("restoring backup {}", source.object)))
            }
        }
    }

    async fn clone_data(&self, spec: &EngineSpec, upstream: &Upstream) -> Result<()> {
        let started_at_ms = corral_proto::now_ms();
        let message = format!(
            "cloning the data from {} ({}:{})",
            upstream.node, upstream.host, upstream.port
        );
        self.events.push("clone_started", &message);
        self.update(|s| {
            s.state = EngineState::Initializing as i32;
            s.message = message.clone();
        });
        let progress = |done: u64, total: u64| {
            self.set_task(Some(pb::Progress {
                kind: "clone".into(),
                done_bytes: done,
                total_bytes: total,
                message: message.clone(),
                started_at_ms,
            }))
        };
        progress(0, 0);
        let began = Instant::now();
        let r = self.driver().clone_data(spec, upstream, &progress).await;
        let last = self.status().task.unwrap_or_default();
        self.set_task(None);
        match r {
            Ok(()) => {
                let secs = began.elapsed().as_secs_f64();
                *self.last_clone.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((last.clone(), began.elapsed().as_millis() as u64));
                let last = last.done_bytes;
                self.events.push(
                    "clone_finished",
                    format!(
                        "cloned {:.1} MB from {} in {secs:.1}s",
                        last as f64 / 1e6,
                        upstream.node
                    ),
                );
                Ok(())
            }
            Err(e) => {
                self.fail(&format!("cloning from {}: {e:#}", upstream.node));
                Err(e.context(format!("cloning from {}", upstream.node)))
            }
        }
    }
}
