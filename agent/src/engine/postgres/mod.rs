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
//! Backups (see `backup.rs`): `archive_mode` is always on (it
//! needs a restart; a standby does not archive), and `archive_command`
//! copies each finished WAL segment into `wal-spool/` when the spec asks
//! for a WAL archive, else discards it (`/bin/true`, changed by a reload).
//! A data directory created before this picks archive_mode up at its next
//! restart.

mod backup;
mod config;
mod connection;
mod fencing;
mod health;
mod layout;
mod roles;
mod settings;
mod sql;
mod tls;
use fencing::*;
use health::*;
use roles::*;
pub use settings::*;
pub use sql::*;

use super::os::{self, mkdir_owned, run, tail, write_owned};
use super::tls::EngineTls;
use super::{Driver, EngineSpec, Health, ProgressFn, Secrets, Upstream};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
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
