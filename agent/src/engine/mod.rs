//! The engine this node runs: its spec, its driver and its supervisor.
//!
//! The coordinator tells the agent what to run with `ConfigureEngine`: an
//! engine, a role (primary or replica), and for a replica where to stream
//! from. The agent records that spec in `engine.json` (never a password),
//! converges the node to it (initialise or clone the data, rewind a former
//! primary, write the configuration, create replication slots), and from
//! then on keeps the engine running: the [`supervise`] task restarts it when
//! it dies, with backoff, and reports every exit and restart as an event.
//! After an agent restart the spec is read back and an engine that is still
//! running is adopted, not restarted: upgrading or restarting the agent does
//! not interrupt the database. An engine stopped on purpose (a primary being
//! demoted) stays stopped across agent restarts until the coordinator says
//! otherwise.
//!
//! Every step runs in a task of its own, so a coordinator that disconnects
//! mid-way (or restarts) does not cancel a clone half-way; its retried call
//! waits for the running step and then finds the work done.

mod configure;
pub mod contract;
mod fence;
pub mod mariadb;
mod os;
pub mod postgres;
mod process;
mod promote;
mod record;
pub mod redis;
mod safety;
mod spec;
mod stop;
mod supervise;
pub mod tls;
mod transitions;

pub use contract::{Backup, BackupInfo, Driver, Drivers, EngineSpec, Health, ProgressFn, Recovery};
pub use contract::{Secrets, Upstream};
pub use fence::FenceState;
pub use process::process_alive;
pub use promote::Promotion;
pub use record::ClusterState;
pub use safety::Round;
pub use spec::{sql_identifier, Request, SUPPORTED_ENGINES};

use crate::events::Events;
use crate::firewall::Firewall;
use crate::lease::{self, Lease};
use anyhow::{bail, Result};
use corral_proto::pb::{self, EngineState};
use record::Stored;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The engine of this node: spec, live status, and the supervisor task.
pub struct Engine {
    state_dir: PathBuf,
    /// Every engine this agent can run, by name.
    drivers: Drivers,
    /// The driver of the engine this node runs (or will): chosen by the
    /// spec at start and at each configure.
    driver: Mutex<Arc<dyn Driver>>,
    events: Arc<Events>,
    status: Mutex<pb::EngineStatus>,
    stored: Mutex<Option<Stored>>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One step (configure, stop, promote, ...) at a time.
    steps: tokio::sync::Mutex<()>,
    /// The last finished clone (bytes, start) and its duration, reported
    /// once in the answer of the configure call that did it.
    last_clone: Mutex<Option<(pb::Progress, u64)>>,
    /// The primary's lease and the replica's confirmation (see [`safety`]).
    lease: Mutex<Lease>,
    /// Set while a promotion is under way: no more confirmations of the
    /// old primary. Written under the `lease` lock (see [`safety`]).
    promoting: std::sync::atomic::AtomicBool,
    /// The node's nftables table (the fence lives there).
    firewall: Firewall,
    /// The fence as last applied: None until the first pass after start.
    fence: tokio::sync::Mutex<Option<fence::FenceState>>,
    /// Until when the kernel's lease gate is open, as last written (None:
    /// closed, or not known to be open).
    gate_until: Mutex<Option<crate::lease::BootTime>>,
    /// The firewall of a primary serving replicas could not be written: its
    /// engine is stopped and not started until it can (see [`fence`]).
    /// Holds why.
    firewall_broken: Mutex<Option<String>>,
    /// The last firewall error logged, and when: the guardian retries every
    /// 250 ms, the log says it again only when it changes or once a minute.
    firewall_error_logged: Mutex<Option<(String, Instant)>>,
    /// The agent's health port, filtered by the allowlist like the engine's.
    health_port: Option<u16>,
    /// When the last successful health check ran.
    last_check: Mutex<Option<Instant>>,
    /// The lease as `lease.json` last got it, and when.
    lease_saved: Mutex<Option<(Instant, crate::lease::Lease)>>,
    /// The allowlist version the firewall holds.
    allowlist_applied: std::sync::atomic::AtomicU64,
    /// The coordinator's addresses: always allowed to reach the engine.
    /// Learnt after start-up: the first fence pass runs before any lookup.
    coordinator_ips: Mutex<Vec<std::net::IpAddr>>,
    /// The stored allowlist, parsed: (the list it was parsed from, the
    /// networks), so a long list is parsed once, not at every guardian turn.
    allow_parsed: Mutex<(Arc<Vec<String>>, Vec<ipnet::IpNet>)>,
    /// Whether the fence is up, readable without waiting (for status).
    fenced_now: std::sync::atomic::AtomicBool,
    /// Wakes the guardian at once (a lease revoked, a role changed).
    pub(crate) guard_wake: tokio::sync::Notify,
    /// Wakes the heartbeat at once (a new primary asking for its lease).
    pub heartbeat_wake: tokio::sync::Notify,
}

impl Engine {
    /// `drivers` must not be empty; the first is used until a spec names
    /// another.
    pub fn new(
        state_dir: PathBuf,
        drivers: Drivers,
        events: Arc<Events>,
        firewall: Firewall,
        health_port: Option<u16>,
    ) -> Arc<Engine> {
        let lease = lease::load(&state_dir);
        let first = drivers
            .first()
            .expect("at least one engine driver")
            .1
            .clone();
        Arc::new(Engine {
            state_dir,
            drivers,
            driver: Mutex::new(first),
            events,
            status: Mutex::new(pb::EngineStatus {
                state: EngineState::None as i32,
                ..Default::default()
            }),
            stored: Mutex::new(None),
            supervisor: Mutex::new(None),
            steps: tokio::sync::Mutex::new(()),
            last_clone: Mutex::new(None),
            lease: Mutex::new(lease),
            promoting: std::sync::atomic::AtomicBool::new(false),
            firewall,
            fence: tokio::sync::Mutex::new(None),
            gate_until: Mutex::new(None),
            firewall_broken: Mutex::new(None),
            firewall_error_logged: Mutex::new(None),
            health_port,
            fenced_now: std::sync::atomic::AtomicBool::new(false),
            last_check: Mutex::new(None),
            lease_saved: Mutex::new(None),
            allowlist_applied: std::sync::atomic::AtomicU64::new(0),
            coordinator_ips: Mutex::new(Vec::new()),
            allow_parsed: Mutex::new(Default::default()),
            guard_wake: tokio::sync::Notify::new(),
            heartbeat_wake: tokio::sync::Notify::new(),
        })
    }

    /// The coordinator's addresses, always allowed to reach the engine.
    pub(crate) fn coordinator_ips(&self) -> Vec<std::net::IpAddr> {
        self.coordinator_ips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records the coordinator's addresses (once they are resolved) and
    /// brings the allowlist in line.
    pub async fn set_coordinator_ips(&self, ips: Vec<std::net::IpAddr>) {
        *self
            .coordinator_ips
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = ips;
        self.enforce().await;
    }

    /// The engine's status, with the term and lease as of now.
    pub fn status(&self) -> pb::EngineStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(stored) = self.stored() {
            s.term = stored.cluster.term;
            s.upstream = stored
                .spec
                .upstream
                .as_ref()
                .map(|u| u.node.clone())
                .unwrap_or_default();
        }
        s.lease = Some(self.lease_status());
        s.promoting = self.promoting.load(std::sync::atomic::Ordering::SeqCst);
        s.allowlist_version = self
            .allowlist_applied
            .load(std::sync::atomic::Ordering::SeqCst);
        s.checked_age_ms = self
            .last_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed().as_millis().min(u32::MAX as u128) as u32)
            .unwrap_or(u32::MAX);
        s
    }

    fn update(&self, f: impl FnOnce(&mut pb::EngineStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn stored(&self) -> Option<Stored> {
        self.stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn spec(&self) -> Option<EngineSpec> {
        self.stored().map(|s| s.spec)
    }

    /// Records `stored` on disk first, then in memory.
    /// The term never goes back: a step that read the record before a
    /// heartbeat's answer adopted a newer term keeps the newer one.
    fn set_stored(&self, mut stored: Stored) -> Result<()> {
        let spec = stored.spec.clone();
        {
            let mut current = self.stored.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = current.as_ref() {
                stored.cluster.term = stored.cluster.term.max(c.cluster.term);
            }
            stored.save(&self.state_dir)?;
            *current = Some(stored);
        }
        self.update(|s| {
            s.engine = spec.engine.clone();
            s.cluster = spec.cluster.clone();
            s.role = spec.role.clone();
            s.port = spec.port as u32;
            if s.state == EngineState::None as i32 {
                s.state = EngineState::Initializing as i32;
            }
        });
        Ok(())
    }

    /// Changes the cluster part of the record (term, timing, peers) in one
    /// hold of the record's lock, so a step changing the spec meanwhile is
    /// neither undone nor undoes it. Returns the record as it now is.
    fn modify_cluster_state(&self, f: impl FnOnce(&mut ClusterState)) -> Result<Option<Stored>> {
        let mut current = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = current.as_mut() else {
            return Ok(None);
        };
        let mut next = c.clone();
        f(&mut next.cluster);
        next.cluster.term = next.cluster.term.max(c.cluster.term);
        if next != *c {
            next.save(&self.state_dir)?;
            *c = next.clone();
        }
        Ok(Some(next))
    }

    /// Has the engine present the node's current certificate (see
    /// [`tls::follow_renewals`]): `prepare` rewrites its TLS files and
    /// reloads it. Nothing to do without a configured, started engine.
    pub(crate) async fn refresh_tls(self: &Arc<Self>) -> Result<()> {
        let _one_at_a_time = self.steps.lock().await;
        let Some(stored) = self.stored() else {
            return Ok(());
        };
        if stored.stopped || !self.driver().has_data() {
            return Ok(());
        }
        self.driver().prepare(&stored.spec).await
    }

    /// The driver of the engine this node runs.
    pub(crate) fn driver(&self) -> Arc<dyn Driver> {
        self.driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The engine this node runs (by name) and where its server log is;
    /// None before the coordinator configured one.
    pub fn log_file(&self) -> Option<(String, PathBuf)> {
        let spec = self.spec()?;
        Some((spec.engine, self.driver().log_path()))
    }

    /// The driver of `engine` (whichever this node runs).
    pub(crate) fn driver_for(&self, engine: &str) -> Result<Arc<dyn Driver>> {
        match self.drivers.iter().find(|(name, _)| *name == engine) {
            Some((_, d)) => Ok(d.clone()),
            None => bail!("this agent has no driver for engine {engine:?}"),
        }
    }

    /// Switches to the driver of `engine`.
    fn select_driver(&self, engine: &str) -> Result<()> {
        let Some((_, d)) = self.drivers.iter().find(|(name, _)| *name == engine) else {
            let names: Vec<&str> = self.drivers.iter().map(|(n, _)| *n).collect();
            bail!(
                "this agent cannot run engine {engine:?}: it runs {}",
                names.join(", ")
            );
        };
        *self.driver.lock().unwrap_or_else(|p| p.into_inner()) = d.clone();
        Ok(())
    }

    /// At agent start: resume supervising the engine recorded in engine.json.
    pub async fn resume(self: &Arc<Self>) -> Result<()> {
        let Some(stored) = Stored::load(&self.state_dir)? else {
            return Ok(());
        };
        let spec = stored.spec.clone();
        self.select_driver(&spec.engine)?;
        tracing::info!(cluster = %spec.cluster, engine = %spec.engine, role = %spec.role, "resuming the engine recorded in engine.json");
        let stopped = stored.stopped;
        self.assume_recent_confirmation(&stored);
        self.set_stored(stored)?;
        if stopped {
            tracing::info!("the engine was stopped on purpose; leaving it stopped");
            self.update(|s| {
                s.state = EngineState::Stopped as i32;
                s.message = "stopped by the coordinator".into();
            });
            return Ok(());
        }
        // The fence first, before anything that may fail or wait: a
        // primary without a valid lease starts fenced (after a VM reboot a
        // former primary must never come back writable), one with a lease
        // gets its gate again, and one whose firewall cannot be written is
        // stopped.
        self.enforce().await;
        if let Err(e) = self.driver().prepare(&spec).await {
            self.fail(&format!("preparing {}: {e:#}", spec.engine));
            return Err(e);
        }
        self.ensure_supervised();
        Ok(())
    }

    fn fail(&self, message: &str) {
        self.events.push("engine_failed", message);
        self.update(|s| {
            s.state = EngineState::Failed as i32;
            s.healthy = false;
            s.message = message.to_string();
        });
    }

    pub(crate) fn set_task(&self, task: Option<pb::Progress>) {
        self.update(|s| s.task = task);
    }
}

/// A request the node cannot honour in its current state.
#[derive(Debug)]
pub struct Conflict(pub String);

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Conflict {}
