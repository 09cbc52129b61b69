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
//!   backup.rs).
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

use super::os::{log_tail, mkdir_owned, remove_dir, remove_file, write_owned, TAIL_LINES};
use super::{Driver, EngineSpec, Health, ProgressFn, Secrets, Upstream};
use ::redis::aio::MultiplexedConnection;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod acl;
mod backup;
mod clone;
mod config;
mod connection;
mod health;
mod info;
mod layout;
mod live;
mod settings;
mod shutdown;
mod tls;
pub use acl::AGENT_USER;
use config::*;
use connection::*;
use info::*;
pub use settings::*;
use shutdown::*;

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
    /// The node's certificate (see tls.rs; none: no TLS).
    tls: std::sync::Arc<super::tls::EngineTls>,
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
}
