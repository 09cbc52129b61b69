//! The supervisor: keeps the configured engine running (start or adopt,
//! health-check, restart with backoff when it exits) and reports each
//! exit and restart as an event.

use super::contract::{EngineSpec, Health};
use super::process::Process;
use super::Engine;
use anyhow::{bail, Result};
use corral_proto::pb::EngineState;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for a starting engine to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Health check period while running (also refreshes replication figures).
const CHECK_EVERY: Duration = Duration::from_secs(1);

impl Engine {
    pub(super) async fn wait_running(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let s = self.status();
            if s.state == EngineState::Running as i32 {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "the engine did not become ready within {}s (state {}: {}); see {}",
                    READY_TIMEOUT.as_secs(),
                    EngineState::try_from(s.state).unwrap_or_default().label(),
                    s.message,
                    self.driver().log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Records a successful health check.
    fn checked(&self, h: Health) {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.update(|s| {
            s.healthy = true;
            s.version = h.version;
            s.replication = Some(h.replication);
            s.stats = h.stats.into_iter().collect();
        });
    }

    /// Runs a fresh health check and records it (GetStatus, after steps).
    pub async fn refresh(&self) {
        let Some(spec) = self.spec() else { return };
        if self.status().state != EngineState::Running as i32 {
            return;
        }
        if let Ok(h) = self.driver().check(&spec).await {
            self.checked(h);
        }
    }

    pub(super) fn ensure_supervised(self: &Arc<Self>) {
        let mut sup = self.supervisor.lock().unwrap_or_else(|p| p.into_inner());
        if sup.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let me = self.clone();
        *sup = Some(tokio::spawn(async move { me.supervise().await }));
    }

    /// Keeps the engine running: start (or adopt), wait until it answers,
    /// health-check it, and restart it with backoff whenever it exits.
    async fn supervise(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(250);
        let mut restarts: u64 = 0;
        loop {
            let Some(spec) = self.spec() else { return };
            let mut process = match self.driver().find_running() {
                Some(pid) => {
                    tracing::info!(pid, "adopting the running {} process", spec.engine);
                    Process::Adopted(pid)
                }
                None if self.start_refused().is_some() => {
                    let why = self.start_refused().unwrap_or_default();
                    self.update(|s| {
                        s.state = EngineState::Stopped as i32;
                        s.healthy = false;
                        s.pid = 0;
                        s.message = why.to_string();
                    });
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                None => match self.driver().start(&spec).await {
                    Ok(child) => Process::Child(child),
                    Err(e) => {
                        let msg = format!("starting {}: {e:#}", spec.engine);
                        self.fail(&msg);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                },
            };
            let pid = process.pid();
            self.update(|s| {
                s.pid = pid;
                s.restarts = restarts;
            });
            let began = Instant::now();
            let first = match (&process, restarts) {
                (Process::Adopted(_), _) => "engine_adopted",
                (_, 0) => "engine_started",
                _ => "engine_restarted",
            };
            let how = self.watch(&spec, &mut process, first).await;
            restarts += 1;
            // A run that lasted a while resets the backoff.
            if began.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_millis(250);
            }
            let message = format!(
                "{} (pid {pid}) {how}; restarting in {} ms (restart #{restarts})",
                spec.engine,
                backoff.as_millis()
            );
            self.events.push("engine_exited", &message);
            self.update(|s| {
                s.state = EngineState::Restarting as i32;
                s.healthy = false;
                s.pid = 0;
                s.restarts = restarts;
                s.message = message.clone();
            });
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Waits for `process` to answer, then health-checks it until it exits.
    /// `first` is the event reported once it answers.
    async fn watch(&self, spec: &EngineSpec, process: &mut Process, first: &str) -> String {
        let started = Instant::now();
        let mut ready = false;
        let exited = process.exited();
        tokio::pin!(exited);
        loop {
            let pause = if ready {
                CHECK_EVERY
            } else {
                Duration::from_millis(20)
            };
            tokio::select! {
                how = &mut exited => return how,
                _ = tokio::time::sleep(pause) => {}
            }
            // A heartbeat's health check (four a second) that succeeded
            // since is as good as this one: no second query. A failing one
            // records nothing, so this check then runs and reports it.
            let recent = self
                .last_check
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < CHECK_EVERY);
            if ready && recent {
                continue;
            }
            // The spec as it is now: a promotion or a repoint changes it
            // while the process keeps running.
            let current = self.spec().unwrap_or_else(|| spec.clone());
            match self.driver().check(&current).await {
                Ok(health) => {
                    if !ready {
                        ready = true;
                        self.events.push(
                            first,
                            format!(
                                "{} {} is up (pid {})",
                                spec.engine,
                                health.version,
                                self.status().pid
                            ),
                        );
                    }
                    self.update(|s| {
                        s.state = EngineState::Running as i32;
                        s.message.clear();
                    });
                    self.checked(health);
                }
                Err(e) if ready => {
                    tracing::warn!("{} health check failed: {e:#}", spec.engine);
                    self.update(|s| {
                        s.healthy = false;
                        s.message = format!("health check failed: {e:#}");
                    });
                }
                Err(e) => {
                    if started.elapsed() > READY_TIMEOUT {
                        self.update(|s| {
                            s.message =
                                format!("not answering after {}s: {e:#}", READY_TIMEOUT.as_secs())
                        });
                    }
                }
            }
        }
    }
}
