//! PostgreSQL: data directory, configuration, process and bootstrap.
//!
//! Layout under `<state>/postgres/`: `data/` (the cluster, owned by the
//! `postgres` user, 0700), `run/` (the Unix socket, 0700, so only `postgres`
//! and root can use the trusted local connection), `server.log`, and
//! `pgpass` (0600, the replication role's password, used by replicas to
//! stream and by pg_basebackup / pg_rewind).
//!
//! The server runs as the `postgres` user, never root. Local connections
//! over the socket are trusted (that is how the agent administers it); every
//! TCP connection needs a SCRAM password.
//!
//! Replication: the primary keeps one physical slot per replica
//! (`corral_<node>`), so it retains the WAL a replica still needs (bounded
//! by `max_slot_wal_keep_size`, so a dead replica cannot fill the disk). A
//! replica is cloned with `pg_basebackup` through its slot and streams with
//! `primary_conninfo` naming itself as `application_name`, which is what
//! `synchronous_standby_names` and `pg_stat_replication` refer to. A former
//! primary rejoins through `pg_rewind`, which is a no-op when it was shut
//! down cleanly before its replica was promoted.
//!
//! Backups (see `postgres_backup.rs`): `archive_mode` is always on (it
//! needs a restart; a standby does not archive), and `archive_command`
//! copies each finished WAL segment into `wal-spool/` when the spec asks
//! for a WAL archive, else discards it (`/bin/true`, changed by a reload).
//! A data directory created before this picks archive_mode up at its next
//! restart.

#[path = "postgres_backup.rs"]
mod backup;
#[path = "postgres_tls.rs"]
mod tls;

use super::os::{self, mkdir_owned, run, tail, write_owned, Account};
use super::tls::{EngineTls, TlsFiles};
use super::{BackupInfo, Driver, EngineSpec, Health, ProgressFn, Recovery, Secrets, Upstream};
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

pub struct Postgres {
    bin_dir: PathBuf,
    base: PathBuf,
    /// This node's id: its application_name and slot name upstream.
    node_id: String,
    /// The cached administrative connection used for health checks.
    conn: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// Held while the fence's files (corral-fence.conf, pg_hba.conf) are
    /// read or written: `prepare` writes pg_hba.conf for the fence as it
    /// finds it, and a fence going up meanwhile must not be undone.
    fence_files: std::sync::Mutex<()>,
    /// The node's certificate, which the server presents (none: no TLS).
    tls: std::sync::Arc<EngineTls>,
}

/// The OS account the server runs as: `postgres`.
fn account() -> Result<Account> {
    Account::lookup("postgres", "install PostgreSQL (apt install postgresql)")
}

/// A single-quoted postgresql.conf value.
fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

impl Postgres {
    pub fn new(bin_dir: PathBuf, state_dir: &Path, node_id: &str) -> Postgres {
        Postgres {
            bin_dir,
            base: state_dir.join("postgres"),
            node_id: node_id.to_string(),
            conn: tokio::sync::Mutex::new(None),
            fence_files: std::sync::Mutex::new(()),
            tls: Default::default(),
        }
    }

    /// Serves TLS with the certificate `tls` holds (see `postgres_tls.rs`).
    pub fn with_tls(mut self, tls: std::sync::Arc<EngineTls>) -> Postgres {
        self.tls = tls;
        self
    }

    /// The server's copy of the node's certificate, if it has one.
    fn tls_files(&self) -> Option<TlsFiles> {
        self.tls.files_in(&self.base)
    }

    /// Installs the node's current certificate for the server; returns
    /// whether the files changed.
    fn install_tls(&self, acct: &Account) -> Result<bool> {
        self.tls.install_in(&self.base, acct)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    /// The base directory (root's, 0755), the socket directory and the
    /// TLS files; returns whether the TLS files changed.
    fn ensure_dirs(&self, acct: &Account) -> Result<bool> {
        os::mkdir(&self.base, 0o755)?;
        mkdir_owned(&self.socket_dir(), 0o700, acct)?;
        self.install_tls(acct)
    }

    fn bin(&self, name: &str) -> Result<PathBuf> {
        os::find_program(
            name,
            &[&self.bin_dir],
            "install PostgreSQL's server package (apt install postgresql) or point --pg-bin-dir \
             at the directory holding initdb and postgres",
        )
    }

    /// A PostgreSQL program, run as the postgres user in the base directory.
    fn command(&self, name: &str, acct: &Account) -> Result<tokio::process::Command> {
        Ok(os::command(
            &self.bin(name)?,
            Some(acct),
            "/usr/bin:/bin",
            &self.base,
        ))
    }

    async fn initdb(&self, acct: &Account) -> Result<()> {
        // Into a scratch directory first, renamed into place when complete:
        // a crash half-way never leaves a data directory that looks usable.
        let scratch = self.base.join("data.initdb");
        os::remove_dir(&scratch)?;
        mkdir_owned(&scratch, 0o700, acct)?;
        run(
            self.command("initdb", acct)?
                .arg("-D")
                .arg(&scratch)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ])
                .args(["--encoding=UTF8", "--locale=C.UTF-8", "--data-checksums"]),
            "initdb",
        )
        .await?;
        std::fs::rename(&scratch, self.data_dir())
            .context("moving the new data directory into place")?;
        Ok(())
    }

    fn pgpass_path(&self) -> PathBuf {
        self.base.join("pgpass")
    }

    fn clone_dir(&self) -> PathBuf {
        self.base.join("data.clone")
    }

    fn config(&self, spec: &EngineSpec) -> String {
        let mut c = format!(
            "# Written by corral-agent from the cluster's spec; edits here are overwritten.\n\
             listen_addresses = '*'\n\
             port = {port}\n\
             unix_socket_directories = {socket}\n\
             unix_socket_permissions = 0700\n\
             password_encryption = 'scram-sha-256'\n\
             cluster_name = {cluster}\n\
             logging_collector = off\n\
             # Every line stamped to the millisecond, in UTC: `corralctl logs`\n\
             # reads these stamps (logs::stamp).\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             log_timezone = 'UTC'\n\
             log_connections = on\n\
             # Replication.\n\
             wal_level = replica\n\
             max_wal_senders = 16\n\
             max_replication_slots = 16\n\
             max_slot_wal_keep_size = '{slot_keep}'\n\
             wal_keep_size = '256MB'\n\
             wal_log_hints = on\n\
             hot_standby = on\n\
             hot_standby_feedback = on\n\
             wal_receiver_status_interval = 1s\n\
             # A standby whose upstream vanished retries (and first replays\n\
             # what it already received) after this, not the default 5 s:\n\
             # a switchover otherwise waits up to 5 s for the last record.\n\
             wal_retrieve_retry_interval = '250ms'\n\
             synchronous_standby_names = {sync}\n\
             # WAL archive (backups): always on, since turning it on needs a\n\
             # restart; what is archived depends on the spec (a reload).\n\
             archive_mode = on\n\
             archive_command = {archive}\n\
             # The fence (read-only while this primary holds no lease).\n\
             include_if_exists = '{fence}'\n\
             {ssl}",
            port = spec.port,
            socket = conf_quote(&self.socket_dir().to_string_lossy()),
            cluster = conf_quote(&spec.cluster),
            slot_keep = SLOT_WAL_KEEP,
            sync = conf_quote(&synchronous_standby_names(spec)),
            fence = FENCE_CONF,
            ssl = tls::ssl_conf(self.tls_files().as_ref(), conf_quote),
            archive = conf_quote(&if spec.wal_archive {
                backup::archive_command(&self.spool_dir())
            } else {
                "/bin/true".to_string()
            }),
        );
        if let Some(up) = &spec.upstream {
            c.push_str(&format!(
                "primary_conninfo = {}\nprimary_slot_name = {}\nrecovery_target_timeline = 'latest'\n",
                conf_quote(&self.conninfo(up, &self.node_id, "replication")),
                conf_quote(&slot_name(&self.node_id)),
            ));
        }
        c
    }

    /// A libpq connection string to `up` as the replication role.
    fn conninfo(&self, up: &Upstream, application_name: &str, dbname: &str) -> String {
        let kv =
            |k: &str, v: &str| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        [
            kv("host", &up.host),
            kv("port", &up.port.to_string()),
            kv("user", REPLICATION_USER),
            kv("passfile", &self.pgpass_path().to_string_lossy()),
            kv("application_name", application_name),
            kv("dbname", dbname),
            kv("connect_timeout", "5"),
            kv("keepalives_idle", "5"),
            kv("keepalives_interval", "2"),
            kv("keepalives_count", "3"),
        ]
        .into_iter()
        .chain(
            tls::conninfo_tls(self.tls_files().as_ref())
                .into_iter()
                .map(|(k, v)| kv(k, &v)),
        )
        .collect::<Vec<_>>()
        .join(" ")
    }

    /// pg_hba.conf. Fenced (a primary without a lease), every TCP
    /// connection is rejected, clients and replicas alike: unlike
    /// `default_transaction_read_only`, which any session may turn off for
    /// itself, no session can undo that (it cannot even start). Only the
    /// agent's socket stays open.
    fn hba(&self, fenced: bool, spec: &EngineSpec) -> String {
        let tcp = if fenced {
            "# Fenced: this primary holds no lease. No TCP client or replica is\n\
             # accepted until it holds one again.\n\
             host all all 0.0.0.0/0 reject\n\
             host all all ::/0 reject\n\
             host replication all 0.0.0.0/0 reject\n\
             host replication all ::/0 reject\n"
                .to_string()
        } else {
            tls::hba_tcp(self.tls_files().is_some(), spec.require_client_tls)
        };
        format!(
            "# Written by corral-agent; edits here are overwritten.\n\
             # The socket directory is 0700: only postgres and the agent reach it.\n\
             local all all trust\n\
             local replication all trust\n\
             {tcp}"
        )
    }

    async fn connect(&self, spec: &EngineSpec) -> Result<tokio_postgres::Client> {
        self.connect_port(spec.port).await
    }

    async fn connect_port(&self, port: u16) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(self.socket_dir())
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .application_name("corral-agent")
            // The agent administers a fenced (read-only) primary too.
            .options("-c default_transaction_read_only=off")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// pg_controldata's fields of the stopped (or running) data directory.
    async fn controldata(&self) -> Result<Vec<(String, String)>> {
        let acct = account()?;
        let out = self
            .command("pg_controldata", &acct)?
            .arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .output()
            .await
            .context("running pg_controldata")?;
        if !out.status.success() {
            bail!(
                "pg_controldata failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }
}

/// The file (in the data directory, included by corral.conf) that makes a
/// fenced primary read-only.
const FENCE_CONF: &str = "corral-fence.conf";

impl Postgres {
    /// The port of the running server, from postmaster.pid (fourth line).
    fn running_port(&self) -> Option<u16> {
        let pidfile = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        pidfile.lines().nth(3)?.trim().parse().ok()
    }

    /// Terminates every client session (not the agent's own) and every
    /// walsender. A fenced primary's walsenders can reach no standby (the
    /// firewall drops their packets): left alone they would hold up a later
    /// fast shutdown, which waits for them to send their last WAL, for
    /// `wal_sender_timeout` (a minute).
    async fn end_client_sessions(&self, port: u16) -> Result<()> {
        // Bounded: a hung server must not hold the fence (or anything
        // waiting for the connection) up.
        tokio::time::timeout(Duration::from_secs(3), self.end_client_sessions_now(port))
            .await
            .map_err(|_| anyhow!("the server did not answer within 3 s"))?
    }

    async fn end_client_sessions_now(&self, port: u16) -> Result<()> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = Some(self.connect_port(port).await?);
        }
        let Some(c) = conn.as_ref() else {
            return Ok(());
        };
        let ended = c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE (backend_type = 'client backend' AND pid <> pg_backend_pid() \
                        AND application_name <> 'corral-agent') \
                    OR backend_type = 'walsender'",
                &[],
            )
            .await;
        match ended {
            Ok(r) => {
                tracing::info!(
                    sessions = r.get::<_, i64>(0),
                    "fenced: client sessions and walsenders ended"
                );
                Ok(())
            }
            Err(e) => {
                *conn = None;
                Err(e).context("ending client sessions")
            }
        }
    }
}

/// The role replicas stream as (and pg_basebackup / pg_rewind connect as).
pub const REPLICATION_USER: &str = "corral_replication";

/// Upper bound of WAL a replication slot may hold back on the primary: a
/// replica that falls further behind (or is dead) loses its slot's WAL and
/// must be resynced, instead of filling the primary's disk.
const SLOT_WAL_KEEP: &str = "4GB";

/// The replication slot that serves replica `node`.
pub fn slot_name(node: &str) -> String {
    // Node names are [a-z0-9-], at most 63 bytes; slot names are [a-z0-9_],
    // at most 63 bytes.
    let name = node.replace('-', "_");
    if name.len() <= 56 {
        return format!("corral_{name}");
    }
    // FNV-1a: stable across builds, enough to tell long names apart.
    let hash = node.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("corral_{}_{:08x}", &name[..47], hash as u32)
}

/// `ANY 1 ("a", "b")` over the replicas when sync is on, else empty.
pub fn synchronous_standby_names(spec: &EngineSpec) -> String {
    if !spec.sync || spec.replicas.is_empty() {
        return String::new();
    }
    let names: Vec<String> = spec
        .replicas
        .iter()
        .map(|r| format!("\"{}\"", r.replace('"', "\"\"")))
        .collect();
    format!("ANY 1 ({})", names.join(", "))
}

/// "0/3000028" -> 0x3000028.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// "123/4567 kB (2%), 0/1 tablespace" -> (123 KiB, 4567 KiB) in bytes.
fn parse_basebackup_progress(line: &str) -> Option<(u64, u64)> {
    let kb = line.find(" kB")?;
    let nums = line[..kb].trim();
    let (done, total) = nums.rsplit(' ').next()?.split_once('/')?;
    Some((
        done.parse::<u64>().ok()? * 1024,
        total.parse::<u64>().ok()? * 1024,
    ))
}

fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// A .pgpass line escapes ':' and '\'.
fn pgpass_escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace(':', "\\:")
}

#[tonic::async_trait]
impl Driver for Postgres {
    fn engine_label(&self) -> &'static str {
        "PostgreSQL"
    }

    fn has_data(&self) -> bool {
        self.data_dir().join("PG_VERSION").exists()
    }

    fn data_is_standby(&self) -> Result<bool> {
        Ok(self.data_dir().join("standby.signal").exists())
    }

    async fn initialize(&self) -> Result<()> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        if self.data_dir().exists() {
            bail!(
                "{} exists but is not a PostgreSQL data directory (no PG_VERSION): refusing to touch \
                 it; move it away if it holds nothing you need",
                self.data_dir().display()
            );
        }
        self.initdb(&acct).await
    }

    async fn clone_data(
        &self,
        _spec: &EngineSpec,
        up: &Upstream,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        if !self.pgpass_path().exists() {
            bail!("no replication password on this node yet (pgpass missing)");
        }
        // Into a scratch directory renamed into place when complete, as initdb.
        let scratch = self.clone_dir();
        os::remove_dir(&scratch)?;
        mkdir_owned(&scratch, 0o700, &acct)?;
        let mut child = self
            .command("pg_basebackup", &acct)?
            .arg("-D")
            .arg(&scratch)
            .arg("--dbname")
            .arg(self.conninfo(up, &format!("{}-clone", self.node_id), "replication"))
            .args(["-S", &slot_name(&self.node_id)])
            .args(["-X", "stream", "-c", "fast", "--progress", "--no-password"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting pg_basebackup")?;
        let mut stderr = child.stderr.take().context("pg_basebackup stderr")?;
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        let mut pending = String::new();
        loop {
            let n = stderr.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(i) = pending.find(['\n', '\r']) {
                let line: String = pending.drain(..=i).collect();
                match parse_basebackup_progress(&line) {
                    Some((done, total)) => progress(done, total),
                    None => text.push_str(&line),
                }
            }
        }
        let status = child.wait().await.context("waiting for pg_basebackup")?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&scratch);
            bail!(
                "pg_basebackup failed ({status}):\n{}",
                tail(&text, os::TAIL_LINES)
            );
        }
        // A re-clone replaces data that is still there (a rewind that
        // failed): the old copy goes only once the new one is complete.
        let old = self.base.join("data.old");
        if self.data_dir().exists() {
            os::remove_dir(&old)?;
            std::fs::rename(self.data_dir(), &old)
                .context("moving the previous data directory aside")?;
        }
        // The clone carries the primary's standby-less state; mark it ours.
        std::fs::rename(&scratch, self.data_dir())
            .context("moving the cloned data directory into place")?;
        write_owned(&self.data_dir().join("standby.signal"), "", &acct)?;
        os::remove_dir(&old)?;
        Ok(())
    }

    async fn rejoin(&self, _spec: &EngineSpec, up: &Upstream) -> Result<()> {
        let acct = account()?;
        self.install_tls(&acct)?;
        run(
            self.command("pg_rewind", &acct)?
                .arg("-D")
                .arg(self.data_dir())
                .arg("--source-server")
                .arg(self.conninfo(up, &format!("{}-rewind", self.node_id), "postgres")),
            "pg_rewind",
        )
        .await?;
        write_owned(&self.data_dir().join("standby.signal"), "", &acct)?;
        Ok(())
    }

    fn save_secrets(&self, secrets: &Secrets) -> Result<()> {
        let acct = account()?;
        self.ensure_dirs(&acct)?;
        write_owned(
            &self.pgpass_path(),
            &format!(
                "*:*:*:{REPLICATION_USER}:{}\n",
                pgpass_escape(&secrets.replication_password)
            ),
            &acct,
        )?;
        Ok(())
    }

    async fn prepare(&self, spec: &EngineSpec) -> Result<()> {
        let acct = account()?;
        // A renewed certificate is picked up by the reload below.
        let tls_changed = self.ensure_dirs(&acct)?;
        if !self.has_data() {
            bail!(
                "{} holds no PostgreSQL data directory",
                self.data_dir().display()
            );
        }
        mkdir_owned(&self.spool_dir(), 0o700, &acct)?;
        let data = self.data_dir();
        let mut changed = tls_changed;
        changed |= write_owned(&data.join("corral.conf"), &self.config(spec), &acct)?;
        {
            let _files = self.fence_files.lock().unwrap_or_else(|p| p.into_inner());
            let fenced = data.join(FENCE_CONF).exists();
            changed |= write_owned(&data.join("pg_hba.conf"), &self.hba(fenced, spec), &acct)?;
        }
        let main_conf = data.join("postgresql.conf");
        let text = std::fs::read_to_string(&main_conf)
            .with_context(|| format!("reading {}", main_conf.display()))?;
        let include = "include_if_exists = 'corral.conf'";
        if !text.lines().any(|l| l.trim() == include) {
            write_owned(
                &main_conf,
                &format!("{text}\n# Corral's settings (port, sockets, ...).\n{include}\n"),
                &acct,
            )?;
            changed = true;
        }
        if changed {
            if let Some(pid) = self.find_running() {
                // Settings that need a restart (port) are not changed in
                // place; primary_conninfo and synchronous_standby_names are
                // applied by a reload.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::SIGHUP,
                );
            }
        }
        Ok(())
    }

    fn find_running(&self) -> Option<u32> {
        // postmaster.pid's first line is the pid.
        os::running_pid(&self.data_dir().join("postmaster.pid"), "postgres")
    }

    async fn start(&self, _spec: &EngineSpec) -> Result<tokio::process::Child> {
        let acct = account()?;
        let log_path = self.log_path();
        let log = os::open_log(&log_path)?;
        *self.conn.lock().await = None;
        let child = os::spawn_logged(
            self.command("postgres", &acct)?
                .arg("-D")
                .arg(self.data_dir()),
            log,
            "postgres",
        )?;
        tracing::info!(pid = child.id(), log = %log_path.display(), "postgres started");
        Ok(child)
    }

    async fn stop(&self, pid: u32) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        if self.data_dir().join(FENCE_CONF).exists() {
            // Fenced: walsenders that got in before the fence would hold
            // the fast shutdown up (see end_client_sessions).
            if let Some(port) = self.running_port() {
                if let Err(e) = self.end_client_sessions(port).await {
                    tracing::warn!("before stopping a fenced primary: {e:#}");
                }
            }
        }
        *self.conn.lock().await = None;
        let target = nix::unistd::Pid::from_raw(pid as i32);
        // Fast shutdown: sessions are disconnected, a shutdown checkpoint is
        // written and every connected standby receives the WAL up to it
        // before the server exits.
        kill(target, Signal::SIGINT).with_context(|| format!("signalling postgres {pid}"))?;
        let began = std::time::Instant::now();
        while super::process_alive(pid) {
            if began.elapsed() > Duration::from_secs(120) {
                bail!(
                    "postgres (pid {pid}) did not stop within 120 s of a fast shutdown; see {}",
                    self.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    async fn stopped_position(&self) -> Result<(u64, String)> {
        let fields = self.controldata().await?;
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .with_context(|| format!("pg_controldata printed no {k:?}"))
        };
        let lsn = parse_lsn(&get("Latest checkpoint location")?)
            .context("unreadable checkpoint location")?;
        Ok((lsn, get("Database cluster state")?))
    }

    async fn check(&self, spec: &EngineSpec) -> Result<Health> {
        let mut conn = tokio::time::timeout(Duration::from_secs(5), self.conn.lock())
            .await
            .map_err(|_| anyhow!("the admin connection is busy (another query hangs)"))?;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = Some(self.connect(spec).await?);
        }
        let client = conn.as_ref().ok_or_else(|| anyhow!("no connection"))?;
        match tokio::time::timeout(Duration::from_secs(5), health(client)).await {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(e)) => {
                *conn = None;
                Err(e)
            }
            Err(_) => {
                *conn = None;
                bail!("health query timed out after 5s")
            }
        }
    }

    async fn bootstrap(&self, spec: &EngineSpec, secrets: &Secrets) -> Result<()> {
        let client = self
            .connect(spec)
            .await
            .context("connecting over the local socket")?;
        let user = quote_ident(&spec.admin_user);
        upsert_role(
            &client,
            &spec.admin_user,
            "LOGIN CREATEDB CREATEROLE",
            &secrets.admin_password,
        )
        .await?;
        client
            .batch_execute(&format!("GRANT pg_monitor, pg_signal_backend TO {user}"))
            .await?;
        upsert_role(
            &client,
            REPLICATION_USER,
            "LOGIN REPLICATION",
            &secrets.replication_password,
        )
        .await?;
        // What pg_rewind needs from its source, and no more (PostgreSQL docs,
        // pg_rewind "Notes").
        let r = quote_ident(REPLICATION_USER);
        client
            .batch_execute(&format!(
                "GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {r};
                 GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {r};
                 GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {r};
                 GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {r};"
            ))
            .await
            .context("granting pg_rewind's functions to the replication role")?;
        let db_exists = !client
            .query(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&spec.database],
            )
            .await?
            .is_empty();
        if !db_exists {
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {} OWNER {user}",
                    quote_ident(&spec.database)
                ))
                .await
                .with_context(|| format!("CREATE DATABASE {}", spec.database))?;
        }
        Ok(())
    }

    async fn converge_slots(&self, spec: &EngineSpec) -> Result<()> {
        let client = self
            .connect(spec)
            .await
            .context("connecting over the local socket")?;
        let wanted: Vec<String> = if spec.role == "primary" {
            spec.replicas.iter().map(|r| slot_name(r)).collect()
        } else {
            Vec::new()
        };
        let rows = client
            .query(
                "SELECT slot_name::text, active FROM pg_replication_slots \
                 WHERE slot_name LIKE 'corral\\_%'",
                &[],
            )
            .await?;
        let existing: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for w in &wanted {
            if !existing.iter().any(|(n, _)| n == w) {
                client
                    .execute("SELECT pg_create_physical_replication_slot($1, true)", &[w])
                    .await
                    .with_context(|| format!("creating replication slot {w}"))?;
                tracing::info!(slot = %w, "replication slot created");
            }
        }
        for (name, active) in existing {
            if wanted.contains(&name) {
                continue;
            }
            if active {
                // The replica it served is being removed; its walsender
                // goes away once the replica stops. Dropped on the next pass.
                tracing::info!(slot = %name, "slot no longer wanted but still active; dropping it later");
                continue;
            }
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
                .with_context(|| format!("dropping replication slot {name}"))?;
            tracing::info!(slot = %name, "replication slot dropped");
        }
        Ok(())
    }

    async fn promote(&self, spec: &EngineSpec) -> Result<()> {
        let client = self
            .connect(spec)
            .await
            .context("connecting over the local socket")?;
        // pg_promote(wait => true) polls every 100 ms; ask without waiting
        // and poll faster ourselves.
        client
            .execute("SELECT pg_promote(false)", &[])
            .await
            .context("pg_promote")?;
        let began = std::time::Instant::now();
        loop {
            let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await?;
            if !row.get::<_, bool>(0) {
                break;
            }
            if began.elapsed() > Duration::from_secs(60) {
                bail!(
                    "still in recovery 60 s after pg_promote; see {}",
                    self.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // pg_rewind of the former primary reads the new timeline from this
        // server's control file, which the end-of-recovery checkpoint updates.
        client
            .batch_execute("CHECKPOINT")
            .await
            .context("checkpoint after promotion")?;
        Ok(())
    }

    async fn set_fenced(&self, spec: &EngineSpec, fenced: bool) -> Result<()> {
        if !self.has_data() {
            return Ok(());
        }
        let acct = account()?;
        let path = self.data_dir().join(FENCE_CONF);
        // Both halves: no TCP session can start (pg_hba.conf), and the
        // agent's own sessions over the socket default to read-only.
        let files = self.fence_files.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = if fenced {
            write_owned(
                &path,
                "# Written by corral-agent: this primary holds no lease.\n\
                 default_transaction_read_only = on\n",
                &acct,
            )?
        } else {
            os::remove_file(&path)?
        };
        changed |= write_owned(
            &self.data_dir().join("pg_hba.conf"),
            &self.hba(fenced, spec),
            &acct,
        )?;
        drop(files);
        let Some(pid) = self.find_running() else {
            return Ok(());
        };
        if changed {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGHUP,
            )
            .context("reloading postgres")?;
        }
        if fenced {
            // Sessions opened before the fence keep their old default; end
            // them. Best effort: the firewall already cut their clients off
            // and the engine may be stopping (nothing to end then).
            if let Err(e) = self.end_client_sessions(spec.port).await {
                tracing::warn!("fenced, but ending client sessions failed: {e:#}");
            }
        }
        Ok(())
    }

    async fn wipe(&self) -> Result<()> {
        *self.conn.lock().await = None;
        for dir in [
            self.data_dir(),
            self.clone_dir(),
            self.base.join("data.initdb"),
            self.base.join("data.restore"),
            self.spool_dir(),
        ] {
            os::remove_dir(&dir)?;
        }
        Ok(())
    }

    fn forget_secrets(&self) -> Result<()> {
        os::remove_file(&self.pgpass_path())?;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.base.join("server.log")
    }

    fn backup(
        &self,
        spec: &EngineSpec,
        out: &mut dyn std::io::Write,
        progress: ProgressFn<'_>,
    ) -> Result<BackupInfo> {
        self.backup_stream(spec, out, progress)
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

    fn wal_spool(&self) -> Option<PathBuf> {
        Some(self.spool_dir())
    }

    async fn switch_wal(&self, spec: &EngineSpec) -> Result<String> {
        let client = self
            .connect(spec)
            .await
            .context("connecting over the local socket")?;
        // The LSN pg_switch_wal returns is the end of the segment it
        // closed, or (nothing written since the last switch) the start of
        // the current one; either way pg_walfile_name, which names the
        // segment holding the byte before a boundary, gives the last
        // closed segment.
        let row = client
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .context("switching to a new WAL segment (pg_switch_wal)")?;
        Ok(row.get(0))
    }
}

/// Creates or updates a role; only its SCRAM verifier reaches the server.
async fn upsert_role(
    client: &tokio_postgres::Client,
    name: &str,
    options: &str,
    password: &str,
) -> Result<()> {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let exists = !client
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await?
        .is_empty();
    let verb = if exists { "ALTER" } else { "CREATE" };
    client
        .batch_execute(&format!(
            "{verb} ROLE {} WITH {options} PASSWORD {}",
            quote_ident(name),
            quote_literal(&verifier)
        ))
        .await
        .with_context(|| format!("{verb} ROLE {name}"))
}

/// One health check: version and replication state.
async fn health(client: &tokio_postgres::Client) -> Result<Health> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), pg_is_in_recovery(), \
             (CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0') \
                   ELSE pg_current_wal_lsn() END - '0/0')::bigint, \
             (coalesce(pg_last_wal_receive_lsn(), '0/0') - '0/0')::bigint, \
             (CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint()) \
                   ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END), \
             (SELECT system_identifier FROM pg_control_system())::text, \
             current_setting('synchronous_standby_names')",
            &[],
        )
        .await?;
    let in_recovery: bool = row.get(1);
    let mut r = pb::Replication {
        in_recovery,
        lsn: row.get::<_, i64>(2) as u64,
        receive_lsn: row.get::<_, i64>(3) as u64,
        timeline: row.get::<_, i32>(4) as u32,
        system_identifier: row.get(5),
        synchronous_standby_names: row.get(6),
        ..Default::default()
    };
    if in_recovery {
        if let Some(w) = client
            .query_opt(
                "SELECT status, coalesce(sender_host, ''), \
                 coalesce((latest_end_lsn - '0/0')::bigint, 0) FROM pg_stat_wal_receiver",
                &[],
            )
            .await?
        {
            r.streaming = w.get::<_, String>(0) == "streaming";
            r.upstream_host = w.get(1);
            r.upstream_lsn = w.get::<_, i64>(2) as u64;
        }
    } else {
        let rows = client
            .query(
                "SELECT application_name, coalesce(state, ''), \
                 coalesce((sent_lsn - '0/0')::bigint, 0), coalesce((flush_lsn - '0/0')::bigint, 0), \
                 coalesce((replay_lsn - '0/0')::bigint, 0), \
                 coalesce((extract(epoch FROM replay_lag) * 1000)::bigint, 0), coalesce(sync_state, '') \
                 FROM pg_stat_replication WHERE application_name NOT LIKE '%-clone' \
                 AND application_name NOT LIKE '%-rewind' AND application_name NOT LIKE '%-backup'",
                &[],
            )
            .await?;
        r.standbys = rows
            .iter()
            .map(|w| pb::Standby {
                name: w.get(0),
                state: w.get(1),
                sent_lsn: w.get::<_, i64>(2) as u64,
                flush_lsn: w.get::<_, i64>(3) as u64,
                replay_lsn: w.get::<_, i64>(4) as u64,
                replay_lag_ms: w.get::<_, i64>(5) as u64,
                sync_state: w.get(6),
            })
            .collect();
    }
    let mut stats = std::collections::BTreeMap::new();
    let figures = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::float8, \
             CASE WHEN NOT pg_is_in_recovery() THEN NULL \
               WHEN pg_last_wal_receive_lsn() IS NOT NULL \
                 AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0::float8 \
               ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)::float8 \
             END",
            &[],
        )
        .await?;
    stats.insert("connections".into(), figures.get::<_, f64>(0));
    if let Some(lag) = figures.get::<_, Option<f64>>(1) {
        // Time since the last replayed commit, while something received
        // waits to be replayed; 0 once everything received is replayed
        // (otherwise an idle primary would make every replica look ever
        // further behind, and raise replication-lag alerts).
        stats.insert("lag_seconds".into(), lag.max(0.0));
    }
    Ok(Health {
        version: row.get(0),
        replication: r,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(conf_quote("/a/it's"), "'/a/it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("o'k"), "'o''k'");
    }
}
