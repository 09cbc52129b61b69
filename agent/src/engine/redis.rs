//! Redis (and Valkey, KeyDB: the same protocol): configuration, process,
//! replication with REPLICAOF.
//!
//! # Layout under `<state>/redis/`
//!
//! - `data/` (the `redis` user's, 0700): the server's `dir`: the
//!   append-only files (`appendonlydir/`) and `dump.rdb`.
//! - `run/` (redis, 0700): the Unix socket and the pid file. Only redis and
//!   root reach the socket; the agent administers the server through it.
//! - `redis.conf` (redis, 0600): written from the spec and the files below;
//!   it holds the passwords (Redis has no other way to be given them),
//!   hence 0600. The server is always started on this file, never on the
//!   system's `/etc/redis`.
//! - `secrets.json` (root, 0600): the passwords the coordinator sent, which
//!   redis.conf is written from.
//! - `upstream.json` (root, 0600): present while the data follows another
//!   node (the replica marker: `replicaof` in redis.conf comes from it, not
//!   from the role in the spec, so nothing but [`Driver::promote`] ever
//!   makes a replica a primary).
//! - `fenced` (root): present while the node is fenced.
//! - `stopped.json` (root, 0600): the replication offset recorded by the
//!   last clean stop; removed when the server starts.
//! - `server.log`: the server's stdout and stderr (its log).
//! - While cloning: `clone.conf` and `data.clone/` (the temporary server),
//!   and `data.old/` (the previous data, until the new copy is complete).
//! - While restoring a backup: `restore.conf` and `data.restore/` (the
//!   temporary server turning the RDB into the append-only file; see
//!   redis_backup.rs).
//!
//! # Users
//!
//! Three ACL users, declared in redis.conf and kept by [`Driver::bootstrap`]:
//! `default` and the spec's admin user both have every right with the admin
//! password (so password-only clients, `AUTH <password>`, and the URI the
//! coordinator hands out, `redis://<admin>:<password>@...`, both work; the
//! agent itself logs in as `default` over the socket), and
//! `corral_replication` may only `PSYNC`, `REPLCONF` and `PING`, with the
//! replication password, which replicas use (`masteruser` / `masterauth`).
//! Redis has numbered databases, not named ones: the spec's database is
//! ignored.
//!
//! # Replication, and what `sync` means here
//!
//! A replica follows its upstream with `replicaof` and syncs itself: a
//! partial resynchronisation from the primary's backlog when it can, else a
//! full one (a new copy of the data set, replacing what it had: nothing can
//! diverge silently). Redis replication is asynchronous, always: a write is
//! acknowledged to the client before any replica has it.
//!
//! `sync` sets `min-replicas-to-write 1` and `min-replicas-max-lag 10` on
//! the primary: it refuses writes (`NOREPLICAS`) while no replica is
//! connected and has acknowledged within the last 10 seconds. That bounds
//! what a failover can lose to about the last 10 seconds of writes, and
//! stops a primary that lost every replica from accepting writes at all. It
//! does NOT make a write durable on a replica before it is acknowledged;
//! a client that needs that sends `WAIT 1 <timeout>` after its write, which
//! returns how many replicas have it. Replicas are therefore reported with
//! `sync_state` "async", never "sync".
//!
//! # Fence
//!
//! A fenced primary refuses every write: `min-replicas-to-write` is raised
//! to a number of replicas no cluster has ([`FENCE_MIN_REPLICAS`]), which
//! makes Redis answer `NOREPLICAS` to every write command, scripts and
//! transactions included, and the client sessions open at that moment are
//! ended. The fence is a file read whenever redis.conf is written, so it
//! holds across restarts; it has no effect on a replica.
//!
//! # Replica names
//!
//! The coordinator looks a replica up in its primary's standbys by node id.
//! Redis identifies a replica by the address it announces, and does not
//! check that the announced "IP" is one (Redis 7 and Valkey keep it as a
//! string up to 255 bytes): every replica announces its node id
//! (`replica-announce-ip <node id>`), so the primary's `INFO replication`
//! lists `slave0:ip=<node id>,port=...`. Nothing in Corral connects to a
//! replica through that address (there is no Sentinel). A replica that does
//! not announce a name (not one of ours) is named `<ip>:<port>`.
//!
//! # Positions
//!
//! Positions are replication offsets (bytes of the replication stream). A
//! primary reports its `master_repl_offset`; a replica what it has
//! processed (`slave_repl_offset`; Redis applies what it receives at once)
//! and what it has read. A primary reports each replica at the offset the
//! replica last acknowledged (`REPLCONF ACK`, once a second).
//! `system_identifier` is the replication id (`master_replid`), shared by a
//! primary and the replicas in sync with it; a promotion starts a new one.
//!
//! Redis loads an append-only file without its replication id, so a server
//! restarted on its AOF is served a full resynchronisation by its primary
//! (and a restarted primary's replicas resync fully): correct, but a copy of
//! the data set each time.

use super::os::{
    self, log_tail, mkdir_owned, remove_dir, remove_file, write_owned, Account, TAIL_LINES,
};
use super::{BackupInfo, Driver, EngineSpec, Health, ProgressFn, Recovery, Secrets, Upstream};
use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "redis_acl.rs"]
mod acl;
#[path = "redis_backup.rs"]
mod backup;
#[path = "redis_tls.rs"]
mod tls;
pub use acl::AGENT_USER;

/// The server binary. Valkey and KeyDB ship `valkey-server` and
/// `keydb-server`, which take the same configuration and commands.
const SERVER_BIN: &str = "redis-server";
/// The OS account the server runs as (never root).
const SERVER_USER: &str = "redis";
/// Where the binary is looked for.
const BIN_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/usr/sbin", "/usr/local/sbin"];

/// The ACL user replicas authenticate as.
pub const REPLICATION_USER: &str = "corral_replication";
/// `min-replicas-to-write` of a fenced node: more replicas than any cluster
/// has, so every write is refused.
pub const FENCE_MIN_REPLICAS: u32 = 1_000_000;
/// How far behind (seconds since its last acknowledgement) a replica may be
/// and still count for `min-replicas-to-write` (Redis's default).
const SYNC_MAX_LAG: u32 = 10;
/// How long a clean stop may take before it is reported as failed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the administrative connection and each command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// A clone that receives nothing for this long has failed.
const CLONE_STALL: Duration = Duration::from_secs(60);
/// How long a stop waits for the replicas to acknowledge the last write
/// before it shuts down (which then waits again, up to shutdown-timeout).
const WAIT_REPLICAS_MS: u64 = 2_000;
/// The channel a stopping primary publishes to, so that `WAIT` has a
/// position after every client write to wait for (nobody listens).
const STOP_CHANNEL: &str = "__corral__:stopping";
/// The longest Unix socket path (sun_path holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

pub struct Redis {
    /// `<state>/redis`: everything the driver keeps.
    base: PathBuf,
    /// This node's id: what it announces to its primary as its address, so
    /// the primary's replica list names it (see the module doc).
    node_id: String,
    /// The server binary's name ([`SERVER_BIN`] unless configured:
    /// `valkey-server`, `keydb-server`), looked for in [`BIN_DIRS`], or a
    /// path.
    bin: String,
    /// The cached administrative connection (over the socket, as `default`).
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Held by every step that changes which node the server follows, or
    /// its write settings (prepare, promote, fence, convergence in check),
    /// so a health check converging to the files on disk never interleaves
    /// with a promotion that is changing them.
    role_lock: tokio::sync::Mutex<()>,
    /// The node's certificate (see redis_tls.rs; none: no TLS).
    tls: std::sync::Arc<super::tls::EngineTls>,
}

/// The OS account the server runs as: [`SERVER_USER`].
fn account() -> Result<Account> {
    Account::lookup(SERVER_USER, "install Redis (apt install redis-server)")
}

/// A redis.conf argument in double quotes, with the escapes Redis's
/// argument splitter (sdssplitargs) reads back byte for byte.
fn conf_quote(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for b in v.bytes() {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s.push('"');
    s
}

/// The passwords as kept on disk (`secrets.json`).
#[derive(Clone, Serialize, Deserialize)]
struct StoredSecrets {
    admin_password: String,
    replication_password: String,
    /// The agent's own ACL user's (see redis_acl.rs); made by the agent,
    /// absent from files written before it existed (then made at once).
    #[serde(default)]
    agent_password: String,
}

/// The ACL users and their rules, in `ACL SETUSER` form (see redis_acl.rs).
fn acl_users(admin_user: &str, s: &StoredSecrets) -> Vec<(String, Vec<String>)> {
    acl::acl_users(
        admin_user,
        &s.admin_password,
        &s.replication_password,
        &s.agent_password,
    )
}

/// `min-replicas-to-write` and `min-replicas-max-lag` for a node.
fn min_replicas(spec: &EngineSpec, fenced: bool) -> (u32, u32) {
    if fenced {
        (FENCE_MIN_REPLICAS, 1)
    } else if spec.role == "primary" && spec.sync && !spec.replicas.is_empty() {
        (1, SYNC_MAX_LAG)
    } else {
        (0, SYNC_MAX_LAG)
    }
}

/// Everything redis.conf is written from.
struct ConfInput<'a> {
    /// TCP port; 0 for the clone's temporary server (socket only).
    port: u16,
    /// The port announced to the primary (the real one, also when cloning).
    announce_port: u16,
    socket: &'a Path,
    pidfile: &'a Path,
    dir: &'a Path,
    node_id: &'a str,
    admin_user: &'a str,
    secrets: &'a StoredSecrets,
    upstream: Option<&'a Upstream>,
    min_replicas: (u32, u32),
}

fn render_conf(c: &ConfInput) -> String {
    let q = |p: &Path| conf_quote(&p.to_string_lossy());
    let mut s = format!(
        "# Written by corral-agent from the cluster's spec; edits here are overwritten.\n\
         # Every address (IPv6 too when the host has it); every user needs a password.\n\
         port {port}\n\
         bind * -::*\n\
         protected-mode yes\n\
         unixsocket {socket}\n\
         unixsocketperm 700\n\
         pidfile {pidfile}\n\
         dir {dir}\n\
         # The log goes to stdout, which the agent appends to server.log.\n\
         logfile \"\"\n\
         daemonize no\n\
         supervised no\n\
         # The config file in the process title: how the agent recognises its server.\n\
         proc-title-template \"{{title}} {{listen-addr}} {{server-mode}} {{config-file}}\"\n\
         # Durability: the append-only file, fsynced every second. No RDB\n\
         # schedule (full syncs and AOF rewrites write RDB files themselves).\n\
         appendonly yes\n\
         appendfsync everysec\n\
         save \"\"\n\
         # Replication. Without a zero delay every full sync waits 5 s for\n\
         # more replicas to share it.\n\
         repl-diskless-sync yes\n\
         repl-diskless-sync-delay 0\n\
         # Room for a replica to resume after a short break without a full sync.\n\
         repl-backlog-size 64mb\n\
         replica-read-only yes\n\
         # Announced as this replica's address: the primary lists it by node id.\n\
         replica-announce-ip {node}\n\
         replica-announce-port {announce}\n\
         # Writes need this many replicas acknowledging within the lag (0: off;\n\
         # {fence}: fenced, every write refused).\n\
         min-replicas-to-write {to_write}\n\
         min-replicas-max-lag {max_lag}\n",
        port = c.port,
        socket = q(c.socket),
        pidfile = q(c.pidfile),
        dir = q(c.dir),
        node = conf_quote(c.node_id),
        announce = c.announce_port,
        fence = FENCE_MIN_REPLICAS,
        to_write = c.min_replicas.0,
        max_lag = c.min_replicas.1,
    );
    s.push_str("# Users (rules as ACL SETUSER takes them).\n");
    for (user, rules) in acl_users(c.admin_user, c.secrets) {
        let rules: Vec<String> = rules.iter().map(|r| conf_quote(r)).collect();
        s.push_str(&format!("user {} {}\n", conf_quote(&user), rules.join(" ")));
    }
    s.push_str(&format!(
        "masteruser {}\nmasterauth {}\n",
        conf_quote(REPLICATION_USER),
        conf_quote(&c.secrets.replication_password)
    ));
    if let Some(up) = c.upstream {
        s.push_str(&format!("replicaof {} {}\n", conf_quote(&up.host), up.port));
    }
    s
}

/// The `min-replicas-to-write` and `min-replicas-max-lag` a redis.conf sets.
fn conf_min_replicas(conf: &str) -> Option<(u32, u32)> {
    let get = |key: &str| {
        conf.lines().find_map(|l| {
            let (k, v) = l.trim().split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u32>().ok()).flatten()
        })
    };
    Some((get("min-replicas-to-write")?, get("min-replicas-max-lag")?))
}

/// `INFO` output: its `key:value` lines, in order.
struct Info(Vec<(String, String)>);

impl Info {
    fn parse(text: &str) -> Info {
        Info(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A counter; negative values (`-1`: unknown) read as None.
    fn num(&self, key: &str) -> Option<u64> {
        self.get(key)?
            .parse::<i64>()
            .ok()
            .and_then(|v| u64::try_from(v).ok())
    }

    fn is_replica(&self) -> bool {
        self.get("role") == Some("slave")
    }

    /// Whether the server follows `up`.
    fn follows(&self, up: &Upstream) -> bool {
        self.is_replica()
            && self.get("master_host") == Some(up.host.as_str())
            && self.num("master_port") == Some(u64::from(up.port))
    }

    fn version(&self) -> String {
        self.get("valkey_version")
            .or_else(|| self.get("redis_version"))
            .unwrap_or("unknown")
            .to_string()
    }
}

/// A primary's view of one replica, from an `INFO replication` line such as
/// `slave0:ip=vm2,port=6379,state=online,offset=1234,lag=0`.
fn parse_standby(line: &str, master_offset: u64) -> Option<pb::Standby> {
    let fields: Vec<(&str, &str)> = line.split(',').filter_map(|f| f.split_once('=')).collect();
    let get = |k: &str| fields.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let ip = get("ip")?;
    let port = get("port").unwrap_or("0");
    let offset: u64 = get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    let lag_s: u64 = get("lag").and_then(|v| v.parse().ok()).unwrap_or(0);
    let name = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(_)) => format!("[{ip}]:{port}"),
        Ok(_) => format!("{ip}:{port}"),
        // Our replicas announce their node id.
        Err(_) => ip.to_string(),
    };
    let state = match get("state").unwrap_or("") {
        "online" => "streaming",
        "wait_bgsave" => "startup",
        "send_bulk" => "catchup",
        other => other,
    };
    Some(pb::Standby {
        name,
        state: state.to_string(),
        // Redis knows each replica's acknowledged offset only.
        sent_lsn: offset,
        flush_lsn: offset,
        replay_lsn: offset,
        // `lag` counts seconds since the replica's last acknowledgement
        // (sent every second): a replica that has everything is not late.
        replay_lag_ms: if offset >= master_offset {
            0
        } else {
            lag_s * 1000
        },
        sync_state: "async".into(),
    })
}

/// The figures `EngineStatus.stats` carries for Redis: connected clients,
/// memory used, keys (every database), the replication offset, and on a
/// replica the seconds since it last heard from its primary (Redis has no
/// replay lag: it applies what it receives).
fn stats_from_info(info: &Info) -> std::collections::BTreeMap<String, f64> {
    let mut stats = std::collections::BTreeMap::new();
    let num = |k: &str| info.get(k).and_then(|v| v.parse::<f64>().ok());
    if let Some(n) = num("connected_clients") {
        stats.insert("connections".to_string(), n);
    }
    if let Some(n) = num("used_memory") {
        stats.insert("used_memory_bytes".to_string(), n);
    }
    let keys: f64 = (0..16)
        .filter_map(|db| info.get(&format!("db{db}")))
        .filter_map(|v| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix("keys="))
                .and_then(|n| n.parse::<f64>().ok())
        })
        .sum();
    stats.insert("keys".to_string(), keys);
    let offset = if info.get("role") == Some("slave") {
        num("slave_repl_offset")
    } else {
        num("master_repl_offset")
    };
    if let Some(n) = offset {
        stats.insert("repl_offset_bytes".to_string(), n);
    }
    if let Some(n) = num("master_last_io_seconds_ago").filter(|n| *n >= 0.0) {
        stats.insert("lag_seconds".to_string(), n);
    }
    stats
}

/// The replication state from `INFO replication` and the running
/// `min-replicas-to-write`.
fn replication_from_info(info: &Info, min_replicas_to_write: u64) -> pb::Replication {
    let master_offset = info.num("master_repl_offset").unwrap_or(0);
    let mut r = pb::Replication {
        in_recovery: info.is_replica(),
        system_identifier: info.get("master_replid").unwrap_or("").to_string(),
        timeline: 0,
        synchronous_standby_names: if min_replicas_to_write > 0 {
            format!("min-replicas-to-write {min_replicas_to_write}")
        } else {
            String::new()
        },
        ..Default::default()
    };
    if r.in_recovery {
        let processed = info.num("slave_repl_offset").unwrap_or(master_offset);
        let read = info.num("slave_read_repl_offset").unwrap_or(processed);
        r.lsn = processed;
        r.receive_lsn = read;
        // What the primary had sent as far as this replica knows.
        r.upstream_lsn = read;
        r.streaming = info.get("master_link_status") == Some("up");
        r.upstream_host = info.get("master_host").unwrap_or("").to_string();
    } else {
        r.lsn = master_offset;
        r.standbys = info
            .0
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix("slave")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .filter_map(|(_, v)| parse_standby(v, master_offset))
            .collect();
    }
    r
}

/// Whether an error means the connection itself is unusable.
fn broken(e: &::redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// Connects to the server's socket as `user` with `password`.
async fn connect(socket: &Path, user: &str, password: &str) -> Result<MultiplexedConnection> {
    let info = ConnectionAddr::Unix(socket.to_path_buf())
        .into_connection_info()?
        .set_redis_settings(
            RedisConnectionInfo::default()
                .set_username(user)
                .set_password(password)
                .set_skip_set_lib_name(),
        );
    let client = ::redis::Client::open(info)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

fn cmd(name: &str) -> ::redis::Cmd {
    ::redis::cmd(name)
}

impl Redis {
    /// A driver keeping its files under `<state_dir>/redis/`.
    pub fn new(state_dir: &Path, node_id: &str) -> Redis {
        let base = state_dir.join("redis");
        Redis {
            // Absolute: the server runs in another directory, and its
            // process title (how find_running recognises it) shows the
            // config file's absolute path.
            base: std::path::absolute(&base).unwrap_or(base),
            node_id: node_id.to_string(),
            bin: SERVER_BIN.to_string(),
            conn: tokio::sync::Mutex::new(None),
            role_lock: tokio::sync::Mutex::new(()),
            tls: Default::default(),
        }
    }

    /// Speaks TLS (when the cluster requires it) with the certificate
    /// `tls` holds (see redis_tls.rs).
    pub fn with_tls(mut self, tls: std::sync::Arc<super::tls::EngineTls>) -> Redis {
        self.tls = tls;
        self
    }

    /// The server's copy of the node's certificate, if it has one.
    fn tls_files(&self) -> Option<super::tls::TlsFiles> {
        self.tls.files_in(&self.base)
    }

    /// The same driver running `server` (a name looked for in the usual
    /// directories, or a path): `valkey-server` or `keydb-server` speak the
    /// same protocol and read the same configuration.
    pub fn with_server(mut self, server: &str) -> Redis {
        self.bin = server.to_string();
        self
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    /// The Unix socket the agent administers the server through.
    pub fn socket_path(&self) -> PathBuf {
        self.run_dir().join("redis.sock")
    }

    pub fn conf_path(&self) -> PathBuf {
        self.base.join("redis.conf")
    }

    fn pid_path(&self) -> PathBuf {
        self.run_dir().join("redis.pid")
    }

    fn secrets_path(&self) -> PathBuf {
        self.base.join("secrets.json")
    }

    fn upstream_path(&self) -> PathBuf {
        self.base.join("upstream.json")
    }

    fn fence_path(&self) -> PathBuf {
        self.base.join("fenced")
    }

    fn stopped_path(&self) -> PathBuf {
        self.base.join("stopped.json")
    }

    fn clone_dir(&self) -> PathBuf {
        self.base.join("data.clone")
    }

    fn clone_conf_path(&self) -> PathBuf {
        self.base.join("clone.conf")
    }

    fn clone_socket(&self) -> PathBuf {
        self.run_dir().join("clone.sock")
    }

    fn clone_pid_path(&self) -> PathBuf {
        self.run_dir().join("clone.pid")
    }

    /// The base directory (root's, 0755), the run directory and the TLS
    /// files; returns whether the TLS files changed.
    fn ensure_dirs(&self, acct: &Account) -> Result<bool> {
        os::mkdir(&self.base, 0o755)?;
        let socket = self.socket_path();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the socket path {} is longer than {MAX_SOCKET_PATH} bytes, which Unix sockets \
                 cannot hold: use a shorter --state-dir",
                socket.display()
            );
        }
        mkdir_owned(&self.run_dir(), 0o700, acct)?;
        self.tls.install_in(&self.base, acct)
    }

    fn binary(&self) -> Result<PathBuf> {
        if self.bin.contains('/') {
            return Ok(PathBuf::from(&self.bin));
        }
        os::find_program(&self.bin, BIN_DIRS, "install it (apt install redis-server)")
    }

    /// Spawns the server on `conf` as the server user, its own process
    /// group, output appended to server.log.
    fn spawn(&self, conf: &Path, acct: &Account) -> Result<tokio::process::Child> {
        let log = os::open_log(&self.log_path())?;
        os::spawn_logged(
            os::command(&self.binary()?, Some(acct), "/usr/bin:/bin", &self.base).arg(conf),
            log,
            &self.bin,
        )
    }

    fn load_secrets(&self) -> Result<StoredSecrets> {
        let path = self.secrets_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no passwords on this node yet ({} is missing): the coordinator sends them with \
                 its next ConfigureEngine",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut secrets: StoredSecrets = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid", path.display()))?;
        if secrets.agent_password.is_empty() {
            // Written before the agent had a user of its own.
            secrets.agent_password = acl::new_agent_password()?;
            corral_proto::pki::write_private(&path, &serde_json::to_string(&secrets)?)?;
        }
        Ok(secrets)
    }

    /// The upstream the data follows (the replica marker), if any.
    fn upstream(&self) -> Result<Option<Upstream>> {
        let path = self.upstream_path();
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                Ok(Some(serde_json::from_str(&t).with_context(|| {
                    format!("{} is not valid", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn set_upstream(&self, up: &Upstream) -> Result<()> {
        if self.upstream()?.as_ref() == Some(up) {
            return Ok(());
        }
        corral_proto::pki::write_private(&self.upstream_path(), &serde_json::to_string(up)?)
    }

    fn fenced(&self) -> bool {
        self.fence_path().exists()
    }

    /// Writes redis.conf for `spec` from the passwords, the replica marker
    /// and the fence; returns whether it changed.
    fn write_config(&self, spec: &EngineSpec, acct: &Account) -> Result<bool> {
        let secrets = self.load_secrets()?;
        let upstream = self.upstream()?;
        let conf = render_conf(&ConfInput {
            port: spec.port,
            announce_port: spec.port,
            socket: &self.socket_path(),
            pidfile: &self.pid_path(),
            dir: &self.data_dir(),
            node_id: &self.node_id,
            admin_user: &spec.admin_user,
            secrets: &secrets,
            upstream: upstream.as_ref(),
            min_replicas: min_replicas(spec, self.fenced()),
        }) + &tls::conf(
            self.tls_files().as_ref(),
            spec.port,
            spec.require_client_tls,
        );
        write_owned(&self.conf_path(), &conf, acct)
    }

    /// The cached administrative connection, opened when there is none.
    async fn admin(&self) -> Result<MultiplexedConnection> {
        let mut slot = tokio::time::timeout(COMMAND_TIMEOUT, self.conn.lock())
            .await
            .map_err(|_| anyhow!("the admin connection is busy (another command hangs)"))?;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let secrets = self.load_secrets()?;
        let socket = self.socket_path();
        let c = match connect(&socket, AGENT_USER, &secrets.agent_password).await {
            Ok(c) => c,
            // A server started before the agent had its own user: as
            // `default`, once, to create it.
            Err(first) => {
                let mut legacy = connect(&socket, "default", &secrets.admin_password)
                    .await
                    .map_err(|_| first)?;
                let rules = acl_users("default", &secrets).swap_remove(0).1;
                cmd("ACL")
                    .arg("SETUSER")
                    .arg(AGENT_USER)
                    .arg(&rules)
                    .query_async::<()>(&mut legacy)
                    .await
                    .context("creating the agent's ACL user")?;
                connect(&socket, AGENT_USER, &secrets.agent_password).await?
            }
        };
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn forget_conn(&self) {
        *self.conn.lock().await = None;
    }

    /// Runs `command` over the admin connection; a broken connection is
    /// dropped, to be reopened by the next command.
    async fn run<T: ::redis::FromRedisValue>(&self, command: &::redis::Cmd) -> Result<T> {
        let mut c = self.admin().await?;
        match tokio::time::timeout(COMMAND_TIMEOUT, command.query_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if broken(&e) {
                    self.forget_conn().await;
                }
                Err(e.into())
            }
            Err(_) => {
                self.forget_conn().await;
                bail!("no answer within {}s", COMMAND_TIMEOUT.as_secs())
            }
        }
    }

    async fn info(&self, sections: &[&str]) -> Result<Info> {
        let mut c = cmd("INFO");
        for s in sections {
            c.arg(*s);
        }
        let text: String = self.run(&c).await.context("INFO")?;
        Ok(Info::parse(&text))
    }

    /// Sets the write settings on the running server.
    async fn set_min_replicas(&self, (to_write, max_lag): (u32, u32)) -> Result<()> {
        self.run::<()>(
            cmd("CONFIG")
                .arg("SET")
                .arg("min-replicas-to-write")
                .arg(to_write)
                .arg("min-replicas-max-lag")
                .arg(max_lag),
        )
        .await
        .context("CONFIG SET min-replicas-to-write")
    }

    /// Has a running TLS server read its (renewed) certificate files again:
    /// setting a file, even to the same path, reloads it. Best effort: a
    /// server without TLS gets it at its next start.
    async fn reload_tls(&self, spec: &EngineSpec) {
        let Some(f) = self.tls_files().filter(|_| spec.require_client_tls) else {
            return;
        };
        let mut c = cmd("CONFIG");
        c.arg("SET");
        for (k, v) in [
            ("tls-cert-file", f.cert()),
            ("tls-key-file", f.key()),
            ("tls-ca-cert-file", f.ca()),
        ] {
            c.arg(k).arg(v.to_string_lossy().as_ref());
        }
        if let Err(e) = self.run::<()>(&c).await {
            tracing::warn!("reloading the TLS certificate: {e:#}");
        }
    }

    /// The ACL users as redis.conf declares them, on the running server.
    async fn set_users(&self, admin_user: &str, secrets: &StoredSecrets) -> Result<()> {
        for (user, rules) in acl_users(admin_user, secrets) {
            self.run::<()>(cmd("ACL").arg("SETUSER").arg(&user).arg(&rules))
                .await
                .with_context(|| format!("ACL SETUSER {user}"))?;
        }
        Ok(())
    }

    /// Makes the running server follow `up` (credentials first).
    async fn follow(&self, up: &Upstream, secrets: &StoredSecrets) -> Result<()> {
        self.run::<()>(
            cmd("CONFIG")
                .arg("SET")
                .arg("masteruser")
                .arg(REPLICATION_USER)
                .arg("masterauth")
                .arg(&secrets.replication_password),
        )
        .await
        .context("CONFIG SET masterauth")?;
        self.run::<()>(cmd("REPLICAOF").arg(&up.host).arg(up.port))
            .await
            .with_context(|| format!("REPLICAOF {} {}", up.host, up.port))
    }

    /// Brings the running server to what redis.conf says: users, write
    /// settings, the upstream it follows. Never `REPLICAOF NO ONE`: only
    /// [`Driver::promote`] does that. The caller holds `role_lock`.
    async fn apply_live(&self, spec: &EngineSpec) -> Result<()> {
        let secrets = self.load_secrets()?;
        self.set_users(&spec.admin_user, &secrets).await?;
        self.set_min_replicas(min_replicas(spec, self.fenced()))
            .await?;
        if let Some(up) = self.upstream()? {
            let info = self.info(&["replication"]).await?;
            if !info.follows(&up) {
                tracing::info!(host = %up.host, port = up.port, "following {}", up.node);
                self.follow(&up, &secrets).await?;
            }
        } else {
            self.run::<()>(
                cmd("CONFIG")
                    .arg("SET")
                    .arg("masteruser")
                    .arg(REPLICATION_USER)
                    .arg("masterauth")
                    .arg(&secrets.replication_password),
            )
            .await
            .context("CONFIG SET masterauth")?;
        }
        Ok(())
    }

    /// Check's convergence: the running server follows the marker's
    /// upstream and has redis.conf's write settings. Skipped while a step
    /// holds `role_lock` (it is changing exactly these).
    async fn converge(&self, info: &Info, running_min: (u32, u32)) -> Result<()> {
        let Ok(_guard) = self.role_lock.try_lock() else {
            return Ok(());
        };
        let up = self.upstream()?;
        if let Some(up) = &up {
            if !info.follows(up) {
                // Read again under the lock: a promotion may have ended
                // between the caller's INFO and here (then the marker is
                // gone and nothing is done).
                let now = self.info(&["replication"]).await?;
                if !now.follows(up) {
                    tracing::warn!(
                        role = now.get("role").unwrap_or("?"),
                        master = now.get("master_host").unwrap_or("none"),
                        "the server does not follow {} ({}:{}) as configured; repointing it",
                        up.node,
                        up.host,
                        up.port
                    );
                    self.follow(up, &self.load_secrets()?).await?;
                }
            }
        }
        let conf = std::fs::read_to_string(self.conf_path()).unwrap_or_default();
        if let Some(want) = conf_min_replicas(&conf) {
            if want != running_min {
                tracing::warn!(
                    running = ?running_min,
                    configured = ?want,
                    "min-replicas-to-write differs from redis.conf; setting it"
                );
                self.set_min_replicas(want).await?;
            }
        }
        Ok(())
    }

    /// One health check: INFO and the running write settings.
    async fn health(&self) -> Result<Health> {
        let mut c = self.admin().await?;
        let answer = tokio::time::timeout(
            COMMAND_TIMEOUT,
            ::redis::pipe()
                .cmd("INFO")
                .arg("server")
                .arg("replication")
                .arg("persistence")
                .arg("clients")
                .arg("memory")
                .arg("keyspace")
                .cmd("CONFIG")
                .arg("GET")
                .arg("min-replicas-to-write")
                .cmd("CONFIG")
                .arg("GET")
                .arg("min-replicas-max-lag")
                .query_async::<(String, Vec<String>, Vec<String>)>(&mut c),
        )
        .await;
        let (text, to_write, max_lag) = match answer {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                if broken(&e) {
                    self.forget_conn().await;
                }
                return Err(e).context("health query");
            }
            Err(_) => {
                self.forget_conn().await;
                bail!(
                    "health query timed out after {}s",
                    COMMAND_TIMEOUT.as_secs()
                )
            }
        };
        let info = Info::parse(&text);
        if info.get("loading") == Some("1") {
            bail!(
                "loading its data set ({}% done)",
                info.get("loading_loaded_perc").unwrap_or("?")
            );
        }
        let setting = |v: &[String]| v.get(1).and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let running_min = (setting(&to_write), setting(&max_lag));
        if let Err(e) = self.converge(&info, running_min).await {
            tracing::warn!("converging the running server to its configuration: {e:#}");
        }
        Ok(Health {
            version: info.version(),
            replication: replication_from_info(&info, u64::from(running_min.0)),
            stats: stats_from_info(&info),
        })
    }

    /// Before a stop: ends writes, records the replication offset (every
    /// acknowledged write is below it), and waits (briefly) until every
    /// replica has acknowledged it. Returns the offset and whether every
    /// replica has it.
    ///
    /// Writes are refused (`min-replicas-to-write`, in memory only: the
    /// file keeps the configured value), not paused with `CLIENT PAUSE`,
    /// which would also hold back the replicas' acknowledgements (they then
    /// come once a second). `WAIT` waits for the replicas to reach this
    /// connection's last write: a `PUBLISH` (replicated, and not a write, so
    /// not refused) puts it after every client write.
    async fn quiesce_and_record(&self, fenced: bool) -> Result<(u64, bool)> {
        if !fenced {
            self.set_min_replicas((FENCE_MIN_REPLICAS, 1))
                .await
                .context("refusing writes before the stop")?;
        }
        let recorded = async {
            let before = self.info(&["replication"]).await?;
            let replicas = before.num("connected_slaves").unwrap_or(0);
            let primary = !before.is_replica();
            if primary && replicas > 0 && !fenced {
                self.run::<()>(cmd("PUBLISH").arg(STOP_CHANNEL).arg(&self.node_id))
                    .await
                    .context("PUBLISH")?;
            }
            let info = self.info(&["replication"]).await?;
            let offset = info
                .num("master_repl_offset")
                .context("INFO replication shows no master_repl_offset")?;
            let record = serde_json::json!({
                "offset": offset,
                "replid": info.get("master_replid").unwrap_or(""),
            });
            corral_proto::pki::write_private(&self.stopped_path(), &record.to_string())?;
            // (A fenced primary's replicas cannot be reached: no waiting.)
            let mut all_acked = !primary || replicas == 0;
            if primary && replicas > 0 && !fenced {
                let acked: u64 = self
                    .run(cmd("WAIT").arg(replicas).arg(WAIT_REPLICAS_MS))
                    .await
                    .context("WAIT for the replicas")?;
                tracing::info!(
                    offset,
                    acked,
                    replicas,
                    "replicas acknowledged before the stop"
                );
                all_acked = acked >= replicas;
            }
            Ok::<_, anyhow::Error>((offset, all_acked))
        }
        .await;
        if recorded.is_err() && !fenced {
            // The stop may still fail: writes resume meanwhile.
            if let Some(want) =
                conf_min_replicas(&std::fs::read_to_string(self.conf_path()).unwrap_or_default())
            {
                let _ = self.set_min_replicas(want).await;
            }
        }
        recorded
    }

    /// Asks the running server to shut down (`SHUTDOWN`, `NOW`: without
    /// waiting for lagging replicas).
    async fn ask_shutdown(&self, now: bool) -> Shutdown {
        let mut c = match self.admin().await {
            Ok(c) => c,
            Err(e) => return Shutdown::Unreachable(e),
        };
        let mut q = cmd("SHUTDOWN");
        if now {
            q.arg("NOW");
        }
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, q.query_async::<()>(&mut c)).await;
        self.forget_conn().await;
        match answer {
            // An error reply: it refused, and runs on.
            Ok(Err(e)) if e.code().is_some() => Shutdown::Refused(e.to_string()),
            // The connection closed (it exits), or no answer yet (it waits
            // for its replicas first).
            _ => Shutdown::Stopping,
        }
    }

    /// The pid of a live server started on `conf`, from `pidfile`.
    fn running_on(&self, pidfile: &Path, conf: &Path) -> Option<u32> {
        let comm = Path::new(&self.bin)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.bin.clone());
        let pid = os::running_pid(pidfile, &comm)?;
        // The process title names the config file (proc-title-template):
        // a server of another node on this machine is not ours.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        cmdline
            .trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
            .ends_with(&*conf.to_string_lossy())
            .then_some(pid)
    }

    /// Ends a temporary clone server left by an interrupted clone.
    async fn kill_clone_server(&self) {
        use nix::sys::signal::{kill, Signal};
        let Some(pid) = self.running_on(&self.clone_pid_path(), &self.clone_conf_path()) else {
            return;
        };
        tracing::info!(pid, "ending the temporary server of an interrupted clone");
        let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        let began = Instant::now();
        while super::process_alive(pid) && began.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_file(self.clone_pid_path());
    }

    /// Watches the temporary clone server until it holds a complete copy
    /// (synced, loaded, its first AOF written), reporting progress.
    async fn await_clone(
        &self,
        child: &mut tokio::process::Child,
        up: &Upstream,
        password: &str,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        let socket = self.clone_socket();
        let mut conn: Option<MultiplexedConnection> = None;
        let mut last_change = Instant::now();
        let mut last_seen = (String::new(), 0u64);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the temporary {} exited ({status}) before the copy was complete; the end of \
                     its log ({}):\n{}",
                    self.bin,
                    self.log_path().display(),
                    log_tail(&self.log_path(), TAIL_LINES)
                );
            }
            if conn.is_none() {
                conn = connect(&socket, AGENT_USER, password).await.ok();
            }
            let mut text = None;
            if let Some(c) = conn.as_mut() {
                let mut q = cmd("INFO");
                q.arg("replication").arg("persistence");
                match tokio::time::timeout(COMMAND_TIMEOUT, q.query_async::<String>(c)).await {
                    Ok(Ok(t)) => text = Some(t),
                    _ => conn = None,
                }
            }
            if let Some(text) = text {
                let info = Info::parse(&text);
                let link = info.get("master_link_status").unwrap_or("").to_string();
                let read = info.num("master_sync_read_bytes").unwrap_or(0);
                if info.get("master_sync_in_progress") == Some("1") {
                    // Diskless transfers do not know their size: -1, i.e. 0.
                    progress(read, info.num("master_sync_total_bytes").unwrap_or(0));
                }
                let rewriting = info.get("aof_rewrite_in_progress") == Some("1")
                    || info.get("aof_rewrite_scheduled") == Some("1");
                // The AOF is off during the sync and restarted (by writing
                // it whole) right after: done once that is written.
                let done = link == "up"
                    && info.get("master_sync_in_progress") == Some("0")
                    && info.get("loading") == Some("0")
                    && info.get("aof_enabled") == Some("1")
                    && !rewriting;
                if done {
                    return Ok(());
                }
                // Synced and writing its first AOF: local work, no deadline
                // (an exit is caught above).
                if (link.clone(), read) != last_seen || (link == "up" && rewriting) {
                    last_change = Instant::now();
                }
                last_seen = (link, read);
            }
            if last_change.elapsed() > CLONE_STALL {
                bail!(
                    "nothing received from {} ({}:{}) for {}s; the end of the log ({}):\n{}",
                    up.node,
                    up.host,
                    up.port,
                    CLONE_STALL.as_secs(),
                    self.log_path().display(),
                    log_tail(&self.log_path(), TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops our own child cleanly (SIGTERM, repeated while Redis refuses)
    /// and waits for it.
    async fn stop_child(&self, child: &mut tokio::process::Child) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        let Some(pid) = child.id() else {
            return Ok(());
        };
        let began = Instant::now();
        loop {
            let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
            match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                Ok(Ok(status)) if status.success() => return Ok(()),
                Ok(Ok(status)) => bail!(
                    "the temporary {} did not stop cleanly ({status}); the end of its log:\n{}",
                    self.bin,
                    log_tail(&self.log_path(), TAIL_LINES)
                ),
                Ok(Err(e)) => return Err(e).context("waiting for the temporary server"),
                Err(_) if began.elapsed() > STOP_TIMEOUT => {
                    let _ = child.kill().await;
                    bail!(
                        "the temporary {} did not stop within {}s; the end of its log:\n{}",
                        self.bin,
                        STOP_TIMEOUT.as_secs(),
                        log_tail(&self.log_path(), TAIL_LINES)
                    )
                }
                Err(_) => {}
            }
        }
    }
}

/// What asking the server to shut down gave.
enum Shutdown {
    /// It exits, or waits for its replicas first.
    Stopping,
    /// It answered with an error and runs on.
    Refused(String),
    /// It could not be asked.
    Unreachable(anyhow::Error),
}

/// Total size of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tonic::async_trait]
impl Driver for Redis {
    fn engine_label(&self) -> &'static str {
        "Redis"
    }

    /// The data directory exists: made empty by `initialize`, or moved into
    /// place complete by `clone_data`.
    fn has_data(&self) -> bool {
        self.data_dir().is_dir()
    }

    fn data_is_standby(&self) -> Result<bool> {
        Ok(self.upstream()?.is_some())
    }

    async fn initialize(&self) -> Result<()> {
        // Redis needs no initdb: an empty directory is an empty data set.
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        mkdir_owned(&self.data_dir(), 0o700, &acct)
    }

    /// A temporary server (on the socket only) replicates from `up` into a
    /// scratch directory until it holds a complete copy, then stops
    /// cleanly; the copy replaces the data directory (the previous data, if
    /// any, is kept until then).
    async fn clone_data(
        &self,
        spec: &EngineSpec,
        up: &Upstream,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        let secrets = self.load_secrets()?;
        self.kill_clone_server().await;
        let scratch = self.clone_dir();
        remove_dir(&scratch)?;
        mkdir_owned(&scratch, 0o700, &acct)?;
        let conf = render_conf(&ConfInput {
            port: 0,
            announce_port: spec.port,
            socket: &self.clone_socket(),
            pidfile: &self.clone_pid_path(),
            dir: &scratch,
            node_id: &self.node_id,
            admin_user: &spec.admin_user,
            secrets: &secrets,
            upstream: Some(up),
            min_replicas: (0, SYNC_MAX_LAG),
        }) + &tls::conf(self.tls_files().as_ref(), 0, spec.require_client_tls);
        write_owned(&self.clone_conf_path(), &conf, &acct)?;
        tracing::info!(
            upstream = %up.node,
            dir = %scratch.display(),
            "cloning: a temporary {} replicates into a scratch directory",
            self.bin
        );
        let mut child = self.spawn(&self.clone_conf_path(), &acct)?;
        let copied = self
            .await_clone(&mut child, up, &secrets.agent_password, progress)
            .await;
        let stopped = match &copied {
            Ok(()) => self.stop_child(&mut child).await,
            Err(_) => {
                let _ = child.kill().await;
                Ok(())
            }
        };
        if let Err(e) = copied.and(stopped) {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
        if !scratch.join("appendonlydir").is_dir() {
            let _ = std::fs::remove_dir_all(&scratch);
            bail!(
                "the temporary {} stopped without writing its append-only file; the end of its \
                 log ({}):\n{}",
                self.bin,
                self.log_path().display(),
                log_tail(&self.log_path(), TAIL_LINES)
            );
        }
        let size = dir_size(&scratch);
        progress(size, size);
        // Marked first: data found without the mark would look like a
        // former primary's (and be made to follow anyway).
        self.set_upstream(up)?;
        // A re-clone replaces data that is still there (a rejoin that
        // failed): the old copy goes only once the new one is complete.
        let old = self.base.join("data.old");
        if self.data_dir().exists() {
            remove_dir(&old)?;
            std::fs::rename(self.data_dir(), &old)
                .context("moving the previous data directory aside")?;
        }
        std::fs::rename(&scratch, self.data_dir())
            .context("moving the cloned data directory into place")?;
        self.write_config(spec, &acct)?;
        remove_dir(&old)?;
        remove_file(&self.clone_conf_path())?;
        Ok(())
    }

    /// Redis resynchronises a former primary itself once it follows `up`
    /// (partially when the histories allow, else fully): this only marks
    /// the data as a replica's and writes `replicaof`.
    async fn rejoin(&self, spec: &EngineSpec, up: &Upstream) -> Result<()> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        if !self.has_data() {
            bail!("{} holds no data to rejoin with", self.data_dir().display());
        }
        self.set_upstream(up)?;
        self.write_config(spec, &acct)?;
        Ok(())
    }

    fn save_secrets(&self, secrets: &Secrets) -> Result<()> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        // The agent's password stays what it was (the server knows it).
        let agent_password = match self.load_secrets() {
            Ok(s) => s.agent_password,
            Err(_) => acl::new_agent_password()?,
        };
        let text = serde_json::to_string(&StoredSecrets {
            admin_password: secrets.admin_password.clone(),
            replication_password: secrets.replication_password.clone(),
            agent_password,
        })?;
        if std::fs::read_to_string(self.secrets_path()).ok().as_deref() != Some(text.as_str()) {
            corral_proto::pki::write_private(&self.secrets_path(), &text)?;
        }
        Ok(())
    }

    async fn prepare(&self, spec: &EngineSpec) -> Result<()> {
        let acct = account()?;
        let tls_changed = self.ensure_dirs(&acct)?;
        if !self.has_data() {
            bail!(
                "{} holds no Redis data directory",
                self.data_dir().display()
            );
        }
        let _role = self.role_lock.lock().await;
        // A replica follows its upstream. A primary spec leaves the marker
        // alone: a replica becomes a primary through promote only.
        if spec.role == "replica" {
            let up = spec
                .upstream
                .as_ref()
                .context("a replica needs an upstream")?;
            self.set_upstream(up)?;
        }
        self.write_config(spec, &acct)?;
        if tls_changed && self.find_running().is_some() {
            self.reload_tls(spec).await;
        }
        if self.find_running().is_some() {
            // Applied in place, not by a restart. The port is not changed
            // in place (the agent refuses to change it).
            match self.apply_live(spec).await {
                Ok(()) => {}
                Err(e)
                    if e.downcast_ref::<::redis::RedisError>()
                        .is_some_and(|r| r.code() == Some("LOADING")) =>
                {
                    // Health checks converge it once loaded.
                    tracing::info!("the server is loading its data; settings applied once loaded");
                }
                Err(e) => return Err(e.context("applying the configuration to the running server")),
            }
        }
        Ok(())
    }

    fn find_running(&self) -> Option<u32> {
        self.running_on(&self.pid_path(), &self.conf_path())
    }

    async fn start(&self, _spec: &EngineSpec) -> Result<tokio::process::Child> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        if !self.conf_path().exists() {
            bail!(
                "{} is missing: the engine was never prepared",
                self.conf_path().display()
            );
        }
        // A position recorded by an earlier stop no longer holds.
        remove_file(&self.stopped_path())?;
        self.forget_conn().await;
        let child = self.spawn(&self.conf_path(), &acct)?;
        tracing::info!(pid = child.id(), log = %self.log_path().display(), "{} started", self.bin);
        Ok(child)
    }

    /// Ends writes, records the offset, waits for the replicas to have it,
    /// then `SHUTDOWN`: Redis ends client sessions, waits for replicas that
    /// still lack writes (up to its `shutdown-timeout`, 10 s; not when
    /// fenced: they cannot be reached), flushes the AOF and exits. SIGTERM
    /// when the server cannot be asked.
    async fn stop(&self, pid: u32) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        // Held to the end: a health check meanwhile must not converge the
        // write settings back (writes are refused on purpose from here).
        let _role = self.role_lock.lock().await;
        let fenced = self.fenced();
        // Shutdown waits for the replicas unless they have everything (or
        // cannot be reached). Its own wait takes a second: it asks them for
        // their position, and they answer with the one before the question.
        let now = match self.quiesce_and_record(fenced).await {
            Ok((offset, all_acked)) => {
                tracing::info!(
                    offset,
                    all_acked,
                    "writes ended for the stop; offset recorded"
                );
                fenced || all_acked
            }
            Err(e) => {
                tracing::warn!(
                    "could not record the replication offset before stopping (its stopped \
                     position will be unknown): {e:#}"
                );
                fenced
            }
        };
        let target = nix::unistd::Pid::from_raw(pid as i32);
        let began = Instant::now();
        let mut next_ask = Some(began);
        let mut refusal = String::new();
        while super::process_alive(pid) {
            if began.elapsed() > STOP_TIMEOUT {
                self.forget_conn().await;
                bail!(
                    "{} (pid {pid}) did not stop within {}s{}; the end of its log ({}):\n{}",
                    self.bin,
                    STOP_TIMEOUT.as_secs(),
                    if refusal.is_empty() {
                        String::new()
                    } else {
                        format!(" (it answered: {refusal})")
                    },
                    self.log_path().display(),
                    log_tail(&self.log_path(), TAIL_LINES)
                );
            }
            if next_ask.is_some_and(|t| Instant::now() >= t) {
                next_ask = match self.ask_shutdown(now).await {
                    Shutdown::Stopping => None,
                    // E.g. a replica writing its first AOF after a full
                    // sync ("Writing initial AOF, can't exit"): again soon.
                    Shutdown::Refused(why) => {
                        refusal = why;
                        Some(Instant::now() + Duration::from_millis(100))
                    }
                    Shutdown::Unreachable(e) => {
                        tracing::warn!(
                            "cannot ask {} to shut down ({e:#}); sending SIGTERM",
                            self.bin
                        );
                        if let Err(e) = kill(target, Signal::SIGTERM) {
                            if e != nix::errno::Errno::ESRCH {
                                return Err(e)
                                    .with_context(|| format!("signalling {} {pid}", self.bin));
                            }
                        }
                        Some(Instant::now() + Duration::from_secs(1))
                    }
                };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.forget_conn().await;
        Ok(())
    }

    async fn stopped_position(&self) -> Result<(u64, String)> {
        let path = self.stopped_path();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no replication offset was recorded when {} last stopped ({} is missing: it was \
                 not stopped by the agent, or could not be asked for its offset); its position \
                 is unknown",
                self.bin,
                path.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid", path.display()))?;
        let offset = v["offset"]
            .as_u64()
            .with_context(|| format!("{} holds no offset", path.display()))?;
        Ok((offset, "shut down".into()))
    }

    async fn check(&self, _spec: &EngineSpec) -> Result<Health> {
        // (The spec the supervisor passes is the one the process was
        // started with; the files on disk are newer. Convergence follows
        // the files.)
        self.health().await
    }

    /// Redis has no databases to create (`spec.database` is ignored): the
    /// users, with the passwords given.
    async fn bootstrap(&self, spec: &EngineSpec, secrets: &Secrets) -> Result<()> {
        let stored = StoredSecrets {
            admin_password: secrets.admin_password.clone(),
            replication_password: secrets.replication_password.clone(),
            agent_password: self.load_secrets()?.agent_password,
        };
        self.set_users(&spec.admin_user, &stored).await
    }

    /// No slots in Redis: a primary's write settings (`sync`) follow the
    /// spec; nothing on a replica.
    async fn converge_slots(&self, spec: &EngineSpec) -> Result<()> {
        if spec.role != "primary" {
            return Ok(());
        }
        let acct = account()?;
        let _role = self.role_lock.lock().await;
        self.write_config(spec, &acct)?;
        if self.find_running().is_some() {
            self.set_min_replicas(min_replicas(spec, self.fenced()))
                .await?;
        }
        Ok(())
    }

    async fn promote(&self, spec: &EngineSpec) -> Result<()> {
        let acct = account()?;
        let _role = self.role_lock.lock().await;
        self.run::<()>(cmd("REPLICAOF").arg("NO").arg("ONE"))
            .await
            .context("REPLICAOF NO ONE")?;
        let began = Instant::now();
        loop {
            let info = self.info(&["replication"]).await?;
            if !info.is_replica() {
                break;
            }
            if began.elapsed() > Duration::from_secs(60) {
                bail!(
                    "still a replica 60 s after REPLICAOF NO ONE; the end of the log ({}):\n{}",
                    self.log_path().display(),
                    log_tail(&self.log_path(), TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Only now: until the server is a primary, a restart must find it a
        // replica.
        remove_file(&self.upstream_path())?;
        self.write_config(spec, &acct)?;
        Ok(())
    }

    async fn set_fenced(&self, spec: &EngineSpec, fenced: bool) -> Result<()> {
        if !self.has_data() {
            return Ok(());
        }
        let acct = account()?;
        let _role = self.role_lock.lock().await;
        if fenced {
            corral_proto::pki::write_private(
                &self.fence_path(),
                "written by corral-agent: this primary holds no lease; writes are refused\n",
            )?;
        } else {
            remove_file(&self.fence_path())?;
        }
        if self.secrets_path().exists() {
            self.write_config(spec, &acct)?;
        }
        let Some(pid) = self.find_running() else {
            return Ok(());
        };
        let applied = async {
            self.set_min_replicas(min_replicas(spec, fenced)).await?;
            if fenced {
                // Sessions in a MULTI, blocked, or subscribed: end them all
                // (not this connection, not replicas).
                for kind in ["normal", "pubsub"] {
                    let ended: i64 = self
                        .run(cmd("CLIENT").arg("KILL").arg("TYPE").arg(kind))
                        .await
                        .with_context(|| format!("CLIENT KILL TYPE {kind}"))?;
                    tracing::info!(sessions = ended, kind, "fenced: client sessions ended");
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        match applied {
            // The server stopped meanwhile: the file holds the fence.
            Err(_) if !super::process_alive(pid) => Ok(()),
            r => r,
        }
    }

    async fn wipe(&self) -> Result<()> {
        self.forget_conn().await;
        self.kill_clone_server().await;
        for dir in [
            self.data_dir(),
            self.clone_dir(),
            self.base.join("data.old"),
            self.base.join("data.restore"),
            self.run_dir(),
        ] {
            remove_dir(&dir)?;
        }
        for file in [
            self.conf_path(),
            self.clone_conf_path(),
            self.base.join("restore.conf"),
            self.upstream_path(),
            self.fence_path(),
            self.stopped_path(),
        ] {
            remove_file(&file)?;
        }
        Ok(())
    }

    fn forget_secrets(&self) -> Result<()> {
        remove_file(&self.secrets_path())?;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.base.join("server.log")
    }

    /// An RDB snapshot streamed from the running server (see redis_backup.rs).
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
        _spec: &EngineSpec,
        input: &mut dyn std::io::Read,
        recovery: Option<&Recovery>,
    ) -> Result<()> {
        self.restore_stream(input, recovery)
    }

    fn verify(&self, input: &mut dyn std::io::Read, scratch: &Path) -> Result<String> {
        self.verify_stream(input, scratch)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn stats_from_info_reads_clients_memory_keys_and_offsets() {
        let primary = Info::parse(
            "# Clients\r\nconnected_clients:3\r\n# Memory\r\nused_memory:1048576\r\n\
             # Replication\r\nrole:master\r\nmaster_repl_offset:4242\r\n\
             # Keyspace\r\ndb0:keys=10,expires=0,avg_ttl=0\r\ndb3:keys=5,expires=1,avg_ttl=9\r\n",
        );
        let s = stats_from_info(&primary);
        assert_eq!(s["connections"], 3.0);
        assert_eq!(s["used_memory_bytes"], 1048576.0);
        assert_eq!(s["keys"], 15.0);
        assert_eq!(s["repl_offset_bytes"], 4242.0);
        assert!(!s.contains_key("lag_seconds"));
        let replica = Info::parse(
            "role:slave\r\nslave_repl_offset:4000\r\nmaster_repl_offset:4242\r\n\
             master_last_io_seconds_ago:1\r\n",
        );
        let s = stats_from_info(&replica);
        assert_eq!(s["repl_offset_bytes"], 4000.0);
        assert_eq!(s["lag_seconds"], 1.0);
        assert_eq!(s["keys"], 0.0);
    }
    use super::*;

    const PRIMARY_INFO: &str = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n\r\n\
        # Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
        slave0:ip=vm-b,port=17002,state=online,offset=52,lag=1\r\n\
        slave1:ip=10.0.0.9,port=6379,state=wait_bgsave,offset=0,lag=0\r\n\
        master_failover_state:no-failover\r\n\
        master_replid:88878f1d5c6430e8d9ca04e7eae5bcfd39160e7e\r\n\
        master_replid2:0000000000000000000000000000000000000000\r\n\
        master_repl_offset:80\r\nsecond_repl_offset:-1\r\n\
        slave_lagging:1\r\n\
        # Persistence\r\nloading:0\r\n";

    const REPLICA_INFO: &str = "# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n\
        master_port:6379\r\nmaster_link_status:up\r\nmaster_last_io_seconds_ago:1\r\n\
        master_sync_in_progress:0\r\nslave_read_repl_offset:60\r\nslave_repl_offset:52\r\n\
        slave_priority:100\r\nslave_read_only:1\r\nreplica_announced:1\r\nconnected_slaves:0\r\n\
        master_replid:88878f1d5c6430e8d9ca04e7eae5bcfd39160e7e\r\nmaster_repl_offset:52\r\n";

    fn spec(role: &str) -> EngineSpec {
        EngineSpec {
            cluster: "cache".into(),
            engine: "redis".into(),
            role: role.into(),
            port: 6379,
            admin_user: "admin".into(),
            database: "defaultdb".into(),
            replicas: if role == "primary" {
                vec!["vm2".into()]
            } else {
                vec![]
            },
            sync: false,
            upstream: (role == "replica").then(|| Upstream {
                node: "vm1".into(),
                host: "10.0.0.1".into(),
                port: 6379,
            }),
            wal_archive: false,
            require_client_tls: false,
        }
    }

    fn secrets() -> StoredSecrets {
        StoredSecrets {
            admin_password: "admin \"pass\" \\ é".into(),
            replication_password: "repl-pass-0123456789".into(),
            agent_password: "agent-pass".into(),
        }
    }

    #[test]
    fn primary_info_gives_position_and_standbys() {
        let info = Info::parse(PRIMARY_INFO);
        assert_eq!(info.version(), "7.0.15");
        let r = replication_from_info(&info, 1);
        assert!(!r.in_recovery);
        assert_eq!(r.lsn, 80);
        assert_eq!(
            r.system_identifier,
            "88878f1d5c6430e8d9ca04e7eae5bcfd39160e7e"
        );
        assert_eq!(r.synchronous_standby_names, "min-replicas-to-write 1");
        assert_eq!(r.standbys.len(), 2, "slave_lagging is not a replica line");
        let b = &r.standbys[0];
        assert_eq!(b.name, "vm-b", "named by the node id it announces");
        assert_eq!(b.state, "streaming");
        assert_eq!(b.replay_lsn, 52);
        assert_eq!(b.replay_lag_ms, 1000);
        assert_eq!(b.sync_state, "async");
        let other = &r.standbys[1];
        assert_eq!(other.name, "10.0.0.9:6379", "a replica announcing no name");
        assert_eq!(other.state, "startup");
    }

    #[test]
    fn replica_info_gives_its_offsets_and_upstream() {
        let info = Info::parse(REPLICA_INFO);
        let r = replication_from_info(&info, 0);
        assert!(r.in_recovery);
        assert!(r.streaming);
        assert_eq!(r.lsn, 52);
        assert_eq!(r.receive_lsn, 60);
        assert_eq!(r.upstream_lsn, 60);
        assert_eq!(r.upstream_host, "10.0.0.1");
        assert_eq!(r.synchronous_standby_names, "");
        assert!(r.standbys.is_empty());
        let up = spec("replica").upstream.unwrap();
        assert!(info.follows(&up));
        assert!(!info.follows(&Upstream {
            port: 6380,
            ..up.clone()
        }));
        assert!(!Info::parse(PRIMARY_INFO).follows(&up));
        let down = Info::parse(&REPLICA_INFO.replace("link_status:up", "link_status:down"));
        assert!(!replication_from_info(&down, 0).streaming);
    }

    #[test]
    fn standby_lines() {
        let s = parse_standby("ip=::1,port=7000,state=send_bulk,offset=5,lag=0", 10).unwrap();
        assert_eq!(s.name, "[::1]:7000");
        assert_eq!(s.state, "catchup");
        let s = parse_standby("ip=vm3,port=7000,state=online,offset=10,lag=3", 10).unwrap();
        assert_eq!(s.replay_lag_ms, 0, "caught up: no lag whatever the ack age");
        assert!(parse_standby("garbage", 0).is_none());
    }

    #[test]
    fn quoting_reads_back_byte_for_byte() {
        assert_eq!(conf_quote("a b"), "\"a b\"");
        assert_eq!(conf_quote("x\"y\\z"), "\"x\\\"y\\\\z\"");
        assert_eq!(conf_quote("é\n"), "\"\\xc3\\xa9\\n\"");
    }

    fn input<'a>(
        s: &'a StoredSecrets,
        up: Option<&'a Upstream>,
        admin: &'a str,
        min: (u32, u32),
    ) -> ConfInput<'a> {
        ConfInput {
            port: 6379,
            announce_port: 6379,
            socket: Path::new("/s/run/redis.sock"),
            pidfile: Path::new("/s/run/redis.pid"),
            dir: Path::new("/s/data"),
            node_id: "vm2",
            admin_user: admin,
            secrets: s,
            upstream: up,
            min_replicas: min,
        }
    }

    #[test]
    fn config_of_a_replica_and_a_primary() {
        let s = secrets();
        let up = spec("replica").upstream.unwrap();
        let conf = render_conf(&input(&s, Some(&up), "admin", (0, 10)));
        for line in [
            "port 6379",
            "bind * -::*",
            "unixsocket \"/s/run/redis.sock\"",
            "unixsocketperm 700",
            "appendonly yes",
            "appendfsync everysec",
            "repl-diskless-sync-delay 0",
            "replica-announce-ip \"vm2\"",
            "replicaof \"10.0.0.1\" 6379",
            "masteruser \"corral_replication\"",
            "masterauth \"repl-pass-0123456789\"",
            "user \"admin\" \"reset\" \"on\" \">admin \\\"pass\\\" \\\\ \\xc3\\xa9\" \"~*\" \"&*\" \"+@all\" \"-@admin\"",
            "user \"corral_agent\" \"reset\" \"on\" \">agent-pass\" \"~*\" \"&*\" \"+@all\"",
            "user \"corral_replication\" \"reset\" \"on\" \">repl-pass-0123456789\" \"+psync\" \"+replconf\" \"+ping\"",
        ] {
            assert!(conf.lines().any(|l| l == line), "missing {line:?} in\n{conf}");
        }
        assert_eq!(conf_min_replicas(&conf), Some((0, 10)));
        let conf = render_conf(&input(&s, None, "default", (1, 10)));
        assert!(!conf.contains("replicaof"));
        assert_eq!(conf.matches("user \"default\"").count(), 1, "{conf}");
        assert_eq!(conf_min_replicas(&conf), Some((1, 10)));
    }

    #[test]
    fn write_settings() {
        let mut p = spec("primary");
        assert_eq!(min_replicas(&p, false), (0, SYNC_MAX_LAG));
        p.sync = true;
        assert_eq!(min_replicas(&p, false), (1, SYNC_MAX_LAG));
        assert_eq!(min_replicas(&p, true), (FENCE_MIN_REPLICAS, 1));
        p.replicas.clear();
        assert_eq!(
            min_replicas(&p, false),
            (0, SYNC_MAX_LAG),
            "no replica to wait for"
        );
        assert_eq!(min_replicas(&spec("replica"), false).0, 0);
    }
}
