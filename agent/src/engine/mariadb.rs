//! MariaDB (and MySQL 8 where its syntax differs): data directory,
//! configuration, process, replication with GTIDs.
//!
//! # Layout under `<state>/mariadb/`
//!
//! - `data/`: the server's data directory (owned by `mysql`, 0700). While
//!   the data follows another node it holds `corral-replica`, written by a
//!   clone or a rejoin and removed by promote; it survives restarts, so it
//!   is what [`Driver::data_is_standby`] reads.
//! - `run/`: the Unix socket and the pid file (owned by `mysql`, 0700, so
//!   only the server and root reach the socket).
//! - `tmp/`: the servers' temporary files (owned by `mysql`, 0700). Not
//!   /tmp: a starting server deletes every `#sql*` file in its tmpdir,
//!   another server's on-disk temporary tables included.
//! - `my.cnf`: written from the spec (root's, 0644). The server reads it and
//!   nothing else (`--defaults-file`): no setting leaks in from /etc/mysql.
//! - `fence.cnf`: present while the node is fenced (`read_only=ON`); my.cnf
//!   includes it last, so the fence survives a restart. (A missing
//!   `!include` file is skipped by the server.)
//! - `secrets.json` (root's, 0600): the replication password.
//! - `server.log`: the server's error log (its stdout and stderr).
//! - Scratch, never left behind by a finished step: `data.initdb/`,
//!   `data.clone/` (a clone being loaded), `data.old/` (the previous data
//!   while a clone moves in), `temp.cnf` (a temporary server's settings),
//!   `data.restore/` and `restore.cnf` (a backup being restored, see
//!   mariadb_backup.rs), `tmp/backup-*` (mariadb-backup's work directory).
//!
//! The server runs as the `mysql` user, never root. The agent administers it
//! as `root@localhost` over the socket, authenticated by `unix_socket` (the
//! agent runs as root), so the agent needs no password of its own. Every TCP
//! client needs a password.
//!
//! # Positions
//!
//! Every node writes GTIDs of replication domain 0 in strict mode, so a
//! GTID's sequence number grows across the whole cluster, failovers
//! included: the driver reports positions as that number (a count of
//! transactions, where PostgreSQL reports WAL bytes). A stopped server's
//! position is read from the end of its own binary log (no server needed,
//! and exact: nothing can commit between reading it and the shutdown).
//!
//! # Replication
//!
//! Replicas start with `skip_slave_start`: the driver, not the server,
//! decides when replication runs. Each health check converges it (pointed at
//! the upstream of the last prepared spec, `MASTER_USE_GTID=slave_pos`, and
//! running), so a freshly started or repointed replica follows its upstream
//! without another hook, and a primary never follows anybody. The spec the
//! driver converges to is the one last given to [`Driver::prepare`] (or
//! [`Driver::promote`]), and only when the data's own marker agrees with it:
//! a data directory half-way through a promotion is left alone.
//!
//! Synchronous mode is semi-synchronous replication (built into the server
//! since 10.3): commits wait, after the binary log is synced, for one
//! replica to acknowledge it received them, and never time out into
//! asynchronous mode (zero loss is the point of the setting).
//!
//! # Cloning
//!
//! A new replica is a logical copy: `mariadb-dump --single-transaction
//! --gtid` over TCP from the upstream, as the replication user, loaded into a
//! freshly initialised scratch directory by a temporary server that has no
//! network and does not replicate; the dump's GTID position becomes the
//! copy's `gtid_slave_pos` and `gtid_binlog_state`, so it continues exactly
//! where the dump's snapshot was taken. A physical copy with `mariadb-backup`
//! would be faster for big data sets, but it reads the donor's data
//! directory: it has to run on the donor, streamed by the donor's agent to
//! the replica (future work: an agent-to-agent transfer), whereas the dump
//! needs nothing but the upstream's SQL port and the replication user,
//! which is all a replica has.
//!
//! A former primary rejoins without a copy when it has no transaction the
//! new upstream lacks (checked by positions, and when they cannot tell, by
//! asking the upstream to stream from this node's last GTID exactly as a
//! replica would); otherwise rejoin fails with `diverged:` and the agent
//! clones it again. Errant transactions are never merged.
//!
//! # MySQL 8
//!
//! MySQL 8 is not installable here. The statements that differ between the
//! two (replication commands, status columns, read-only and semi-sync
//! variables, positions) come from [`Flavour`], chosen from the server's
//! version string and unit-tested for both; the configuration file, the
//! process handling, the clone and the rejoin are MariaDB's, and only the
//! MariaDB path runs end to end.

use super::os::{
    self, log_tail, mkdir_owned, remove_dir, remove_file, run, tail, write_owned, write_readable,
    Account, TAIL_LINES,
};
use super::{BackupInfo, Driver, EngineSpec, Health, ProgressFn, Recovery, Secrets, Upstream};
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use mysql_async::prelude::*;
use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "mariadb_backup.rs"]
mod backup;
#[path = "mariadb_client.rs"]
mod client;
#[path = "mariadb_tls.rs"]
mod tls;
pub use backup::{position_from_binlog_info, position_from_output};

/// The account replicas stream as (and clone with).
pub const REPLICATION_USER: &str = "corral_replication";
/// The file in the data directory that marks it a replica's.
const REPLICA_MARKER: &str = "corral-replica";
/// The binary log's base name, relative to the data directory.
const BINLOG: &str = "binlog";
/// How long a stopping server may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting and each health query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Live changes made while fencing: a hung server must not hold the fence up.
const FENCE_TIMEOUT: Duration = Duration::from_secs(3);
/// Semi-sync wait in ms: a year, i.e. never fall back to asynchronous
/// replication. (Not the variable's maximum: the server adds it to the
/// clock in nanoseconds.)
const SEMI_SYNC_TIMEOUT_MS: u64 = 365 * 24 * 3600 * 1000;
/// The SQL mode of the agent's own sessions: whatever the global mode
/// becomes, backslashes stay escapes in the string literals we build.
const AGENT_SQL_MODE: &str =
    "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION";
/// A replica whose replication stopped on an I/O error is restarted at
/// most this often (errors that persist would otherwise flood the log).
const RESTART_REPLICATION_EVERY: Duration = Duration::from_secs(5);

pub struct Mariadb {
    base: PathBuf,
    /// This node's id: its `report_host` (how its upstream names it) and the
    /// seed of its `server_id`.
    node_id: String,
    /// The cached administrative connection (root over the socket).
    conn: tokio::sync::Mutex<Option<Admin>>,
    /// The spec last given to prepare (or promote): what health checks
    /// converge replication to. The agent's supervisor may hold an older
    /// spec for as long as the process runs; this one is always current.
    desired: std::sync::Mutex<Option<EngineSpec>>,
    /// When a health check last restarted failed replication.
    restarted_replication: std::sync::Mutex<Option<Instant>>,
    /// The node's certificate, which the server presents (none: no TLS).
    tls: std::sync::Arc<super::tls::EngineTls>,
}

/// An administrative session and what it found out about the server.
struct Admin {
    conn: mysql_async::Conn,
    flavour: Flavour,
    version: String,
}

/// The OS account the server runs as: `mysql`.
fn account() -> Result<Account> {
    Account::lookup("mysql", "install MariaDB (apt install mariadb-server)")
}

/// A MariaDB program, from the usual places.
fn binary(name: &str) -> Result<PathBuf> {
    os::find_program(
        name,
        &["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"],
        "install MariaDB's server and client (apt install mariadb-server mariadb-client)",
    )
}

/// A path spliced into my.cnf: option files have no quoting that `!include`
/// honours, so a path must not need any.
fn check_cnf_path(p: &Path) -> Result<()> {
    let s = p.to_string_lossy();
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || "\"'\\#;".contains(c))
    {
        bail!(
            "{s:?}: the state directory's path must not contain spaces, quotes, backslashes, \
             '#' or ';' (MariaDB's option files cannot quote it)"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// SQL text: quoting, GTIDs, and the statements that differ by flavour.
// ---------------------------------------------------------------------------

/// A single-quoted SQL string literal. The agent's sessions never run with
/// NO_BACKSLASH_ESCAPES (see [`AGENT_SQL_MODE`]), so backslashes escape.
pub fn sql_string(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\'' => s.push_str("\\'"),
            '\0' => s.push_str("\\0"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\x1a' => s.push_str("\\Z"),
            c => s.push(c),
        }
    }
    s.push('\'');
    s
}

/// A back-quoted identifier.
pub fn quote_ident(v: &str) -> String {
    format!("`{}`", v.replace('`', "``"))
}

/// `'user'@'host'`.
pub fn account_name(user: &str, host: &str) -> String {
    format!("{}@{}", sql_string(user), sql_string(host))
}

/// One MariaDB GTID: replication domain, originating server, sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl std::fmt::Display for Gtid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

/// Parses a GTID position such as `@@gtid_binlog_pos`: `"0-1-100,1-2-5"`,
/// or `""` for none.
pub fn parse_gtid_list(s: &str) -> Result<Vec<Gtid>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut it = p.splitn(3, '-');
            let (Some(d), Some(sv), Some(n)) = (it.next(), it.next(), it.next()) else {
                return Err(format!("{p:?} is not a GTID (domain-server-sequence)"));
            };
            Ok(Gtid {
                domain: d.parse().map_err(|_| format!("{p:?}: bad domain"))?,
                server: sv.parse().map_err(|_| format!("{p:?}: bad server id"))?,
                seq: n
                    .parse()
                    .map_err(|_| format!("{p:?}: bad sequence number"))?,
            })
        })
        .collect()
}

pub fn format_gtids(gtids: &[Gtid]) -> String {
    gtids
        .iter()
        .map(Gtid::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The latest GTID of `domain` in a position (the one with the highest
/// sequence number: strict mode keeps them increasing).
pub fn last_in_domain(gtids: &[Gtid], domain: u32) -> Option<Gtid> {
    gtids
        .iter()
        .filter(|g| g.domain == domain)
        .max_by_key(|g| g.seq)
        .copied()
}

/// The sequence number of domain 0 in a position; 0 when absent or unreadable.
pub fn domain0_seq(pos: &str) -> u64 {
    parse_gtid_list(pos)
        .ok()
        .and_then(|g| last_in_domain(&g, 0))
        .map(|g| g.seq)
        .unwrap_or(0)
}

/// MySQL's position: the number of transactions in a GTID set
/// (`uuid:1-5:7,uuid2:1-3` holds 9). Without errant transactions it grows
/// across failovers, as MariaDB's domain sequence number does.
pub fn gtid_set_count(s: &str) -> u64 {
    let mut n = 0u64;
    for member in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        // uuid[:tag]:interval[:interval...]; a tag does not parse as one.
        for iv in member.split(':').skip(1) {
            let iv = iv.trim();
            match iv.split_once('-') {
                Some((a, b)) => {
                    if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                        n += b.saturating_sub(a) + 1;
                    }
                }
                None => {
                    if iv.parse::<u64>().is_ok() {
                        n += 1;
                    }
                }
            }
        }
    }
    n
}

/// Whether `own` (a stopped node's binlog position) holds transactions the
/// upstream, at position `upstream`, does not.
#[derive(Debug, PartialEq, Eq)]
pub enum Containment {
    /// Every transaction of ours is the upstream's last or before it.
    Contained,
    /// These are ours only.
    Diverged(Vec<Gtid>),
    /// Ours are behind the upstream's position: whether the upstream's
    /// binlog holds these very GTIDs (and not others with the same
    /// sequence numbers) only its binlog can tell.
    Unknown(Vec<Gtid>),
}

pub fn containment(own: &[Gtid], upstream: &[Gtid]) -> Containment {
    let mut diverged = Vec::new();
    let mut unknown = Vec::new();
    let mut domains: Vec<u32> = own.iter().map(|g| g.domain).collect();
    domains.dedup();
    for d in domains {
        let Some(ours) = last_in_domain(own, d) else {
            continue;
        };
        match last_in_domain(upstream, d) {
            None => diverged.push(ours),
            Some(theirs) if ours.seq > theirs.seq => diverged.push(ours),
            Some(theirs) if ours.seq == theirs.seq && ours.server != theirs.server => {
                diverged.push(ours)
            }
            Some(theirs) if ours.seq == theirs.seq => {}
            Some(_) => unknown.push(ours),
        }
    }
    if !diverged.is_empty() {
        Containment::Diverged(diverged)
    } else if !unknown.is_empty() {
        Containment::Unknown(unknown)
    } else {
        Containment::Contained
    }
}

/// A server_id from the node id (FNV-1a), never 0.
pub fn server_id(node_id: &str) -> u32 {
    let h = node_id.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x01000193)
    });
    h.max(1)
}

/// The server dialect: MariaDB, or MySQL 8 where its statements differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavour {
    #[default]
    Mariadb,
    Mysql,
}

/// A column of `SHOW SLAVE STATUS` / `SHOW REPLICA STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Host,
    Port,
    User,
    IoRunning,
    SqlRunning,
    /// The last transaction received.
    Received,
    /// Whether the position is a GTID one.
    GtidMode,
    /// The upstream's binary log file being read.
    SourceLogFile,
    LastIoErrno,
    LastIoError,
    LastSqlErrno,
    LastSqlError,
    SslAllowed,
}

/// A semi-synchronous replication variable (lower case) or status (capitalised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SemiSync {
    SourceEnabled,
    SourceWaitPoint,
    SourceTimeout,
    ReplicaEnabled,
    SourceClients,
    SourceStatus,
}

/// How a user authenticates, as a statement gives it.
pub enum Credential<'a> {
    /// MariaDB's mysql_native_password hash (`*` and 40 hex digits): the
    /// password itself never reaches the server or its binary log.
    NativeHash(&'a str),
    Plain(&'a str),
}

impl Flavour {
    pub fn detect(version: &str) -> Flavour {
        if version.to_ascii_lowercase().contains("mariadb") {
            Flavour::Mariadb
        } else {
            Flavour::Mysql
        }
    }

    /// Points replication at `host:port` by GTID, retrying every second.
    /// Over TLS, verified against the CA in `ca`, when given (see
    /// mariadb_tls.rs).
    pub fn change_source(
        self,
        host: &str,
        port: u16,
        user: &str,
        password: &str,
        ca: Option<&Path>,
    ) -> String {
        let (h, u, p) = (sql_string(host), sql_string(user), sql_string(password));
        let ca = ca.map(|c| sql_string(&c.to_string_lossy()));
        match (self, ca) {
            (Flavour::Mariadb, None) => format!(
                "CHANGE MASTER TO MASTER_HOST={h}, MASTER_PORT={port}, MASTER_USER={u}, \
                 MASTER_PASSWORD={p}, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1"
            ),
            (Flavour::Mariadb, Some(ca)) => format!(
                "CHANGE MASTER TO MASTER_HOST={h}, MASTER_PORT={port}, MASTER_USER={u}, \
                 MASTER_PASSWORD={p}, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1, \
                 MASTER_SSL=1, MASTER_SSL_CA={ca}, MASTER_SSL_VERIFY_SERVER_CERT=0"
            ),
            (Flavour::Mysql, None) => format!(
                "CHANGE REPLICATION SOURCE TO SOURCE_HOST={h}, SOURCE_PORT={port}, SOURCE_USER={u}, \
                 SOURCE_PASSWORD={p}, SOURCE_AUTO_POSITION=1, SOURCE_CONNECT_RETRY=1, \
                 GET_SOURCE_PUBLIC_KEY=1"
            ),
            (Flavour::Mysql, Some(ca)) => format!(
                "CHANGE REPLICATION SOURCE TO SOURCE_HOST={h}, SOURCE_PORT={port}, SOURCE_USER={u}, \
                 SOURCE_PASSWORD={p}, SOURCE_AUTO_POSITION=1, SOURCE_CONNECT_RETRY=1, \
                 SOURCE_SSL=1, SOURCE_SSL_CA={ca}, SOURCE_SSL_VERIFY_SERVER_CERT=0"
            ),
        }
    }

    pub fn start_replica(self) -> &'static str {
        match self {
            Flavour::Mariadb => "START SLAVE",
            Flavour::Mysql => "START REPLICA",
        }
    }

    pub fn stop_replica(self) -> &'static str {
        match self {
            Flavour::Mariadb => "STOP SLAVE",
            Flavour::Mysql => "STOP REPLICA",
        }
    }

    pub fn stop_replica_io(self) -> &'static str {
        match self {
            Flavour::Mariadb => "STOP SLAVE IO_THREAD",
            Flavour::Mysql => "STOP REPLICA IO_THREAD",
        }
    }

    pub fn start_replica_io(self) -> &'static str {
        match self {
            Flavour::Mariadb => "START SLAVE IO_THREAD",
            Flavour::Mysql => "START REPLICA IO_THREAD",
        }
    }

    pub fn reset_replica_all(self) -> &'static str {
        match self {
            Flavour::Mariadb => "RESET SLAVE ALL",
            Flavour::Mysql => "RESET REPLICA ALL",
        }
    }

    pub fn replica_status(self) -> &'static str {
        match self {
            Flavour::Mariadb => "SHOW SLAVE STATUS",
            Flavour::Mysql => "SHOW REPLICA STATUS",
        }
    }

    /// Lists the replicas registered with this server (column `Host`).
    pub fn replica_hosts(self) -> &'static str {
        match self {
            Flavour::Mariadb => "SHOW SLAVE HOSTS",
            Flavour::Mysql => "SHOW REPLICAS",
        }
    }

    /// The variable that stops writes from everyone but replication.
    /// MariaDB's `read_only` binds every account without READ_ONLY ADMIN
    /// (the admin user's is revoked); MySQL's binds SUPER only with
    /// `super_read_only`.
    pub fn read_only_variable(self) -> &'static str {
        match self {
            Flavour::Mariadb => "read_only",
            Flavour::Mysql => "super_read_only",
        }
    }

    pub fn set_read_only(self, on: bool) -> String {
        match (self, on) {
            (Flavour::Mariadb, true) => "SET GLOBAL read_only = ON".into(),
            (Flavour::Mariadb, false) => "SET GLOBAL read_only = OFF".into(),
            // super_read_only=ON implies read_only=ON.
            (Flavour::Mysql, true) => "SET GLOBAL super_read_only = ON".into(),
            (Flavour::Mysql, false) => {
                "SET GLOBAL super_read_only = OFF, GLOBAL read_only = OFF".into()
            }
        }
    }

    pub fn column(self, c: Column) -> &'static str {
        use Column::*;
        match (self, c) {
            (Flavour::Mariadb, Host) => "Master_Host",
            (Flavour::Mariadb, Port) => "Master_Port",
            (Flavour::Mariadb, User) => "Master_User",
            (Flavour::Mariadb, IoRunning) => "Slave_IO_Running",
            (Flavour::Mariadb, SqlRunning) => "Slave_SQL_Running",
            (Flavour::Mariadb, Received) => "Gtid_IO_Pos",
            (Flavour::Mariadb, GtidMode) => "Using_Gtid",
            (Flavour::Mariadb, SourceLogFile) => "Master_Log_File",
            (Flavour::Mysql, Host) => "Source_Host",
            (Flavour::Mysql, Port) => "Source_Port",
            (Flavour::Mysql, User) => "Source_User",
            (Flavour::Mysql, IoRunning) => "Replica_IO_Running",
            (Flavour::Mysql, SqlRunning) => "Replica_SQL_Running",
            (Flavour::Mysql, Received) => "Retrieved_Gtid_Set",
            (Flavour::Mysql, GtidMode) => "Auto_Position",
            (Flavour::Mysql, SourceLogFile) => "Source_Log_File",
            (Flavour::Mariadb, SslAllowed) => "Master_SSL_Allowed",
            (Flavour::Mysql, SslAllowed) => "Source_SSL_Allowed",
            (_, LastIoErrno) => "Last_IO_Errno",
            (_, LastIoError) => "Last_IO_Error",
            (_, LastSqlErrno) => "Last_SQL_Errno",
            (_, LastSqlError) => "Last_SQL_Error",
        }
    }

    /// Whether the GtidMode column says replication positions by GTID.
    pub fn uses_gtid(self, value: &str) -> bool {
        match self {
            Flavour::Mariadb => value.eq_ignore_ascii_case("Slave_Pos"),
            Flavour::Mysql => value.trim() == "1",
        }
    }

    pub fn semi_sync(self, v: SemiSync) -> &'static str {
        use SemiSync::*;
        match (self, v) {
            (Flavour::Mariadb, SourceEnabled) => "rpl_semi_sync_master_enabled",
            (Flavour::Mariadb, SourceWaitPoint) => "rpl_semi_sync_master_wait_point",
            (Flavour::Mariadb, SourceTimeout) => "rpl_semi_sync_master_timeout",
            (Flavour::Mariadb, ReplicaEnabled) => "rpl_semi_sync_slave_enabled",
            (Flavour::Mariadb, SourceClients) => "Rpl_semi_sync_master_clients",
            (Flavour::Mariadb, SourceStatus) => "Rpl_semi_sync_master_status",
            (Flavour::Mysql, SourceEnabled) => "rpl_semi_sync_source_enabled",
            (Flavour::Mysql, SourceWaitPoint) => "rpl_semi_sync_source_wait_point",
            (Flavour::Mysql, SourceTimeout) => "rpl_semi_sync_source_timeout",
            (Flavour::Mysql, ReplicaEnabled) => "rpl_semi_sync_replica_enabled",
            (Flavour::Mysql, SourceClients) => "Rpl_semi_sync_source_clients",
            (Flavour::Mysql, SourceStatus) => "Rpl_semi_sync_source_status",
        }
    }

    /// `SET GLOBAL <semi-sync variable> = value`.
    pub fn set_semi_sync(self, v: SemiSync, value: &str) -> String {
        format!("SET GLOBAL {} = {value}", self.semi_sync(v))
    }

    /// A clean shutdown that first sends every connected replica the
    /// binary log it has not received (MariaDB; MySQL has no such wait).
    pub fn shutdown(self) -> &'static str {
        match self {
            Flavour::Mariadb => "SHUTDOWN WAIT FOR ALL SLAVES",
            Flavour::Mysql => "SHUTDOWN",
        }
    }

    /// (what this server has written, what it applied as a replica).
    pub fn positions_query(self) -> &'static str {
        match self {
            Flavour::Mariadb => "SELECT @@gtid_binlog_pos, @@gtid_slave_pos",
            Flavour::Mysql => "SELECT @@gtid_executed, @@gtid_executed",
        }
    }

    /// A position as the u64 reported upward.
    pub fn position(self, text: &str) -> u64 {
        match self {
            Flavour::Mariadb => domain0_seq(text),
            Flavour::Mysql => gtid_set_count(text),
        }
    }

    /// Waits (up to `secs`) until a replica applied `pos`; 0 when it has.
    pub fn wait_applied(self, pos: &str, secs: u32) -> String {
        match self {
            Flavour::Mariadb => format!("SELECT MASTER_GTID_WAIT({}, {secs})", sql_string(pos)),
            Flavour::Mysql => {
                format!(
                    "SELECT WAIT_FOR_EXECUTED_GTID_SET({}, {secs})",
                    sql_string(pos)
                )
            }
        }
    }

    /// Creates `account` if missing, then sets its password.
    pub fn user_statements(self, account: &str, cred: &Credential) -> Vec<String> {
        let ident = match cred {
            Credential::NativeHash(h) => format!("IDENTIFIED BY PASSWORD {}", sql_string(h)),
            Credential::Plain(p) => format!("IDENTIFIED BY {}", sql_string(p)),
        };
        vec![
            format!("CREATE USER IF NOT EXISTS {account} {ident}"),
            format!("ALTER USER {account} {ident}"),
        ]
    }

    /// The cluster's admin: every privilege, except (MariaDB) writing on a
    /// read-only server, so the fence and a replica's read_only bind it.
    pub fn admin_grants(self, account: &str) -> Vec<String> {
        let mut v = vec![format!(
            "GRANT ALL PRIVILEGES ON *.* TO {account} WITH GRANT OPTION"
        )];
        if self == Flavour::Mariadb {
            v.push(format!("REVOKE READ_ONLY ADMIN ON *.* FROM {account}"));
        }
        v
    }

    /// Streaming, and what a logical clone (mariadb-dump) needs.
    pub fn replication_grants(self, account: &str) -> String {
        let privs = match self {
            Flavour::Mariadb => {
                "REPLICATION SLAVE, BINLOG MONITOR, SELECT, SHOW VIEW, TRIGGER, EVENT, \
                 LOCK TABLES, RELOAD, EXECUTE"
            }
            Flavour::Mysql => {
                "REPLICATION SLAVE, REPLICATION CLIENT, SELECT, SHOW VIEW, TRIGGER, EVENT, \
                 LOCK TABLES, RELOAD, EXECUTE, PROCESS"
            }
        };
        format!("GRANT {privs} ON *.* TO {account}")
    }
}

// ---------------------------------------------------------------------------
// The binary log of a stopped server.
// ---------------------------------------------------------------------------

const FORMAT_DESCRIPTION_EVENT: u8 = 15;
const GTID_EVENT: u8 = 162;
const GTID_LIST_EVENT: u8 = 163;
const START_ENCRYPTION_EVENT: u8 = 164;
/// Set in the first event's header while the server has the file open.
const LOG_EVENT_BINLOG_IN_USE_F: u16 = 0x1;

/// What the end of a binary log file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogTail {
    /// The last GTID of each domain (what `@@gtid_binlog_pos` would say).
    pub gtids: Vec<Gtid>,
    /// The server closed the file (a clean shutdown), not a crash.
    pub closed_cleanly: bool,
}

/// Reads as many bytes as there are, up to `buf.len()`.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Walks a MariaDB binary log file event by event (headers only, plus the
/// GTID events' bodies): its GTID list at the start, then each GTID. A
/// truncated last event (a crash) ends the walk.
pub fn scan_binlog<R: Read + Seek>(mut r: R) -> std::io::Result<BinlogTail> {
    use std::io::{Error, ErrorKind};
    let mut magic = [0u8; 4];
    if read_full(&mut r, &mut magic)? < 4 || magic != *b"\xfebin" {
        return Err(Error::new(ErrorKind::InvalidData, "not a binary log"));
    }
    let mut last: BTreeMap<u32, Gtid> = BTreeMap::new();
    let mut closed_cleanly = false;
    let mut first = true;
    loop {
        let mut h = [0u8; 19];
        if read_full(&mut r, &mut h)? < 19 {
            break;
        }
        let kind = h[4];
        let server = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
        let len = u32::from_le_bytes([h[9], h[10], h[11], h[12]]) as u64;
        let flags = u16::from_le_bytes([h[17], h[18]]);
        if len < 19 {
            break;
        }
        if first {
            first = false;
            closed_cleanly =
                kind == FORMAT_DESCRIPTION_EVENT && flags & LOG_EVENT_BINLOG_IN_USE_F == 0;
        }
        let body = len - 19;
        let mut read = 0u64;
        match kind {
            GTID_EVENT => {
                let mut b = [0u8; 12];
                if body < 12 || read_full(&mut r, &mut b)? < 12 {
                    break;
                }
                read = 12;
                let seq = u64::from_le_bytes(b[0..8].try_into().unwrap_or_default());
                let domain = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
                last.insert(
                    domain,
                    Gtid {
                        domain,
                        server,
                        seq,
                    },
                );
            }
            GTID_LIST_EVENT => {
                let mut c = [0u8; 4];
                if body < 4 || read_full(&mut r, &mut c)? < 4 {
                    break;
                }
                let count = (u32::from_le_bytes(c) & 0x0fff_ffff) as u64;
                if body < 4 + 16 * count {
                    break;
                }
                read = 4 + 16 * count;
                for _ in 0..count {
                    let mut e = [0u8; 16];
                    if read_full(&mut r, &mut e)? < 16 {
                        return Ok(BinlogTail {
                            gtids: last.into_values().collect(),
                            closed_cleanly: false,
                        });
                    }
                    let g = Gtid {
                        domain: u32::from_le_bytes(e[0..4].try_into().unwrap_or_default()),
                        server: u32::from_le_bytes(e[4..8].try_into().unwrap_or_default()),
                        seq: u64::from_le_bytes(e[8..16].try_into().unwrap_or_default()),
                    };
                    // The list holds each server's last GTID per domain;
                    // the domain's last is the highest (strict mode).
                    if last.get(&g.domain).is_none_or(|l| l.seq <= g.seq) {
                        last.insert(g.domain, g);
                    }
                }
            }
            START_ENCRYPTION_EVENT => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "the binary log is encrypted; its position cannot be read without the server",
                ));
            }
            _ => {}
        }
        r.seek_relative((body - read) as i64)?;
    }
    Ok(BinlogTail {
        gtids: last.into_values().collect(),
        closed_cleanly,
    })
}

/// The tail of the newest binary log in `data`; None without a binary log.
fn read_binlog_tail(data: &Path) -> Result<Option<BinlogTail>> {
    let index = data.join(format!("{BINLOG}.index"));
    let text = match std::fs::read_to_string(&index) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", index.display())),
    };
    let Some(last) = text.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let path = data.join(last);
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let t = scan_binlog(std::io::BufReader::with_capacity(64 * 1024, f))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(t))
}

// ---------------------------------------------------------------------------
// The configuration file.
// ---------------------------------------------------------------------------

/// What my.cnf (or a temporary server's configuration) is written from.
struct ServerConfig<'a> {
    datadir: &'a Path,
    tmpdir: &'a Path,
    socket: &'a Path,
    pid_file: &'a Path,
    port: u16,
    server_id: u32,
    report_host: &'a str,
    /// Read-only from the start: a replica, or data not yet promoted.
    read_only: bool,
    /// Commits wait for one replica's acknowledgement.
    semi_sync_master: bool,
    /// A temporary server (clone, rejoin): no network, no fence.
    temp: bool,
    fence: &'a Path,
}

fn render_config(c: &ServerConfig) -> String {
    let on = |b: bool| if b { "ON" } else { "OFF" };
    let mut s = format!(
        "# Written by corral-agent from the cluster's spec; edits here are overwritten.\n\
         # The server reads this file alone (--defaults-file): nothing from /etc/mysql.\n\
         [mariadbd]\n\
         datadir = {datadir}\n\
         tmpdir = {tmpdir}\n\
         socket = {socket}\n\
         pid_file = {pid}\n\
         port = {port}\n",
        datadir = c.datadir.display(),
        tmpdir = c.tmpdir.display(),
        socket = c.socket.display(),
        pid = c.pid_file.display(),
        port = c.port,
    );
    if c.temp {
        s.push_str("skip_networking = ON\n");
    } else {
        s.push_str("# Every address, IPv4 and IPv6.\nbind_address = *\n");
    }
    s.push_str(&format!(
        "skip_name_resolve = ON\n\
         character_set_server = utf8mb4\n\
         collation_server = utf8mb4_general_ci\n\
         max_allowed_packet = 64M\n\
         # Durability: a commit is on disk, in the engine and in the binary log.\n\
         innodb_buffer_pool_size = 128M\n\
         innodb_flush_log_at_trx_commit = 1\n\
         sync_binlog = 1\n\
         # Replication by GTID, domain 0 only, strictly increasing sequence numbers:\n\
         # positions compare across the whole cluster.\n\
         server_id = {server_id}\n\
         log_bin = {BINLOG}\n\
         log_bin_index = {BINLOG}.index\n\
         relay_log = relay-bin\n\
         relay_log_index = relay-bin.index\n\
         relay_log_recovery = ON\n\
         log_slave_updates = ON\n\
         binlog_format = ROW\n\
         gtid_strict_mode = ON\n\
         gtid_domain_id = 0\n\
         binlog_expire_logs_seconds = 604800\n\
         max_binlog_size = 256M\n\
         # The agent starts replication once it has pointed it at the right upstream.\n\
         skip_slave_start = ON\n\
         slave_net_timeout = 10\n\
         read_only = {read_only}\n\
         # Semi-synchronous replication: a replica acknowledges what it received;\n\
         # a primary in synchronous mode waits for one acknowledgement, forever.\n\
         rpl_semi_sync_slave_enabled = {semi_replica}\n\
         rpl_semi_sync_master_enabled = {semi}\n\
         rpl_semi_sync_master_wait_point = AFTER_SYNC\n\
         rpl_semi_sync_master_timeout = {SEMI_SYNC_TIMEOUT_MS}\n\
         rpl_semi_sync_master_wait_no_slave = ON\n",
        server_id = c.server_id,
        read_only = on(c.read_only),
        // A temporary server's replication (rejoin's check) must not
        // acknowledge what it then throws away.
        semi_replica = on(!c.temp),
        semi = on(c.semi_sync_master && !c.temp),
    ));
    if !c.temp {
        // How the upstream names this replica (SHOW SLAVE HOSTS); a
        // temporary server stays anonymous.
        s.push_str(&format!("report_host = {}\n", c.report_host));
        s.push_str(&format!(
            "# The fence (read_only while this primary holds no lease); skipped when absent.\n\
             !include {}\n",
            c.fence.display()
        ));
    }
    s
}

/// Whether a spec's primary waits for a replica at each commit.
fn wants_semi_sync(spec: &EngineSpec) -> bool {
    spec.role == "primary" && spec.sync && !spec.replicas.is_empty()
}

// ---------------------------------------------------------------------------
// What a running server reports, and what to change: pure.
// ---------------------------------------------------------------------------

/// The replication threads as `SHOW SLAVE STATUS` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ReplicaStatus {
    host: String,
    port: u16,
    user: String,
    io_running: String,
    sql_running: String,
    received: String,
    gtid_mode: String,
    source_log_file: String,
    last_io_errno: u32,
    last_io_error: String,
    last_sql_errno: u32,
    last_sql_error: String,
    /// Seconds_Behind_Master (MySQL 8: _Source); empty (NULL) while the
    /// replica is not replicating.
    seconds_behind: String,
    /// Master_SSL_Allowed (MySQL 8: Source_): "Yes" when replication was
    /// pointed over TLS.
    ssl_allowed: String,
}

impl ReplicaStatus {
    fn streaming(&self) -> bool {
        self.io_running == "Yes" && self.sql_running == "Yes"
    }
}

/// One look at a running server.
#[derive(Debug, Clone, Default)]
struct Observed {
    flavour: Flavour,
    version: String,
    binlog_pos: String,
    applied_pos: String,
    read_only: bool,
    replica: Option<ReplicaStatus>,
    /// Primary: the replicas registered with it (their report_host).
    replica_hosts: Vec<String>,
    semi_source_enabled: bool,
    semi_source_active: bool,
    semi_clients: u64,
    semi_wait_point: String,
    semi_timeout: String,
    semi_replica_enabled: bool,
    /// Threads_connected: client connections, the agent's own included.
    connections: Option<u64>,
}

/// The replication report of one observation; `standby`: the data is
/// marked a replica's.
fn replication_report(o: &Observed, standby: bool) -> pb::Replication {
    let f = o.flavour;
    let written = f.position(&o.binlog_pos);
    let in_recovery = standby || o.replica.is_some();
    let mut r = pb::Replication {
        in_recovery,
        synchronous_standby_names: if o.semi_source_enabled {
            "semi-sync".into()
        } else {
            String::new()
        },
        ..Default::default()
    };
    if in_recovery {
        // Everything applied is in the binary log too (log_slave_updates),
        // and a former primary's own writes are only there.
        r.lsn = written.max(f.position(&o.applied_pos));
        if let Some(s) = &o.replica {
            r.receive_lsn = f.position(&s.received).max(r.lsn);
            r.streaming = s.streaming();
            r.upstream_host = s.host.clone();
            // MariaDB tells a replica nothing of its primary's position
            // beyond what it sent: what was received is a lower bound.
            r.upstream_lsn = r.receive_lsn;
        } else {
            r.receive_lsn = r.lsn;
        }
    } else {
        r.lsn = written;
        let sync_state = if !o.semi_source_enabled {
            "async"
        } else if o.semi_source_active && o.semi_clients >= o.replica_hosts.len() as u64 {
            // Any one acknowledgement releases a commit: ANY 1 of them.
            "quorum"
        } else {
            "potential"
        };
        r.standbys = o
            .replica_hosts
            .iter()
            .map(|h| pb::Standby {
                name: h.clone(),
                state: "streaming".into(),
                sync_state: sync_state.into(),
                // MariaDB keeps no per-replica positions on the primary.
                ..Default::default()
            })
            .collect();
    }
    r
}

/// A change that brings a running server to its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Stop replication, point it at the upstream, start it.
    Follow(Upstream),
    /// Replication is set up but not running.
    StartReplication,
    /// A primary follows nobody.
    ForgetUpstream,
    SetReadOnly(bool),
}

/// What to change so the server matches `spec`. Only when the data's marker
/// (`standby`) agrees with the spec's role: a replica whose promotion is
/// under way, or a primary not yet rejoined, is left alone.
fn plan(o: &Observed, spec: &EngineSpec, standby: bool, fenced: bool) -> Vec<Action> {
    let mut actions = Vec::new();
    match (spec.role.as_str(), standby, &spec.upstream) {
        ("replica", true, Some(up)) => {
            let pointed = o.replica.as_ref().is_some_and(|s| {
                s.host == up.host
                    && s.port == up.port
                    && s.user == REPLICATION_USER
                    && o.flavour.uses_gtid(&s.gtid_mode)
            });
            if !pointed {
                actions.push(Action::Follow(up.clone()));
            } else if let Some(s) = &o.replica {
                let stopped = s.io_running == "No" || s.sql_running == "No";
                // An SQL error means the data disagrees with the stream:
                // restarting does not help, a rejoin or resync does.
                if stopped && s.last_sql_errno == 0 {
                    actions.push(Action::StartReplication);
                }
            }
            if !o.read_only {
                actions.push(Action::SetReadOnly(true));
            }
        }
        ("primary", false, _) => {
            if o.replica.is_some() {
                actions.push(Action::ForgetUpstream);
            }
            if o.read_only != fenced {
                actions.push(Action::SetReadOnly(fenced));
            }
        }
        _ => {}
    }
    actions
}

// ---------------------------------------------------------------------------
// Talking to servers.
// ---------------------------------------------------------------------------

fn text(row: &mysql_async::Row, name: &str) -> String {
    match row.get_opt::<Option<String>, &str>(name) {
        Some(Ok(Some(s))) => s,
        _ => String::new(),
    }
}

fn number<T: std::str::FromStr + Default>(row: &mysql_async::Row, name: &str) -> T {
    text(row, name).trim().parse().unwrap_or_default()
}

/// `SHOW GLOBAL VARIABLES|STATUS LIKE pattern`, names lower-cased.
async fn show(conn: &mut mysql_async::Conn, what: &str) -> Result<BTreeMap<String, String>> {
    let rows: Vec<(String, String)> = conn.query(what).await?;
    Ok(rows
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect())
}

async fn replica_status(a: &mut Admin) -> Result<Option<ReplicaStatus>> {
    let f = a.flavour;
    let row: Option<mysql_async::Row> = a
        .conn
        .query_first(f.replica_status())
        .await
        .with_context(|| f.replica_status())?;
    Ok(row.map(|row| ReplicaStatus {
        host: text(&row, f.column(Column::Host)),
        port: number(&row, f.column(Column::Port)),
        user: text(&row, f.column(Column::User)),
        io_running: text(&row, f.column(Column::IoRunning)),
        sql_running: text(&row, f.column(Column::SqlRunning)),
        received: text(&row, f.column(Column::Received)),
        gtid_mode: text(&row, f.column(Column::GtidMode)),
        source_log_file: text(&row, f.column(Column::SourceLogFile)),
        last_io_errno: number(&row, f.column(Column::LastIoErrno)),
        last_io_error: text(&row, f.column(Column::LastIoError)),
        last_sql_errno: number(&row, f.column(Column::LastSqlErrno)),
        last_sql_error: text(&row, f.column(Column::LastSqlError)),
        ssl_allowed: text(&row, f.column(Column::SslAllowed)),
        seconds_behind: ["Seconds_Behind_Master", "Seconds_Behind_Source"]
            .iter()
            .map(|c| text(&row, c))
            .find(|v| !v.is_empty())
            .unwrap_or_default(),
    }))
}

/// The figures of one observation (from the queries `observe` already
/// ran): connections, a replica's lag in seconds as the server measures
/// it (absent while it is not replicating), and the GTID sequence number
/// `lsn` of the replication report.
fn engine_stats(o: &Observed, lsn: u64) -> BTreeMap<String, f64> {
    let mut stats = BTreeMap::new();
    if let Some(n) = o.connections {
        stats.insert("connections".to_string(), n as f64);
    }
    let behind = o
        .replica
        .as_ref()
        .and_then(|r| r.seconds_behind.trim().parse().ok());
    if let Some(s) = behind {
        stats.insert("lag_seconds".to_string(), s);
    }
    stats.insert("gtid_seq".to_string(), lsn as f64);
    stats
}

async fn observe(a: &mut Admin) -> Result<Observed> {
    let f = a.flavour;
    let (binlog_pos, applied_pos): (Option<String>, Option<String>) = a
        .conn
        .query_first(f.positions_query())
        .await?
        .unwrap_or_default();
    let read_only: Option<i64> = a
        .conn
        .query_first(format!("SELECT @@{}", f.read_only_variable()))
        .await?;
    let replica = replica_status(a).await?;
    let hosts: Vec<mysql_async::Row> = a.conn.query(f.replica_hosts()).await?;
    let vars = show(&mut a.conn, "SHOW GLOBAL VARIABLES LIKE 'rpl_semi_sync%'").await?;
    let status = show(
        &mut a.conn,
        "SHOW GLOBAL STATUS WHERE Variable_name LIKE 'rpl_semi_sync%' \
         OR Variable_name = 'Threads_connected'",
    )
    .await?;
    let get = |m: &BTreeMap<String, String>, v: SemiSync| {
        m.get(&f.semi_sync(v).to_ascii_lowercase())
            .cloned()
            .unwrap_or_default()
    };
    Ok(Observed {
        flavour: f,
        version: a.version.clone(),
        binlog_pos: binlog_pos.unwrap_or_default(),
        applied_pos: applied_pos.unwrap_or_default(),
        read_only: read_only.unwrap_or(0) != 0,
        replica,
        replica_hosts: hosts
            .iter()
            .map(|r| text(r, "Host"))
            .filter(|h| !h.is_empty())
            .collect(),
        semi_source_enabled: get(&vars, SemiSync::SourceEnabled) == "ON",
        semi_source_active: get(&status, SemiSync::SourceStatus) == "ON",
        semi_clients: get(&status, SemiSync::SourceClients).parse().unwrap_or(0),
        semi_wait_point: get(&vars, SemiSync::SourceWaitPoint),
        semi_timeout: get(&vars, SemiSync::SourceTimeout),
        semi_replica_enabled: get(&vars, SemiSync::ReplicaEnabled) == "ON",
        connections: status.get("threads_connected").and_then(|v| v.parse().ok()),
    })
}

async fn connect_socket(socket: &Path) -> Result<Admin> {
    let opts = mysql_async::OptsBuilder::default()
        .socket(Some(socket.to_string_lossy().into_owned()))
        .user(Some("root"))
        .prefer_socket(true)
        .init(vec![format!("SET SESSION sql_mode = '{AGENT_SQL_MODE}'")]);
    let mut conn = tokio::time::timeout(QUERY_TIMEOUT, mysql_async::Conn::new(opts))
        .await
        .map_err(|_| anyhow!("connecting to {} timed out after 5 s", socket.display()))?
        .with_context(|| format!("connecting to {} as root", socket.display()))?;
    let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
    let version = version.unwrap_or_default();
    Ok(Admin {
        flavour: Flavour::detect(&version),
        version,
        conn,
    })
}

/// A TCP session with `up` as the replication user.
/// Over TLS when `ca` is given (the replication account requires it then).
async fn connect_upstream(
    up: &Upstream,
    password: &str,
    ca: Option<&Path>,
) -> Result<mysql_async::Conn> {
    let opts = mysql_async::OptsBuilder::default()
        .ssl_opts(ca.map(tls::client_opts))
        .ip_or_hostname(up.host.clone())
        .tcp_port(up.port)
        .user(Some(REPLICATION_USER))
        .pass(Some(password.to_string()))
        // Not the upstream's socket, even on this very machine.
        .prefer_socket(false)
        .init(vec![format!("SET SESSION sql_mode = '{AGENT_SQL_MODE}'")]);
    tokio::time::timeout(QUERY_TIMEOUT, mysql_async::Conn::new(opts))
        .await
        .map_err(|_| anyhow!("connecting to {}:{} timed out after 5 s", up.host, up.port))?
        .with_context(|| {
            format!(
                "connecting to {} ({}:{}) as {REPLICATION_USER}",
                up.node, up.host, up.port
            )
        })
}

/// A server started by the driver for one step (clone, rejoin): no
/// network, no replication, its own socket; killed if dropped running.
struct TempServer {
    child: tokio::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl TempServer {
    async fn connect(&self) -> Result<Admin> {
        connect_socket(&self.socket).await
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!(
                "the temporary server exited with {status}; see {}:\n{}",
                self.log.display(),
                log_tail(&self.log, TAIL_LINES)
            ),
            Ok(Err(e)) => Err(e).context("waiting for the temporary server"),
            Err(_) => bail!(
                "the temporary server did not stop within {} s; see {}",
                STOP_TIMEOUT.as_secs(),
                self.log.display()
            ),
        }
    }
}

impl Drop for TempServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.start_kill();
        }
    }
}

impl Mariadb {
    /// A driver keeping its files under `<state_dir>/mariadb/`.
    pub fn new(state_dir: &Path, node_id: &str) -> Mariadb {
        Mariadb {
            base: state_dir.join("mariadb"),
            node_id: node_id.to_string(),
            conn: tokio::sync::Mutex::new(None),
            desired: std::sync::Mutex::new(None),
            restarted_replication: std::sync::Mutex::new(None),
            tls: Default::default(),
        }
    }

    /// Serves TLS, and replicates over it, with the certificate `tls`
    /// holds (see mariadb_tls.rs).
    pub fn with_tls(mut self, tls: std::sync::Arc<super::tls::EngineTls>) -> Mariadb {
        self.tls = tls;
        self
    }

    /// The server's copy of the node's certificate, if it has one.
    fn tls_files(&self) -> Option<super::tls::TlsFiles> {
        self.tls.files_in(&self.base)
    }

    /// CHANGE MASTER to `up` as the replication user, over TLS when this
    /// node has a certificate.
    fn point_at(&self, f: Flavour, up: &Upstream, password: &str) -> String {
        f.change_source(
            &up.host,
            up.port,
            REPLICATION_USER,
            password,
            self.tls_ca().as_deref(),
        )
    }

    /// The CA a replica verifies its upstream with, if TLS is on.
    fn tls_ca(&self) -> Option<PathBuf> {
        self.tls_files().map(|f| f.ca())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.base.join("tmp")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.run_dir().join("mariadbd.sock")
    }

    fn pid_path(&self) -> PathBuf {
        self.run_dir().join("mariadbd.pid")
    }

    fn temp_socket(&self) -> PathBuf {
        self.run_dir().join("temp.sock")
    }

    fn temp_pid(&self) -> PathBuf {
        self.run_dir().join("temp.pid")
    }

    pub fn config_path(&self) -> PathBuf {
        self.base.join("my.cnf")
    }

    fn temp_config_path(&self) -> PathBuf {
        self.base.join("temp.cnf")
    }

    pub fn fence_path(&self) -> PathBuf {
        self.base.join("fence.cnf")
    }

    fn secrets_path(&self) -> PathBuf {
        self.base.join("secrets.json")
    }

    fn marker_path(&self) -> PathBuf {
        self.data_dir().join(REPLICA_MARKER)
    }

    fn clone_dir(&self) -> PathBuf {
        self.base.join("data.clone")
    }

    fn initdb_dir(&self) -> PathBuf {
        self.base.join("data.initdb")
    }

    fn old_dir(&self) -> PathBuf {
        self.base.join("data.old")
    }

    fn standby(&self) -> bool {
        self.marker_path().exists()
    }

    fn fenced(&self) -> bool {
        self.fence_path().exists()
    }

    /// The spec health checks converge to: the last prepared, else `spec`.
    fn desired(&self, spec: &EngineSpec) -> EngineSpec {
        self.desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| spec.clone())
    }

    fn set_desired(&self, spec: Option<&EngineSpec>) {
        *self.desired.lock().unwrap_or_else(|p| p.into_inner()) = spec.cloned();
    }

    /// The base directory (root's, 0755), the run directory and the TLS
    /// files; returns whether the TLS files changed.
    fn ensure_dirs(&self, acct: &Account) -> Result<bool> {
        os::mkdir(&self.base, 0o755)?;
        check_cnf_path(&self.base)?;
        // A Unix socket path holds at most 107 bytes.
        if self.socket_path().as_os_str().len() > 100 {
            bail!(
                "{} is too long for a Unix socket; use a shorter state directory",
                self.socket_path().display()
            );
        }
        mkdir_owned(&self.run_dir(), 0o700, acct)?;
        mkdir_owned(&self.tmp_dir(), 0o700, acct)?;
        self.tls.install_in(&self.base, acct)
    }

    /// A MariaDB program, run in the base directory as the mysql user
    /// (`acct`), or as the agent when None.
    fn command(&self, program: &str, acct: Option<&Account>) -> Result<tokio::process::Command> {
        let mut cmd = os::command(
            &binary(program)?,
            acct,
            "/usr/sbin:/usr/bin:/sbin:/bin",
            &self.base,
        );
        // mariadb-install-db's bootstrap server takes its tmpdir from here.
        cmd.env("TMPDIR", self.tmp_dir());
        Ok(cmd)
    }

    fn config(&self, spec: &EngineSpec) -> String {
        let (data, tmp, socket, pid, fence) = (
            self.data_dir(),
            self.tmp_dir(),
            self.socket_path(),
            self.pid_path(),
            self.fence_path(),
        );
        render_config(&ServerConfig {
            datadir: &data,
            tmpdir: &tmp,
            socket: &socket,
            pid_file: &pid,
            port: spec.port,
            server_id: server_id(&self.node_id),
            report_host: &self.node_id,
            read_only: spec.role != "primary" || self.standby(),
            semi_sync_master: wants_semi_sync(spec),
            temp: false,
            fence: &fence,
        }) + &tls::server_conf(self.tls_files().as_ref(), spec.require_client_tls)
    }

    /// Writes my.cnf for `spec`; returns whether it changed.
    fn write_config(&self, spec: &EngineSpec) -> Result<bool> {
        write_readable(&self.config_path(), &self.config(spec))
    }

    fn replication_password(&self) -> Result<String> {
        let path = self.secrets_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no replication password on this node yet ({} missing); the coordinator sends it \
                 with the engine's configuration",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        v.get("replication_password")
            .and_then(|p| p.as_str())
            .map(str::to_string)
            .with_context(|| format!("{} holds no replication_password", path.display()))
    }

    /// A session on the running server: the cached one, or a new one.
    async fn admin<'a>(&self, slot: &'a mut Option<Admin>) -> Result<&'a mut Admin> {
        if slot.is_none() {
            *slot = Some(connect_socket(&self.socket_path()).await?);
        }
        slot.as_mut().ok_or_else(|| anyhow!("no connection"))
    }

    /// Brings the running server to `spec` (see [`plan`]); returns what it saw.
    async fn converge(&self, a: &mut Admin, spec: &EngineSpec) -> Result<Observed> {
        let o = observe(a).await?;
        let mut actions = plan(&o, spec, self.standby(), self.fenced());
        // Pointed without TLS (before this node had a certificate): again,
        // over TLS.
        if let (Some(up), Some(r)) = (&spec.upstream, &o.replica) {
            let follows = actions.iter().any(|a| matches!(a, Action::Follow(_)));
            if self.tls_files().is_some() && r.ssl_allowed != "Yes" && !follows && self.standby() {
                actions.insert(0, Action::Follow(up.clone()));
            }
        }
        if actions.is_empty() {
            return Ok(o);
        }
        let f = a.flavour;
        for action in &actions {
            match action {
                Action::Follow(up) => {
                    let password = self.replication_password()?;
                    a.conn.query_drop(f.stop_replica()).await?;
                    a.conn
                        .query_drop(self.point_at(f, up, &password))
                        .await
                        .context("pointing replication at the upstream")?;
                    a.conn.query_drop(f.start_replica()).await?;
                    tracing::info!(upstream = %up.node, host = %up.host, port = up.port, "replication pointed at the upstream and started");
                }
                Action::StartReplication => {
                    let status = o.replica.clone().unwrap_or_default();
                    if status.last_io_errno != 0 {
                        let mut last = self
                            .restarted_replication
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if last.is_some_and(|t| t.elapsed() < RESTART_REPLICATION_EVERY) {
                            continue;
                        }
                        *last = Some(Instant::now());
                        tracing::warn!(
                            "replication stopped on an error ({}: {}); restarting it",
                            status.last_io_errno,
                            status.last_io_error
                        );
                    }
                    a.conn.query_drop(f.start_replica()).await?;
                }
                Action::ForgetUpstream => {
                    a.conn.query_drop(f.stop_replica()).await?;
                    a.conn.query_drop(f.reset_replica_all()).await?;
                    tracing::info!("a primary follows nobody: replication configuration removed");
                }
                Action::SetReadOnly(on) => {
                    a.conn.query_drop(f.set_read_only(*on)).await?;
                }
            }
        }
        observe(a).await
    }

    /// Semi-synchronous replication as `spec` wants it; returns whether the
    /// replica side was just turned on (its I/O thread must reconnect).
    async fn apply_semi_sync(&self, a: &mut Admin, spec: &EngineSpec) -> Result<bool> {
        let f = a.flavour;
        let o = observe(a).await?;
        if wants_semi_sync(spec) {
            if !o.semi_wait_point.eq_ignore_ascii_case("AFTER_SYNC") {
                a.conn
                    .query_drop(f.set_semi_sync(SemiSync::SourceWaitPoint, "AFTER_SYNC"))
                    .await?;
            }
            if o.semi_timeout != SEMI_SYNC_TIMEOUT_MS.to_string() {
                a.conn
                    .query_drop(
                        f.set_semi_sync(SemiSync::SourceTimeout, &SEMI_SYNC_TIMEOUT_MS.to_string()),
                    )
                    .await?;
            }
            if !o.semi_source_enabled {
                a.conn
                    .query_drop(f.set_semi_sync(SemiSync::SourceEnabled, "ON"))
                    .await?;
                tracing::info!("semi-synchronous replication on: each commit waits for a replica");
            }
        } else if o.semi_source_enabled {
            a.conn
                .query_drop(f.set_semi_sync(SemiSync::SourceEnabled, "OFF"))
                .await?;
            tracing::info!("semi-synchronous replication off");
        }
        if !o.semi_replica_enabled {
            a.conn
                .query_drop(f.set_semi_sync(SemiSync::ReplicaEnabled, "ON"))
                .await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Ends every client session but ours (replication and system threads
    /// stay). `dump_threads`: end only the binlog dump threads instead.
    async fn kill_sessions(a: &mut Admin, dump_threads: bool) -> Result<usize> {
        let filter = if dump_threads {
            "COMMAND IN ('Binlog Dump', 'Binlog Dump GTID')"
        } else {
            "COMMAND NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon', 'Slave_IO', \
             'Slave_SQL', 'Slave_worker') AND USER NOT IN ('system user', 'event_scheduler')"
        };
        let ids: Vec<u64> = a
            .conn
            .query(format!(
                "SELECT ID FROM information_schema.PROCESSLIST \
                 WHERE ID <> CONNECTION_ID() AND {filter}"
            ))
            .await?;
        let mut ended = 0;
        for id in ids {
            match a.conn.query_drop(format!("KILL CONNECTION {id}")).await {
                Ok(()) => ended += 1,
                // Gone meanwhile (ER_NO_SUCH_THREAD).
                Err(mysql_async::Error::Server(e)) if e.code == 1094 => {}
                Err(e) => return Err(e).with_context(|| format!("KILL CONNECTION {id}")),
            }
        }
        Ok(ended)
    }

    /// mariadb-install-db into `dir` (removed first), as the mysql user.
    async fn install_db(&self, dir: &Path, acct: &Account) -> Result<()> {
        remove_dir(dir)?;
        mkdir_owned(dir, 0o700, acct)?;
        run(
            self.command("mariadb-install-db", Some(acct))?
                .arg("--no-defaults")
                .arg("--user=mysql")
                .arg(format!("--datadir={}", dir.display()))
                .args([
                    "--skip-test-db",
                    "--auth-root-authentication-method=socket",
                    "--skip-name-resolve",
                ]),
            "mariadb-install-db",
        )
        .await
    }

    /// Stops a temporary server a crashed agent left running.
    async fn stop_stale_temp(&self) {
        let Some(pid) = os::running_pid(&self.temp_pid(), "mariadbd") else {
            return;
        };
        tracing::warn!(pid, "stopping a temporary server left running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let began = Instant::now();
        while super::process_alive(pid) && began.elapsed() < STOP_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a temporary server on `datadir` and waits until it answers.
    async fn start_temp(
        &self,
        spec: &EngineSpec,
        datadir: &Path,
        purpose: &str,
        acct: &Account,
    ) -> Result<TempServer> {
        self.stop_stale_temp().await;
        let (socket, pid, fence, tmp) = (
            self.temp_socket(),
            self.temp_pid(),
            self.fence_path(),
            self.tmp_dir(),
        );
        let cnf = self.temp_config_path();
        write_readable(
            &cnf,
            &render_config(&ServerConfig {
                datadir,
                tmpdir: &tmp,
                socket: &socket,
                pid_file: &pid,
                port: spec.port,
                server_id: server_id(&self.node_id),
                report_host: &self.node_id,
                read_only: false,
                semi_sync_master: false,
                temp: true,
                fence: &fence,
            }),
        )?;
        let log_path = self.log_path();
        let mut log = os::open_log(&log_path)?;
        {
            use std::io::Write;
            let _ = writeln!(
                log,
                "---- corral-agent: temporary server on {} ({purpose}) ----",
                datadir.display()
            );
        }
        let child = os::spawn_logged(
            self.command("mariadbd", Some(acct))?
                .arg(format!("--defaults-file={}", cnf.display()))
                .kill_on_drop(true),
            log,
            "a temporary mariadbd",
        )?;
        let mut temp = TempServer {
            child,
            socket,
            log: log_path,
        };
        let began = Instant::now();
        loop {
            if let Ok(Some(status)) = temp.child.try_wait() {
                bail!(
                    "the temporary server on {} exited at start ({status}); see {}:\n{}",
                    datadir.display(),
                    temp.log.display(),
                    log_tail(&temp.log, TAIL_LINES)
                );
            }
            if temp.socket.exists() && temp.connect().await.is_ok() {
                return Ok(temp);
            }
            if began.elapsed() > Duration::from_secs(90) {
                let _ = temp.child.start_kill();
                bail!(
                    "the temporary server on {} did not answer within 90 s; see {}:\n{}",
                    datadir.display(),
                    temp.log.display(),
                    log_tail(&temp.log, TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The upstream's data size (tables and indexes), for progress; 0 when
    /// it cannot be had.
    async fn estimate_size(&self, up: &Upstream, password: &str) -> u64 {
        let size = async {
            let mut c = connect_upstream(up, password, self.tls_ca().as_deref()).await?;
            let n: Option<Option<String>> = c
                .query_first(
                    "SELECT CAST(COALESCE(SUM(data_length + index_length), 0) AS CHAR) \
                     FROM information_schema.TABLES \
                     WHERE table_schema NOT IN ('mysql', 'information_schema', \
                     'performance_schema', 'sys')",
                )
                .await?;
            let _ = c.disconnect().await;
            anyhow::Ok(n.flatten().and_then(|s| s.parse().ok()).unwrap_or(0))
        };
        match tokio::time::timeout(QUERY_TIMEOUT, size).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!("estimating the clone's size: {e:#}");
                0
            }
            Err(_) => 0,
        }
    }

    /// mariadb-dump of everything on `up`, as the replication user, with
    /// the password in `options` (see mariadb_client.rs).
    fn dump_command(
        &self,
        up: &Upstream,
        options: &client::OptionFile,
        acct: &Account,
    ) -> Result<tokio::process::Command> {
        let mut c = self.command("mariadb-dump", Some(acct))?;
        c.arg(options.arg())
            .arg("--protocol=tcp")
            .arg(format!("--host={}", up.host))
            .arg(format!("--port={}", up.port))
            .arg(format!("--user={REPLICATION_USER}"))
            .args([
                // One consistent snapshot, and the GTID position it is at.
                "--single-transaction",
                "--gtid",
                "--master-data=2",
                "--all-databases",
                // Accounts as CREATE USER / GRANT (the copy's own system
                // tables stay); IF NOT EXISTS for the ones a fresh data
                // directory already has (root, mysql, mariadb.sys).
                "--ignore-database=mysql",
                "--system=users",
                "--insert-ignore",
                "--routines",
                "--events",
                "--triggers",
                "--hex-blob",
                "--default-character-set=utf8mb4",
                "--max-allowed-packet=1G",
            ]);
        if let Some(ca) = self.tls_ca() {
            // Encrypted, the upstream's certificate verified against the
            // CA (not its name: it names the node, not the address).
            c.arg("--ssl").arg(format!("--ssl-ca={}", ca.display()));
        }
        Ok(c)
    }

    /// Streams mariadb-dump from `up` into the temporary server; returns
    /// the dump's GTID position.
    async fn load_dump(
        &self,
        up: &Upstream,
        password: &str,
        temp: &TempServer,
        total: u64,
        progress: ProgressFn<'_>,
        acct: &Account,
    ) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The password in a file of mariadb-dump's own, for this run.
        let options = client::OptionFile::create(&self.tmp_dir(), password, acct)?;
        let mut dump = self.dump_command(up, &options, acct)?;
        let mut dump = dump
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting mariadb-dump")?;

        let mut load = self
            .command("mariadb", None)?
            .arg("--no-defaults")
            .arg("--protocol=socket")
            .arg(format!("--socket={}", temp.socket.display()))
            .args([
                "--user=root",
                "--binary-mode",
                "--max-allowed-packet=1G",
                // The copy's binary log starts at the dump's position: the
                // load itself must not write transactions of its own there.
                "--init-command=SET SESSION sql_log_bin=0",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the mariadb client to load the dump")?;
        let collect = |r: Option<tokio::process::ChildStderr>| {
            tokio::spawn(async move {
                let mut s = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut s).await;
                }
                s
            })
        };
        let dump_err = collect(dump.stderr.take());
        let load_err = collect(load.stderr.take());
        let mut out = dump.stdout.take().context("mariadb-dump's output")?;
        let mut input = load.stdin.take().context("the mariadb client's input")?;
        // The position is written near the end: keep the last 64 KiB.
        const KEEP: usize = 64 * 1024;
        let mut end: Vec<u8> = Vec::with_capacity(2 * KEEP);
        let mut buf = vec![0u8; 256 * 1024];
        let mut done = 0u64;
        let mut last_report = Instant::now();
        let mut broken = None;
        loop {
            let n = out
                .read(&mut buf)
                .await
                .context("reading mariadb-dump's output")?;
            if n == 0 {
                break;
            }
            if let Err(e) = input.write_all(&buf[..n]).await {
                // The loader failed; its error says why.
                broken = Some(e);
                break;
            }
            done += n as u64;
            end.extend_from_slice(&buf[..n]);
            if end.len() > 2 * KEEP {
                end.drain(..end.len() - KEEP);
            }
            if last_report.elapsed() > Duration::from_millis(100) {
                progress(done, total.max(done));
                last_report = Instant::now();
            }
        }
        progress(done, total.max(done));
        drop(input);
        if broken.is_some() {
            let _ = dump.start_kill();
        }
        let dump_status = dump.wait().await.context("waiting for mariadb-dump")?;
        let load_status = load
            .wait()
            .await
            .context("waiting for the mariadb client")?;
        let (dump_err, load_err) = (
            dump_err.await.unwrap_or_default(),
            load_err.await.unwrap_or_default(),
        );
        if !load_status.success() || broken.is_some() {
            bail!(
                "loading the dump into the new data directory failed ({load_status}):\n{}",
                tail(&load_err, TAIL_LINES)
            );
        }
        if !dump_status.success() {
            bail!(
                "mariadb-dump from {} ({}:{}) failed ({dump_status}):\n{}",
                up.node,
                up.host,
                up.port,
                tail(&dump_err, TAIL_LINES)
            );
        }
        dump_position(&String::from_utf8_lossy(&end)).with_context(|| {
            format!(
                "the dump from {} carries no GTID position (is its binary log on?)",
                up.node
            )
        })
    }
}

/// The GTID position a `--gtid --master-data=2` dump was taken at, from
/// its commented `SET GLOBAL gtid_slave_pos='...'` line.
pub fn dump_position(end_of_dump: &str) -> Option<String> {
    let key = "SET GLOBAL gtid_slave_pos='";
    let at = end_of_dump.rfind(key)? + key.len();
    let rest = &end_of_dump[at..];
    let pos = &rest[..rest.find('\'')?];
    parse_gtid_list(pos).ok()?;
    Some(pos.to_string())
}

#[tonic::async_trait]
impl Driver for Mariadb {
    fn engine_label(&self) -> &'static str {
        "MariaDB"
    }

    fn has_data(&self) -> bool {
        self.data_dir().join("mysql").is_dir()
    }

    fn data_is_standby(&self) -> Result<bool> {
        Ok(self.standby())
    }

    async fn initialize(&self) -> Result<()> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        if self.data_dir().exists() {
            bail!(
                "{} exists but is not a MariaDB data directory (no mysql/ in it): refusing to \
                 touch it; move it away if it holds nothing you need",
                self.data_dir().display()
            );
        }
        // Into a scratch directory first, renamed into place when complete:
        // a crash half-way never leaves a data directory that looks usable.
        let scratch = self.initdb_dir();
        self.install_db(&scratch, &acct).await?;
        std::fs::rename(&scratch, self.data_dir())
            .context("moving the new data directory into place")?;
        Ok(())
    }

    async fn clone_data(
        &self,
        spec: &EngineSpec,
        up: &Upstream,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        let password = self.replication_password()?;
        if self.find_running().is_some() {
            bail!("mariadbd is running on this node's data; stop it before cloning");
        }
        let total = self.estimate_size(up, &password).await;
        progress(0, total);
        let scratch = self.clone_dir();
        self.install_db(&scratch, &acct).await?;
        let cloned = async {
            let temp = self
                .start_temp(spec, &scratch, "loading a clone", &acct)
                .await?;
            let loaded = async {
                let pos = self
                    .load_dump(up, &password, &temp, total, progress, &acct)
                    .await?;
                let mut a = temp.connect().await?;
                let f = a.flavour;
                // The copy continues exactly where the dump's snapshot was:
                // as a replica (slave_pos), and as a primary after a
                // promotion (its binlog state, from which its own next
                // GTID is numbered).
                a.conn.query_drop("RESET MASTER").await?;
                if !pos.is_empty() {
                    a.conn
                        .query_drop(format!(
                            "SET GLOBAL gtid_binlog_state = {}",
                            sql_string(&pos)
                        ))
                        .await
                        .context("setting the copy's binlog state")?;
                }
                a.conn
                    .query_drop(format!("SET GLOBAL gtid_slave_pos = {}", sql_string(&pos)))
                    .await
                    .context("setting the copy's replication position")?;
                a.conn.query_drop(f.reset_replica_all()).await?;
                a.conn
                    .query_drop(self.point_at(f, up, &password))
                    .await
                    .context("pointing the copy at its upstream")?;
                let _ = a.conn.disconnect().await;
                tracing::info!(upstream = %up.node, position = %pos, "clone loaded");
                anyhow::Ok(())
            }
            .await;
            let stopped = temp.stop().await;
            loaded.and(stopped)
        }
        .await;
        let _ = std::fs::remove_file(self.temp_config_path());
        if let Err(e) = cloned {
            let _ = remove_dir(&scratch);
            return Err(e);
        }
        write_owned(&scratch.join(REPLICA_MARKER), "", &acct)?;
        // A re-clone replaces data that is still there (a rejoin that
        // failed): the old copy goes only once the new one is complete.
        let old = self.old_dir();
        if self.data_dir().exists() {
            remove_dir(&old)?;
            std::fs::rename(self.data_dir(), &old)
                .context("moving the previous data directory aside")?;
        }
        std::fs::rename(&scratch, self.data_dir())
            .context("moving the cloned data directory into place")?;
        remove_dir(&old)?;
        Ok(())
    }

    async fn rejoin(&self, spec: &EngineSpec, up: &Upstream) -> Result<()> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        if !self.has_data() {
            bail!(
                "{} holds no MariaDB data directory",
                self.data_dir().display()
            );
        }
        if self.find_running().is_some() {
            bail!("mariadbd is running on this node's data; stop it before rejoining");
        }
        let password = self.replication_password()?;
        // The upstream first: nothing here changes if it cannot be reached.
        let mut upc = connect_upstream(up, &password, self.tls_ca().as_deref()).await?;
        let theirs: Option<String> = upc
            .query_first("SELECT @@gtid_binlog_pos")
            .await
            .with_context(|| format!("reading {}'s position", up.node))?;
        let theirs = theirs.unwrap_or_default();
        let _ = upc.disconnect().await;
        let their_gtids =
            parse_gtid_list(&theirs).map_err(|e| anyhow!("{}'s position: {e}", up.node))?;

        let temp = self
            .start_temp(spec, &self.data_dir(), "rejoining", &acct)
            .await?;
        let joined = async {
            let mut a = temp.connect().await?;
            let f = a.flavour;
            // After crash recovery, if it crashed: what it really holds.
            let ours: Option<String> = a.conn.query_first("SELECT @@gtid_binlog_pos").await?;
            let ours = ours.unwrap_or_default();
            let our_gtids = parse_gtid_list(&ours).map_err(|e| anyhow!("own position: {e}"))?;
            match containment(&our_gtids, &their_gtids) {
                Containment::Contained => {}
                Containment::Diverged(errant) => bail!(
                    "diverged: this node has {} which {} ({}:{}) does not have (it is at {}); \
                     the data must be cloned again",
                    format_gtids(&errant),
                    up.node,
                    up.host,
                    up.port,
                    if theirs.is_empty() { "nothing" } else { &theirs }
                ),
                Containment::Unknown(ours_behind) => {
                    if let Some(refusal) =
                        self.upstream_refuses(&mut a, up, &password, &ours).await?
                    {
                        bail!(
                            "diverged: {} ({}:{}) cannot serve this node from {} ({refusal}); \
                             the data must be cloned again",
                            up.node,
                            up.host,
                            up.port,
                            format_gtids(&ours_behind)
                        );
                    }
                }
            }
            // Replication continues from this node's own last transaction.
            a.conn.query_drop(f.reset_replica_all()).await?;
            a.conn
                .query_drop(format!("SET GLOBAL gtid_slave_pos = {}", sql_string(&ours)))
                .await
                .context("setting the replication position")?;
            a.conn
                .query_drop(self.point_at(f, up, &password))
                .await
                .context("pointing replication at the upstream")?;
            let _ = a.conn.disconnect().await;
            tracing::info!(upstream = %up.node, position = %ours, "rejoined: follows the upstream from its own last transaction");
            anyhow::Ok(())
        }
        .await;
        let stopped = temp.stop().await;
        let _ = std::fs::remove_file(self.temp_config_path());
        joined?;
        stopped?;
        write_owned(&self.marker_path(), "", &acct)?;
        Ok(())
    }

    fn save_secrets(&self, secrets: &Secrets) -> Result<()> {
        std::fs::create_dir_all(&self.base)
            .with_context(|| format!("creating {}", self.base.display()))?;
        let text = serde_json::to_string(&serde_json::json!({
            "replication_password": secrets.replication_password,
        }))?;
        if std::fs::read_to_string(self.secrets_path()).ok() != Some(text.clone()) {
            corral_proto::pki::write_private(&self.secrets_path(), &text)?;
        }
        Ok(())
    }

    async fn prepare(&self, spec: &EngineSpec) -> Result<()> {
        let acct = account()?;
        let tls_changed = self.ensure_dirs(&acct)?;
        if !self.has_data() {
            bail!(
                "{} holds no MariaDB data directory",
                self.data_dir().display()
            );
        }
        self.set_desired(Some(spec));
        let changed = self.write_config(spec)?;
        if self.find_running().is_none() {
            return Ok(());
        }
        if changed {
            tracing::info!("configuration changed; applying it to the running server (a port change needs a restart)");
        }
        let mut slot = self.conn.lock().await;
        let a = match self.admin(&mut slot).await {
            Ok(a) => a,
            Err(e) => {
                // Starting or stopping: the health checks converge it once
                // it answers, and the new my.cnf holds at its next start.
                tracing::warn!(
                    "the running server could not be reached to apply the configuration: {e:#}"
                );
                return Ok(());
            }
        };
        let applied = async {
            if tls_changed && self.tls_files().is_some() {
                // A renewed certificate, same files: reloaded in place. (A
                // server started without TLS gets it at its next start.)
                if let Err(e) = a.conn.query_drop("FLUSH SSL").await {
                    tracing::warn!("FLUSH SSL (reloading the certificate): {e}");
                }
            }
            self.apply_semi_sync(a, spec).await?;
            self.converge(a, spec).await?;
            anyhow::Ok(())
        }
        .await;
        if applied.is_err() {
            *slot = None;
        }
        applied.context("applying the configuration to the running server")
    }

    fn find_running(&self) -> Option<u32> {
        os::running_pid(&self.pid_path(), "mariadbd")
    }

    async fn start(&self, _spec: &EngineSpec) -> Result<tokio::process::Child> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        if !self.config_path().exists() {
            bail!(
                "{} is missing: the configuration is written before the first start",
                self.config_path().display()
            );
        }
        let log_path = self.log_path();
        let log = os::open_log(&log_path)?;
        *self.conn.lock().await = None;
        let child = os::spawn_logged(
            self.command("mariadbd", Some(&acct))?
                .arg(format!("--defaults-file={}", self.config_path().display())),
            log,
            "mariadbd",
        )?;
        tracing::info!(pid = child.id(), log = %log_path.display(), "mariadbd started");
        Ok(child)
    }

    async fn stop(&self, pid: u32) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        // Asked over SQL, the server first sends every connected replica
        // the binary log it has not received (as PostgreSQL's fast
        // shutdown sends its WAL); SIGTERM if it does not answer.
        let fenced = self.fenced();
        let asked = tokio::time::timeout(FENCE_TIMEOUT, async {
            let mut slot = self.conn.lock().await;
            let mut a = match slot.take() {
                Some(a) => a,
                None => connect_socket(&self.socket_path()).await?,
            };
            if fenced {
                // Replicas behind the fence's firewall cannot receive
                // anything: their dump threads would hold the shutdown up.
                Self::kill_sessions(&mut a, true).await?;
            }
            match a.conn.query_drop(a.flavour.shutdown()).await {
                Err(mysql_async::Error::Server(e)) => {
                    Err(anyhow!("{}: {}", a.flavour.shutdown(), e.message))
                }
                // The server closes the session as it goes down.
                _ => anyhow::Ok(()),
            }
        })
        .await;
        *self.conn.lock().await = None;
        match asked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!("asking mariadbd to shut down: {e:#}; sending SIGTERM");
                kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM)
                    .with_context(|| format!("signalling mariadbd {pid}"))?;
            }
            Err(_) => {
                tracing::warn!("mariadbd did not answer the shutdown request; sending SIGTERM");
                kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM)
                    .with_context(|| format!("signalling mariadbd {pid}"))?;
            }
        }
        let began = Instant::now();
        while super::process_alive(pid) {
            if began.elapsed() > STOP_TIMEOUT {
                bail!(
                    "mariadbd (pid {pid}) did not stop within {} s of a shutdown; see {}:\n{}",
                    STOP_TIMEOUT.as_secs(),
                    self.log_path().display(),
                    log_tail(&self.log_path(), TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    async fn stopped_position(&self) -> Result<(u64, String)> {
        let data = self.data_dir();
        let tail = tokio::task::spawn_blocking(move || read_binlog_tail(&data))
            .await
            .context("reading the binary log")??;
        let Some(tail) = tail else {
            return Ok((0, "no binary log".into()));
        };
        let seq = last_in_domain(&tail.gtids, 0).map(|g| g.seq).unwrap_or(0);
        let state = match (tail.closed_cleanly, self.standby()) {
            (true, false) => "shut down",
            (true, true) => "shut down in recovery",
            (false, _) => "in production",
        };
        Ok((seq, state.into()))
    }

    async fn check(&self, spec: &EngineSpec) -> Result<Health> {
        let mut slot = tokio::time::timeout(QUERY_TIMEOUT, self.conn.lock())
            .await
            .map_err(|_| anyhow!("the admin connection is busy (another query hangs)"))?;
        let desired = self.desired(spec);
        let checked = tokio::time::timeout(QUERY_TIMEOUT, async {
            let a = self.admin(&mut slot).await?;
            let o = self.converge(a, &desired).await?;
            let replication = replication_report(&o, self.standby());
            let stats = engine_stats(&o, replication.lsn);
            anyhow::Ok(Health {
                version: o.version.clone(),
                replication,
                stats,
            })
        })
        .await;
        match checked {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(e)) => {
                *slot = None;
                Err(e)
            }
            Err(_) => {
                *slot = None;
                bail!("health check timed out after 5 s")
            }
        }
    }

    async fn bootstrap(&self, spec: &EngineSpec, secrets: &Secrets) -> Result<()> {
        super::sql_identifier("admin user", &spec.admin_user).map_err(|e| anyhow!(e))?;
        super::sql_identifier("database", &spec.database).map_err(|e| anyhow!(e))?;
        let mut slot = self.conn.lock().await;
        let done = async {
            let a = self.admin(&mut slot).await?;
            let f = a.flavour;
            for (user, password) in [
                (spec.admin_user.as_str(), secrets.admin_password.as_str()),
                (REPLICATION_USER, secrets.replication_password.as_str()),
            ] {
                let account = account_name(user, "%");
                // MariaDB: only the password's hash reaches the server (and
                // its binary log); it is computed there, from a parameter.
                let hash = match f {
                    Flavour::Mariadb => {
                        let h: Option<String> =
                            a.conn.exec_first("SELECT PASSWORD(?)", (password,)).await?;
                        Some(h.context("PASSWORD() returned nothing")?)
                    }
                    Flavour::Mysql => None,
                };
                let cred = match &hash {
                    Some(h) => Credential::NativeHash(h),
                    None => Credential::Plain(password),
                };
                for stmt in f.user_statements(&account, &cred) {
                    a.conn
                        .query_drop(&stmt)
                        .await
                        .with_context(|| format!("creating or updating user {user}"))?;
                }
            }
            let admin = account_name(&spec.admin_user, "%");
            for stmt in f.admin_grants(&admin) {
                a.conn
                    .query_drop(&stmt)
                    .await
                    .with_context(|| format!("granting {}'s privileges", spec.admin_user))?;
            }
            a.conn
                .query_drop(f.replication_grants(&account_name(REPLICATION_USER, "%")))
                .await
                .with_context(|| format!("granting {REPLICATION_USER}'s privileges"))?;
            // Only once the server itself speaks TLS: one started before
            // this node had a certificate (an upgrade) gets it at its next
            // start, and its replicas must still reach it meanwhile.
            let have_ssl = show(&mut a.conn, "SHOW GLOBAL VARIABLES LIKE 'have_ssl'").await?;
            let serves_tls = have_ssl.get("have_ssl").is_some_and(|v| v == "YES");
            a.conn
                .query_drop(tls::replication_require(
                    &account_name(REPLICATION_USER, "%"),
                    self.tls_files().is_some() && serves_tls,
                ))
                .await
                .with_context(|| format!("setting {REPLICATION_USER}'s TLS requirement"))?;
            a.conn
                .query_drop(format!(
                    "CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4",
                    quote_ident(&spec.database)
                ))
                .await
                .with_context(|| format!("CREATE DATABASE {}", spec.database))?;
            anyhow::Ok(())
        }
        .await;
        if done.is_err() {
            *slot = None;
        }
        done
    }

    async fn converge_slots(&self, spec: &EngineSpec) -> Result<()> {
        let mut slot = self.conn.lock().await;
        let done = async {
            let a = self.admin(&mut slot).await?;
            let replica_side_changed = self.apply_semi_sync(a, spec).await?;
            if replica_side_changed {
                // The I/O thread says whether it acknowledges when it connects.
                if let Some(s) = replica_status(a).await? {
                    if s.io_running != "No" {
                        let f = a.flavour;
                        a.conn.query_drop(f.stop_replica_io()).await?;
                        a.conn.query_drop(f.start_replica_io()).await?;
                    }
                }
            }
            anyhow::Ok(())
        }
        .await;
        if done.is_err() {
            *slot = None;
        }
        done.context("converging semi-synchronous replication")
    }

    async fn promote(&self, spec: &EngineSpec) -> Result<()> {
        let mut slot = self.conn.lock().await;
        let done = async {
            let a = self.admin(&mut slot).await?;
            let f = a.flavour;
            if let Some(s) = replica_status(a).await? {
                // Stop receiving, then apply everything received: with
                // semi-sync, a commit was acknowledged once it was here,
                // not once it was applied.
                a.conn.query_drop(f.stop_replica_io()).await?;
                let s = replica_status(a).await?.unwrap_or(s);
                if !s.received.is_empty() {
                    if s.sql_running != "Yes" {
                        bail!(
                            "cannot promote: replication's SQL thread is stopped ({}: {}), so \
                             transactions received from the old primary ({}) would be lost",
                            s.last_sql_errno,
                            s.last_sql_error,
                            s.received
                        );
                    }
                    let r: Option<i64> =
                        a.conn.query_first(f.wait_applied(&s.received, 60)).await?;
                    if r != Some(0) {
                        bail!(
                            "cannot promote: the transactions received ({}) were not applied \
                             within 60 s; see {}",
                            s.received,
                            self.log_path().display()
                        );
                    }
                }
                a.conn.query_drop(f.stop_replica()).await?;
                a.conn.query_drop(f.reset_replica_all()).await?;
            }
            remove_file(&self.marker_path())?;
            self.set_desired(Some(spec));
            // my.cnf as a primary's: writable after a restart too.
            self.write_config(spec)?;
            if !self.fenced() {
                a.conn.query_drop(f.set_read_only(false)).await?;
                let ro: Option<i64> = a
                    .conn
                    .query_first(format!("SELECT @@{}", f.read_only_variable()))
                    .await?;
                if ro != Some(0) {
                    bail!("still read-only after promotion");
                }
            }
            anyhow::Ok(())
        }
        .await;
        if done.is_err() {
            *slot = None;
        }
        done.context("promoting")
    }

    async fn set_fenced(&self, spec: &EngineSpec, fenced: bool) -> Result<()> {
        std::fs::create_dir_all(&self.base)
            .with_context(|| format!("creating {}", self.base.display()))?;
        if fenced {
            write_readable(
                &self.fence_path(),
                "# Written by corral-agent: this primary holds no lease.\n\
                 [mariadbd]\n\
                 read_only = ON\n",
            )?;
        } else {
            remove_file(&self.fence_path())?;
        }
        if self.find_running().is_none() {
            return Ok(());
        }
        let primary = !self.standby() && self.desired(spec).role == "primary";
        let live = tokio::time::timeout(FENCE_TIMEOUT, async {
            let mut slot = self.conn.lock().await;
            let done = async {
                let a = self.admin(&mut slot).await?;
                let f = a.flavour;
                if fenced {
                    // Sessions first: setting read_only waits for running
                    // writes (and semi-sync waits) to finish.
                    let mut ended = Self::kill_sessions(a, false).await?;
                    a.conn.query_drop(f.set_read_only(true)).await?;
                    // And any that came in meanwhile.
                    ended += Self::kill_sessions(a, false).await?;
                    tracing::info!(sessions = ended, "fenced: read-only, client sessions ended");
                } else if primary {
                    a.conn.query_drop(f.set_read_only(false)).await?;
                }
                anyhow::Ok(())
            }
            .await;
            if done.is_err() {
                *slot = None;
            }
            done
        })
        .await;
        match live {
            Ok(r) => r,
            Err(_) => {
                // The connection may be mid-statement: start afresh.
                *self.conn.lock().await = None;
                bail!(
                    "the server did not apply the fence within {} s (fence.cnf is written: it \
                     applies at the next start)",
                    FENCE_TIMEOUT.as_secs()
                )
            }
        }
    }

    async fn wipe(&self) -> Result<()> {
        *self.conn.lock().await = None;
        self.set_desired(None);
        for dir in [
            self.data_dir(),
            self.clone_dir(),
            self.initdb_dir(),
            self.old_dir(),
            self.base.join("data.restore"),
            self.run_dir(),
            self.tmp_dir(),
        ] {
            remove_dir(&dir)?;
        }
        for file in [
            self.config_path(),
            self.temp_config_path(),
            self.base.join("restore.cnf"),
            self.fence_path(),
        ] {
            remove_file(&file)?;
        }
        Ok(())
    }

    fn forget_secrets(&self) -> Result<()> {
        remove_file(&self.secrets_path()).map(|_| ())
    }

    fn log_path(&self) -> PathBuf {
        self.base.join("server.log")
    }

    /// `mariadb-backup --stream=xbstream` of the running server (see
    /// mariadb_backup.rs).
    fn backup(
        &self,
        _spec: &EngineSpec,
        out: &mut dyn std::io::Write,
        progress: ProgressFn<'_>,
    ) -> Result<BackupInfo> {
        self.backup_stream(out, progress)
    }

    fn restore(
        &self,
        spec: &EngineSpec,
        input: &mut dyn std::io::Read,
        recovery: Option<&Recovery>,
    ) -> Result<()> {
        self.restore_stream(spec, input, recovery)
    }

    fn verify(&self, input: &mut dyn std::io::Read, scratch: &Path) -> Result<String> {
        self.verify_stream(input, scratch)
    }
}

impl Mariadb {
    /// Asks the upstream to stream its binary log from `pos` exactly as a
    /// replica at that position does (strict mode), through the temporary
    /// server's own replication: None when it serves it, else its refusal
    /// (it lacks one of our GTIDs, or purged them). Nothing received is
    /// applied; the relay log is discarded.
    async fn upstream_refuses(
        &self,
        a: &mut Admin,
        up: &Upstream,
        password: &str,
        pos: &str,
    ) -> Result<Option<String>> {
        let f = a.flavour;
        a.conn.query_drop(f.reset_replica_all()).await?;
        a.conn
            .query_drop(format!("SET GLOBAL gtid_slave_pos = {}", sql_string(pos)))
            .await?;
        a.conn.query_drop(self.point_at(f, up, password)).await?;
        a.conn.query_drop(f.start_replica_io()).await?;
        let began = Instant::now();
        let verdict = loop {
            let s = replica_status(a).await?.unwrap_or_default();
            // ER_MASTER_FATAL_ERROR_READING_BINLOG: it cannot serve that position.
            if s.last_io_errno == 1236 {
                break Ok(Some(s.last_io_error));
            }
            // The upstream names its binary log file only once it accepted
            // the position (its first event, a rotate, carries the name).
            if s.last_io_errno == 0 && !s.source_log_file.is_empty() {
                break Ok(None);
            }
            if began.elapsed() > Duration::from_secs(15) {
                break Err(anyhow!(
                    "could not ask {} ({}:{}) for its binary log within 15 s (last error {}: {})",
                    up.node,
                    up.host,
                    up.port,
                    s.last_io_errno,
                    s.last_io_error
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        a.conn.query_drop(f.stop_replica()).await?;
        a.conn.query_drop(f.reset_replica_all()).await?;
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(domain: u32, server: u32, seq: u64) -> Gtid {
        Gtid {
            domain,
            server,
            seq,
        }
    }

    #[test]
    fn gtid_lists_parse() {
        assert_eq!(parse_gtid_list("").unwrap(), vec![]);
        assert_eq!(parse_gtid_list("  ").unwrap(), vec![]);
        assert_eq!(parse_gtid_list("0-1-100").unwrap(), vec![g(0, 1, 100)]);
        assert_eq!(
            parse_gtid_list("0-1-100,1-2-5").unwrap(),
            vec![g(0, 1, 100), g(1, 2, 5)]
        );
        assert_eq!(
            parse_gtid_list("1-2-5, 0-4294967295-18446744073709551615\n").unwrap(),
            vec![g(1, 2, 5), g(0, u32::MAX, u64::MAX)]
        );
        for bad in ["0-1", "a-1-2", "0-1-x", "0-1-2-3", "0--1-2"] {
            assert!(parse_gtid_list(bad).is_err(), "{bad} should not parse");
        }
        assert_eq!(format_gtids(&[g(0, 1, 100), g(1, 2, 5)]), "0-1-100,1-2-5");
    }

    #[test]
    fn domain_zero_sequence() {
        assert_eq!(domain0_seq(""), 0);
        assert_eq!(domain0_seq("0-1-100,1-2-5"), 100);
        assert_eq!(domain0_seq("1-2-5,0-3-7"), 7);
        assert_eq!(domain0_seq("1-2-5"), 0);
        assert_eq!(domain0_seq("garbage"), 0);
        assert_eq!(
            last_in_domain(&[g(0, 1, 4), g(0, 2, 9)], 0),
            Some(g(0, 2, 9))
        );
    }

    #[test]
    fn mysql_gtid_sets_count_transactions() {
        assert_eq!(gtid_set_count(""), 0);
        assert_eq!(
            gtid_set_count("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5"),
            5
        );
        assert_eq!(
            gtid_set_count(
                "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7,\n4e11fa47-71ca-11e1-9e33-c80aa9429562:1-3"
            ),
            9
        );
        // MySQL 8.3 tags.
        assert_eq!(
            gtid_set_count("3e11fa47-71ca-11e1-9e33-c80aa9429562:tag:1-2"),
            2
        );
    }

    #[test]
    fn containment_of_a_former_primary() {
        let up = vec![g(0, 1, 10)];
        assert_eq!(containment(&[], &up), Containment::Contained);
        assert_eq!(containment(&[g(0, 1, 10)], &up), Containment::Contained);
        // Ahead of the upstream: ours only.
        assert_eq!(
            containment(&[g(0, 1, 11)], &up),
            Containment::Diverged(vec![g(0, 1, 11)])
        );
        // Same number, another server: a different transaction.
        assert_eq!(
            containment(&[g(0, 2, 10)], &up),
            Containment::Diverged(vec![g(0, 2, 10)])
        );
        // A domain the upstream never saw.
        assert_eq!(
            containment(&[g(0, 1, 10), g(1, 3, 1)], &up),
            Containment::Diverged(vec![g(1, 3, 1)])
        );
        // Behind: only the upstream's binlog can tell.
        assert_eq!(
            containment(&[g(0, 2, 7)], &up),
            Containment::Unknown(vec![g(0, 2, 7)])
        );
        assert_eq!(
            containment(&[g(0, 2, 7)], &[]),
            Containment::Diverged(vec![g(0, 2, 7)])
        );
    }

    #[test]
    fn server_ids_are_stable_and_never_zero() {
        assert_eq!(server_id("vm1"), server_id("vm1"));
        assert_ne!(server_id("vm1"), server_id("vm2"));
        assert_ne!(server_id(""), 0);
    }

    #[test]
    fn quoting() {
        assert_eq!(sql_string("plain"), "'plain'");
        assert_eq!(sql_string("it's"), "'it\\'s'");
        assert_eq!(sql_string("back\\slash"), "'back\\\\slash'");
        assert_eq!(sql_string("a\\'b"), "'a\\\\\\'b'");
        assert_eq!(sql_string("nul\0nl\ncr\r"), "'nul\\0nl\\ncr\\r'");
        assert_eq!(quote_ident("we`ird"), "`we``ird`");
        assert_eq!(account_name("admin", "%"), "'admin'@'%'");
    }

    #[test]
    fn flavour_from_version() {
        assert_eq!(
            Flavour::detect("10.11.6-MariaDB-0+deb12u1-log"),
            Flavour::Mariadb
        );
        assert_eq!(Flavour::detect("5.5.5-10.11.6-MariaDB"), Flavour::Mariadb);
        assert_eq!(Flavour::detect("8.0.36"), Flavour::Mysql);
        assert_eq!(Flavour::detect("8.0.36-0ubuntu0.22.04.1"), Flavour::Mysql);
    }

    #[test]
    fn change_source_statements() {
        let pw = "p'a\\ss";
        assert_eq!(
            Flavour::Mariadb.change_source("10.0.0.1", 3306, REPLICATION_USER, pw, None),
            "CHANGE MASTER TO MASTER_HOST='10.0.0.1', MASTER_PORT=3306, \
             MASTER_USER='corral_replication', MASTER_PASSWORD='p\\'a\\\\ss', \
             MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1"
        );
        assert_eq!(
            Flavour::Mysql.change_source("fd00::1", 3307, REPLICATION_USER, pw, None),
            "CHANGE REPLICATION SOURCE TO SOURCE_HOST='fd00::1', SOURCE_PORT=3307, \
             SOURCE_USER='corral_replication', SOURCE_PASSWORD='p\\'a\\\\ss', \
             SOURCE_AUTO_POSITION=1, SOURCE_CONNECT_RETRY=1, GET_SOURCE_PUBLIC_KEY=1"
        );
    }

    #[test]
    fn replication_commands_by_flavour() {
        let m = Flavour::Mariadb;
        let y = Flavour::Mysql;
        assert_eq!(m.start_replica(), "START SLAVE");
        assert_eq!(y.start_replica(), "START REPLICA");
        assert_eq!(m.stop_replica(), "STOP SLAVE");
        assert_eq!(y.stop_replica(), "STOP REPLICA");
        assert_eq!(m.stop_replica_io(), "STOP SLAVE IO_THREAD");
        assert_eq!(y.start_replica_io(), "START REPLICA IO_THREAD");
        assert_eq!(m.reset_replica_all(), "RESET SLAVE ALL");
        assert_eq!(y.reset_replica_all(), "RESET REPLICA ALL");
        assert_eq!(m.replica_status(), "SHOW SLAVE STATUS");
        assert_eq!(y.replica_status(), "SHOW REPLICA STATUS");
        assert_eq!(m.replica_hosts(), "SHOW SLAVE HOSTS");
        assert_eq!(y.replica_hosts(), "SHOW REPLICAS");
        assert_eq!(m.shutdown(), "SHUTDOWN WAIT FOR ALL SLAVES");
        assert_eq!(y.shutdown(), "SHUTDOWN");
        assert_eq!(m.column(Column::IoRunning), "Slave_IO_Running");
        assert_eq!(y.column(Column::IoRunning), "Replica_IO_Running");
        assert_eq!(m.column(Column::Received), "Gtid_IO_Pos");
        assert_eq!(y.column(Column::Received), "Retrieved_Gtid_Set");
        assert_eq!(m.column(Column::Host), "Master_Host");
        assert_eq!(y.column(Column::Host), "Source_Host");
        assert!(m.uses_gtid("Slave_Pos") && !m.uses_gtid("No"));
        assert!(y.uses_gtid("1") && !y.uses_gtid("0"));
        assert_eq!(
            m.wait_applied("0-1-5", 60),
            "SELECT MASTER_GTID_WAIT('0-1-5', 60)"
        );
        assert_eq!(
            y.wait_applied("u:1-5", 60),
            "SELECT WAIT_FOR_EXECUTED_GTID_SET('u:1-5', 60)"
        );
        assert_eq!(m.position("0-1-5,1-1-9"), 5);
        assert_eq!(y.position("u:1-5,v:1-2"), 7);
    }

    #[test]
    fn read_only_by_flavour() {
        assert_eq!(Flavour::Mariadb.read_only_variable(), "read_only");
        assert_eq!(Flavour::Mysql.read_only_variable(), "super_read_only");
        assert_eq!(
            Flavour::Mariadb.set_read_only(true),
            "SET GLOBAL read_only = ON"
        );
        assert_eq!(
            Flavour::Mariadb.set_read_only(false),
            "SET GLOBAL read_only = OFF"
        );
        assert_eq!(
            Flavour::Mysql.set_read_only(true),
            "SET GLOBAL super_read_only = ON"
        );
        assert_eq!(
            Flavour::Mysql.set_read_only(false),
            "SET GLOBAL super_read_only = OFF, GLOBAL read_only = OFF"
        );
    }

    #[test]
    fn semi_sync_names_by_flavour() {
        use SemiSync::*;
        let m = Flavour::Mariadb;
        let y = Flavour::Mysql;
        assert_eq!(
            m.set_semi_sync(SourceEnabled, "ON"),
            "SET GLOBAL rpl_semi_sync_master_enabled = ON"
        );
        assert_eq!(
            y.set_semi_sync(SourceEnabled, "ON"),
            "SET GLOBAL rpl_semi_sync_source_enabled = ON"
        );
        assert_eq!(
            m.semi_sync(SourceWaitPoint),
            "rpl_semi_sync_master_wait_point"
        );
        assert_eq!(y.semi_sync(SourceTimeout), "rpl_semi_sync_source_timeout");
        assert_eq!(m.semi_sync(ReplicaEnabled), "rpl_semi_sync_slave_enabled");
        assert_eq!(y.semi_sync(ReplicaEnabled), "rpl_semi_sync_replica_enabled");
        assert_eq!(m.semi_sync(SourceClients), "Rpl_semi_sync_master_clients");
        assert_eq!(y.semi_sync(SourceStatus), "Rpl_semi_sync_source_status");
    }

    #[test]
    fn account_statements_by_flavour() {
        let acct = account_name("admin", "%");
        assert_eq!(
            Flavour::Mariadb.user_statements(&acct, &Credential::NativeHash("*ABC")),
            vec![
                "CREATE USER IF NOT EXISTS 'admin'@'%' IDENTIFIED BY PASSWORD '*ABC'",
                "ALTER USER 'admin'@'%' IDENTIFIED BY PASSWORD '*ABC'",
            ]
        );
        assert_eq!(
            Flavour::Mysql.user_statements(&acct, &Credential::Plain("o'k\\")),
            vec![
                "CREATE USER IF NOT EXISTS 'admin'@'%' IDENTIFIED BY 'o\\'k\\\\'",
                "ALTER USER 'admin'@'%' IDENTIFIED BY 'o\\'k\\\\'",
            ]
        );
        assert_eq!(
            Flavour::Mariadb.admin_grants(&acct),
            vec![
                "GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%' WITH GRANT OPTION",
                "REVOKE READ_ONLY ADMIN ON *.* FROM 'admin'@'%'",
            ]
        );
        assert_eq!(
            Flavour::Mysql.admin_grants(&acct),
            vec!["GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%' WITH GRANT OPTION"]
        );
        assert!(Flavour::Mariadb
            .replication_grants(&acct)
            .contains("REPLICATION SLAVE, BINLOG MONITOR"));
        assert!(Flavour::Mysql
            .replication_grants(&acct)
            .contains("REPLICATION SLAVE, REPLICATION CLIENT"));
    }

    #[test]
    fn dump_positions() {
        let end =
            "-- SET GLOBAL gtid_slave_pos='0-1-9';\n/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE */;\n";
        assert_eq!(dump_position(end).as_deref(), Some("0-1-9"));
        assert_eq!(
            dump_position("-- SET GLOBAL gtid_slave_pos='';\n").as_deref(),
            Some("")
        );
        assert_eq!(dump_position("-- Dump completed\n"), None);
        assert_eq!(dump_position("-- SET GLOBAL gtid_slave_pos='0-1-x';"), None);
        assert_eq!(dump_position("-- SET GLOBAL gtid_slave_pos='0-1-9"), None);
    }

    fn spec(role: &str) -> EngineSpec {
        EngineSpec {
            cluster: "orders".into(),
            engine: "mariadb".into(),
            role: role.into(),
            port: 3306,
            admin_user: "admin".into(),
            database: "app".into(),
            replicas: vec![],
            sync: false,
            upstream: (role == "replica").then(|| Upstream {
                node: "vm1".into(),
                host: "10.0.0.1".into(),
                port: 3306,
            }),
            wal_archive: false,
            require_client_tls: false,
        }
    }

    fn following(host: &str) -> ReplicaStatus {
        ReplicaStatus {
            host: host.into(),
            port: 3306,
            user: REPLICATION_USER.into(),
            io_running: "Yes".into(),
            sql_running: "Yes".into(),
            received: "0-1-12".into(),
            gtid_mode: "Slave_Pos".into(),
            ..Default::default()
        }
    }

    #[test]
    fn stats_come_from_the_observation() {
        let replica = Observed {
            connections: Some(4),
            replica: Some(ReplicaStatus {
                seconds_behind: "2".into(),
                ..following("10.0.0.1")
            }),
            ..Default::default()
        };
        let s = engine_stats(&replica, 12);
        assert_eq!(s["connections"], 4.0);
        assert_eq!(s["lag_seconds"], 2.0);
        assert_eq!(s["gtid_seq"], 12.0);
        // Not replicating (NULL), or a primary: no lag figure.
        let stopped = Observed {
            replica: Some(following("10.0.0.1")),
            ..Default::default()
        };
        assert!(!engine_stats(&stopped, 0).contains_key("lag_seconds"));
        assert!(!engine_stats(&Observed::default(), 0).contains_key("connections"));
    }

    #[test]
    fn replicas_converge_to_their_upstream() {
        let up = spec("replica").upstream.unwrap();
        let fresh = Observed {
            read_only: true,
            ..Default::default()
        };
        assert_eq!(
            plan(&fresh, &spec("replica"), true, false),
            vec![Action::Follow(up.clone())]
        );
        let streaming = Observed {
            read_only: true,
            replica: Some(following("10.0.0.1")),
            ..Default::default()
        };
        assert_eq!(plan(&streaming, &spec("replica"), true, false), vec![]);
        let elsewhere = Observed {
            replica: Some(following("10.0.0.9")),
            ..streaming.clone()
        };
        assert_eq!(
            plan(&elsewhere, &spec("replica"), true, false),
            vec![Action::Follow(up.clone())]
        );
        let mut stopped = streaming.clone();
        stopped.replica.as_mut().unwrap().io_running = "No".into();
        stopped.replica.as_mut().unwrap().sql_running = "No".into();
        stopped.read_only = false;
        assert_eq!(
            plan(&stopped, &spec("replica"), true, false),
            vec![Action::StartReplication, Action::SetReadOnly(true)]
        );
        let mut broken = streaming.clone();
        broken.replica.as_mut().unwrap().sql_running = "No".into();
        broken.replica.as_mut().unwrap().last_sql_errno = 1062;
        assert_eq!(plan(&broken, &spec("replica"), true, false), vec![]);
        // Connecting is not stopped.
        let mut connecting = streaming.clone();
        connecting.replica.as_mut().unwrap().io_running = "Connecting".into();
        assert_eq!(plan(&connecting, &spec("replica"), true, false), vec![]);
    }

    #[test]
    fn primaries_follow_nobody_and_the_fence() {
        let replicating = Observed {
            read_only: true,
            replica: Some(following("10.0.0.1")),
            ..Default::default()
        };
        assert_eq!(
            plan(&replicating, &spec("primary"), false, false),
            vec![Action::ForgetUpstream, Action::SetReadOnly(false)]
        );
        let writable = Observed::default();
        assert_eq!(plan(&writable, &spec("primary"), false, false), vec![]);
        assert_eq!(
            plan(&writable, &spec("primary"), false, true),
            vec![Action::SetReadOnly(true)]
        );
    }

    #[test]
    fn role_and_marker_must_agree() {
        // Promotion under way (primary spec, replica data): left alone.
        let replicating = Observed {
            read_only: true,
            replica: Some(following("10.0.0.1")),
            ..Default::default()
        };
        assert_eq!(plan(&replicating, &spec("primary"), true, false), vec![]);
        // A former primary not yet rejoined: left alone.
        assert_eq!(
            plan(&Observed::default(), &spec("replica"), false, false),
            vec![]
        );
    }

    #[test]
    fn reports() {
        let replica = Observed {
            binlog_pos: "0-1-10".into(),
            applied_pos: "0-1-11".into(),
            read_only: true,
            replica: Some(following("10.0.0.1")),
            ..Default::default()
        };
        let r = replication_report(&replica, true);
        assert!(r.in_recovery && r.streaming);
        assert_eq!((r.lsn, r.receive_lsn, r.upstream_lsn), (11, 12, 12));
        assert_eq!(r.upstream_host, "10.0.0.1");
        assert!(r.standbys.is_empty());
        assert_eq!((r.timeline, r.system_identifier.as_str()), (0, ""));

        let primary = Observed {
            binlog_pos: "0-1-20".into(),
            applied_pos: "0-2-3".into(),
            replica_hosts: vec!["vm2".into(), "vm3".into()],
            semi_source_enabled: true,
            semi_source_active: true,
            semi_clients: 2,
            ..Default::default()
        };
        let r = replication_report(&primary, false);
        assert!(!r.in_recovery);
        assert_eq!(r.lsn, 20);
        assert_eq!(r.synchronous_standby_names, "semi-sync");
        let names: Vec<_> = r.standbys.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["vm2", "vm3"]);
        assert!(r
            .standbys
            .iter()
            .all(|s| s.state == "streaming" && s.sync_state == "quorum"));
        let one_async = Observed {
            semi_clients: 1,
            ..primary.clone()
        };
        assert!(replication_report(&one_async, false)
            .standbys
            .iter()
            .all(|s| s.sync_state == "potential"));
        let plain = Observed {
            semi_source_enabled: false,
            ..primary
        };
        let r = replication_report(&plain, false);
        assert_eq!(r.synchronous_standby_names, "");
        assert!(r.standbys.iter().all(|s| s.sync_state == "async"));
    }

    #[test]
    fn config_by_role() {
        let (d, s, p, f) = (
            Path::new("/s/mariadb/data"),
            Path::new("/s/mariadb/run/mariadbd.sock"),
            Path::new("/s/mariadb/run/mariadbd.pid"),
            Path::new("/s/mariadb/fence.cnf"),
        );
        let c = |read_only, semi, temp| {
            render_config(&ServerConfig {
                datadir: d,
                tmpdir: Path::new("/s/mariadb/tmp"),
                socket: s,
                pid_file: p,
                port: 3307,
                server_id: 42,
                report_host: "vm2",
                read_only,
                semi_sync_master: semi,
                temp,
                fence: f,
            })
        };
        let replica = c(true, false, false);
        for line in [
            "[mariadbd]",
            "datadir = /s/mariadb/data",
            "tmpdir = /s/mariadb/tmp",
            "socket = /s/mariadb/run/mariadbd.sock",
            "port = 3307",
            "bind_address = *",
            "server_id = 42",
            "report_host = vm2",
            "log_bin = binlog",
            "log_slave_updates = ON",
            "binlog_format = ROW",
            "gtid_strict_mode = ON",
            "gtid_domain_id = 0",
            "skip_slave_start = ON",
            "read_only = ON",
            "rpl_semi_sync_master_enabled = OFF",
            "rpl_semi_sync_slave_enabled = ON",
            "sync_binlog = 1",
            "innodb_flush_log_at_trx_commit = 1",
            "innodb_buffer_pool_size = 128M",
            "!include /s/mariadb/fence.cnf",
        ] {
            assert!(
                replica.lines().any(|l| l == line),
                "{line:?} missing from:\n{replica}"
            );
        }
        // The fence comes last: it overrides read_only.
        assert!(replica
            .trim_end()
            .ends_with("!include /s/mariadb/fence.cnf"));
        let primary = c(false, true, false);
        assert!(primary.lines().any(|l| l == "read_only = OFF"));
        assert!(primary
            .lines()
            .any(|l| l == "rpl_semi_sync_master_enabled = ON"));
        assert!(primary
            .lines()
            .any(|l| l == "rpl_semi_sync_master_wait_point = AFTER_SYNC"));
        let temp = c(false, true, true);
        assert!(temp.lines().any(|l| l == "skip_networking = ON"));
        assert!(!temp.contains("bind_address"));
        assert!(!temp.contains("!include"));
        assert!(!temp.contains("report_host"));
        assert!(temp
            .lines()
            .any(|l| l == "rpl_semi_sync_slave_enabled = OFF"));
        assert!(temp
            .lines()
            .any(|l| l == "rpl_semi_sync_master_enabled = OFF"));
    }

    #[test]
    fn semi_sync_needs_a_primary_with_replicas() {
        let mut s = spec("primary");
        s.sync = true;
        assert!(!wants_semi_sync(&s));
        s.replicas = vec!["vm2".into()];
        assert!(wants_semi_sync(&s));
        s.role = "replica".into();
        assert!(!wants_semi_sync(&s));
    }

    #[test]
    fn cnf_paths_need_no_quoting() {
        assert!(check_cnf_path(Path::new("/var/lib/corral-agent/mariadb")).is_ok());
        for bad in ["/a b", "/a#b", "/a\"b", "/a\\b", "/a;b"] {
            assert!(check_cnf_path(Path::new(bad)).is_err(), "{bad}");
        }
    }

    /// One binlog event: header (19 bytes) + body.
    fn event(kind: u8, server: u32, flags: u16, body: &[u8]) -> Vec<u8> {
        let len = 19 + body.len() as u32;
        let mut e = Vec::new();
        e.extend_from_slice(&0u32.to_le_bytes());
        e.push(kind);
        e.extend_from_slice(&server.to_le_bytes());
        e.extend_from_slice(&len.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(body);
        e
    }

    fn gtid_event(server: u32, domain: u32, seq: u64) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&[0u8; 7]);
        event(GTID_EVENT, server, 0, &b)
    }

    fn gtid_list(gtids: &[Gtid]) -> Vec<u8> {
        let mut b = (gtids.len() as u32).to_le_bytes().to_vec();
        for g in gtids {
            b.extend_from_slice(&g.domain.to_le_bytes());
            b.extend_from_slice(&g.server.to_le_bytes());
            b.extend_from_slice(&g.seq.to_le_bytes());
        }
        b.extend_from_slice(&[1, 2, 3, 4]); // checksum
        event(GTID_LIST_EVENT, 1, 0, &b)
    }

    fn binlog(in_use: bool, events: &[Vec<u8>]) -> Vec<u8> {
        let mut f = b"\xfebin".to_vec();
        f.extend(event(
            FORMAT_DESCRIPTION_EVENT,
            1,
            if in_use { LOG_EVENT_BINLOG_IN_USE_F } else { 0 },
            &[0u8; 40],
        ));
        for e in events {
            f.extend_from_slice(e);
        }
        f
    }

    #[test]
    fn binlog_tails() {
        let scan = |b: Vec<u8>| scan_binlog(std::io::Cursor::new(b)).unwrap();
        // Only the state at the start of the file: the list's last per domain.
        let t = scan(binlog(
            false,
            &[gtid_list(&[g(0, 2, 7), g(0, 1, 9), g(1, 5, 3)])],
        ));
        assert_eq!(t.gtids, vec![g(0, 1, 9), g(1, 5, 3)]);
        assert!(t.closed_cleanly);
        // Transactions after it, with other events between.
        let t = scan(binlog(
            true,
            &[
                gtid_list(&[g(0, 1, 9)]),
                gtid_event(1, 0, 10),
                event(2, 1, 0, b"BEGIN"),
                gtid_event(3, 0, 11),
                event(16, 3, 0, &[0u8; 12]),
            ],
        ));
        assert_eq!(t.gtids, vec![g(0, 3, 11)]);
        assert!(!t.closed_cleanly);
        // A crash mid-event: the incomplete one does not count.
        let mut b = binlog(true, &[gtid_list(&[]), gtid_event(1, 0, 1)]);
        let partial = gtid_event(1, 0, 2);
        b.extend_from_slice(&partial[..25]);
        let t = scan(b);
        assert_eq!(t.gtids, vec![g(0, 1, 1)]);
        // Empty and foreign files.
        assert_eq!(scan(binlog(false, &[])).gtids, vec![]);
        assert!(scan_binlog(std::io::Cursor::new(b"hello".to_vec())).is_err());
    }
}
