//! MariaDB backups: `mariadb-backup --stream=xbstream` of the running
//! server, restored with `mbstream -x` and `mariadb-backup --prepare`.
//!
//! # Backup
//!
//! `mariadb-backup --backup` runs against the local server (over its
//! socket, as the `mysql` user, authenticated by `unix_socket`: the account
//! `mariadb-install-db --user=mysql` creates), reading the data directory
//! as that user, and streams xbstream to its stdout, which is copied to the
//! caller's writer. It blocks commits only for the moment it records the
//! position (`BACKUP STAGE BLOCK_COMMIT`), so a replica keeps replicating.
//! The position is the GTID it prints for that moment (`gtid_current_pos`:
//! on a replica with `log_slave_updates`, everything it applied).
//! On a replica `--slave-info` records the upstream position too.
//! `--safe-slave-backup` is not used: it stops the SQL thread only to wait
//! for replicated temporary tables, which ROW-based replication
//! (`binlog_format = ROW`) never has, and the driver's health checks would
//! restart the thread meanwhile anyway.
//!
//! # Restore
//!
//! Into `data.restore/` (the scratch directory, renamed to `data/` once
//! complete, so a failure never leaves data that looks usable): `mbstream
//! -x`, then `mariadb-backup --prepare`, both as `mysql`. A backup holds no
//! binary log, and a replica's backup may carry its replica marker: the
//! marker and any replication state files are removed, and a temporary
//! server (no network, its own socket) forgets any upstream (`RESET SLAVE
//! ALL`) and starts the binary log at the backup's GTID position
//! (`gtid_binlog_state`, `gtid_slave_pos`), as a clone does: the restored
//! primary's own transactions continue the sequence. The accounts the
//! backup carries stay; `bootstrap` then sets the new cluster's passwords
//! (`CREATE USER IF NOT EXISTS` + `ALTER USER`), and the agent keeps using
//! `root@localhost` over the socket (`unix_socket`, carried by the backup).
//!
//! # Verify
//!
//! The same extraction and preparation into the caller's scratch
//! directory, then a server there with `skip_networking` and its socket,
//! pid file and temporary files in the scratch directory; it is asked how
//! many databases and tables it holds, and stopped.

use super::super::os::{
    self, failure_summary, log_tail, mkdir_owned, pump, remove_dir, PumpError, Reaped, TAIL_LINES,
};
use super::{account, binary, render_config, server_id, Mariadb, ServerConfig, REPLICA_MARKER};
use crate::engine::contract::{Backup, BackupInfo, Driver, EngineSpec, ProgressFn, Recovery};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a temporary server may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a temporary server may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of a tool's stderr kept for its error message and its position.
const KEEP_LINES: usize = 200;
/// The files of replication state a restored primary must not keep.
const REPLICATION_FILES: &[&str] = &[
    REPLICA_MARKER,
    "master.info",
    "relay-log.info",
    "multi-master.info",
];

/// The `mysql` user's ids, for the tools run as it.
fn mysql_ids() -> Result<(u32, u32)> {
    account()?;
    let u = nix::unistd::User::from_name("mysql")
        .context("looking up the `mysql` user")?
        .ok_or_else(|| anyhow!("there is no `mysql` user on this machine"))?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

/// A command for a MariaDB program, run in `dir` as the `mysql` user (or
/// as the agent when `ids` is None), with a clean environment.
fn command(program: &str, ids: Option<(u32, u32)>, dir: &Path) -> Result<Command> {
    let mut cmd = Command::new(binary(program)?);
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .current_dir(dir);
    Ok(cmd)
}

/// Collects a tool's stderr on a thread: the last [`KEEP_LINES`] lines.
fn collect_lines(r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut lines = std::collections::VecDeque::new();
        for line in std::io::BufReader::new(r).split(b'\n') {
            let Ok(line) = line else { break };
            lines.push_back(String::from_utf8_lossy(&line).into_owned());
            if lines.len() > KEEP_LINES {
                lines.pop_front();
            }
        }
        lines.into()
    })
}

/// The GTID position mariadb-backup printed for the moment it is
/// consistent at: `... GTID of the last change '0-1-5'` (its binary log
/// position line), else `gtid_slave_pos 0-1-5` (its `--slave-info` line).
pub fn position_from_output(lines: &[String]) -> Option<String> {
    let quoted = |l: &str, key: &str| {
        let at = l.find(key)? + key.len();
        let rest = &l[at..];
        Some(rest[..rest.find('\'')?].to_string())
    };
    if let Some(p) = lines
        .iter()
        .rev()
        .find_map(|l| quoted(l, "GTID of the last change '"))
    {
        return Some(p);
    }
    lines.iter().rev().find_map(|l| {
        let at = l.find("gtid_slave_pos")? + "gtid_slave_pos".len();
        let rest = l[at..].trim_start_matches([' ', '=', '\'']);
        let end = rest.find(['\'', ' ', ';']).unwrap_or(rest.len());
        Some(rest[..end].to_string())
    })
}

/// The GTID position of `xtrabackup_binlog_info` (`file\tpos\tgtid`);
/// empty when the backup recorded none.
pub fn position_from_binlog_info(text: &str) -> String {
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

/// "10.11.6" of "10.11.6-MariaDB-0+deb12u1-log".
fn short_version(v: &str) -> String {
    v.split('-').next().unwrap_or(v).trim().to_string()
}

/// Total size of the data files (binary and relay logs are not backed up).
fn data_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            match e.metadata() {
                Ok(m) if m.is_dir() => data_size(&e.path()),
                _ if name.starts_with("binlog.") || name.starts_with("relay-bin.") => 0,
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        })
        .sum()
}

/// Runs SQL over `socket` as root (the agent, `unix_socket`) with the
/// `mariadb` client; returns its tab-separated output.
fn sql(socket: &Path, query: &str) -> Result<String> {
    let out = command("mariadb", None, Path::new("/"))?
        .arg("--no-defaults")
        .arg("--protocol=socket")
        .arg(format!("--socket={}", socket.display()))
        .args(["--user=root", "--batch", "--skip-column-names"])
        .arg("--connect-timeout=5")
        .arg("-e")
        .arg(query)
        .stdin(Stdio::null())
        .output()
        .context("running the mariadb client")?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            query,
            out.status,
            failure_summary(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Extracts an xbstream from `input` into `dir` (mbstream, as mysql) and
/// prepares it (mariadb-backup --prepare): a data directory a server can
/// start on. Returns the backup's GTID position.
fn extract_and_prepare(input: &mut dyn Read, dir: &Path, ids: (u32, u32)) -> Result<String> {
    let mut mb = Reaped::spawn(
        command("mbstream", Some(ids), dir)?
            .arg("-x")
            .arg("-C")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        "mbstream",
    )?;
    let err = collect_lines(mb.child.stderr.take().context("mbstream's stderr")?);
    let mut stdin = mb.child.stdin.take().context("mbstream's stdin")?;
    let (fed, refused) = match pump(input, &mut stdin, |_| {}) {
        Ok(fed) => (fed, None),
        Err(PumpError::Read(e, _)) => {
            mb.kill();
            return Err(e).context("reading the backup stream");
        }
        // mbstream gave up; its stderr says why.
        Err(PumpError::Write(e, fed)) => (fed, Some(e)),
    };
    drop(stdin);
    let status = mb.wait()?;
    let lines = err.join().unwrap_or_default();
    if !status.success() || refused.is_some() {
        bail!(
            "the backup stream is not a valid mariadb-backup stream: mbstream -x failed ({status}) \
             after {fed} bytes:\n{}",
            failure_summary(&lines.join("\n"))
        );
    }
    // mariadb-backup writes xtrabackup_checkpoints at the end of its stream.
    if !dir.join("xtrabackup_checkpoints").exists() {
        bail!(
            "the backup stream is incomplete ({fed} bytes, no xtrabackup_checkpoints at its end): \
             it was cut short"
        );
    }
    let out = command("mariadb-backup", Some(ids), dir)?
        .arg("--prepare")
        .arg(format!("--target-dir={}", dir.display()))
        .stdin(Stdio::null())
        .output()
        .context("running mariadb-backup --prepare")?;
    if !out.status.success() {
        bail!(
            "mariadb-backup --prepare failed ({}):\n{}",
            out.status,
            failure_summary(&format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        );
    }
    Ok(std::fs::read_to_string(dir.join("xtrabackup_binlog_info"))
        .map(|t| position_from_binlog_info(&t))
        .unwrap_or_default())
}

/// A server started for one step, with no network: stopped (SIGTERM) by
/// [`TempServer::stop`], killed if dropped running.
struct TempServer {
    guard: Reaped,
    socket: PathBuf,
    log: PathBuf,
}

/// Where a temporary server keeps its files.
struct TempPaths<'a> {
    datadir: &'a Path,
    tmpdir: &'a Path,
    socket: &'a Path,
    pid: &'a Path,
    cnf: &'a Path,
    log: &'a Path,
    port: u16,
}

impl TempServer {
    fn start(m: &Mariadb, p: &TempPaths, ids: (u32, u32), purpose: &str) -> Result<TempServer> {
        if p.socket.as_os_str().len() > 100 {
            bail!(
                "{} is too long for a Unix socket; use a shorter directory",
                p.socket.display()
            );
        }
        let fence = PathBuf::from("/nonexistent");
        os::write_readable(
            p.cnf,
            &render_config(&ServerConfig {
                datadir: p.datadir,
                tmpdir: p.tmpdir,
                socket: p.socket,
                pid_file: p.pid,
                port: p.port,
                server_id: server_id(&m.node_id),
                report_host: &m.node_id,
                read_only: false,
                semi_sync_master: false,
                temp: true,
                fence: &fence,
            }),
        )?;
        let mut log = os::open_log(p.log)?;
        let _ = writeln!(
            log,
            "---- corral-agent: temporary server on {} ({purpose}) ----",
            p.datadir.display()
        );
        let out = log.try_clone().context("sharing the log")?;
        let guard = Reaped::spawn(
            command("mariadbd", Some(ids), p.datadir)?
                .arg(format!("--defaults-file={}", p.cnf.display()))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(log)
                .process_group(0),
            "a temporary mariadbd",
        )?;
        let mut temp = TempServer {
            guard,
            socket: p.socket.to_path_buf(),
            log: p.log.to_path_buf(),
        };
        let began = Instant::now();
        loop {
            if let Ok(Some(status)) = temp.guard.child.try_wait() {
                bail!(
                    "mariadbd could not start on the restored data ({status}); the end of its \
                     log ({}):\n{}",
                    temp.log.display(),
                    log_tail(&temp.log, TAIL_LINES)
                );
            }
            if temp.socket.exists() && sql(&temp.socket, "SELECT 1").is_ok() {
                return Ok(temp);
            }
            if began.elapsed() > START_TIMEOUT {
                bail!(
                    "the temporary mariadbd on {} did not answer within {} s; the end of its log \
                     ({}):\n{}",
                    p.datadir.display(),
                    START_TIMEOUT.as_secs(),
                    temp.log.display(),
                    log_tail(&temp.log, TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sql(&self, query: &str) -> Result<String> {
        sql(&self.socket, query)
    }

    fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.guard.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let began = Instant::now();
        loop {
            match self.guard.child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => bail!(
                    "the temporary mariadbd exited with {s}; the end of its log ({}):\n{}",
                    self.log.display(),
                    log_tail(&self.log, TAIL_LINES)
                ),
                Ok(None) if began.elapsed() > STOP_TIMEOUT => bail!(
                    "the temporary mariadbd did not stop within {} s (killed)",
                    STOP_TIMEOUT.as_secs()
                ),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e).context("waiting for the temporary mariadbd"),
            }
        }
    }
}

/// Kills the temporary server of an interrupted restore (an agent that
/// crashed half-way), named by its pid file.
fn stop_stale(pid_file: &Path) {
    if let Some(pid) = os::running_pid(pid_file, "mariadbd") {
        tracing::warn!(
            pid,
            "killing the temporary server of an interrupted restore"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let began = Instant::now();
        while crate::engine::process_alive(pid) && began.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether `dir` is missing or holds nothing.
fn absent_or_empty(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

impl Mariadb {
    fn restore_dir(&self) -> PathBuf {
        self.base.join("data.restore")
    }
}

/// Backups of Mariadb (see [`Backup`]): blocking, run on a blocking thread.
impl Backup for Mariadb {
    fn backup(
        &self,
        _spec: &EngineSpec,
        out: &mut dyn Write,
        progress: ProgressFn<'_>,
    ) -> Result<BackupInfo> {
        let ids = mysql_ids()?;
        if self.find_running().is_none() {
            bail!("mariadbd is not running on this node: a backup is taken of the running server");
        }
        let version = sql(&self.socket_path(), "SELECT VERSION()")
            .context("asking the server for its version")?;
        let replica = self.standby();
        let total = data_size(&self.data_dir());
        progress(0, total);
        // mariadb-backup's own scratch (the stream needs none on disk, but
        // it wants a target directory it may write to).
        let work = self.tmp_dir().join(format!(
            "backup-{}-{}",
            std::process::id(),
            corral_proto::now_ms()
        ));
        remove_dir(&work)?;
        mkdir_owned(&work, 0o700, &account()?)?;
        let mut cmd = command("mariadb-backup", Some(ids), &work)?;
        cmd.arg(format!("--defaults-file={}", self.config_path().display()))
            .arg("--backup")
            .arg("--stream=xbstream")
            .arg(format!("--target-dir={}", work.display()))
            .arg(format!("--tmpdir={}", work.display()))
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--socket={}", self.socket_path().display()))
            .arg("--user=mysql");
        if replica {
            cmd.arg("--slave-info");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let streamed = (|| {
            let mut tool = Reaped::spawn(&mut cmd, "mariadb-backup")?;
            let err = collect_lines(
                tool.child
                    .stderr
                    .take()
                    .context("mariadb-backup's stderr")?,
            );
            let mut stdout = tool
                .child
                .stdout
                .take()
                .context("mariadb-backup's stdout")?;
            let mut last_report = Instant::now();
            let done = match pump(&mut stdout, out, |done| {
                if last_report.elapsed() > Duration::from_millis(200) {
                    progress(done, total.max(done));
                    last_report = Instant::now();
                }
            }) {
                Ok(done) => done,
                Err(PumpError::Read(e, _)) => {
                    tool.kill();
                    return Err(e).context("reading mariadb-backup's output");
                }
                Err(PumpError::Write(e, done)) => {
                    tool.kill();
                    return Err(anyhow!(e).context(format!(
                        "writing the backup stream after {done} bytes (mariadb-backup stopped)"
                    )));
                }
            };
            let status = tool.wait()?;
            let lines = err.join().unwrap_or_default();
            if !status.success() {
                bail!(
                    "mariadb-backup --backup failed ({status}):\n{}",
                    failure_summary(&lines.join("\n"))
                );
            }
            out.flush().context("flushing the backup stream")?;
            progress(done, done);
            Ok(lines)
        })();
        let _ = remove_dir(&work);
        let lines = streamed?;
        let position = position_from_output(&lines).with_context(|| {
            format!(
                "mariadb-backup did not print the GTID position of its backup:\n{}",
                os::tail(&lines.join("\n"), TAIL_LINES)
            )
        })?;
        Ok(BackupInfo {
            version: short_version(version.trim()),
            position,
            position_time_ms: corral_proto::now_ms(),
            start_wal: String::new(),
        })
    }

    fn restore(
        &self,
        spec: &EngineSpec,
        input: &mut dyn Read,
        recovery: Option<&Recovery>,
    ) -> Result<()> {
        if recovery.is_some() {
            bail!(
                "point-in-time recovery is PostgreSQL's: a MariaDB backup restores to the moment \
                 it was taken"
            );
        }
        let acct = account()?;
        let ids = mysql_ids()?;
        self.ensure_dirs(&acct)?;
        if self.find_running().is_some() {
            bail!("mariadbd is running on this node's data; stop it before restoring");
        }
        if !absent_or_empty(&self.data_dir())? {
            bail!(
                "{} is not empty: a backup is restored into a node without data",
                self.data_dir().display()
            );
        }
        let (socket, pid) = (
            self.run_dir().join("restore.sock"),
            self.run_dir().join("restore.pid"),
        );
        stop_stale(&pid);
        let scratch = self.restore_dir();
        remove_dir(&scratch)?;
        mkdir_owned(&scratch, 0o700, &acct)?;
        let cnf = self.base.join("restore.cnf");
        let restored = (|| {
            let pos = extract_and_prepare(input, &scratch, ids)?;
            for f in REPLICATION_FILES {
                os::remove_file(&scratch.join(f))?;
            }
            for e in std::fs::read_dir(&scratch)?.flatten() {
                if e.file_name().to_string_lossy().starts_with("relay-bin.") {
                    os::remove_file(&e.path())?;
                }
            }
            let temp = TempServer::start(
                self,
                &TempPaths {
                    datadir: &scratch,
                    tmpdir: &self.tmp_dir(),
                    socket: &socket,
                    pid: &pid,
                    cnf: &cnf,
                    log: &self.log_path(),
                    port: spec.port,
                },
                ids,
                "restoring a backup",
            )?;
            // A primary follows nobody; its binary log continues the
            // backup's GTID sequence.
            let mut stmts = vec!["RESET SLAVE ALL".to_string(), "RESET MASTER".to_string()];
            if !pos.is_empty() {
                stmts.push(format!(
                    "SET GLOBAL gtid_binlog_state = {}",
                    super::sql_string(&pos)
                ));
            }
            stmts.push(format!(
                "SET GLOBAL gtid_slave_pos = {}",
                super::sql_string(&pos)
            ));
            temp.sql(&stmts.join("; "))
                .context("making the restored data a primary's")?;
            temp.stop()?;
            tracing::info!(position = %pos, "backup restored");
            anyhow::Ok(())
        })();
        let _ = os::remove_file(&cnf);
        if let Err(e) = restored {
            let _ = remove_dir(&scratch);
            return Err(e);
        }
        remove_dir(&self.data_dir())?;
        std::fs::rename(&scratch, self.data_dir())
            .context("moving the restored data directory into place")?;
        Ok(())
    }

    fn verify(&self, input: &mut dyn Read, scratch: &Path) -> Result<String> {
        let acct = account()?;
        let ids = mysql_ids()?;
        mkdir_owned(scratch, 0o700, &acct)?;
        let (data, tmp) = (scratch.join("data"), scratch.join("tmp"));
        mkdir_owned(&data, 0o700, &acct)?;
        mkdir_owned(&tmp, 0o700, &acct)?;
        extract_and_prepare(input, &data, ids)?;
        let temp = TempServer::start(
            self,
            &TempPaths {
                datadir: &data,
                tmpdir: &tmp,
                socket: &scratch.join("mariadbd.sock"),
                pid: &scratch.join("mariadbd.pid"),
                cnf: &scratch.join("my.cnf"),
                log: &scratch.join("server.log"),
                port: 0,
            },
            ids,
            "verifying a backup",
        )?;
        let answer = temp.sql(
            "SELECT VERSION(), \
             (SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME NOT IN \
              ('mysql', 'information_schema', 'performance_schema', 'sys')), \
             (SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_TYPE = 'BASE TABLE' \
              AND TABLE_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys'))",
        )?;
        temp.stop()?;
        let fields: Vec<&str> = answer.trim().split('\t').collect();
        let [version, dbs, tables] = fields[..] else {
            bail!("unexpected answer from the restored server: {answer:?}");
        };
        Ok(format!(
            "MariaDB {} started on the restored data: {dbs} databases, {tables} tables",
            short_version(version)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_from_the_tools() {
        let lines: Vec<String> = [
            "[00] 2026-11-26 04:30:00 Streaming ./ibdata1",
            "[00] 2026-11-26 04:30:01 mariabackup: MySQL binlog position: filename \
             'binlog.000002', position '1234', GTID of the last change '0-42-17'",
            "[00] 2026-11-26 04:30:01 completed OK!",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(position_from_output(&lines).as_deref(), Some("0-42-17"));
        let replica = vec!["SET GLOBAL gtid_slave_pos = '0-1-9';".to_string()];
        assert_eq!(position_from_output(&replica).as_deref(), Some("0-1-9"));
        assert_eq!(position_from_output(&["nothing".to_string()]), None);
        assert_eq!(
            position_from_binlog_info("binlog.000002\t1234\t0-42-17\n"),
            "0-42-17"
        );
        assert_eq!(position_from_binlog_info("binlog.000001\t329\n"), "");
        assert_eq!(short_version("10.11.6-MariaDB-0+deb12u1-log"), "10.11.6");
    }
}
