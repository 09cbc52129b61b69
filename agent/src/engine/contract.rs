//! The contract between the agent and an engine: the [`Driver`] trait every
//! engine implements (PostgreSQL, MariaDB/MySQL, Redis/Valkey/KeyDB), and
//! the plain types its methods take and return. Nothing here knows the
//! agent's supervisor, lease or firewall: a driver is told what to do and
//! reports what it found, and [`super::Engine`] decides when.

use anyhow::{bail, Result};
use corral_proto::pb;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Passwords the coordinator sends with each ConfigureEngine; never stored
/// in engine.json (the driver keeps what the engine itself needs, 0600).
#[derive(Clone)]
pub struct Secrets {
    pub admin_password: String,
    pub replication_password: String,
}

/// The drivers of an agent, by engine name (one driver may serve several).
pub type Drivers = Vec<(&'static str, Arc<dyn Driver>)>;

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

/// The backup part of the contract, implemented in each engine's
/// `backup.rs`. Blocking: the agent runs these on a blocking thread
/// (`crate::backup`), with `out` and `input` wired to the (compressing,
/// encrypting) target stream.
pub trait Backup {
    /// Writes a consistent backup of the running engine to `out`, as one
    /// stream in the engine's own format (PostgreSQL: a tar of the data
    /// directory with the WAL it needs; MariaDB: xbstream; Redis: an RDB
    /// file). A replica backs itself up (the primary is not loaded).
    fn backup(
        &self,
        spec: &EngineSpec,
        out: &mut dyn std::io::Write,
        progress: ProgressFn<'_>,
    ) -> Result<BackupInfo>;
    /// Fills the absent or empty data directory from a stream [`Backup::backup`]
    /// wrote; the engine is stopped. The caller starts the engine afterwards
    /// (with `prepare` and `start`). PostgreSQL with `recovery`: recovers to
    /// its time using the WAL segments fetched into its directory; an engine
    /// without point-in-time recovery refuses a `recovery`.
    fn restore(
        &self,
        spec: &EngineSpec,
        input: &mut dyn std::io::Read,
        recovery: Option<&Recovery>,
    ) -> Result<()>;
    /// Restores a stream into `scratch` (an empty directory owned by the
    /// engine's user; the caller removes it) and checks it the way the
    /// engine would use it, without touching the running engine; returns
    /// what it found, e.g. "PostgreSQL 15.8 started on the restored data:
    /// 3 databases".
    fn verify(&self, input: &mut dyn std::io::Read, scratch: &Path) -> Result<String>;
}

/// The one contract every engine implements.
///
/// **Who calls it.** Only [`super::Engine`]: its steps (`configure.rs`,
/// `promote.rs`, `stop.rs`), its supervisor (`supervise.rs`: `find_running`,
/// `start`, `check`), its guardian (`fence.rs`: `set_fenced`), and the
/// backup service (`crate::backup`: the [`Backup`] streams,
/// `wal_spool`, `switch_wal`). The steps run one at a time per node (the
/// Engine's step lock), so a driver never sees two of `initialize`,
/// `clone_data`, `rejoin`, `prepare`, `promote`, `wipe` at once; `check`
/// and `set_fenced` may run beside any of them.
///
/// **What it decides.** Nothing about roles, terms, leases or the firewall:
/// the transitions table (`transitions.rs`) decides what is done to the
/// data, the Engine checks terms and holds the lease, and the driver only
/// does what it is told to its engine and reports what it found.
///
/// **Idempotent.** The coordinator retries a step whose answer it did not
/// get, so a method must be safe to call again after it succeeded or
/// failed half-way: `prepare` rewrites the same files, `save_secrets`
/// overwrites, `bootstrap` and `converge_slots` converge to the spec,
/// `wipe` of nothing succeeds. `clone_data` builds the copy aside and puts
/// it in place only when complete, so a failed one leaves the node as it
/// was (a failed restore is erased by the Engine). Methods valid in one
/// state only (`initialize` of nothing, `promote` of a running standby,
/// `rejoin` of a former primary's stopped data) are only called in it:
/// the transitions table sees to that.
///
/// **Blocking or not.** `async` methods must not block the runtime for
/// long (run external tools with `tokio::process`). The plain ones are
/// quick checks (`has_data`, `data_is_standby`, `find_running`), except
/// the backup stream methods, which the agent runs on a blocking thread.
///
/// **Errors** say what failed and what to do, in the engine's terms
/// ("pg_basebackup exited 1: ... ; check that the upstream allows
/// replication"); the Engine adds the step and the node, and reports them
/// as events and in the engine's status.
#[tonic::async_trait]
pub trait Driver: Backup + Send + Sync + 'static {
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

    // ------------------------------------------ WAL (the streams: [`Backup`])

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
