//! `corralctl`, the operator CLI: a mutual-TLS client of the operator API,
//! plus the offline PKI commands that need the CA key on disk.
//!
//! Where to connect comes from `--config FILE` (or `CORRAL_CONFIG`, or
//! `~/.config/corral/corralctl.toml`), each field overridable by
//! `CORRAL_COORDINATOR`, `CORRAL_CA`, `CORRAL_CERT` and `CORRAL_KEY`.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use corral_proto::identity::{Identity, Role};
use corral_proto::pb::{self, operator_client::OperatorClient};
use corral_proto::pki::{self, CertAuthority, CertKey, COORDINATOR_DNS};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(
    name = "corralctl",
    version,
    about = "Operate Corral database clusters"
)]
pub struct Cli {
    /// Connection settings file (coordinator address and certificate paths).
    #[arg(long, global = true, env = "CORRAL_CONFIG")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Certificates: the CA and operator certificates (offline, with the CA
    /// key); revocation, renewal and the list (online).
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Join tokens for enrolling new agents.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Database clusters.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Enrolled nodes (VMs running corral-agent).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Durable operations and their step logs.
    #[command(subcommand, alias = "op")]
    Operation(OperationCmd),
    /// The audit trail (admin only).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Events observed on nodes (engine restarts, nodes down/up).
    #[command(subcommand)]
    Event(EventCmd),
    /// Alerts firing now, their history, and the notification channels.
    #[command(subcommand)]
    Alerts(AlertsCmd),
    /// Backups: take, list, verify, download, restore, schedule.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Show who the configured certificate says you are.
    Whoami,
    /// A node's engine log (default) or agent log, from its VM.
    ///
    /// The last 100 lines unless --since or --tail says otherwise; with
    /// --follow, then new lines as they are written, until Ctrl-C.
    Logs {
        cluster: String,
        node: String,
        /// The engine's server log (the default).
        #[arg(long, conflicts_with = "agent")]
        engine: bool,
        /// The agent's own log instead.
        #[arg(long)]
        agent: bool,
        /// Only lines written in this last while: 30s, 10m, 2h, 1d.
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// The last N lines (of those since --since, if given).
        #[arg(long)]
        tail: Option<u32>,
        /// Keep printing new lines as they are written.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BackupCmd {
    /// Take a backup now (from a healthy replica when there is one) and
    /// wait for it.
    Now {
        cluster: String,
        /// A target of the coordinator's [backup.targets] (default: the
        /// schedule's, else "local").
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Backups of a cluster (of every cluster, deleted ones' kept backups
    /// included, without one), oldest first.
    List { cluster: Option<String> },
    /// One backup in full.
    Show { cluster: String, id: String },
    /// Delete a backup's stored objects and its record.
    Delete {
        cluster: String,
        id: String,
        /// Repeat the backup's id.
        #[arg(long)]
        confirm: Option<String>,
    },
    /// Save a backup in the engine's own format (PostgreSQL: a tar of the
    /// data directory; MariaDB: xbstream; Redis: an RDB file), decrypted
    /// and checked on the way; with --raw, the stored encrypted object.
    Download {
        cluster: String,
        id: String,
        /// The file to write (default: ID.tar / ID.xbstream / ID.rdb, or
        /// ID.cbk with --raw); "-" for standard output.
        file: Option<PathBuf>,
        #[arg(long)]
        raw: bool,
    },
    /// Scheduled backups: when, how many or how long to keep, and where.
    /// PostgreSQL clusters with a schedule also archive their WAL to the
    /// target, for point-in-time restores.
    Schedule {
        cluster: String,
        /// Five-field cron in UTC ("30 2 * * *": 02:30 daily), or six with
        /// seconds first. Without --cron: show the schedule.
        #[arg(long)]
        cron: Option<String>,
        /// Keep this many scheduled backups (e.g. 7) or this long (7d, 36h).
        #[arg(long, value_parser = parse_retain)]
        retain: Option<Retain>,
        #[arg(long)]
        target: Option<String>,
        /// Remove the schedule (no more scheduled backups).
        #[arg(long, conflicts_with_all = ["cron", "retain", "target"])]
        off: bool,
    },
    /// Restore a backup: into a new cluster (safest: --into-new-cluster NAME
    /// --nodes ...), optionally to a point in time (PostgreSQL).
    Restore {
        cluster: String,
        id: String,
        /// A UTC time to recover to (RFC 3339, e.g. 2026-11-26T05:00:00.250Z),
        /// between the backup's end and the last archived WAL.
        #[arg(long, value_parser = parse_time)]
        to_time: Option<i64>,
        /// In place: repeat the cluster's name.
        #[arg(long)]
        confirm: Option<String>,
        #[arg(long)]
        into_new_cluster: Option<String>,
        /// The new cluster's nodes (the first is its primary).
        #[arg(long = "nodes", value_delimiter = ',')]
        nodes: Vec<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Read a backup back through the key and restore it into a scratch
    /// directory on a node, checking what the engine finds there; the
    /// running cluster is not touched.
    Verify {
        cluster: String,
        id: String,
        #[arg(long)]
        no_wait: bool,
    },
}

/// `--retain`: a count or an age.
#[derive(Clone, Debug, PartialEq)]
enum Retain {
    Count(u32),
    Age(Duration),
}

fn parse_retain(s: &str) -> Result<Retain, String> {
    if let Ok(n) = s.parse::<u32>() {
        if n == 0 {
            return Err(
                "--retain 0 would keep nothing: give a count of 1 or more, or an age".into(),
            );
        }
        return Ok(Retain::Count(n));
    }
    parse_duration(s)
        .map(Retain::Age)
        .map_err(|e| format!("{e}; or a count of backups, e.g. 7"))
}

fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
                .map(|t| t.and_utc().timestamp_millis())
        })
        .map_err(|_| {
            format!(
                "invalid time {s:?}: use RFC 3339 in UTC, e.g. 2026-11-26T05:00:00Z or \
                 2026-11-26T05:00:00.250Z"
            )
        })
}

fn rfc3339(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn backups_table(backups: &[pb::Backup]) -> Table {
    let mut t = table(&[
        "ID",
        "CLUSTER",
        "KIND",
        "STATE",
        "TARGET",
        "FROM",
        "TAKEN (UTC)",
        "TOOK",
        "DATA",
        "STORED",
        "POSITION",
        "EXPIRES",
        "VERIFIED",
    ]);
    for b in backups {
        let state = match (b.state.as_str(), &b.progress) {
            ("running", Some(p)) if p.done_bytes > 0 => format!("running ({})", size(p.done_bytes)),
            ("failed", _) => format!("failed: {}", b.reason),
            (s, _) => s.to_string(),
        };
        t.add_row(vec![
            b.id.clone(),
            b.cluster.clone(),
            b.kind.clone(),
            state,
            b.target.clone(),
            if b.node.is_empty() {
                "-".into()
            } else {
                format!("{} ({})", b.node, b.role)
            },
            rfc3339(b.started_at_ms),
            if b.finished_at_ms > 0 && b.state == "succeeded" {
                format!(
                    "{:.1}s",
                    (b.finished_at_ms - b.started_at_ms) as f64 / 1000.0
                )
            } else {
                "-".into()
            },
            size(b.plain_bytes),
            size(b.stored_bytes),
            b.position.clone(),
            match (b.expires_at_ms, b.kind.as_str()) {
                (0, "scheduled") => "by retention".into(),
                (0, _) => "when deleted".into(),
                (at, _) => rfc3339(at),
            },
            match (b.verified_at_ms, b.verify_ok) {
                (0, _) => "never".into(),
                (at, true) => format!("ok {}", ago(at)),
                (at, false) => format!("FAILED {}", ago(at)),
            },
        ]);
    }
    t
}

fn download_extension(engine: &str) -> &'static str {
    match engine {
        "postgres" => "tar",
        "mariadb" | "mysql" => "xbstream",
        _ => "rdb",
    }
}

#[derive(Subcommand, Debug)]
enum PkiCmd {
    /// Create the CA, the coordinator's certificate and a first admin operator.
    Init {
        /// Directory to write; must not already hold a CA.
        #[arg(long)]
        dir: PathBuf,
        /// Name of the first admin operator.
        #[arg(long, default_value = "admin")]
        admin: String,
        /// Coordinator address written into the generated corralctl.toml.
        #[arg(long, default_value = "127.0.0.1:7400")]
        coordinator: String,
        /// Extra DNS names for the coordinator's certificate.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Issue a certificate for another operator.
    IssueOperator {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        role: Role,
        /// Writes PREFIX.crt and PREFIX.key.
        #[arg(long)]
        out: PathBuf,
    },
    #[command(flatten)]
    Online(crate::cli_identity::PkiOnline),
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Print a single-use join token (it also pins this coordinator's CA).
    Create {
        /// Lifetime, e.g. 30m, 1h, 2d (at most 7d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Create a cluster and wait until it runs.
    Create {
        #[arg(long)]
        name: String,
        /// postgres, mariadb (or mysql: MariaDB's driver speaking MySQL 8),
        /// redis (or valkey, keydb: the agents' --redis-server).
        #[arg(long)]
        engine: String,
        /// Nodes to run on, comma-separated or repeated; the first is the
        /// primary (--mode primary-replica), the others its replicas.
        #[arg(long = "nodes", alias = "node", value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// single or primary-replica.
        #[arg(long, default_value = "single")]
        mode: String,
        /// Zero-loss: every commit waits until at least one replica has it.
        #[arg(long)]
        sync: bool,
        /// Clients must use TLS (plaintext is refused); without it TLS is
        /// offered. Redis: the port then speaks TLS only.
        #[arg(long)]
        require_tls: bool,
        /// Return once the operation is accepted instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Change settings: sync=on|off, termination-protection=on|off,
    /// auto-failover=on|off, lease=DURATION (e.g. 2s), heartbeat=DURATION
    /// (e.g. 500ms).
    Set {
        name: String,
        #[arg(required = true, value_parser = parse_setting)]
        settings: Vec<(String, Setting)>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Erase every (or one) replica's data and clone it again from the primary.
    Resync {
        name: String,
        /// Only this replica.
        #[arg(long)]
        node: Option<String>,
        /// Repeat the cluster's name.
        #[arg(long)]
        confirm: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Take a final backup (kept 15 days), then stop every engine, erase
    /// every node's data and forget the cluster.
    Delete {
        name: String,
        /// Repeat the cluster's name.
        #[arg(long)]
        confirm: Option<String>,
        /// Skip the final backup.
        #[arg(long)]
        no_final_backup: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Print the admin connection string (audited). It uses TLS and names
    /// this corralctl's CA certificate file, which the servers' chain to.
    Credentials {
        name: String,
    },
    /// Which client addresses may reach the cluster's engine port.
    #[command(subcommand)]
    Allowlist(AllowlistCmd),
}

#[derive(Subcommand, Debug)]
enum AllowlistCmd {
    /// The list, and whether every node applied it.
    Show { cluster: String },
    /// Replace the list (no entries: open to every address).
    Set {
        cluster: String,
        #[command(flatten)]
        change: AllowlistChange,
    },
    /// Add addresses or ranges.
    Add {
        cluster: String,
        #[command(flatten)]
        change: AllowlistChange,
    },
    /// Remove addresses or ranges.
    Remove {
        cluster: String,
        #[command(flatten)]
        change: AllowlistChange,
    },
    /// Every change: when, who, old and new lists.
    History { cluster: String },
}

#[derive(clap::Args, Debug)]
struct AllowlistChange {
    /// IPv4/IPv6 addresses or CIDR ranges: 203.0.113.5 203.0.113.0/24
    /// 2001:db8::1 2001:db8::/48.
    entries: Vec<String>,
    /// Also read entries from FILE, one per line (# starts a comment).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Apply even if the list keeps out the address this request comes from.
    #[arg(long)]
    force: bool,
    /// Return at once instead of waiting for every node to apply it.
    #[arg(long)]
    no_wait: bool,
}

impl AllowlistChange {
    /// The entries from the command line and the file, in order.
    fn entries(&self) -> Result<Vec<String>> {
        let mut out = self.entries.clone();
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading allowlist entries from {}", path.display()))?;
            out.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
        Ok(out)
    }
}

/// Prints an allowlist and where each node stands.
fn print_allowlist(a: &pb::Allowlist) {
    if a.entries.is_empty() {
        println!(
            "cluster {}: allowlist empty (version {}): every address may connect",
            a.cluster, a.version
        );
    } else {
        println!(
            "cluster {}: {} allowlist entr{} (version {}):",
            a.cluster,
            a.entries.len(),
            if a.entries.len() == 1 { "y" } else { "ies" },
            a.version
        );
        for e in &a.entries {
            println!("  {e}");
        }
    }
    for n in &a.nodes {
        println!(
            "  node {:<12} {:<8} {}",
            n.node,
            n.state,
            if n.current {
                "applied".to_string()
            } else {
                format!("holds version {} (not yet this one)", n.applied_version)
            }
        );
    }
}

/// Waits until every node that is up holds the list's version.
async fn wait_allowlist(
    api: &mut OperatorClient<Channel>,
    cluster: &str,
    json: bool,
) -> Result<pb::Allowlist> {
    let began = std::time::Instant::now();
    loop {
        let a = api
            .get_allowlist(pb::GetAllowlistRequest {
                cluster: cluster.to_string(),
            })
            .await?
            .into_inner();
        let pending: Vec<&str> = a
            .nodes
            .iter()
            .filter(|n| n.state == "up" && !n.current)
            .map(|n| n.node.as_str())
            .collect();
        if pending.is_empty() {
            return Ok(a);
        }
        if began.elapsed() > Duration::from_secs(30) {
            if !json {
                eprintln!(
                    "warning: {} not applied version {} after 30 s; they apply it at their next \
                     heartbeat (see `corralctl event list --cluster {cluster}`)",
                    pending.join(", "),
                    a.version
                );
            }
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    List,
    /// Deregister a node that serves no cluster and revoke its certificate
    /// (admin); the id can then be enrolled again with a new join token.
    Forget(crate::cli_identity::ForgetArgs),
    /// Add a node to a cluster as a replica cloned from the primary.
    Add {
        cluster: String,
        node: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Detach a replica, stop its engine and erase its data.
    Remove {
        cluster: String,
        node: String,
        /// Repeat the node's name.
        #[arg(long)]
        confirm: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Planned switchover: make this replica the primary; the old primary follows it.
    Promote {
        cluster: String,
        node: String,
        /// Repeat the node's name.
        #[arg(long)]
        confirm: Option<String>,
        /// Promote even if the node is unhealthy or lagging, or the primary is down.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Restart a node's engine cleanly (a primary needs --force: writes pause).
    Reboot {
        cluster: String,
        node: String,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// A node's CPU, memory, disk, network and engine figures over time:
    /// every heartbeat for the last hour, 5-minute buckets up to 7 days.
    Metrics {
        cluster: String,
        node: String,
        /// How far back, e.g. 10m, 1h, 24h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        since: Duration,
    },
}

#[derive(Subcommand, Debug)]
enum AlertsCmd {
    /// Alerts firing now, and how each notification channel is doing.
    List,
    /// Alerts that fired (and resolved) and one-shot notices, newest last.
    History {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
enum OperationCmd {
    /// The newest operations, oldest first; --before pages back.
    List {
        #[arg(long)]
        cluster: Option<String>,
        /// At most this many (the coordinator caps a page at 10,000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Only operations created before this one (an id printed here).
        #[arg(long, default_value = "")]
        before: String,
    },
    Show {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// The newest entries, oldest first; --before pages back.
    List {
        /// At most this many (the coordinator caps a page at 10,000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only entries with an id below this one.
        #[arg(long, default_value_t = 0)]
        before: i64,
    },
}

#[derive(Subcommand, Debug)]
enum EventCmd {
    List {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        /// At most this many (the coordinator caps a page at 10,000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only events with an id below this one.
        #[arg(long, default_value_t = 0)]
        before: i64,
    },
}

/// The value of a `cluster set` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Flag(bool),
    Millis(u32),
}

fn parse_setting(s: &str) -> Result<(String, Setting), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid setting {s:?}: use KEY=VALUE, e.g. sync=on or lease=2s"))?;
    let value = match k {
        "sync" | "termination-protection" | "auto-failover" => Setting::Flag(match v {
            "on" | "true" => true,
            "off" | "false" => false,
            _ => return Err(format!("invalid value {v:?} for {k}: use on or off")),
        }),
        "lease" | "heartbeat" => Setting::Millis(parse_millis(v).map_err(|e| format!("{k}: {e}"))?),
        _ => {
            return Err(format!(
                "unknown setting {k:?}: settable are sync, termination-protection, auto-failover, \
                 lease and heartbeat"
            ))
        }
    };
    Ok((k.to_string(), value))
}

/// "500ms", "2s" -> milliseconds.
fn parse_millis(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid duration {s:?}: use milliseconds or seconds, e.g. 500ms or 2s");
    let (num, factor) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        return Err(bad());
    };
    let n: u32 = num.parse().map_err(|_| bad())?;
    n.checked_mul(factor).ok_or_else(bad)
}

/// A cluster's settings as `cluster set` takes them.
fn settings_line(c: &pb::Cluster) -> String {
    format!(
        "sync={} termination-protection={} auto-failover={} lease={}ms heartbeat={}ms",
        on_off(c.sync),
        on_off(c.termination_protection),
        on_off(c.auto_failover),
        c.lease_ms,
        c.heartbeat_interval_ms
    )
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

/// The connection settings file written by `pki init`.
#[derive(serde::Deserialize, serde::Serialize, Default, Debug)]
pub(crate) struct ConnConfig {
    coordinator: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl ConnConfig {
    fn load(path: Option<&Path>) -> Result<ConnConfig> {
        let default = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".config/corral/corralctl.toml"));
        let mut cfg = match (path, default) {
            (Some(p), _) => toml::from_str(&pki::read(p)?)
                .with_context(|| format!("parsing {}", p.display()))?,
            (None, Some(p)) if p.exists() => toml::from_str(&pki::read(&p)?)
                .with_context(|| format!("parsing {}", p.display()))?,
            _ => ConnConfig::default(),
        };
        if let Ok(v) = std::env::var("CORRAL_COORDINATOR") {
            cfg.coordinator = Some(v);
        }
        for (var, field) in [
            ("CORRAL_CA", &mut cfg.ca),
            ("CORRAL_CERT", &mut cfg.cert),
            ("CORRAL_KEY", &mut cfg.key),
        ] {
            if let Some(v) = std::env::var_os(var) {
                *field = Some(v.into());
            }
        }
        Ok(cfg)
    }

    fn missing(what: &str, var: &str) -> anyhow::Error {
        anyhow!(
            "no {what} configured: pass --config FILE (written by `corralctl pki init`), \
             or set {var}"
        )
    }

    pub(crate) fn address(&self) -> Result<String> {
        self.coordinator
            .clone()
            .ok_or_else(|| Self::missing("coordinator address", "CORRAL_COORDINATOR"))
    }

    pub(crate) fn ca_file(&self) -> Result<&Path> {
        self.ca
            .as_deref()
            .ok_or_else(|| Self::missing("CA certificate", "CORRAL_CA"))
    }

    /// The client certificate and key files.
    pub(crate) fn files(&self) -> Result<(PathBuf, PathBuf)> {
        Ok((
            self.cert
                .clone()
                .ok_or_else(|| Self::missing("client certificate", "CORRAL_CERT"))?,
            self.key
                .clone()
                .ok_or_else(|| Self::missing("client key", "CORRAL_KEY"))?,
        ))
    }

    fn channel(&self) -> Result<(Channel, String)> {
        let addr = self.address()?;
        let ca = pki::read(self.ca_file()?)?;
        let (cert, key) = self.files()?;
        let me = CertKey {
            cert_pem: pki::read(&cert)?,
            key_pem: pki::read(&key)?,
        };
        let tls = corral_proto::tls::client_config(&ca, Some(&me), COORDINATOR_DNS);
        let ch = corral_proto::tls::channel(&addr, tls, Duration::from_secs(30))?;
        Ok((ch, addr))
    }
}

/// Turns a gRPC error into the one line the operator needs.
fn rpc_error(addr: &str, s: tonic::Status) -> anyhow::Error {
    // Transport failures keep their cause in the source chain.
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(&s);
    while let Some(e) = source {
        causes.push(e.to_string());
        source = e.source();
    }
    causes.dedup();
    let cause = causes.join(": ");
    let transport = s.code() == tonic::Code::Cancelled
        || s.message().contains("transport")
        || s.message().contains("connect")
        || !causes.is_empty();
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled if transport => {
            let detail = if cause.is_empty() {
                s.message().to_string()
            } else {
                cause
            };
            // A refused client certificate shows up in many forms under TLS
            // 1.3 (an alert, a closed stream, a broken pipe): name both causes.
            let hint = if detail.contains("refused") || detail.contains("timed out") {
                "; check that the coordinator is running and reachable"
            } else {
                "; check that the coordinator is running there, and that this client's CA, certificate \
                 and key (--config, or CORRAL_CA/CORRAL_CERT/CORRAL_KEY) come from its `corralctl pki init`"
            };
            anyhow!("cannot reach the coordinator at {addr}: {detail}{hint}")
        }
        _ => anyhow!("{}", s.message()),
    }
}

pub async fn main_with(cli: Cli) -> Result<()> {
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Pki(cmd) if !matches!(cmd, PkiCmd::Online(_)) => pki_cmd(cmd, json),
        command => {
            let conn = ConnConfig::load(cli.config.as_deref())?;
            let (channel, addr) = conn.channel()?;
            let result = match command {
                Command::Pki(PkiCmd::Online(cmd)) => {
                    crate::cli_identity::pki(channel, cmd, &conn, json).await
                }
                Command::Node(NodeCmd::Forget(a)) => {
                    crate::cli_identity::forget(channel, a, json).await
                }
                Command::Cluster(ClusterCmd::Credentials { name }) => {
                    crate::cli_credentials::show(channel, &name, &conn, json).await
                }
                command => run(&mut OperatorClient::new(channel), command, json).await,
            };
            result.map_err(|e| match e.downcast::<tonic::Status>() {
                Ok(s) => rpc_error(&addr, s),
                Err(e) => e,
            })
        }
    }
}

fn pki_cmd(cmd: PkiCmd, json: bool) -> Result<()> {
    match cmd {
        PkiCmd::Init {
            dir,
            admin,
            coordinator,
            san,
        } => {
            if admin.is_empty() || admin.contains('/') {
                bail!("invalid admin name {admin:?}: use letters, digits and '-'");
            }
            let ca = CertAuthority::init_dir(&dir, &admin, &san)?;
            let abs = std::fs::canonicalize(&dir)?;
            let cfg = ConnConfig {
                coordinator: Some(coordinator),
                ca: Some(abs.join("ca.crt")),
                cert: Some(abs.join("admin.crt")),
                key: Some(abs.join("admin.key")),
            };
            pki::write_private(&abs.join("corralctl.toml"), &toml::to_string(&cfg)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "dir": abs, "ca_fingerprint": ca.fingerprint()? })
                );
            } else {
                println!(
                    "CA created in {} (fingerprint {})",
                    abs.display(),
                    ca.fingerprint()?
                );
                println!(
                    "corralctl settings: {}",
                    abs.join("corralctl.toml").display()
                );
                println!(
                    "next: corral-coordinator --pki-dir {} --state-dir DIR --listen ADDR",
                    abs.display()
                );
            }
            Ok(())
        }
        PkiCmd::Online(_) => unreachable!("online PKI commands need the coordinator"),
        PkiCmd::IssueOperator {
            dir,
            name,
            role,
            out,
        } => {
            if name.is_empty() || name.contains('/') {
                bail!("invalid operator name {name:?}: use letters, digits and '-'");
            }
            let ca = CertAuthority::load(&dir)?;
            let ck = ca.issue(
                &Identity::Operator {
                    role,
                    name: name.clone(),
                },
                &[],
            )?;
            let crt = out.with_extension("crt");
            let key = out.with_extension("key");
            pki::write_public(&crt, &ck.cert_pem)?;
            pki::write_private(&key, &ck.key_pem)?;
            println!(
                "operator {name} ({role}): {} {}",
                crt.display(),
                key.display()
            );
            Ok(())
        }
    }
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

/// After a page of a list: how to see the older entries, if any remain.
fn more_before(next: &dyn std::fmt::Display) {
    let next = next.to_string();
    if !next.is_empty() && next != "0" {
        eprintln!("older entries: add --before {next}");
    }
}

fn ago(ms: i64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let s = (corral_proto::now_ms() - ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn gib(b: u64) -> String {
    format!("{:.1}G", b as f64 / (1u64 << 30) as f64)
}

fn engine_label(e: &Option<pb::EngineStatus>) -> String {
    match e {
        Some(e) if !e.engine.is_empty() => {
            let state = pb::EngineState::try_from(e.state)
                .unwrap_or_default()
                .label();
            let mut s = format!("{} {state}", e.engine);
            if e.restarts > 0 {
                s.push_str(&format!(
                    " ({} restart{})",
                    e.restarts,
                    if e.restarts == 1 { "" } else { "s" }
                ));
            }
            if e.lease.as_ref().is_some_and(|l| l.fenced) {
                s.push_str(", FENCED (no lease)");
            }
            if let Some(n) = e.stats.get("connections") {
                s.push_str(&format!(", {n:.0} conn"));
            }
            if let Some(n) = e.stats.get("keys") {
                s.push_str(&format!(", {n:.0} keys"));
            }
            s
        }
        _ => "-".into(),
    }
}

fn lag_label(n: &pb::Node) -> String {
    if n.role != "replica" || n.lag_bytes < 0 {
        return "-".into();
    }
    let bytes = match n.lag_bytes {
        b if b < 1 << 10 => format!("{b} B"),
        b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    };
    if n.lag_ms >= 0 {
        format!("{bytes}, {:.1}s", n.lag_ms as f64 / 1000.0)
    } else {
        bytes
    }
}

fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

fn print_nodes(nodes: &[pb::Node]) {
    let mut t = table(&[
        "NODE",
        "ADDRESS",
        "STATE",
        "CLUSTER",
        "ROLE",
        "ENGINE",
        "REPLICATION",
        "LAG",
        "CPU",
        "MEM",
        "DISK",
        "LAST HEARTBEAT",
    ]);
    for n in nodes {
        let m = n.metrics.unwrap_or_default();
        t.add_row(vec![
            n.id.clone(),
            n.address.clone(),
            n.state.clone(),
            if n.cluster.is_empty() {
                "-".into()
            } else {
                n.cluster.clone()
            },
            if n.role.is_empty() {
                "-".into()
            } else {
                n.role.clone()
            },
            engine_label(&n.engine),
            if n.replication.is_empty() {
                "-".into()
            } else {
                n.replication.clone()
            },
            lag_label(n),
            format!("{:.0}%", m.cpu_percent),
            format!("{}/{}", gib(m.memory_used_bytes), gib(m.memory_total_bytes)),
            format!("{}/{}", gib(m.disk_used_bytes), gib(m.disk_total_bytes)),
            ago(n.last_heartbeat_ms),
        ]);
    }
    println!("{t}");
}

fn print_operation(op: &pb::Operation) {
    println!(
        "operation {} ({}) on cluster {}: {}",
        op.id, op.kind, op.cluster, op.state
    );
    for l in &op.log {
        println!("  {}  {}", fmt_time(l.at_ms), l.message);
    }
    if !op.error.is_empty() {
        println!("error: {}", op.error);
    }
}

fn fmt_time(ms: i64) -> String {
    // Seconds resolution in UTC is enough to read a log; JSON has the raw value.
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}Z")
}

/// Follows an operation until it ends, echoing new log lines to stderr and,
/// on a terminal, drawing a progress bar for its long steps.
async fn wait_operation(api: &mut OperatorClient<Channel>, id: &str) -> Result<pb::Operation> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut shown = 0;
    loop {
        let op = api
            .get_operation(pb::GetOperationRequest { id: id.into() })
            .await?
            .into_inner();
        for l in op.log.iter().skip(shown) {
            match &bar {
                Some(b) => b.println(format!("  {}", l.message)),
                None => eprintln!("  {}", l.message),
            }
        }
        shown = op.log.len();
        match (&op.progress, tty) {
            (Some(p), true) if p.total_bytes > 0 => {
                let b = bar.get_or_insert_with(|| {
                    let b = indicatif::ProgressBar::new(p.total_bytes);
                    if let Ok(style) = indicatif::ProgressStyle::with_template(
                        "  {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b
                });
                b.set_length(p.total_bytes);
                b.set_position(p.done_bytes);
                b.set_message(p.message.clone());
            }
            _ => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
        }
        if op.state == "succeeded" || op.state == "failed" {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            return Ok(op);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for an accepted operation (unless `no_wait`) and fails if it failed.
async fn follow(
    api: &mut OperatorClient<Channel>,
    op: pb::Operation,
    no_wait: bool,
    json: bool,
    what: &str,
) -> Result<pb::Operation> {
    if no_wait {
        if json {
            print_json(&op)?;
        } else {
            println!(
                "operation {} accepted; follow it with `corralctl operation show {}`",
                op.id, op.id
            );
        }
        return Ok(op);
    }
    eprintln!("{what} (operation {})", op.id);
    let op = wait_operation(api, &op.id).await?;
    if op.state != "succeeded" {
        bail!(
            "{what} failed: {} (see `corralctl operation show {}`)",
            op.error,
            op.id
        );
    }
    if json {
        print_json(&op)?;
    } else {
        println!("{what}: done");
    }
    Ok(op)
}

async fn run(api: &mut OperatorClient<Channel>, command: Command, json: bool) -> Result<()> {
    match command {
        Command::Pki(_)
        | Command::Node(NodeCmd::Forget(_))
        | Command::Cluster(ClusterCmd::Credentials { .. }) => {
            unreachable!("handled in main_with")
        }
        Command::Whoami => {
            let me = api.who_am_i(pb::WhoAmIRequest {}).await?.into_inner();
            if json {
                print_json(&me)?;
            } else {
                println!("{} ({})", me.name, me.role);
            }
        }
        Command::Token(TokenCmd::Create { ttl }) => {
            let secs = u32::try_from(ttl.as_secs()).map_err(|_| anyhow!("--ttl is too long"))?;
            if secs == 0 {
                bail!("--ttl must be at least 1s");
            }
            let t = api
                .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: secs })
                .await?
                .into_inner();
            if json {
                print_json(&t)?;
            } else {
                println!("{}", t.token);
            }
        }
        Command::Cluster(ClusterCmd::Create {
            name,
            engine,
            nodes,
            mode,
            sync,
            require_tls,
            no_wait,
        }) => {
            corral_proto::names::validate("cluster", &name).map_err(|e| anyhow!(e))?;
            let op = api
                .create_cluster(pb::CreateClusterRequest {
                    name: name.clone(),
                    engine,
                    mode,
                    nodes,
                    sync,
                    require_tls,
                })
                .await?
                .into_inner();
            if no_wait {
                if json {
                    print_json(&op)?;
                } else {
                    println!(
                        "operation {} accepted; follow it with `corralctl operation show {}`",
                        op.id, op.id
                    );
                }
                return Ok(());
            }
            eprintln!("creating cluster {name} (operation {})", op.id);
            let op = wait_operation(api, &op.id).await?;
            if op.state != "succeeded" {
                bail!(
                    "creating cluster {name} failed: {} (see `corralctl operation show {}`)",
                    op.error,
                    op.id
                );
            }
            let cluster = api
                .get_cluster(pb::GetClusterRequest { name: name.clone() })
                .await?
                .into_inner();
            if json {
                print_json(&cluster)?;
            } else {
                println!("cluster {name} is {}", cluster.state);
                println!("connection string: corralctl cluster credentials {name}");
            }
        }
        Command::Cluster(ClusterCmd::List) => {
            let r = api
                .list_clusters(pb::ListClustersRequest {})
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            let mut t = table(&["CLUSTER", "ENGINE", "MODE", "STATE", "NODES", "CREATED"]);
            for c in &r.clusters {
                let nodes: Vec<String> = c
                    .nodes
                    .iter()
                    .map(|n| format!("{} ({}, {})", n.id, n.role, n.state))
                    .collect();
                t.add_row(vec![
                    c.name.clone(),
                    c.engine.clone(),
                    c.mode.clone(),
                    c.state.clone(),
                    nodes.join(", "),
                    ago(c.created_at_ms),
                ]);
            }
            println!("{t}");
        }
        Command::Cluster(ClusterCmd::Show { name }) => {
            let c = api
                .get_cluster(pb::GetClusterRequest { name })
                .await?
                .into_inner();
            if json {
                return print_json(&c);
            }
            println!(
                "cluster {}: {} {} ({}), port {}, database {}, term {}",
                c.name, c.engine, c.mode, c.state, c.port, c.database, c.term
            );
            println!("settings: {}", settings_line(&c));
            if !c.failover_status.is_empty() {
                println!("failover: {}", c.failover_status);
            }
            print_nodes(&c.nodes);
        }
        Command::Cluster(ClusterCmd::Set {
            name,
            settings,
            no_wait,
        }) => {
            let get = |k: &str| {
                settings
                    .iter()
                    .rev()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| *v)
            };
            let flag = |k: &str| match get(k) {
                Some(Setting::Flag(v)) => Some(v),
                _ => None,
            };
            let millis = |k: &str| match get(k) {
                Some(Setting::Millis(v)) => Some(v),
                _ => None,
            };
            let r = api
                .set_cluster(pb::SetClusterRequest {
                    name: name.clone(),
                    sync: flag("sync"),
                    termination_protection: flag("termination-protection"),
                    auto_failover: flag("auto-failover"),
                    lease_ms: millis("lease"),
                    heartbeat_interval_ms: millis("heartbeat"),
                })
                .await?
                .into_inner();
            if let Some(op) = r.operation {
                follow(api, op, no_wait, json, &format!("reconfiguring {name}")).await?;
            } else if json {
                print_json(&r.cluster)?;
            }
            if !json {
                if let Some(c) = r.cluster {
                    println!("cluster {name}: {}", settings_line(&c));
                }
            }
        }
        Command::Cluster(ClusterCmd::Resync {
            name,
            node,
            confirm,
            no_wait,
        }) => {
            let op = api
                .resync_cluster(pb::ResyncClusterRequest {
                    name: name.clone(),
                    node: node.clone().unwrap_or_default(),
                    confirm: confirm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let what = match node {
                Some(n) => format!("resyncing {n} of {name}"),
                None => format!("resyncing the replicas of {name}"),
            };
            follow(api, op, no_wait, json, &what).await?;
        }
        Command::Cluster(ClusterCmd::Delete {
            name,
            confirm,
            no_final_backup,
            no_wait,
        }) => {
            let op = api
                .delete_cluster(pb::DeleteClusterRequest {
                    name: name.clone(),
                    confirm: confirm.unwrap_or_default(),
                    no_final_backup,
                })
                .await?
                .into_inner();
            follow(api, op, no_wait, json, &format!("deleting cluster {name}")).await?;
        }
        Command::Node(NodeCmd::Add {
            cluster,
            node,
            no_wait,
        }) => {
            let op = api
                .add_node(pb::AddNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                })
                .await?
                .into_inner();
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("adding {node} to {cluster}"),
            )
            .await?;
        }
        Command::Node(NodeCmd::Remove {
            cluster,
            node,
            confirm,
            no_wait,
        }) => {
            let op = api
                .remove_node(pb::RemoveNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    confirm: confirm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("removing {node} from {cluster}"),
            )
            .await?;
        }
        Command::Node(NodeCmd::Promote {
            cluster,
            node,
            confirm,
            force,
            no_wait,
        }) => {
            let op = api
                .promote_node(pb::PromoteNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    confirm: confirm.unwrap_or_default(),
                    force,
                })
                .await?
                .into_inner();
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("promoting {node} in {cluster}"),
            )
            .await?;
        }
        Command::Node(NodeCmd::Reboot {
            cluster,
            node,
            force,
            no_wait,
        }) => {
            let op = api
                .reboot_node(pb::RebootNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    force,
                })
                .await?
                .into_inner();
            if force {
                eprintln!(
                    "warning: if {node} is the primary, writes to {cluster} pause until its engine is back"
                );
            }
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("restarting the engine on {node}"),
            )
            .await?;
        }
        Command::Cluster(ClusterCmd::Allowlist(cmd)) => {
            let (cluster, how, change) = match cmd {
                AllowlistCmd::Show { cluster } => {
                    let a = api
                        .get_allowlist(pb::GetAllowlistRequest { cluster })
                        .await?
                        .into_inner();
                    if json {
                        return print_json(&a);
                    }
                    print_allowlist(&a);
                    return Ok(());
                }
                AllowlistCmd::History { cluster } => {
                    let r = api
                        .list_allowlist_changes(pb::ListAllowlistChangesRequest { cluster })
                        .await?
                        .into_inner();
                    if json {
                        return print_json(&r);
                    }
                    for c in &r.changes {
                        println!(
                            "{} version {} by {}: {} -> {} entries\n  old: {}\n  new: {}",
                            fmt_time(c.at_ms),
                            c.version,
                            c.who,
                            c.old_entries.len(),
                            c.new_entries.len(),
                            c.old_entries.join(" "),
                            c.new_entries.join(" ")
                        );
                    }
                    return Ok(());
                }
                AllowlistCmd::Set { cluster, change } => (cluster, "set", change),
                AllowlistCmd::Add { cluster, change } => (cluster, "add", change),
                AllowlistCmd::Remove { cluster, change } => (cluster, "remove", change),
            };
            let a = api
                .set_allowlist(pb::SetAllowlistRequest {
                    cluster: cluster.clone(),
                    change: how.into(),
                    entries: change.entries()?,
                    force: change.force,
                })
                .await?
                .into_inner();
            if !json {
                println!("{}", a.message);
            }
            let a = if change.no_wait {
                a
            } else {
                wait_allowlist(api, &cluster, json).await?
            };
            if json {
                print_json(&a)?;
            } else {
                print_allowlist(&a);
            }
        }
        Command::Node(NodeCmd::List) => {
            let r = api.list_nodes(pb::ListNodesRequest {}).await?.into_inner();
            if json {
                print_json(&r)?;
            } else {
                print_nodes(&r.nodes);
            }
        }
        Command::Operation(OperationCmd::List {
            cluster,
            limit,
            before,
        }) => {
            let r = api
                .list_operations(pb::ListOperationsRequest {
                    cluster: cluster.unwrap_or_default(),
                    limit,
                    before,
                })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            let mut t = table(&[
                "OPERATION",
                "CLUSTER",
                "KIND",
                "STATE",
                "BY",
                "UPDATED",
                "ERROR",
            ]);
            for o in &r.operations {
                t.add_row(vec![
                    o.id.clone(),
                    o.cluster.clone(),
                    o.kind.clone(),
                    o.state.clone(),
                    o.requested_by.clone(),
                    ago(o.updated_at_ms),
                    o.error.clone(),
                ]);
            }
            println!("{t}");
            more_before(&r.next_before);
        }
        Command::Operation(OperationCmd::Show { id }) => {
            let o = api
                .get_operation(pb::GetOperationRequest { id })
                .await?
                .into_inner();
            if json {
                print_json(&o)?;
            } else {
                print_operation(&o);
            }
        }
        Command::Audit(AuditCmd::List { limit, before }) => {
            let r = api
                .list_audit(pb::ListAuditRequest { limit, before })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            let mut t = table(&["ID", "WHEN", "WHO", "ACTION", "TARGET", "RESULT"]);
            for a in &r.entries {
                t.add_row(vec![
                    a.id.to_string(),
                    ago(a.at_ms),
                    a.who.clone(),
                    a.action.clone(),
                    a.target.clone(),
                    a.result.clone(),
                ]);
            }
            println!("{t}");
            more_before(&r.next_before);
        }
        Command::Event(EventCmd::List {
            node,
            cluster,
            limit,
            before,
        }) => {
            let r = api
                .list_events(pb::ListEventsRequest {
                    node: node.unwrap_or_default(),
                    cluster: cluster.unwrap_or_default(),
                    limit,
                    before,
                })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            let mut t = table(&["WHEN", "NODE", "CLUSTER", "KIND", "MESSAGE"]);
            for e in &r.events {
                t.add_row(vec![
                    ago(e.at_ms),
                    e.node.clone(),
                    e.cluster.clone(),
                    e.kind.clone(),
                    e.message.clone(),
                ]);
            }
            println!("{t}");
            more_before(&r.next_before);
        }
        Command::Node(NodeCmd::Metrics {
            cluster,
            node,
            since,
        }) => {
            let r = api
                .get_node_metrics(pb::GetNodeMetricsRequest {
                    cluster,
                    node,
                    since_ms: corral_proto::now_ms() - since.as_millis() as i64,
                })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            print!("{}", render_metrics(&r, 60));
        }
        Command::Backup(cmd) => backup_command(api, cmd, json).await?,
        Command::Alerts(AlertsCmd::List) => {
            let r = api
                .list_alerts(pb::ListAlertsRequest {})
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            if r.alerts.is_empty() {
                println!("no alerts firing");
            } else {
                println!("{}", alerts_table(&r.alerts, false));
            }
            if r.channels.is_empty() {
                println!("no notification channels configured ([notify] in the coordinator's configuration file)");
            } else {
                let mut t = table(&[
                    "CHANNEL",
                    "KIND",
                    "DELIVERED",
                    "FAILED ATTEMPTS",
                    "DROPPED",
                    "QUEUED",
                    "LAST SUCCESS",
                    "LAST ERROR",
                ]);
                for c in &r.channels {
                    t.add_row(vec![
                        c.name.clone(),
                        c.kind.clone(),
                        c.delivered.to_string(),
                        c.failed_attempts.to_string(),
                        c.dropped.to_string(),
                        c.queued.to_string(),
                        ago(c.last_success_ms),
                        c.last_error.clone(),
                    ]);
                }
                println!("{t}");
            }
        }
        Command::Alerts(AlertsCmd::History { cluster, limit }) => {
            let r = api
                .list_alert_history(pb::ListAlertHistoryRequest {
                    cluster: cluster.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            println!("{}", alerts_table(&r.alerts, true));
        }
        Command::Logs {
            cluster,
            node,
            engine: _,
            agent,
            since,
            tail,
            follow,
        } => {
            let source = if agent {
                pb::LogSource::Agent
            } else {
                pb::LogSource::Engine
            };
            let since_ms = match since {
                Some(d) => corral_proto::now_ms()
                    .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                    .max(1),
                None => 0,
            };
            let stream = api
                .logs(pb::LogsRequest {
                    cluster,
                    node: node.clone(),
                    source: source as i32,
                    since_ms,
                    tail: tail.unwrap_or(0),
                    follow,
                })
                .await?
                .into_inner();
            let source = if agent { "agent" } else { "engine" };
            print_logs(stream, &node, source, json).await?;
        }
    }
    Ok(())
}

fn alerts_table(alerts: &[pb::AlertInfo], with_state: bool) -> Table {
    let mut header = vec!["SINCE", "SEVERITY", "ALERT", "CLUSTER", "NODE", "SUMMARY"];
    if with_state {
        header.insert(1, "STATE");
        header.insert(2, "ENDED");
    }
    let mut t = table(&header);
    for a in alerts {
        let label = |k: &str| a.labels.get(k).cloned().unwrap_or_default();
        let mut row = vec![
            ago(a.started_at_ms),
            a.severity.clone(),
            a.name.clone(),
            label("cluster"),
            label("node"),
            a.summary.clone(),
        ];
        if with_state {
            row.insert(1, a.state.clone());
            row.insert(
                2,
                // A notice is a moment; only alerts that resolved ended.
                if a.state == "resolved" {
                    ago(a.ended_at_ms)
                } else {
                    String::new()
                },
            );
        }
        t.add_row(row);
    }
    t
}

/// A node's history as one sparkline per figure, `width` columns wide
/// (each column averages the points it covers), with min, average, max
/// and the last value.
pub fn render_metrics(m: &pb::NodeMetrics, width: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some((first, last)) = m.points.first().zip(m.points.last()) else {
        let _ = writeln!(
            out,
            "no figures recorded for node {} in this window (nodes report with every heartbeat)",
            m.node
        );
        return out;
    };
    let res = if m.resolution_ms == 0 {
        "every heartbeat".to_string()
    } else {
        format!("{}-minute averages", m.resolution_ms / 60_000)
    };
    let _ = writeln!(
        out,
        "node {} of cluster {}: {} points from {} to {} ({res})",
        m.node,
        m.cluster,
        m.points.len(),
        clock(first.at_ms),
        clock(last.at_ms)
    );
    type Get = fn(&pb::MetricsPoint) -> f64;
    type Fmt = fn(f64) -> String;
    fn pct(used: f64, total: f64) -> f64 {
        if total > 0.0 {
            used * 100.0 / total
        } else {
            0.0
        }
    }
    // Percentages are drawn on 0-100, the rest on 0-max.
    let series: [(&str, Get, Fmt, Option<f64>); 8] = [
        (
            "cpu",
            |p| p.cpu_percent,
            |v| format!("{v:.0}%"),
            Some(100.0),
        ),
        (
            "memory",
            |p| pct(p.memory_used_bytes, p.memory_total_bytes),
            |v| format!("{v:.0}%"),
            Some(100.0),
        ),
        (
            "disk",
            |p| pct(p.disk_used_bytes, p.disk_total_bytes),
            |v| format!("{v:.1}%"),
            Some(100.0),
        ),
        ("net rx", |p| p.net_rx_bytes_per_sec, rate, None),
        ("net tx", |p| p.net_tx_bytes_per_sec, rate, None),
        ("load1", |p| p.load1, |v| format!("{v:.2}"), None),
        (
            "connections",
            |p| p.connections,
            |v| format!("{v:.0}"),
            None,
        ),
        ("lag", |p| p.lag_seconds, |v| format!("{v:.1}s"), None),
    ];
    for (name, get, fmt, top) in series {
        let values: Vec<f64> = m.points.iter().map(get).collect();
        let (min, max) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        let avg = values.iter().sum::<f64>() / values.len() as f64;
        let _ = writeln!(
            out,
            "{name:<12} {}  min {} avg {} max {} last {}",
            sparkline(&values, width, top),
            fmt(min),
            fmt(avg),
            fmt(max),
            fmt(*values.last().unwrap_or(&0.0))
        );
    }
    out
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}MB/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}kB/s", v / 1e3)
    } else {
        format!("{v:.0}B/s")
    }
}

fn clock(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(|t| {
            format!(
                "{}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| ms.to_string())
}

/// Values as block characters on a scale from 0 to `top` (default: the
/// largest value); at most `width` columns.
pub fn sparkline(values: &[f64], width: usize, top: Option<f64>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() || width == 0 {
        return String::new();
    }
    let cols = values.len().min(width);
    let avg: Vec<f64> = (0..cols)
        .map(|c| {
            let (a, b) = (c * values.len() / cols, (c + 1) * values.len() / cols);
            values[a..b.max(a + 1)].iter().sum::<f64>() / (b.max(a + 1) - a) as f64
        })
        .collect();
    let lo = 0f64;
    let hi = top.unwrap_or_else(|| avg.iter().cloned().fold(0f64, f64::max));
    avg.iter()
        .map(|v| {
            if hi <= lo {
                BARS[0]
            } else {
                BARS[(((v - lo) / (hi - lo)) * 7.0).round().clamp(0.0, 7.0) as usize]
            }
        })
        .collect()
}

/// Prints log chunks as they arrive, each flushed at once; ends at the end
/// of the stream, on Ctrl-C (a follow's normal end) or when stdout is
/// closed (`| head`).
async fn print_logs(
    mut stream: tonic::Streaming<pb::LogLines>,
    node: &str,
    source: &str,
    json: bool,
) -> Result<()> {
    use std::io::Write;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let chunk = tokio::select! {
            chunk = stream.message() => chunk?,
            _ = &mut ctrl_c => None,
        };
        let Some(chunk) = chunk else { break };
        let mut write = || -> std::io::Result<()> {
            for line in &chunk.lines {
                if json {
                    let at = (line.at_ms > 0).then(|| rfc3339_ms(line.at_ms));
                    let v = serde_json::json!({
                        "at": at,
                        "node": node,
                        "source": source,
                        "text": line.text,
                    });
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(out, "{}", line.text)?;
                }
            }
            out.flush()
        };
        match write() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
    Ok(())
}

/// Unix milliseconds as RFC 3339 UTC, e.g. `2026-11-26T01:32:42.123Z`.
fn rfc3339_ms(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use corral_proto::pb;
    use std::time::Duration;

    #[test]
    fn sparklines() {
        use super::sparkline;
        assert_eq!(sparkline(&[0.0, 50.0, 100.0], 60, Some(100.0)), "▁▅█");
        assert_eq!(sparkline(&[0.0, 50.0, 100.0], 60, Some(200.0)), "▁▃▅");
        assert_eq!(sparkline(&[3.0, 3.0], 60, None), "██");
        assert_eq!(sparkline(&[0.0, 0.0], 60, None), "▁▁");
        assert_eq!(sparkline(&[], 60, None), "");
        // 120 points in 60 columns: pairs averaged.
        let v: Vec<f64> = (0..120).map(|i| if i < 60 { 0.0 } else { 10.0 }).collect();
        let line = sparkline(&v, 60, None);
        assert_eq!(line.chars().count(), 60);
        assert!(line.starts_with('▁') && line.ends_with('█'));
    }

    #[test]
    fn metrics_render() {
        let p = |at_ms, cpu| pb::MetricsPoint {
            at_ms,
            cpu_percent: cpu,
            memory_used_bytes: 1.0,
            memory_total_bytes: 4.0,
            ..Default::default()
        };
        let m = pb::NodeMetrics {
            cluster: "c1".into(),
            node: "vm1".into(),
            resolution_ms: 0,
            points: vec![p(0, 10.0), p(1000, 30.0)],
        };
        let text = super::render_metrics(&m, 60);
        assert!(text.contains("2 points"), "{text}");
        assert!(
            text.contains("cpu          ▂▃  min 10% avg 20% max 30% last 30%"),
            "{text}"
        );
        assert!(text.contains("memory       ▃▃  min 25%"), "{text}");
        let empty = pb::NodeMetrics {
            points: vec![],
            ..m
        };
        assert!(super::render_metrics(&empty, 60).contains("no figures"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172800));
        for bad in ["", "h", "10", "5w", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod log_tests {
    #[test]
    fn log_times_print_as_rfc3339() {
        assert_eq!(
            super::rfc3339_ms(1_795_656_762_123),
            "2026-11-26T01:32:42.123Z"
        );
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    }
}

async fn backup_command(
    api: &mut OperatorClient<Channel>,
    cmd: BackupCmd,
    json: bool,
) -> Result<()> {
    match cmd {
        BackupCmd::Now {
            cluster,
            target,
            no_wait,
        } => {
            let op = api
                .backup_now(pb::BackupNowRequest {
                    cluster: cluster.clone(),
                    target: target.unwrap_or_default(),
                })
                .await?
                .into_inner();
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("backing up cluster {cluster}"),
            )
            .await?;
        }
        BackupCmd::List { cluster } => {
            let r = api
                .list_backups(pb::ListBackupsRequest {
                    cluster: cluster.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            if r.backups.is_empty() {
                println!(
                    "no backups{}; take one with `corralctl backup now CLUSTER`",
                    cluster
                        .map(|c| format!(" of cluster {c}"))
                        .unwrap_or_default()
                );
            } else {
                println!("{}", backups_table(&r.backups));
            }
        }
        BackupCmd::Show { cluster, id } => {
            let b = api
                .get_backup(pb::GetBackupRequest { id: id.clone() })
                .await?
                .into_inner();
            if b.cluster != cluster {
                bail!("backup {id} is of cluster {}, not {cluster}", b.cluster);
            }
            if json {
                return print_json(&b);
            }
            let rows = [
                ("id", b.id.clone()),
                ("cluster", b.cluster.clone()),
                ("kind", b.kind.clone()),
                ("state", b.state.clone()),
                ("reason", b.reason.clone()),
                ("target", b.target.clone()),
                ("taken from", format!("{} ({})", b.node, b.role)),
                ("engine", format!("{} {}", b.engine, b.version)),
                ("started", rfc3339(b.started_at_ms)),
                ("finished", rfc3339(b.finished_at_ms)),
                (
                    "consistent at",
                    format!("{} ({})", b.position, rfc3339(b.position_time_ms)),
                ),
                ("data", size(b.plain_bytes)),
                ("stored", size(b.stored_bytes)),
                ("sha256", b.sha256.clone()),
                ("key id", b.key_id.clone()),
                (
                    "expires",
                    match (b.expires_at_ms, b.kind.as_str()) {
                        (0, "scheduled") => "when the schedule's retention removes it".into(),
                        (0, _) => "never: kept until deleted".into(),
                        (at, _) => rfc3339(at),
                    },
                ),
                ("operation", b.operation.clone()),
                (
                    "verified",
                    match b.verified_at_ms {
                        0 => "never (`corralctl backup verify`)".into(),
                        at => format!(
                            "{} at {}: {}",
                            if b.verify_ok { "ok" } else { "FAILED" },
                            rfc3339(at),
                            b.verify_summary
                        ),
                    },
                ),
            ];
            for (k, v) in rows {
                if !v.is_empty() {
                    println!("{k:>14}: {v}");
                }
            }
        }
        BackupCmd::Delete {
            cluster,
            id,
            confirm,
        } => {
            let b = api
                .get_backup(pb::GetBackupRequest { id: id.clone() })
                .await?
                .into_inner();
            if b.cluster != cluster {
                bail!("backup {id} is of cluster {}, not {cluster}", b.cluster);
            }
            let b = api
                .delete_backup(pb::DeleteBackupRequest {
                    id: id.clone(),
                    confirm: confirm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                return print_json(&b);
            }
            println!("backup {id} deleted");
        }
        BackupCmd::Download {
            cluster,
            id,
            file,
            raw,
        } => {
            let b = api
                .get_backup(pb::GetBackupRequest { id: id.clone() })
                .await?
                .into_inner();
            if b.cluster != cluster {
                bail!("backup {id} is of cluster {}, not {cluster}", b.cluster);
            }
            let path = file.unwrap_or_else(|| {
                PathBuf::from(format!(
                    "{id}.{}",
                    if raw {
                        "cbk"
                    } else {
                        download_extension(&b.engine)
                    }
                ))
            });
            download(api, &id, raw, &path).await?;
        }
        BackupCmd::Schedule {
            cluster,
            cron,
            retain,
            target,
            off,
        } => {
            let s = if off || cron.is_some() {
                if !off && retain.is_none() {
                    bail!("--cron needs --retain: how many backups (e.g. 7) or how long (e.g. 14d) to keep");
                }
                let (retain_count, retain_ms) = match retain {
                    Some(Retain::Count(n)) => (n, 0),
                    Some(Retain::Age(d)) => (0, d.as_millis() as i64),
                    None => (0, 0),
                };
                api.set_backup_schedule(pb::SetBackupScheduleRequest {
                    cluster: cluster.clone(),
                    cron: if off {
                        String::new()
                    } else {
                        cron.unwrap_or_default()
                    },
                    retain_count,
                    retain_ms,
                    target: target.unwrap_or_default(),
                })
                .await?
                .into_inner()
            } else {
                if retain.is_some() || target.is_some() {
                    bail!(
                        "give --cron with --retain and --target (or --off to remove the schedule)"
                    );
                }
                api.get_backup_schedule(pb::GetBackupScheduleRequest {
                    cluster: cluster.clone(),
                })
                .await?
                .into_inner()
            };
            if json {
                return print_json(&s);
            }
            if s.cron.is_empty() {
                println!("cluster {cluster} has no backup schedule");
            } else {
                println!(
                    "cluster {cluster}: backups at {:?} (UTC) to target {}",
                    s.cron, s.target
                );
                let keep = match (s.retain_count, s.retain_ms) {
                    (0, 0) => "every backup".to_string(),
                    (n, 0) => format!("the newest {n}"),
                    (0, ms) => format!(
                        "those younger than {}",
                        crate::backups::fmt_duration(Duration::from_millis(ms as u64))
                    ),
                    (n, ms) => format!(
                        "the newest {n}, younger than {}",
                        crate::backups::fmt_duration(Duration::from_millis(ms as u64))
                    ),
                };
                println!("  keeps {keep} (the newest is never removed)");
                println!("  next run: {}", rfc3339(s.next_run_ms));
                if s.wal_archiving {
                    println!(
                        "  WAL is archived to {} for point-in-time restores",
                        s.target
                    );
                }
            }
        }
        BackupCmd::Restore {
            cluster,
            id,
            to_time,
            confirm,
            into_new_cluster,
            nodes,
            no_wait,
        } => {
            if into_new_cluster.is_none() && confirm.is_none() {
                bail!(
                    "say where to restore: --into-new-cluster NAME --nodes N1,N2 (safest: the \
                     cluster keeps running), or in place with --confirm {cluster}"
                );
            }
            let what = match &into_new_cluster {
                Some(n) => format!("restoring backup {id} into new cluster {n}"),
                None => format!("restoring backup {id} into cluster {cluster}"),
            };
            let op = api
                .restore_backup(pb::RestoreBackupRequest {
                    cluster,
                    id,
                    to_time_ms: to_time.unwrap_or(0),
                    confirm: confirm.unwrap_or_default(),
                    into_new_cluster: into_new_cluster.unwrap_or_default(),
                    nodes,
                })
                .await?
                .into_inner();
            follow(api, op, no_wait, json, &what).await?;
        }
        BackupCmd::Verify {
            cluster,
            id,
            no_wait,
        } => {
            let b = api
                .get_backup(pb::GetBackupRequest { id: id.clone() })
                .await?
                .into_inner();
            if b.cluster != cluster {
                bail!("backup {id} is of cluster {}, not {cluster}", b.cluster);
            }
            let op = api
                .verify_backup(pb::VerifyBackupOperatorRequest { id: id.clone() })
                .await?
                .into_inner();
            follow(api, op, no_wait, json, &format!("verifying backup {id}")).await?;
        }
    }
    Ok(())
}

/// Writes a downloaded backup to `path` (a temporary name renamed once
/// complete, so a failed download leaves no file that looks whole).
async fn download(
    api: &mut OperatorClient<Channel>,
    id: &str,
    raw: bool,
    path: &Path,
) -> Result<()> {
    use std::io::Write;
    let mut stream = api
        .download_backup(pb::DownloadBackupRequest { id: id.into(), raw })
        .await?
        .into_inner();
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        let written: std::io::Result<()> = async {
            while let Some(chunk) = stream.message().await.map_err(std::io::Error::other)? {
                out.write_all(&chunk.data)?;
            }
            out.flush()
        }
        .await;
        return match written {
            // The reader had enough (`| head`): not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.with_context(|| format!("downloading backup {id}")),
        };
    }
    if path.exists() {
        bail!(
            "{} exists; name another file after the backup's id",
            path.display()
        );
    }
    let part = path.with_extension("part");
    let mut file =
        std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let mut bytes = 0u64;
    let outcome: Result<()> = async {
        while let Some(chunk) = stream.message().await? {
            file.write_all(&chunk.data)?;
            bytes += chunk.data.len() as u64;
        }
        file.sync_all()?;
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        let _ = std::fs::remove_file(&part);
        return Err(e.context(format!("downloading backup {id}; nothing was saved")));
    }
    std::fs::rename(&part, path)?;
    eprintln!("saved backup {id} to {} ({})", path.display(), size(bytes));
    Ok(())
}
