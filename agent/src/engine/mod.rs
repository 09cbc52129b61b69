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

mod fence;
pub mod mariadb;
mod os;
pub mod postgres;
pub mod redis;
mod safety;
pub mod tls;

pub use fence::FenceState;
pub use safety::Round;

use crate::events::Events;
use crate::firewall::Firewall;
use crate::lease::{self, Lease};
use anyhow::{bail, Context, Result};
use corral_proto::pb::{self, EngineState};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a replica clones and streams from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub node: String,
    pub host: String,
    pub port: u16,
}

/// What the coordinator asked this node to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSpec {
    pub cluster: String,
    pub engine: String,
    pub role: String,
    pub port: u16,
    pub admin_user: String,
    pub database: String,
    /// Primary: the replicas it serves (a replication slot each).
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Primary: commits wait for one replica.
    #[serde(default)]
    pub sync: bool,
    /// Replica: where it streams from.
    #[serde(default)]
    pub upstream: Option<Upstream>,
    /// PostgreSQL: archive every finished WAL segment while primary (the
    /// engine copies it to [`Driver::wal_spool`]; the agent uploads it).
    /// Set on replicas too, so a promoted one archives at once.
    #[serde(default)]
    pub wal_archive: bool,
    /// Clients must use TLS (plaintext connections are refused); without
    /// it TLS is offered. Replication always uses TLS when the node has a
    /// certificate.
    #[serde(default)]
    pub require_client_tls: bool,
}

/// What engine.json holds: the spec plus the agent's own bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    spec: EngineSpec,
    /// Stopped on purpose: do not start it at agent start.
    #[serde(default)]
    stopped: bool,
    /// The last resync request carried out, so a retried one is not redone.
    #[serde(default)]
    last_resync: String,
    /// The cluster's term and timing as last heard, and the primary's peers.
    /// (Named apart from the spec's flattened `cluster`, its name.)
    #[serde(default, rename = "cluster_state")]
    cluster: ClusterState,
}

/// What the agent keeps of its cluster beyond the engine spec, persisted so
/// that a restarted agent still refuses stale commands and can still reach
/// its replicas while the coordinator is away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The highest term seen; commands carrying a lower one are refused.
    #[serde(default)]
    pub term: u64,
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u32,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u32,
    /// Primary: agent address (host:port) of each replica, for confirmations.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
    /// The cluster's IP allowlist (empty: open) and its version, and the
    /// addresses always allowed (the cluster's nodes): applied at agent start
    /// from here, before the coordinator is heard from.
    ///
    /// Shared (`Arc`): the stored state is cloned many times a second, and
    /// a list may hold 10,000 entries.
    #[serde(default)]
    pub allowlist: std::sync::Arc<Vec<String>>,
    #[serde(default)]
    pub allowlist_version: u64,
    #[serde(default)]
    pub always_allowed: Vec<String>,
}

fn default_lease_ms() -> u32 {
    corral_proto::lease::DEFAULT_LEASE_MS
}

fn default_heartbeat_ms() -> u32 {
    corral_proto::lease::DEFAULT_HEARTBEAT_MS
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            term: 0,
            lease_ms: default_lease_ms(),
            heartbeat_ms: default_heartbeat_ms(),
            peers: Default::default(),
            allowlist: Default::default(),
            allowlist_version: 0,
            always_allowed: Vec::new(),
        }
    }
}

impl ClusterState {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(u64::from(self.lease_ms))
    }

    /// Takes the timing a command or an assignment carries, when valid.
    fn set_timing(&mut self, lease_ms: u32, heartbeat_ms: u32) {
        if corral_proto::lease::validate(lease_ms, heartbeat_ms).is_ok() {
            self.lease_ms = lease_ms;
            self.heartbeat_ms = heartbeat_ms;
        }
    }
}

/// Passwords the coordinator sends with each ConfigureEngine; never stored
/// in engine.json (the driver keeps what the engine itself needs, 0600).
#[derive(Clone)]
pub struct Secrets {
    pub admin_password: String,
    pub replication_password: String,
}

/// Engines this agent can run (`mysql`: the MariaDB driver, which speaks
/// MySQL 8's syntax where it differs; `valkey` and `keydb`: the Redis
/// driver with the agent's `--redis-server`).
pub const SUPPORTED_ENGINES: &[&str] =
    &["postgres", "mariadb", "mysql", "redis", "valkey", "keydb"];

/// The drivers of an agent, by engine name (one driver may serve several).
pub type Drivers = Vec<(&'static str, Arc<dyn Driver>)>;
pub const ROLES: &[&str] = &["primary", "replica"];

/// A ConfigureEngine request, checked.
pub struct Request {
    pub spec: EngineSpec,
    pub secrets: Secrets,
    pub initialize: bool,
    pub resync_id: String,
    /// The cluster's term (0: not given) and timing (0: keep).
    pub term: u64,
    pub lease_ms: u32,
    pub heartbeat_ms: u32,
    /// With `initialize`: fill the data from this backup.
    pub restore: Option<pb::RestoreSource>,
    /// Where to archive WAL as primary (see [`crate::backup::wal`]).
    pub wal_archive: Option<pb::WalArchive>,
}

impl EngineSpec {
    /// Checks a request from the coordinator; every problem is named.
    pub fn from_request(req: &pb::ConfigureEngineRequest) -> Result<Request, String> {
        corral_proto::names::validate("cluster", &req.cluster)?;
        if !SUPPORTED_ENGINES.contains(&req.engine.as_str()) {
            return Err(format!(
                "engine {:?} is not supported by this agent (supported: {})",
                req.engine,
                SUPPORTED_ENGINES.join(", ")
            ));
        }
        if !ROLES.contains(&req.role.as_str()) {
            return Err(format!(
                "role {:?} is not supported (supported: {})",
                req.role,
                ROLES.join(", ")
            ));
        }
        let port = valid_port(req.port)?;
        sql_identifier("admin user", &req.admin_user)?;
        if matches!(req.engine.as_str(), "redis" | "valkey" | "keydb") {
            // Redis numbers its databases.
            if req.database.parse::<u8>().is_err() {
                return Err(format!(
                    "invalid database {:?} for redis: a database number such as 0",
                    req.database
                ));
            }
        } else {
            sql_identifier("database", &req.database)?;
        }
        if req.admin_password.len() < 16 {
            return Err("admin password is missing or shorter than 16 characters".into());
        }
        if req.replication_password.len() < 16 {
            return Err("replication password is missing or shorter than 16 characters".into());
        }
        for r in &req.replicas {
            corral_proto::names::validate("replica node", r)?;
        }
        let upstream = match (&req.upstream, req.role.as_str()) {
            (Some(u), "replica") => {
                corral_proto::names::validate("upstream node", &u.node)?;
                let host: std::net::IpAddr = u
                    .host
                    .parse()
                    .map_err(|_| format!("upstream host {:?} is not an IP address", u.host))?;
                Some(Upstream {
                    node: u.node.clone(),
                    host: host.to_string(),
                    port: valid_port(u.port)?,
                })
            }
            (None, "replica") => return Err("a replica needs an upstream to stream from".into()),
            (Some(_), _) => return Err("only a replica has an upstream".into()),
            (None, _) => None,
        };
        if req.role == "replica" && (req.initialize || !req.replicas.is_empty() || req.sync) {
            return Err("initialize, replicas and sync apply to a primary only".into());
        }
        if req.restore.is_some() && !req.initialize {
            return Err(
                "a restore applies to a new cluster's first node only (with initialize)".into(),
            );
        }
        if let Some(w) = &req.wal_archive {
            if w.key.len() != 32 || w.prefix.is_empty() || w.target.is_none() {
                return Err("a WAL archive needs a target, a prefix and a 32-byte key".into());
            }
            if let Some(t) = &w.target {
                crate::backup::scope::check_own(t, &req.cluster, &w.prefix)
                    .map_err(|e| format!("the WAL archive: {e:#}"))?;
            }
        }
        if req.role == "primary" && !req.resync_id.is_empty() {
            return Err("a primary cannot be resynced; promote another node first".into());
        }
        Ok(Request {
            spec: EngineSpec {
                cluster: req.cluster.clone(),
                engine: req.engine.clone(),
                role: req.role.clone(),
                port,
                admin_user: req.admin_user.clone(),
                database: req.database.clone(),
                replicas: req.replicas.clone(),
                sync: req.sync,
                upstream,
                wal_archive: req.wal_archive.is_some(),
                require_client_tls: req.require_client_tls,
            },
            secrets: Secrets {
                admin_password: req.admin_password.clone(),
                replication_password: req.replication_password.clone(),
            },
            initialize: req.initialize,
            resync_id: req.resync_id.clone(),
            term: req.term,
            lease_ms: req.lease_duration_ms,
            heartbeat_ms: req.heartbeat_interval_ms,
            restore: req.restore.clone(),
            wal_archive: req.wal_archive.clone(),
        })
    }
}

fn valid_port(p: u32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p >= 1024)
        .ok_or_else(|| format!("port {p} is outside 1024..=65535"))
}

impl Stored {
    fn load(state_dir: &Path) -> Result<Option<Stored>> {
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

    fn save(&self, state_dir: &Path) -> Result<()> {
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

/// Health and replication state from one check.
pub struct Health {
    pub version: String,
    pub replication: pb::Replication,
    /// The engine's own figures, named with their unit (see
    /// `EngineStatus.stats` in the proto): connections, lag_seconds, ...
    pub stats: std::collections::BTreeMap<String, f64>,
}

/// Reports bytes done / total of a long step.
pub type ProgressFn<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// What each engine implements; the supervisor and the API drive it.
#[tonic::async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Whether the node holds a data directory for the engine.
    fn has_data(&self) -> bool;
    /// Whether the data on disk is a standby's (set up to follow another).
    fn data_is_standby(&self) -> Result<bool>;
    /// Creates an empty data directory (new cluster's primary only).
    async fn initialize(&self) -> Result<()>;
    /// Copies the data from `upstream` (a new or resynced replica).
    async fn clone_data(
        &self,
        spec: &EngineSpec,
        upstream: &Upstream,
        progress: ProgressFn<'_>,
    ) -> Result<()>;
    /// Makes the stopped data of a former primary able to follow
    /// `upstream` (rewinding writes the new primary never saw).
    async fn rejoin(&self, spec: &EngineSpec, upstream: &Upstream) -> Result<()>;
    /// Keeps the replication password where the engine's tools find it.
    fn save_secrets(&self, secrets: &Secrets) -> Result<()>;
    /// Writes the configuration for `spec`; reloads a running engine when
    /// it changed.
    async fn prepare(&self, spec: &EngineSpec) -> Result<()>;
    /// The engine's process if one is already running on our data.
    fn find_running(&self) -> Option<u32>;
    /// Starts the engine process.
    async fn start(&self, spec: &EngineSpec) -> Result<tokio::process::Child>;
    /// Asks the running engine `pid` to stop cleanly and waits for it.
    async fn stop(&self, pid: u32) -> Result<()>;
    /// Of stopped data: where its last checkpoint starts, and its state.
    async fn stopped_position(&self) -> Result<(u64, String)>;
    /// Ok once the engine answers queries.
    async fn check(&self, spec: &EngineSpec) -> Result<Health>;
    /// Primary: creates (or updates) the admin and replication roles and
    /// the database.
    async fn bootstrap(&self, spec: &EngineSpec, secrets: &Secrets) -> Result<()>;
    /// Primary: a replication slot for each replica and no other.
    /// Replica: no slots.
    async fn converge_slots(&self, spec: &EngineSpec) -> Result<()>;
    /// Turns the running standby into a primary; returns once it accepts writes.
    async fn promote(&self, spec: &EngineSpec) -> Result<()>;
    /// Fences (or unfences) the engine itself: read-only, client sessions
    /// ended. Works whether or not the engine runs; the setting survives a
    /// restart of the engine. (The firewall part of the fence is the
    /// agent's, not the driver's.)
    async fn set_fenced(&self, spec: &EngineSpec, fenced: bool) -> Result<()>;
    /// Erases the engine's data and configuration (the engine is stopped).
    async fn wipe(&self) -> Result<()>;
    /// Removes what [`Driver::save_secrets`] wrote (leaving the cluster).
    fn forget_secrets(&self) -> Result<()>;
    /// Where the engine's own log goes, for error messages and for
    /// `corralctl logs`.
    fn log_path(&self) -> PathBuf;

    // ---------------------------------------------------------- backups
    //
    // Blocking: the agent runs these on a blocking thread, with `out` and
    // `input` wired to the (compressing, encrypting) target stream.

    /// Writes a consistent backup of the running engine to `out`, as one
    /// stream in the engine's own format (PostgreSQL: a tar of the data
    /// directory with the WAL it needs; MariaDB: xbstream; Redis: an RDB
    /// file). A replica backs itself up (the primary is not loaded).
    fn backup(
        &self,
        spec: &EngineSpec,
        out: &mut dyn std::io::Write,
        progress: ProgressFn<'_>,
    ) -> Result<BackupInfo> {
        let _ = (spec, out, progress);
        bail!("backups of {} are not supported yet", self.engine_label())
    }
    /// Fills the absent or empty data directory from a stream [`Driver::backup`]
    /// wrote; the engine is stopped. The caller starts the engine afterwards
    /// (with `prepare` and `start`). PostgreSQL with `recovery`: recovers to
    /// its time using the WAL segments fetched into its directory.
    fn restore(
        &self,
        spec: &EngineSpec,
        input: &mut dyn std::io::Read,
        recovery: Option<&Recovery>,
    ) -> Result<()> {
        let _ = (spec, input, recovery);
        bail!("restores of {} are not supported yet", self.engine_label())
    }
    /// Restores a stream into `scratch` (an empty directory owned by the
    /// engine's user; the caller removes it) and checks it the way the
    /// engine would use it, without touching the running engine; returns
    /// what it found, e.g. "PostgreSQL 15.8 started on the restored data:
    /// 3 databases".
    fn verify(&self, input: &mut dyn std::io::Read, scratch: &Path) -> Result<String> {
        let _ = (input, scratch);
        bail!(
            "verifying backups of {} is not supported yet",
            self.engine_label()
        )
    }
    /// PostgreSQL: the directory the engine's archive_command copies each
    /// finished WAL segment to, for the agent to upload (with
    /// `EngineSpec::wal_archive`). None: the engine has no WAL archive.
    fn wal_spool(&self) -> Option<PathBuf> {
        None
    }
    /// PostgreSQL primary: closes the current WAL segment (so it is
    /// archived); returns its file name.
    async fn switch_wal(&self, spec: &EngineSpec) -> Result<String> {
        let _ = spec;
        bail!("{} has no WAL to switch", self.engine_label())
    }
    /// The engine's name for messages ("PostgreSQL", "MariaDB", "Redis").
    fn engine_label(&self) -> &'static str;
}

/// What a backup stream is consistent at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupInfo {
    /// The engine's version, e.g. "15.8".
    pub version: String,
    /// PostgreSQL: the end LSN ("0/3000138"); MariaDB: the GTID position;
    /// Redis: the replication offset.
    pub position: String,
    /// When the backup was consistent (ms since the epoch); 0: unknown.
    pub position_time_ms: i64,
    /// PostgreSQL: the WAL segment file the backup starts in; archived
    /// segments before it are not needed to restore it. Empty elsewhere.
    pub start_wal: String,
}

/// PostgreSQL point-in-time recovery.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Recover up to this time (ms since the epoch), then promote.
    pub to_time_ms: i64,
    /// Holds the archived WAL segments (and timeline history files) of the
    /// source, already fetched and decrypted, under their own names: the
    /// restore_command copies from here.
    pub wal_dir: PathBuf,
}

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

/// How long a replica pointed at a new primary may take to stream from it
/// before it is rewound.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a starting engine to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Health check period while running (also refreshes replication figures).
const CHECK_EVERY: Duration = Duration::from_secs(1);

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

    /// Makes the node run `req.spec`: idempotent, and refused (nothing
    /// changed) when the node serves something else.
    pub async fn configure(self: &Arc<Self>, req: Request) -> Result<pb::ConfigureEngineResponse> {
        let _one_at_a_time = self.steps.lock().await;
        *self.last_clone.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let spec = req.spec.clone();
        let current = self.stored();
        if let Some(c) = &current {
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
        self.select_driver(&spec.engine)?;
        let mut cluster = self.stored().map(|c| c.cluster).unwrap_or_default();
        cluster.term = cluster.term.max(req.term);
        cluster.set_timing(req.lease_ms, req.heartbeat_ms);
        self.driver().save_secrets(&req.secrets)?;
        let last_resync = current
            .as_ref()
            .map(|c| c.last_resync.clone())
            .unwrap_or_default();
        match spec.role.as_str() {
            "primary" => self
                .converge_primary(&req, current.as_ref(), cluster)
                .await
                .map_err(|e| self.with_firewall_cause(e))?,
            _ => {
                let upstream = spec
                    .upstream
                    .clone()
                    .context("a replica needs an upstream")?;
                let resync = !req.resync_id.is_empty() && req.resync_id != last_resync;
                if resync && self.driver().has_data() {
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
                let repointed = current
                    .as_ref()
                    .is_some_and(|c| c.spec.upstream.as_ref() != Some(&upstream));
                if !self.driver().has_data() {
                    self.stop_locked().await?;
                    self.clone_data(&spec, &upstream).await?;
                } else if !self.driver().data_is_standby()? {
                    self.events.push(
                        "rejoin_started",
                        format!(
                            "this node's data was a primary's; rewinding it to follow {}",
                            upstream.node
                        ),
                    );
                    self.stop_locked().await?;
                    self.rewind_or_reclone(&spec, &upstream).await?;
                }
                let resync_done = if req.resync_id.is_empty() {
                    last_resync
                } else {
                    req.resync_id.clone()
                };
                crate::backup::wal_config::save(&self.state_dir, req.wal_archive.as_ref())
                    .context("recording where WAL is archived")?;
                self.set_stored(Stored {
                    spec: spec.clone(),
                    stopped: false,
                    last_resync: resync_done,
                    cluster,
                })?;
                self.prepare_and_run(&spec).await?;
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
                    self.rewind_or_reclone(&spec, &upstream).await?;
                    self.prepare_and_run(&spec).await?;
                }
                self.driver()
                    .converge_slots(&spec)
                    .await
                    .context("converging the replica's replication settings")?;
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

    async fn converge_primary(
        self: &Arc<Self>,
        req: &Request,
        current: Option<&Stored>,
        cluster: ClusterState,
    ) -> Result<()> {
        let spec = &req.spec;
        if !self.driver().has_data() {
            if !req.initialize {
                bail!(Conflict(
                    "this node has no data directory, so it cannot be a primary; only a new \
                     cluster's first node is initialised empty"
                        .into()
                ));
            }
            match &req.restore {
                Some(source) => self.restore(spec, source).await?,
                None => self.driver().initialize().await?,
            }
        } else if self.driver().data_is_standby()? {
            bail!(Conflict(
                "this node is a replica; promote it (corralctl node promote) to make it the primary"
                    .into()
            ));
        }
        crate::backup::wal_config::save(&self.state_dir, req.wal_archive.as_ref())
            .context("recording where WAL is archived")?;
        self.set_stored(Stored {
            spec: spec.clone(),
            stopped: false,
            last_resync: current.map(|c| c.last_resync.clone()).unwrap_or_default(),
            cluster,
        })?;
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
            let run =
                crate::backup::restore(self.driver(), spec, source, &self.state_dir, progress);
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
    async fn stop_locked(&self) -> Result<()> {
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
        if self.driver().data_is_standby()? {
            if stored.stopped || self.driver().find_running().is_none() {
                bail!(Conflict(
                    "this replica's engine is not running; it cannot be promoted".into()
                ));
            }
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
        } else {
            self.set_stored(record)?;
            self.driver().prepare(&spec).await?;
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
            replication_password: "y".repeat(32),
            replicas: vec!["vm2".into()],
            ..Default::default()
        }
    }

    fn replica() -> pb::ConfigureEngineRequest {
        pb::ConfigureEngineRequest {
            role: "replica".into(),
            replicas: vec![],
            upstream: Some(pb::Upstream {
                node: "vm1".into(),
                host: "10.0.0.1".into(),
                port: 5432,
            }),
            ..request()
        }
    }

    #[test]
    fn accepts_valid_requests() {
        let r = EngineSpec::from_request(&request()).unwrap();
        assert_eq!(r.spec.port, 5432);
        assert_eq!(r.spec.replicas, ["vm2"]);
        let r = EngineSpec::from_request(&replica()).unwrap();
        assert_eq!(r.spec.upstream.unwrap().host, "10.0.0.1");
    }

    #[test]
    fn names_what_is_wrong() {
        type Mutation = Box<dyn Fn(&mut pb::ConfigureEngineRequest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|r| r.engine = "oracle".into()),
                "engine \"oracle\" is not supported",
            ),
            (Box::new(|r| r.role = "standby".into()), "role \"standby\""),
            (
                Box::new(|r| r.role = "replica".into()),
                "a replica needs an upstream",
            ),
            (
                Box::new(|r| r.replication_password = "short".into()),
                "replication password",
            ),
            (
                Box::new(|r| r.replicas = vec!["Bad".into()]),
                "invalid replica node name",
            ),
            (
                Box::new(|r| r.resync_id = "op-1".into()),
                "a primary cannot be resynced",
            ),
            (
                Box::new(|r| {
                    *r = replica();
                    r.upstream.as_mut().unwrap().host = "db.example".into();
                }),
                "is not an IP address",
            ),
            (
                Box::new(|r| {
                    *r = replica();
                    r.initialize = true;
                }),
                "apply to a primary only",
            ),
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
            let Err(err) = EngineSpec::from_request(&r) else {
                panic!("accepted a request that should mention {expected}");
            };
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn engine_json_round_trips_and_reads_older_files() {
        let r = EngineSpec::from_request(&replica()).unwrap();
        let mut cluster = ClusterState {
            term: 7,
            ..Default::default()
        };
        cluster.peers.insert("vm3".into(), "10.0.0.3:7401".into());
        let stored = Stored {
            spec: r.spec,
            stopped: true,
            last_resync: "op-1".into(),
            cluster,
        };
        let text = serde_json::to_string(&stored).unwrap();
        let back: Stored = serde_json::from_str(&text).unwrap();
        assert_eq!(back.spec, stored.spec);
        assert_eq!(back.cluster, stored.cluster);
        assert!(back.stopped);
        // A file written before terms existed: defaults.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old.as_object_mut().unwrap().remove("cluster_state");
        let back: Stored = serde_json::from_value(old).unwrap();
        assert_eq!(back.cluster, ClusterState::default());
        assert_eq!(back.spec.cluster, "orders");
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
