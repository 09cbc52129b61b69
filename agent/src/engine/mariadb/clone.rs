//! Cloning data: installing an empty data directory, the temporary server,
//! and the logical dump streamed from an upstream and loaded.

use super::config::{render_config, ServerConfig};
use super::connection::{connect_upstream, TempServer};
use super::gtid::{parse_gtid_list, server_id};
use super::settings::{QUERY_TIMEOUT, REPLICATION_USER, STOP_TIMEOUT};
use super::{client, Mariadb};
use crate::engine::os::{
    log_tail, mkdir_owned, remove_dir, run, tail, write_readable, Account, TAIL_LINES,
};
use crate::engine::{os, Driver, EngineSpec, ProgressFn, Upstream};
use anyhow::{bail, Context, Result};
use mysql_async::prelude::*;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

impl Mariadb {
    /// mariadb-install-db into `dir` (removed first), as the mysql user.
    pub(super) async fn install_db(&self, dir: &Path, acct: &Account) -> Result<()> {
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
    pub(super) async fn stop_stale_temp(&self) {
        let Some(pid) = os::running_pid(&self.temp_pid(), "mariadbd") else {
            return;
        };
        tracing::warn!(pid, "stopping a temporary server left running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let began = Instant::now();
        while super::super::process_alive(pid) && began.elapsed() < STOP_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a temporary server on `datadir` and waits until it answers.
    pub(super) async fn start_temp(
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
    pub(super) async fn estimate_size(&self, up: &Upstream, password: &str) -> u64 {
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
    /// the password in `options` (see client.rs).
    pub(super) fn dump_command(
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
    pub(super) async fn load_dump(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
