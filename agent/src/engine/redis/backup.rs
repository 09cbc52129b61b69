//! Redis backups: an RDB snapshot of the running server, streamed as it
//! is sent; restored as the append-only file the driver's configuration
//! loads.
//!
//! # Backup
//!
//! The driver asks its own server for a full resynchronisation as a
//! replica would, over the socket (`AUTH`, `REPLCONF capa eof`, `REPLCONF
//! rdb-only 1`, `PSYNC ? -1`), and copies the RDB payload to the caller's
//! writer as it arrives: no tool process, and no copy on disk (the
//! driver's servers run `repl-diskless-sync yes`, and `capa eof` lets the
//! server stream the snapshot from its fork straight to the socket). The
//! answer `+FULLRESYNC <replid> <offset>` gives the replication offset the
//! snapshot is consistent at, on a primary and on a replica alike (a
//! replica serves its own data at its own offset; one that is not in sync
//! with its primary refuses, `NOMASTERLINK`). `rdb-only` (Redis 7,
//! Valkey) makes the server end the transfer after the snapshot; an older
//! server would go on with the replication stream, which the driver does
//! not read: it hangs up after the payload. (`redis-cli --rdb` does the
//! same, but it comes in as many flavours as the servers, and does not
//! report the offset.)
//!
//! # Restore
//!
//! The driver's redis.conf runs with `appendonly yes`: a server started
//! that way loads its append-only files only, and with none it starts
//! empty, ignoring any `dump.rdb`. So the RDB is written (temp file, then
//! renamed) as `dump.rdb` in a scratch directory `data.restore/`, a
//! temporary server with `appendonly no` (socket only, no TCP port) loads
//! it, `CONFIG SET appendonly yes` makes it write its first append-only
//! file from what it holds, and once that is done it shuts down cleanly.
//! The RDB is then removed (the AOF is the data from here on, and a stale
//! `dump.rdb` would only mislead) and the directory renamed to `data/`, so
//! a failed restore never leaves a data directory that looks usable. The
//! restored data follows nobody (no `upstream.json`): `prepare` and
//! `start` then run it as a primary, and `bootstrap` sets the users (an RDB
//! carries no ACL users).
//!
//! # Verify
//!
//! The RDB is written into the caller's scratch directory and loaded by a
//! temporary server there (no TCP port, its socket and pid file in the
//! scratch directory, no AOF), which is asked how many keys each database
//! holds, then stopped without saving.

use super::super::os::{self, log_tail, mkdir_owned, remove_dir, remove_file, TAIL_LINES};
use super::{account, conf_quote, dir_size, Info, Redis, MAX_SOCKET_PATH, SERVER_USER};
use crate::engine::contract::{Backup, BackupInfo, Driver, EngineSpec, ProgressFn, Recovery};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A transfer that receives nothing for this long has failed (the server
/// sends a newline every second while it prepares the snapshot).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a temporary server may take to load the RDB.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a temporary server may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const CHUNK: usize = 256 * 1024;

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Reply {
    fn text(&self) -> String {
        match self {
            Reply::Simple(s) | Reply::Error(s) => s.clone(),
            Reply::Int(n) => n.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) => String::new(),
            Reply::Array(v) => v.iter().map(Reply::text).collect::<Vec<_>>().join(" "),
        }
    }
}

/// A blocking RESP session over a Unix socket: just what backups need.
struct Resp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Resp {
    fn connect(socket: &Path, password: Option<&str>) -> Result<Resp> {
        let s = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut c = Resp {
            r: BufReader::with_capacity(CHUNK, s.try_clone()?),
            w: s,
        };
        if let Some(p) = password {
            c.cmd(&["AUTH", super::AGENT_USER, p]).context("AUTH")?;
        }
        Ok(c)
    }

    fn send(&mut self, args: &[&str]) -> Result<()> {
        let mut b = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            b.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            b.extend_from_slice(a.as_bytes());
            b.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&b).context("sending a command")
    }

    /// One line, without its line end.
    fn line(&mut self) -> Result<Vec<u8>> {
        let mut l = Vec::new();
        if self
            .r
            .read_until(b'\n', &mut l)
            .context("reading a reply")?
            == 0
        {
            bail!("the server closed the connection");
        }
        while l.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            l.pop();
        }
        Ok(l)
    }

    fn reply(&mut self) -> Result<Reply> {
        let l = self.line()?;
        let Some((&kind, rest)) = l.split_first() else {
            bail!("an empty line where a reply was expected");
        };
        let rest = String::from_utf8_lossy(rest).into_owned();
        let num = || {
            rest.parse::<i64>()
                .map_err(|_| anyhow!("a malformed reply: {rest:?}"))
        };
        Ok(match kind {
            b'+' => Reply::Simple(rest),
            b'-' => Reply::Error(rest),
            b':' => Reply::Int(num()?),
            b'$' => {
                let n = num()?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut b = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut b).context("reading a reply")?;
                    b.truncate(n as usize);
                    Reply::Bulk(Some(b))
                }
            }
            b'*' => {
                let n = num()?;
                let mut v = Vec::new();
                for _ in 0..n.max(0) {
                    v.push(self.reply()?);
                }
                Reply::Array(v)
            }
            _ => bail!("an unexpected reply: {:?}", String::from_utf8_lossy(&l)),
        })
    }

    /// Runs a command; an error reply is an error.
    fn cmd(&mut self, args: &[&str]) -> Result<Reply> {
        self.send(args)?;
        match self.reply()? {
            Reply::Error(e) => bail!("{}: {e}", args[0]),
            r => Ok(r),
        }
    }

    fn info(&mut self, section: &str) -> Result<Info> {
        Ok(Info::parse(&self.cmd(&["INFO", section])?.text()))
    }
}

/// Copies the RDB payload of a full resynchronisation to `out`: `$<len>`
/// (a snapshot written to disk first) or `$EOF:<40-byte mark>` (streamed:
/// the payload ends with the mark). Returns the bytes written.
fn copy_payload(
    r: &mut impl BufRead,
    header: &[u8],
    out: &mut dyn Write,
    mut count: impl FnMut(u64),
) -> Result<u64> {
    let header = String::from_utf8_lossy(header).into_owned();
    let write = |out: &mut dyn Write, b: &[u8], done: u64| {
        out.write_all(b).map_err(|e| {
            anyhow!(e).context(format!(
                "writing the backup stream after {done} bytes (the transfer was ended)"
            ))
        })
    };
    let mut done = 0u64;
    let mut buf = vec![0u8; CHUNK];
    if let Some(mark) = header.strip_prefix("$EOF:") {
        let mark = mark.as_bytes();
        if mark.len() != 40 {
            bail!("a malformed transfer header: {header:?}");
        }
        // Everything but the last 40 bytes read may go out: they may be
        // (the start of) the mark.
        let mut held: Vec<u8> = Vec::with_capacity(CHUNK + 40);
        loop {
            let n = r.read(&mut buf).context("receiving the snapshot")?;
            if n == 0 {
                bail!("the server ended the transfer before the end of the snapshot");
            }
            held.extend_from_slice(&buf[..n]);
            if let Some(at) = held.windows(40).position(|w| w == mark) {
                write(out, &held[..at], done)?;
                done += at as u64;
                count(done);
                return Ok(done);
            }
            if held.len() > 40 {
                let go = held.len() - 40;
                write(out, &held[..go], done)?;
                done += go as u64;
                count(done);
                held.drain(..go);
            }
        }
    }
    let len: u64 = header
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("a malformed transfer header: {header:?}"))?;
    while done < len {
        let want = (len - done).min(CHUNK as u64) as usize;
        let n = r.read(&mut buf[..want]).context("receiving the snapshot")?;
        if n == 0 {
            bail!("the server ended the transfer after {done} of {len} bytes");
        }
        write(out, &buf[..n], done)?;
        done += n as u64;
        count(done);
    }
    Ok(done)
}

/// The offset of `+FULLRESYNC <replid> <offset>`.
fn fullresync_offset(line: &str) -> Option<(String, u64)> {
    let mut it = line.strip_prefix("FULLRESYNC ")?.split_whitespace();
    let id = it.next()?.to_string();
    Some((id, it.next()?.parse().ok()?))
}

/// A server process killed (and reaped) if dropped running.
struct Server {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    bin: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    fn exited(&mut self, what: &str) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} {what} ({status}); the end of its log ({}):\n{}",
                self.bin,
                self.log.display(),
                log_tail(&self.log, TAIL_LINES)
            );
        }
        Ok(())
    }

    /// Waits until it has loaded its data and answers.
    fn ready(&mut self) -> Result<Resp> {
        let began = Instant::now();
        loop {
            self.exited("could not load the RDB: it exited")?;
            if self.socket.exists() {
                if let Ok(mut c) = Resp::connect(&self.socket, None) {
                    c.send(&["PING"])?;
                    match c.reply() {
                        Ok(Reply::Simple(p)) if p == "PONG" => return Ok(c),
                        // LOADING, or it just exited.
                        _ => {}
                    }
                }
            }
            if began.elapsed() > LOAD_TIMEOUT {
                bail!(
                    "the temporary {} did not load the RDB within {} s",
                    self.bin,
                    LOAD_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `SHUTDOWN` (with `NOSAVE`, or as configured) and waits for the exit.
    fn shutdown(mut self, c: &mut Resp, nosave: bool) -> Result<()> {
        let args: &[&str] = if nosave {
            &["SHUTDOWN", "NOSAVE"]
        } else {
            &["SHUTDOWN"]
        };
        let _ = c.send(args);
        // The connection closes as it exits; an error reply says why not.
        if let Ok(Reply::Error(e)) = c.reply() {
            bail!("{} refused to shut down: {e}", self.bin);
        }
        let began = Instant::now();
        loop {
            match self.child.try_wait().context("waiting for the server")? {
                Some(s) if s.success() => return Ok(()),
                Some(s) => bail!(
                    "the temporary {} exited with {s}; the end of its log ({}):\n{}",
                    self.bin,
                    self.log.display(),
                    log_tail(&self.log, TAIL_LINES)
                ),
                None if began.elapsed() > STOP_TIMEOUT => bail!(
                    "the temporary {} did not stop within {} s (killed)",
                    self.bin,
                    STOP_TIMEOUT.as_secs()
                ),
                None => std::thread::sleep(Duration::from_millis(10)),
            }
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

/// Writes the stream to `path` (temp file, fsynced, renamed), owned by the
/// server's user, 0600; checks it starts as an RDB does. Returns its size.
fn write_rdb(input: &mut dyn Read, path: &Path, ids: (u32, u32)) -> Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("rdb.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    nix::unistd::chown(
        &tmp,
        Some(nix::unistd::Uid::from_raw(ids.0)),
        Some(nix::unistd::Gid::from_raw(ids.1)),
    )
    .with_context(|| format!("chown {}", tmp.display()))?;
    let mut magic = [0u8; 5];
    let mut got = 0;
    while got < 5 {
        match input.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the backup stream"),
        }
    }
    if &magic[..got] != b"REDIS" {
        let _ = std::fs::remove_file(&tmp);
        bail!("the backup stream is not an RDB file (it does not start with \"REDIS\")");
    }
    f.write_all(&magic)?;
    let n = std::io::copy(input, &mut f).context("writing the RDB file")?;
    f.sync_all().context("syncing the RDB file")?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(n + 5)
}

/// The keys of each database of `INFO keyspace` (`db0:keys=3,expires=0,...`).
fn keyspace(info: &Info) -> Vec<(String, u64)> {
    info.0
        .iter()
        .filter(|(k, _)| k.starts_with("db"))
        .filter_map(|(k, v)| {
            let n = v.split(',').find_map(|kv| kv.strip_prefix("keys="))?;
            Some((k.clone(), n.parse().ok()?))
        })
        .collect()
}

impl Redis {
    fn restore_dir(&self) -> PathBuf {
        self.base.join("data.restore")
    }

    /// The server user's ids.
    fn server_ids(&self) -> Result<(u32, u32)> {
        account()?;
        let u = nix::unistd::User::from_name(SERVER_USER)
            .context("looking up the server's user")?
            .ok_or_else(|| anyhow!("there is no `{SERVER_USER}` user on this machine"))?;
        Ok((u.uid.as_raw(), u.gid.as_raw()))
    }

    /// Starts a temporary server on `conf_text` (written to `conf`),
    /// answering on `socket` only; its output goes to `log`.
    fn start_temp(
        &self,
        conf: &Path,
        conf_text: &str,
        socket: &Path,
        log: &Path,
        ids: (u32, u32),
    ) -> Result<Server> {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the socket path {} is too long for a Unix socket",
                socket.display()
            );
        }
        os::write_owned(conf, conf_text, &account()?)?;
        let log_file = os::open_log(log)?;
        let out = log_file.try_clone().context("sharing the log")?;
        let child = Command::new(self.binary()?)
            .arg(conf)
            .uid(ids.0)
            .gid(ids.1)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .current_dir(conf.parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting a temporary {}", self.bin))?;
        Ok(Server {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            bin: self.bin.clone(),
        })
    }

    /// A temporary server's configuration: the socket only, the RDB in
    /// `dir` loaded at start, no AOF, never saving on its own.
    fn temp_conf(dir: &Path, socket: &Path, pidfile: &Path) -> String {
        let q = |p: &Path| conf_quote(&p.to_string_lossy());
        format!(
            "# Written by corral-agent: a temporary server (restore or verify).\n\
             port 0\n\
             unixsocket {}\n\
             unixsocketperm 700\n\
             pidfile {}\n\
             dir {}\n\
             dbfilename dump.rdb\n\
             appendonly no\n\
             appenddirname appendonlydir\n\
             save \"\"\n\
             logfile \"\"\n\
             daemonize no\n\
             supervised no\n\
             # The config file in the process title: how a stale one is recognised.\n\
             proc-title-template \"{{title}} {{listen-addr}} {{server-mode}} {{config-file}}\"\n",
            q(socket),
            q(pidfile),
            q(dir)
        )
    }
}

/// Backups of Redis (see [`Backup`]): blocking, run on a blocking thread.
impl Backup for Redis {
    fn backup(
        &self,
        _spec: &EngineSpec,
        out: &mut dyn Write,
        progress: ProgressFn<'_>,
    ) -> Result<BackupInfo> {
        if self.find_running().is_none() {
            bail!(
                "{} is not running on this node: a backup is taken of the running server",
                self.bin
            );
        }
        let password = self.load_secrets()?.agent_password;
        let socket = self.socket_path();
        let mut c = Resp::connect(&socket, Some(&password))?;
        let version = c.info("server")?.version();
        let total = dir_size(&self.data_dir());
        progress(0, total);
        // Streamed from the server's fork (diskless), not staged in a file.
        c.cmd(&["REPLCONF", "capa", "eof", "capa", "psync2"])
            .context("REPLCONF capa")?;
        // Redis 7 and Valkey: end the transfer after the snapshot (older
        // servers refuse; the connection is closed after the payload).
        let _ = c.cmd(&["REPLCONF", "rdb-only", "1"]);
        c.send(&["PSYNC", "?", "-1"])?;
        let answer = match c.reply().context("PSYNC")? {
            Reply::Simple(s) => s,
            Reply::Error(e) => bail!("{} refused to send a snapshot: {e}", self.bin),
            r => bail!("an unexpected answer to PSYNC: {r:?}"),
        };
        let (replid, offset) = fullresync_offset(&answer)
            .ok_or_else(|| anyhow!("an unexpected answer to PSYNC: {answer:?}"))?;
        // Newlines keep the connection alive while the snapshot is prepared.
        let header = loop {
            let l = c.line().context("waiting for the snapshot")?;
            if !l.is_empty() {
                break l;
            }
        };
        if header.first() == Some(&b'-') {
            bail!(
                "{} could not send a snapshot: {}",
                self.bin,
                String::from_utf8_lossy(&header[1..])
            );
        }
        let mut last_report = Instant::now();
        let done = copy_payload(&mut c.r, &header, out, |done| {
            if last_report.elapsed() > Duration::from_millis(200) {
                progress(done, total.max(done));
                last_report = Instant::now();
            }
        })?;
        // Hang up: an older server would go on with the replication stream.
        drop(c);
        out.flush().context("flushing the backup stream")?;
        progress(done, done);
        tracing::info!(bytes = done, offset, replid = %replid, "RDB snapshot streamed");
        Ok(BackupInfo {
            version,
            position: offset.to_string(),
            position_time_ms: corral_proto::now_ms(),
            start_wal: String::new(),
        })
    }

    fn restore(
        &self,
        _spec: &EngineSpec,
        input: &mut dyn Read,
        recovery: Option<&Recovery>,
    ) -> Result<()> {
        if recovery.is_some() {
            bail!(
                "point-in-time recovery is PostgreSQL's: a Redis backup restores the snapshot \
                 as it was taken"
            );
        }
        let acct = account()?;
        let ids = self.server_ids()?;
        self.ensure_dirs(&acct)?;
        if self.find_running().is_some() {
            bail!(
                "{} is running on this node; stop it before restoring",
                self.bin
            );
        }
        if !absent_or_empty(&self.data_dir())? {
            bail!(
                "{} is not empty: a backup is restored into a node without data",
                self.data_dir().display()
            );
        }
        let conf = self.base.join("restore.conf");
        let (socket, pidfile) = (
            self.run_dir().join("restore.sock"),
            self.run_dir().join("restore.pid"),
        );
        // The temporary server of an interrupted restore (a crashed agent).
        if let Some(pid) = self.running_on(&pidfile, &conf) {
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
        let scratch = self.restore_dir();
        remove_dir(&scratch)?;
        mkdir_owned(&scratch, 0o700, &acct)?;
        let restored = (|| {
            let size = write_rdb(input, &scratch.join("dump.rdb"), ids)?;
            let mut server = self.start_temp(
                &conf,
                &Self::temp_conf(&scratch, &socket, &pidfile),
                &socket,
                &self.log_path(),
                ids,
            )?;
            let mut c = server.ready()?;
            // The driver's configuration loads the AOF only: write it from
            // what was loaded (see the module doc).
            c.cmd(&["CONFIG", "SET", "appendonly", "yes"])
                .context("turning the append-only file on")?;
            let began = Instant::now();
            loop {
                server.exited("exited while writing the append-only file")?;
                let p = c.info("persistence")?;
                let busy = p.get("aof_rewrite_in_progress") == Some("1")
                    || p.get("aof_rewrite_scheduled") == Some("1");
                if !busy && p.get("aof_enabled") == Some("1") {
                    if p.get("aof_last_bgrewrite_status") == Some("err") {
                        bail!(
                            "{} could not write the append-only file; the end of its log ({}):\n{}",
                            self.bin,
                            self.log_path().display(),
                            log_tail(&self.log_path(), TAIL_LINES)
                        );
                    }
                    break;
                }
                if began.elapsed() > LOAD_TIMEOUT {
                    bail!("the append-only file was not written within an hour");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            server.shutdown(&mut c, false)?;
            remove_file(&scratch.join("dump.rdb"))?;
            let aof =
                scratch.join("appendonlydir").is_dir() || scratch.join("appendonly.aof").is_file();
            if !aof {
                bail!("{} stopped without an append-only file", self.bin);
            }
            tracing::info!(bytes = size, "RDB restored as the append-only file");
            anyhow::Ok(())
        })();
        let _ = remove_file(&conf);
        if let Err(e) = restored {
            let _ = remove_dir(&scratch);
            return Err(e);
        }
        // The restored data follows nobody; no stopped position holds.
        remove_file(&self.upstream_path())?;
        remove_file(&self.stopped_path())?;
        remove_dir(&self.data_dir())?;
        std::fs::rename(&scratch, self.data_dir())
            .context("moving the restored data directory into place")?;
        Ok(())
    }

    fn verify(&self, input: &mut dyn Read, scratch: &Path) -> Result<String> {
        let acct = account()?;
        let ids = self.server_ids()?;
        mkdir_owned(scratch, 0o700, &acct)?;
        write_rdb(input, &scratch.join("dump.rdb"), ids)?;
        let (socket, pidfile) = (scratch.join("redis.sock"), scratch.join("redis.pid"));
        let mut server = self.start_temp(
            &scratch.join("verify.conf"),
            &Self::temp_conf(scratch, &socket, &pidfile),
            &socket,
            &scratch.join("server.log"),
            ids,
        )?;
        let mut c = server.ready()?;
        let info = Info::parse(&c.cmd(&["INFO", "server"])?.text());
        let keys = keyspace(&c.info("keyspace")?);
        server.shutdown(&mut c, true)?;
        let label = if info.get("valkey_version").is_some() {
            "Valkey"
        } else if self.bin.contains("keydb") {
            "KeyDB"
        } else {
            "Redis"
        };
        let total: u64 = keys.iter().map(|(_, n)| n).sum();
        let per_db = if keys.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                keys.iter()
                    .map(|(db, n)| format!("{db}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Ok(format!(
            "{label} {} loaded the RDB: {total} keys{per_db}",
            info.version()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_by_length_and_by_mark() {
        let rdb = b"REDIS0011\xfa\x09redis-ver\x067.0.15\xff12345678".to_vec();
        let mut out = Vec::new();
        let mut r = std::io::Cursor::new(rdb.clone());
        let n = copy_payload(
            &mut r,
            format!("${}", rdb.len()).as_bytes(),
            &mut out,
            |_| {},
        )
        .unwrap();
        assert_eq!((n, &out), (rdb.len() as u64, &rdb));

        let mark = "0123456789abcdef0123456789abcdef01234567";
        let mut streamed = rdb.clone();
        streamed.extend_from_slice(mark.as_bytes());
        streamed.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        let mut out = Vec::new();
        // Small reads: the mark arrives split across them.
        let mut r = BufReader::with_capacity(7, std::io::Cursor::new(streamed));
        copy_payload(&mut r, format!("$EOF:{mark}").as_bytes(), &mut out, |_| {}).unwrap();
        assert_eq!(out, rdb);

        let mut r = std::io::Cursor::new(rdb[..10].to_vec());
        let err =
            copy_payload(&mut r, format!("$EOF:{mark}").as_bytes(), &mut out, |_| {}).unwrap_err();
        assert!(err.to_string().contains("before the end"), "{err}");
    }

    #[test]
    fn fullresync_answers() {
        assert_eq!(
            fullresync_offset("FULLRESYNC 8de1787ba490483314a4d30f1c628bc5025eb761 2310"),
            Some(("8de1787ba490483314a4d30f1c628bc5025eb761".into(), 2310))
        );
        assert_eq!(fullresync_offset("CONTINUE"), None);
    }

    #[test]
    fn keyspaces() {
        let info = Info::parse(
            "# Keyspace\r\ndb0:keys=3,expires=0,avg_ttl=0\r\ndb5:keys=2,expires=1,avg_ttl=9\r\n",
        );
        assert_eq!(
            keyspace(&info),
            vec![("db0".to_string(), 3), ("db5".to_string(), 2)]
        );
    }
}
