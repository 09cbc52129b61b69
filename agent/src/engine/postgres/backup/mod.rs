//! PostgreSQL backups: a physical backup of the local server as one tar
//! stream, its restore (with recovery run to completion, optionally to a
//! point in time from archived WAL), its verification in a scratch
//! directory, and the WAL archive's spool.
//!
//! A backup is `pg_basebackup -D - -Ft -X fetch` against the local server
//! over its Unix socket: one tar holding the data directory and the WAL
//! from the backup's start to its end, so it restores without any archive.
//! It works on a standby too (a backup from a standby).
//!
//! A restore extracts the tar (as `postgres`) into `data.restore`, removes
//! what made the source a standby or fenced (standby.signal, corral.conf,
//! corral-fence.conf, recovery settings in postgresql.auto.conf), and runs
//! recovery to completion in a private server: no TCP (listen_addresses
//! empty), its socket in a private directory, with `recovery.signal` and
//! every recovery setting given on its command line only, so none of them
//! is left in a file afterwards. Recovery ends with a promotion, so the
//! restored data is on a new timeline (its WAL never collides with the
//! source's archive). The private server is stopped cleanly and the
//! directory renamed into place: afterwards it is an ordinary primary's,
//! which the agent prepares and starts as usual.

use super::os::{
    self, failure_summary, mkdir_owned, pump, write_owned, Account, PumpError, Reaped,
};
use super::{account, Postgres};
use crate::engine::contract::{Backup, BackupInfo, Driver, EngineSpec, ProgressFn, Recovery};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod text;
pub(super) use text::archive_command;
use text::*;

/// The port of the private recovery server: only names its socket file
/// (it listens on no TCP port), so it never collides with the node's.
const PRIVATE_PORT: u16 = 5432;

/// Longest wait for recovery to finish (a point-in-time recovery may
/// replay a great deal of WAL).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

/// Settings that make a server recover or follow another; stripped from
/// the restored configuration files.
const RECOVERY_SETTINGS: &[&str] = &[
    "primary_conninfo",
    "primary_slot_name",
    "restore_command",
    "archive_cleanup_command",
    "recovery_end_command",
    "recovery_min_apply_delay",
    "promote_trigger_file",
];

/// What PostgreSQL says when the WAL ran out before the recovery target.
const TARGET_NOT_REACHED: &str = "recovery ended before configured recovery target was reached";
/// ... and when the target lies before the end of the backup.
const TARGET_TOO_EARLY: &str = "requested recovery stop point is before consistent recovery point";

/// The postgres user's ids, for commands run from a blocking thread.
struct Ids {
    acct: Account,
    uid: u32,
    gid: u32,
}

fn ids() -> Result<Ids> {
    let acct = account()?;
    let user = nix::unistd::User::from_name("postgres")
        .context("looking up the `postgres` user")?
        .ok_or_else(|| anyhow!("there is no `postgres` user on this machine"))?;
    Ok(Ids {
        acct,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

/// Reads a child's stderr to the end on a thread of its own (so that it
/// never blocks the child); joined for the text.
struct Collected(Option<std::thread::JoinHandle<String>>);

impl Collected {
    fn start(stderr: Option<std::process::ChildStderr>) -> Collected {
        Collected(stderr.map(|mut s| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        }))
    }

    fn text(&mut self) -> String {
        self.0
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

/// A temporary PostgreSQL server on restored data: killed (immediate
/// shutdown, then SIGKILL) if dropped while running.
struct PrivateServer {
    child: Option<Child>,
    psql: PathBuf,
    run_dir: PathBuf,
    uid: u32,
    gid: u32,
    /// Its postmaster.pid, whose status line says when it accepts
    /// connections (asking earlier only fills the log with refusals).
    pid_file: PathBuf,
    log: PathBuf,
    /// Where in the log this server's lines start.
    log_from: u64,
}

impl PrivateServer {
    /// This server's part of the log, last lines.
    fn log_tail(&self, n: usize) -> String {
        use std::io::{Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.log) else {
            return String::new();
        };
        let _ = f.seek(SeekFrom::Start(self.log_from));
        let mut buf = Vec::new();
        let _ = f.take(4 << 20).read_to_end(&mut buf);
        os::tail(&String::from_utf8_lossy(&buf), n)
    }

    fn log_text(&self) -> String {
        self.log_tail(10_000)
    }

    /// Runs `sql` in `db` with psql over the private socket; its output
    /// (unaligned, tuples only).
    fn query(&self, db: &str, sql: &str) -> Result<String> {
        let out = std::process::Command::new(&self.psql)
            .uid(self.uid)
            .gid(self.gid)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .current_dir(&self.run_dir)
            .arg("-XAtq")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg("-d")
            .arg(format!(
                "host={} port={PRIVATE_PORT} user=postgres dbname={} connect_timeout=5",
                conn_value(&self.run_dir.to_string_lossy()),
                conn_value(db)
            ))
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Waits until recovery has ended with a promotion.
    fn wait_promoted(&mut self, recovery: Option<&Recovery>) -> Result<()> {
        let began = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .map(|c| c.try_wait())
                .transpose()
                .context("waiting for the recovery server")?
                .flatten()
            {
                self.child = None;
                let log = self.log_text();
                if let Some(r) = recovery {
                    let when = recovery_time(r.to_time_ms).unwrap_or_default();
                    if log.contains(TARGET_NOT_REACHED) {
                        bail!(
                            "point-in-time recovery to {when} failed: the WAL archive has no WAL up \
                             to that time (recovery ended before reaching it); choose an earlier \
                             time or wait until the WAL up to it is archived"
                        );
                    }
                    if log.contains(TARGET_TOO_EARLY) {
                        bail!(
                            "point-in-time recovery to {when} failed: the backup ends after that \
                             time; restore an older backup"
                        );
                    }
                }
                bail!(
                    "PostgreSQL's recovery of the backup failed (the server {status}):\n{}",
                    failure_summary(&os::tail(&log, 30))
                );
            }
            // The eighth line of postmaster.pid: "ready" once the server
            // accepts connections, which (no hot standby) is once recovery
            // has ended.
            let ready = std::fs::read_to_string(&self.pid_file)
                .ok()
                .and_then(|t| t.lines().nth(7).map(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                if let Ok(v) = self.query("postgres", "SELECT pg_is_in_recovery()") {
                    if v == "f" {
                        return Ok(());
                    }
                }
            }
            if began.elapsed() > RECOVERY_TIMEOUT {
                bail!(
                    "recovery of the backup did not finish within {} hours:\n{}",
                    RECOVERY_TIMEOUT.as_secs() / 3600,
                    self.log_tail(os::TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fast shutdown; fails unless the server stops cleanly.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGINT);
        let began = Instant::now();
        loop {
            if let Some(status) = child
                .try_wait()
                .context("waiting for the recovery server")?
            {
                if !status.success() {
                    bail!(
                        "the recovery server did not stop cleanly ({status}):\n{}",
                        self.log_tail(os::TAIL_LINES)
                    );
                }
                return Ok(());
            }
            if began.elapsed() > Duration::from_secs(300) {
                self.child = Some(child);
                bail!("the recovery server did not stop within 300 s of a fast shutdown");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            // Immediate shutdown: the postmaster ends its children first.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGQUIT);
            let began = Instant::now();
            while let Ok(None) = child.try_wait() {
                if began.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.wait();
    }
}

impl Postgres {
    /// Where archive_command copies finished WAL segments.
    pub(super) fn spool_dir(&self) -> PathBuf {
        self.base.join("wal-spool")
    }

    /// A PostgreSQL program (or `tar`) run as postgres from a blocking
    /// thread, with a clean environment, in the base directory.
    fn std_command(&self, program: &Path, ids: &Ids) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        cmd.uid(ids.uid)
            .gid(ids.gid)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .current_dir(&self.base);
        cmd
    }

    /// Runs `sql` against the node's running server (the socket as
    /// postgres); its output, unaligned.
    fn local_query(&self, ids: &Ids, port: u16, sql: &str) -> Result<String> {
        let out = self
            .std_command(&self.bin("psql")?, ids)
            .arg("-XAtq")
            .arg("-d")
            .arg(format!(
                "host={} port={port} user=postgres dbname=postgres connect_timeout=5",
                conn_value(&self.socket_dir().to_string_lossy())
            ))
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "querying the local server failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Extracts the tar stream `input` into `dir` (which exists, is empty
    /// and is postgres'), with `tar` run as postgres.
    fn extract(&self, ids: &Ids, input: &mut dyn Read, dir: &Path) -> Result<u64> {
        let tar = os::find_program(
            "tar",
            &["/usr/bin", "/bin"],
            "install tar (apt install tar)",
        )?;
        let child = self
            .std_command(&tar, ids)
            .arg("-x")
            .arg("-f")
            .arg("-")
            .arg("-C")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tar to extract the backup")?;
        let mut tool = Reaped::new(child, "tar");
        let mut stderr = Collected::start(tool.child.stderr.take());
        let mut stdin = tool
            .child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("tar has no stdin"))?;
        let (done, write_failed) = match pump(input, &mut stdin, |_| {}) {
            Ok(done) => (done, None),
            Err(PumpError::Read(e, done)) => {
                tool.kill();
                let _ = stderr.text();
                return Err(anyhow::Error::new(e).context(format!(
                    "reading the backup stream failed after {done} bytes"
                )));
            }
            // tar stopped reading: its own error says why.
            Err(PumpError::Write(e, done)) => (done, Some(e)),
        };
        drop(stdin);
        let status = tool.wait()?;
        let text = stderr.text();
        if !status.success() {
            bail!(
                "extracting the backup failed: the stream is truncated or is not a PostgreSQL \
                 backup (tar {status}):\n{}",
                failure_summary(&text)
            );
        }
        if let Some(e) = write_failed {
            bail!("extracting the backup failed: tar stopped reading its input: {e}");
        }
        for needed in ["PG_VERSION", "global/pg_control", "backup_label"] {
            if !dir.join(needed).exists() {
                bail!(
                    "the backup stream is truncated or is not a PostgreSQL base backup: it \
                     holds no {needed} ({done} bytes read)"
                );
            }
        }
        Ok(done)
    }

    /// Makes extracted data an ordinary (not standby, not fenced) data
    /// directory without Corral's per-node configuration, ready for a
    /// recovery run.
    fn sanitize(&self, ids: &Ids, data: &Path) -> Result<()> {
        for f in [
            "standby.signal",
            "recovery.signal",
            "corral.conf",
            super::FENCE_CONF,
            "postmaster.pid",
            "postmaster.opts",
            "backup_manifest",
        ] {
            os::remove_file(&data.join(f))?;
        }
        for f in ["postgresql.auto.conf", "postgresql.conf"] {
            let path = data.join(f);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if let Some(stripped) = strip_recovery_settings(&text) {
                write_owned(&path, &stripped, &ids.acct)?;
            }
        }
        Ok(())
    }

    /// Runs recovery of the extracted `data` to completion in a private
    /// server (socket in `run_dir`, no TCP), with `recovery` or to the end
    /// of the backup; returns the promoted, running server.
    fn recover(
        &self,
        ids: &Ids,
        data: &Path,
        run_dir: &Path,
        log: &Path,
        recovery: Option<&Recovery>,
    ) -> Result<PrivateServer> {
        self.sanitize(ids, data)?;
        write_owned(&data.join("recovery.signal"), "", &ids.acct)?;
        mkdir_owned(run_dir, 0o700, &ids.acct)?;
        let mut settings: Vec<String> = vec![
            "listen_addresses=".into(),
            format!("unix_socket_directories={}", run_dir.display()),
            "unix_socket_permissions=0700".into(),
            format!("port={PRIVATE_PORT}"),
            "archive_mode=off".into(),
            // No hot standby: nothing connects before the promotion, and
            // the source's max_connections & co. need not be matched.
            "hot_standby=off".into(),
            "primary_conninfo=".into(),
            "primary_slot_name=".into(),
            "synchronous_standby_names=".into(),
            "logging_collector=off".into(),
            "recovery_target_action=promote".into(),
            "recovery_target_timeline=latest".into(),
        ];
        match recovery {
            None => {
                // The WAL the backup needs is in its pg_wal (-X fetch):
                // replay all of it, then (no more WAL, no target) end
                // recovery on a new timeline. Not recovery_target =
                // 'immediate': a backup from an idle standby is consistent
                // exactly at its last record, and PostgreSQL 15 then ends
                // recovery with "recovery ended before configured recovery
                // target was reached" (it checks the target only after
                // replaying a further record).
                settings.push("restore_command=/bin/false".into());
            }
            Some(r) => {
                let dir = &r.wal_dir;
                if !dir.is_dir() {
                    bail!("the WAL directory {} does not exist", dir.display());
                }
                // restore_command runs as postgres: the fetched segments
                // become its to read.
                let acct_chown = |p: &Path| {
                    nix::unistd::chown(
                        p,
                        Some(nix::unistd::Uid::from_raw(ids.uid)),
                        Some(nix::unistd::Gid::from_raw(ids.gid)),
                    )
                    .with_context(|| format!("chown {} to postgres", p.display()))
                };
                acct_chown(dir)?;
                for e in
                    std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?
                {
                    acct_chown(&e?.path())?;
                }
                settings.push(format!(
                    "restore_command=cp {}/%f %p",
                    sh_quote(&dir.to_string_lossy())
                ));
                settings.push(format!(
                    "recovery_target_time={}",
                    recovery_time(r.to_time_ms)?
                ));
            }
        }
        let log_file = os::open_log(log)?;
        let log_from = log_file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.std_command(&self.bin("postgres")?, ids);
        cmd.arg("-D").arg(data);
        for s in &settings {
            cmd.arg("-c").arg(s);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("sharing the recovery log")?)
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .context("starting PostgreSQL to recover the backup")?;
        let mut server = PrivateServer {
            child: Some(child),
            psql: self.bin("psql")?,
            run_dir: run_dir.to_path_buf(),
            uid: ids.uid,
            gid: ids.gid,
            pid_file: data.join("postmaster.pid"),
            log: log.to_path_buf(),
            log_from,
        };
        server.wait_promoted(recovery)?;
        Ok(server)
    }
}

/// Backups of Postgres (see [`Backup`]): blocking, run on a blocking thread.
impl Backup for Postgres {
    fn backup(
        &self,
        spec: &EngineSpec,
        out: &mut dyn Write,
        progress: ProgressFn<'_>,
    ) -> Result<BackupInfo> {
        let ids = ids()?;
        if self.find_running().is_none() {
            bail!(
                "PostgreSQL is not running on this node; a backup is taken of the running server"
            );
        }
        let port = self.running_port().unwrap_or(spec.port);
        let facts = self
            .local_query(
                &ids,
                port,
                "SELECT split_part(current_setting('server_version'), ' ', 1), \
                 (SELECT coalesce(sum(pg_database_size(oid)), 0) FROM pg_database)::bigint",
            )
            .context("reading the server's version and size")?;
        let (version, size) = facts
            .split_once('|')
            .ok_or_else(|| anyhow!("unexpected answer from the server: {facts:?}"))?;
        let version = version.to_string();
        let total: u64 = size.trim().parse().unwrap_or(0);
        let conninfo = format!(
            "host={} port={port} user=postgres application_name={}",
            conn_value(&self.socket_dir().to_string_lossy()),
            conn_value(&format!("{}-backup", self.node_id))
        );
        let child = self
            .std_command(&self.bin("pg_basebackup")?, &ids)
            .args(["-D", "-", "-F", "t", "-X", "fetch", "-c", "fast"])
            .args(["--verbose", "--no-password", "-d", &conninfo])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pg_basebackup")?;
        let mut tool = Reaped::new(child, "pg_basebackup");
        let mut stderr = Collected::start(tool.child.stderr.take());
        let mut stdout = tool
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("pg_basebackup has no stdout"))?;
        let done = match pump(&mut stdout, out, |done| {
            progress(done, if total > 0 { total.max(done) } else { 0 })
        }) {
            Ok(done) => done,
            Err(PumpError::Read(e, done)) => {
                tool.kill();
                bail!(
                    "reading pg_basebackup's output failed after {done} bytes: {e}\n{}",
                    failure_summary(&stderr.text())
                );
            }
            Err(PumpError::Write(e, done)) => {
                tool.kill();
                let _ = stderr.text();
                return Err(anyhow::Error::new(e).context(format!(
                    "writing the backup stream failed after {done} bytes; pg_basebackup was stopped"
                )));
            }
        };
        drop(stdout);
        let status = tool.wait()?;
        let text = stderr.text();
        if !status.success() {
            bail!(
                "pg_basebackup failed ({status}):\n{}",
                failure_summary(&text)
            );
        }
        out.flush()
            .context("writing the end of the backup stream failed")?;
        let position = parse_end_point(&text).ok_or_else(|| {
            anyhow!(
                "pg_basebackup succeeded but printed no write-ahead log end point:\n{}",
                failure_summary(&text)
            )
        })?;
        progress(done, done);
        Ok(BackupInfo {
            version,
            position,
            position_time_ms: corral_proto::now_ms(),
            start_wal: parse_start_segment(&text).unwrap_or_default(),
        })
    }

    fn restore(
        &self,
        _spec: &EngineSpec,
        input: &mut dyn Read,
        recovery: Option<&Recovery>,
    ) -> Result<()> {
        let ids = ids()?;
        self.ensure_dirs(&ids.acct)?;
        if self.find_running().is_some() {
            bail!("PostgreSQL is running on this node; stop it before restoring");
        }
        let data = self.data_dir();
        if data.exists() {
            let empty = std::fs::read_dir(&data)
                .with_context(|| format!("reading {}", data.display()))?
                .next()
                .is_none();
            if !empty {
                bail!(
                    "{} is not empty: a backup is restored into an absent or empty data directory",
                    data.display()
                );
            }
        }
        let scratch = self.base.join("data.restore");
        let run_dir = self.base.join("restore.run");
        let result = (|| {
            os::remove_dir(&scratch)?;
            mkdir_owned(&scratch, 0o700, &ids.acct)?;
            self.extract(&ids, input, &scratch)?;
            let mut server = self.recover(&ids, &scratch, &run_dir, &self.log_path(), recovery)?;
            server.stop()?;
            drop(server);
            // PostgreSQL removed recovery.signal when it promoted; make sure.
            os::remove_file(&scratch.join("recovery.signal"))?;
            os::remove_file(&scratch.join("standby.signal"))?;
            os::remove_dir(&data)?;
            std::fs::rename(&scratch, &data)
                .context("moving the restored data directory into place")
        })();
        let _ = os::remove_dir(&run_dir);
        if result.is_err() {
            let _ = os::remove_dir(&scratch);
        }
        result
    }

    fn verify(&self, input: &mut dyn Read, scratch: &Path) -> Result<String> {
        let ids = ids()?;
        mkdir_owned(scratch, 0o700, &ids.acct)?;
        let data = scratch.join("data");
        mkdir_owned(&data, 0o700, &ids.acct)?;
        self.extract(&ids, input, &data)?;
        let mut server = self.recover(
            &ids,
            &data,
            &scratch.join("run"),
            &scratch.join("server.log"),
            None,
        )?;
        let version = server.query(
            "postgres",
            "SELECT split_part(current_setting('server_version'), ' ', 1)",
        )?;
        let databases: u64 = server
            .query("postgres", "SELECT count(*) FROM pg_database")?
            .parse()
            .context("counting the databases")?;
        let names = server.query(
            "postgres",
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
        )?;
        let mut tables: u64 = 0;
        for db in names.lines().filter(|l| !l.is_empty()) {
            let n: u64 = server
                .query(
                    db,
                    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' \
                     AND n.nspname NOT LIKE 'pg\\_%'",
                )
                .with_context(|| format!("counting the tables of database {db}"))?
                .parse()
                .with_context(|| format!("counting the tables of database {db}"))?;
            tables += n;
        }
        server.stop()?;
        Ok(format!(
            "PostgreSQL {version} recovered the backup and started: {databases} databases, \
             {tables} tables"
        ))
    }
}
