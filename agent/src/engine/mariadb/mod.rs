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
//!   backup.rs), `tmp/backup-*` (mariadb-backup's work directory).
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

use super::os::{self, log_tail, remove_dir, remove_file, write_owned, write_readable, TAIL_LINES};
use super::{Driver, EngineSpec, Health, ProgressFn, Secrets, Upstream};
use anyhow::{anyhow, bail, Context, Result};
use mysql_async::prelude::*;

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod backup;
mod binlog;
mod client;
mod clone;
mod config;
mod connection;
mod fencing;
mod gtid;
mod layout;
mod replication;
mod settings;
mod statements;
mod status;
mod tls;
pub use backup::{position_from_binlog_info, position_from_output};
pub use binlog::*;
pub use clone::*;
use config::*;
use connection::*;
pub use gtid::*;
use replication::*;
pub use settings::*;
pub use statements::*;
use status::*;

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
}
