//! The engine this node runs: its spec, its driver and its supervisor.
//!
//! The coordinator tells the agent what to run with `ConfigureEngine`; the
//! agent records that spec in `engine.json` (never the password), prepares
//! the engine (initdb, configuration), and from then on keeps it running:
//! the [`supervise`] task restarts it when it dies, with backoff, and reports
//! every exit and restart as an event. After an agent restart the spec is
//! read back and an engine that is still running is adopted, not restarted:
//! upgrading or restarting the agent does not interrupt the database.

pub mod postgres;

use crate::events::Events;
use anyhow::{bail, Context, Result};
use corral_proto::pb::{self, EngineState};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the coordinator asked this node to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSpec {
    pub cluster: String,
    pub engine: String,
    pub role: String,
    pub port: u16,
    pub admin_user: String,
    pub database: String,
}

/// Engines this agent can run.
pub const SUPPORTED_ENGINES: &[&str] = &["postgres"];

impl EngineSpec {
    /// Checks a request from the coordinator; every problem is named.
    pub fn from_request(req: &pb::ConfigureEngineRequest) -> Result<EngineSpec, String> {
        corral_proto::names::validate("cluster", &req.cluster)?;
        if !SUPPORTED_ENGINES.contains(&req.engine.as_str()) {
            return Err(format!(
                "engine {:?} is not supported by this agent (supported: {})",
                req.engine,
                SUPPORTED_ENGINES.join(", ")
            ));
        }
        if req.role != "primary" {
            return Err(format!(
                "role {:?} is not supported yet (supported: primary)",
                req.role
            ));
        }
        let port = u16::try_from(req.port)
            .ok()
            .filter(|p| *p >= 1024)
            .ok_or_else(|| format!("port {} is outside 1024..=65535", req.port))?;
        for (what, v) in [("admin user", &req.admin_user), ("database", &req.database)] {
            sql_identifier(what, v)?;
        }
        if req.admin_password.len() < 16 {
            return Err("admin password is missing or shorter than 16 characters".into());
        }
        Ok(EngineSpec {
            cluster: req.cluster.clone(),
            engine: req.engine.clone(),
            role: req.role.clone(),
            port,
            admin_user: req.admin_user.clone(),
            database: req.database.clone(),
        })
    }

    pub fn load(state_dir: &Path) -> Result<Option<EngineSpec>> {
        let path = spec_path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                Ok(Some(serde_json::from_str(&s).with_context(|| {
                    format!("{} is not valid", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, state_dir: &Path) -> Result<()> {
        corral_proto::pki::write_private(
            &spec_path(state_dir),
            &serde_json::to_string_pretty(self)?,
        )
    }
}

fn spec_path(state_dir: &Path) -> PathBuf {
    state_dir.join("engine.json")
}

/// A name safe to splice into SQL as a quoted identifier: lowercase letters,
/// digits and `_`, starting with a letter, at most 63 bytes.
pub fn sql_identifier(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.starts_with(|c: char| c.is_ascii_lowercase())
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {v:?}: use lowercase letters, digits and '_', starting with a letter"
        ))
    }
}

/// A running engine process: our child, or one adopted from a previous agent.
pub enum Process {
    Child(tokio::process::Child),
    Adopted(u32),
}

impl Process {
    pub fn pid(&self) -> u32 {
        match self {
            Process::Child(c) => c.id().unwrap_or(0),
            Process::Adopted(pid) => *pid,
        }
    }

    /// Resolves when the process has exited, with a description of how.
    async fn exited(&mut self) -> String {
        match self {
            Process::Child(c) => match c.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => format!("could not be waited for: {e}"),
            },
            Process::Adopted(pid) => {
                let pid = *pid;
                while process_alive(pid) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                "exited (adopted process; exit status unknown)".into()
            }
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown");
            format!("was killed by signal {sig} ({name})")
        }
        _ => "exited".into(),
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// What each engine implements; the supervisor and the API drive it.
#[tonic::async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Creates the data directory if it is missing and writes the
    /// configuration. Idempotent; never touches existing data.
    async fn prepare(&self, spec: &EngineSpec) -> Result<()>;
    /// The engine's process if one is already running on our data.
    fn find_running(&self) -> Option<u32>;
    /// Starts the engine process.
    async fn start(&self, spec: &EngineSpec) -> Result<tokio::process::Child>;
    /// Ok once the engine answers queries; returns its version.
    async fn check(&self, spec: &EngineSpec) -> Result<String>;
    /// Creates (or updates) the admin role and the database.
    async fn bootstrap(&self, spec: &EngineSpec, admin_password: &str) -> Result<()>;
    /// Where the engine's own log goes, for error messages.
    fn log_path(&self) -> PathBuf;
}

/// The engine of this node: spec, live status, and the supervisor task.
pub struct Engine {
    state_dir: PathBuf,
    driver: Arc<dyn Driver>,
    events: Arc<Events>,
    status: Mutex<pb::EngineStatus>,
    spec: Mutex<Option<EngineSpec>>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One ConfigureEngine at a time.
    configuring: tokio::sync::Mutex<()>,
}

/// Longest wait for a starting engine to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Health check period while running.
const CHECK_EVERY: Duration = Duration::from_secs(2);

impl Engine {
    pub fn new(state_dir: PathBuf, driver: Arc<dyn Driver>, events: Arc<Events>) -> Arc<Engine> {
        Arc::new(Engine {
            state_dir,
            driver,
            events,
            status: Mutex::new(pb::EngineStatus {
                state: EngineState::None as i32,
                ..Default::default()
            }),
            spec: Mutex::new(None),
            supervisor: Mutex::new(None),
            configuring: tokio::sync::Mutex::new(()),
        })
    }

    pub fn status(&self) -> pb::EngineStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut pb::EngineStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn spec(&self) -> Option<EngineSpec> {
        self.spec.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// At agent start: resume supervising the engine recorded in engine.json.
    pub async fn resume(self: &Arc<Self>) -> Result<()> {
        let Some(spec) = EngineSpec::load(&self.state_dir)? else {
            return Ok(());
        };
        tracing::info!(cluster = %spec.cluster, engine = %spec.engine, "resuming the engine recorded in engine.json");
        self.set_spec(&spec);
        if let Err(e) = self.driver.prepare(&spec).await {
            self.fail(&format!("preparing {}: {e:#}", spec.engine));
            return Err(e);
        }
        self.ensure_supervised();
        Ok(())
    }

    fn set_spec(&self, spec: &EngineSpec) {
        *self.spec.lock().unwrap_or_else(|p| p.into_inner()) = Some(spec.clone());
        self.update(|s| {
            s.engine = spec.engine.clone();
            s.cluster = spec.cluster.clone();
            s.role = spec.role.clone();
            s.port = spec.port as u32;
            if s.state == EngineState::None as i32 {
                s.state = EngineState::Initializing as i32;
            }
        });
    }

    fn fail(&self, message: &str) {
        self.events.push("engine_failed", message);
        self.update(|s| {
            s.state = EngineState::Failed as i32;
            s.healthy = false;
            s.message = message.to_string();
        });
    }

    /// Makes the node run `spec`: idempotent, and refused (nothing changed)
    /// when the node already serves something else.
    pub async fn configure(
        self: &Arc<Self>,
        spec: EngineSpec,
        admin_password: &str,
    ) -> Result<pb::EngineStatus> {
        let _one_at_a_time = self.configuring.lock().await;
        if let Some(current) = self.spec() {
            if current.cluster != spec.cluster {
                bail!(Conflict(format!(
                    "this node already runs cluster {:?}; remove it from that cluster first",
                    current.cluster
                )));
            }
            if current != spec {
                bail!(Conflict(format!(
                    "this node already runs cluster {:?} with different settings ({current:?}); \
                     changing them is not supported",
                    current.cluster
                )));
            }
        }
        spec.save(&self.state_dir)?;
        self.set_spec(&spec);
        if let Err(e) = self.driver.prepare(&spec).await {
            self.fail(&format!("preparing {}: {e:#}", spec.engine));
            return Err(e);
        }
        self.ensure_supervised();
        self.wait_running().await?;
        self.driver
            .bootstrap(&spec, admin_password)
            .await
            .context("creating the admin role and database")?;
        Ok(self.status())
    }

    async fn wait_running(&self) -> Result<()> {
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
                    self.driver.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ensure_supervised(self: &Arc<Self>) {
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
            let mut process = match self.driver.find_running() {
                Some(pid) => {
                    tracing::info!(pid, "adopting the running {} process", spec.engine);
                    Process::Adopted(pid)
                }
                None => match self.driver.start(&spec).await {
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
                Duration::from_millis(100)
            };
            tokio::select! {
                how = &mut exited => return how,
                _ = tokio::time::sleep(pause) => {}
            }
            match self.driver.check(spec).await {
                Ok(version) => {
                    if !ready {
                        ready = true;
                        self.events.push(
                            first,
                            format!(
                                "{} {version} is up (pid {})",
                                spec.engine,
                                self.status().pid
                            ),
                        );
                    }
                    self.update(|s| {
                        s.state = EngineState::Running as i32;
                        s.healthy = true;
                        s.version = version;
                        s.message.clear();
                    });
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

/// A request the node cannot honour in its current state.
#[derive(Debug)]
pub struct Conflict(pub String);

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Conflict {}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::ConfigureEngineRequest {
        pb::ConfigureEngineRequest {
            cluster: "orders".into(),
            engine: "postgres".into(),
            role: "primary".into(),
            port: 5432,
            admin_user: "admin".into(),
            admin_password: "x".repeat(32),
            database: "defaultdb".into(),
        }
    }

    #[test]
    fn accepts_a_valid_request() {
        let spec = EngineSpec::from_request(&request()).unwrap();
        assert_eq!(spec.port, 5432);
    }

    #[test]
    fn names_what_is_wrong() {
        type Mutation = Box<dyn Fn(&mut pb::ConfigureEngineRequest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|r| r.engine = "oracle".into()),
                "engine \"oracle\" is not supported",
            ),
            (Box::new(|r| r.role = "replica".into()), "role \"replica\""),
            (Box::new(|r| r.port = 80), "port 80"),
            (Box::new(|r| r.port = 70000), "port 70000"),
            (
                Box::new(|r| r.admin_user = "a\"; drop".into()),
                "invalid admin user",
            ),
            (Box::new(|r| r.database = "".into()), "invalid database"),
            (
                Box::new(|r| r.admin_password = "short".into()),
                "admin password",
            ),
            (
                Box::new(|r| r.cluster = "Bad_Name".into()),
                "invalid cluster name",
            ),
        ];
        for (mutate, expected) in cases {
            let mut r = request();
            mutate(&mut r);
            let err = EngineSpec::from_request(&r).unwrap_err();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn liveness_of_processes() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!process_alive(pid), "a zombie is not alive");
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
