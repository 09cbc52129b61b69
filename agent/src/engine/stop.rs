//! Stopping: StopEngine (kept stopped until told otherwise), RestartEngine,
//! and Decommission (leaving the cluster: engine stopped, data erased).

use super::record::spec_path;
use super::{Conflict, Engine};
use anyhow::{bail, Context, Result};
use corral_proto::pb::{self, EngineState};
use std::sync::Arc;
use std::time::Instant;

impl Engine {
    /// Stops the engine cleanly and keeps it stopped (across agent restarts
    /// too) until the next configure, restart or promote.
    pub async fn stop(self: &Arc<Self>, term: u64) -> Result<pb::StopEngineResponse> {
        let _one_at_a_time = self.steps.lock().await;
        self.check_term(term, "stop")?;
        let Some(mut stored) = self.stored() else {
            bail!(Conflict("no engine is configured on this node".into()));
        };
        stored.stopped = true;
        self.set_stored(stored)?;
        self.stop_locked().await?;
        let (checkpoint_lsn, cluster_state) = self.driver().stopped_position().await?;
        Ok(pb::StopEngineResponse {
            checkpoint_lsn,
            cluster_state,
        })
    }

    /// Stops the supervisor and the engine. The caller holds `steps`.
    pub(super) async fn stop_locked(&self) -> Result<()> {
        let handle = self
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            h.abort();
            let _ = h.await;
        }
        if let Some(pid) = self.driver().find_running() {
            let began = Instant::now();
            self.driver().stop(pid).await?;
            self.events.push(
                "engine_stopped",
                format!(
                    "stopped cleanly on request in {} ms (pid {pid})",
                    began.elapsed().as_millis()
                ),
            );
        }
        self.update(|s| {
            s.state = EngineState::Stopped as i32;
            s.healthy = false;
            s.pid = 0;
            s.message = "stopped by the coordinator".into();
        });
        Ok(())
    }

    /// Stops the engine cleanly and starts it again.
    pub async fn restart(self: &Arc<Self>, term: u64) -> Result<pb::EngineStatus> {
        let _one_at_a_time = self.steps.lock().await;
        self.check_term(term, "restart")?;
        let Some(mut stored) = self.stored() else {
            bail!(Conflict("no engine is configured on this node".into()));
        };
        self.stop_locked().await?;
        stored.stopped = false;
        let spec = stored.spec.clone();
        self.set_stored(stored)?;
        self.driver().prepare(&spec).await?;
        self.ensure_supervised();
        self.wait_running().await?;
        self.refresh().await;
        Ok(self.status())
    }

    /// Leaves the cluster: engine stopped, data and spec erased.
    pub async fn decommission(self: &Arc<Self>, cluster: &str, term: u64) -> Result<()> {
        let _one_at_a_time = self.steps.lock().await;
        if self.stored().is_some_and(|s| s.spec.cluster == cluster) {
            self.check_term(term, "decommission")?;
        }
        match self.stored() {
            None => return Ok(()),
            Some(s) if s.spec.cluster != cluster => bail!(Conflict(format!(
                "this node runs cluster {:?}, not {cluster:?}; refusing to erase it",
                s.spec.cluster
            ))),
            Some(_) => {}
        }
        self.stop_locked().await?;
        self.driver().wipe().await?;
        self.driver().forget_secrets()?;
        // The WAL archive's key goes with the cluster.
        crate::backup::wal_config::save(&self.state_dir, None)?;
        match std::fs::remove_file(spec_path(&self.state_dir)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing engine.json"),
        }
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.lock_lease_reset();
        self.enforce().await;
        self.events.push(
            "decommissioned",
            format!("left cluster {cluster}: engine stopped, data erased"),
        );
        self.update(|s| {
            *s = pb::EngineStatus {
                state: EngineState::None as i32,
                ..Default::default()
            }
        });
        Ok(())
    }
}
