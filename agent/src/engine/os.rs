//! What the engine drivers do with the operating system, written once: the
//! unprivileged account a server runs as, the files and directories handed
//! over to it, finding and running programs, spawning a server with its
//! output appended to its log, and recognising a running server from its
//! pid file.
//!
//! The agent runs as root; every database server runs as a system user of
//! its own (`postgres`, `mysql`, `redis`), never as root. Nothing here knows
//! which engine it serves: the user, the program and what to install when
//! one is missing are the caller's.

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::{chown, Gid, Uid, User};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

/// How many lines of a failed command's output, or of a server's log, an
/// error message carries.
pub const TAIL_LINES: usize = 15;

/// How much of the end of a log [`log_tail`] reads.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// The longest name `/proc/PID/comm` holds (TASK_COMM_LEN, 16 with the NUL).
const COMM_LEN: usize = 15;

/// The OS account a server runs as: a system user, never root.
#[derive(Debug)]
pub struct Account {
    /// The user's name, for messages.
    name: String,
    uid: Uid,
    gid: Gid,
}

impl Account {
    /// Looks up the system user `user`. `install` says what to do when
    /// there is none (the server's package creates it), e.g. "install
    /// Redis (apt install redis-server)". A user with uid 0 is refused.
    pub fn lookup(user: &str, install: &str) -> Result<Account> {
        let found = User::from_name(user)
            .with_context(|| format!("looking up the `{user}` user in the user database"))?
            .ok_or_else(|| anyhow!("there is no `{user}` user on this machine: {install}"))?;
        if found.uid.is_root() {
            bail!(
                "the `{user}` user has uid 0; the server must not run as root: give `{user}` \
                 an unprivileged uid of its own"
            );
        }
        Ok(Account {
            name: user.to_string(),
            uid: found.uid,
            gid: found.gid,
        })
    }

    /// Makes `path` this account's (user and primary group).
    fn chown(&self, path: &Path) -> Result<()> {
        chown(path, Some(self.uid), Some(self.gid)).with_context(|| {
            format!(
                "chown {} to `{}` (uid {}, gid {})",
                path.display(),
                self.name,
                self.uid,
                self.gid
            )
        })
    }
}

/// Whether `path` already holds exactly `contents`.
fn unchanged(path: &Path, contents: &str) -> bool {
    std::fs::read_to_string(path).ok().as_deref() == Some(contents)
}

/// Writes `contents` to `path` as `acct`'s file (0600, replaced whole),
/// only if it changed; returns whether it did.
pub fn write_owned(path: &Path, contents: &str, acct: &Account) -> Result<bool> {
    if unchanged(path, contents) {
        return Ok(false);
    }
    corral_proto::pki::write_private(path, contents)?;
    acct.chown(path)?;
    Ok(true)
}

/// Writes `contents` to `path` as the agent's (root's) file that any
/// server may read (0644, replaced whole), only if it changed; returns
/// whether it did.
pub fn write_readable(path: &Path, contents: &str) -> Result<bool> {
    if unchanged(path, contents) {
        return Ok(false);
    }
    corral_proto::pki::write_public(path, contents)?;
    Ok(true)
}

/// Creates the directory `path` (and its parents) and sets its mode; its
/// owner is left alone (the agent's, root's, when the agent creates it).
pub fn mkdir(path: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    chmod(path, mode)
}

/// Creates the directory `path` (and its parents), makes it `acct`'s and
/// sets its mode.
pub fn mkdir_owned(path: &Path, mode: u32, acct: &Account) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    acct.chown(path)?;
    chmod(path, mode)
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Removes the file `path` if it is there; returns whether it was.
pub fn remove_file(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Removes the directory `path` and everything in it, if it is there.
pub fn remove_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// The last `n` lines of `text` that are not blank.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a log file (not blank; read from its last
/// 64 KiB), or a note that it cannot be read, for an error message.
pub fn log_tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("({} cannot be read)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    tail(&String::from_utf8_lossy(&buf), n)
}

/// What a failed tool printed that says why. Short output whole; else its
/// error lines (MariaDB's tools print them first, then pages of advice;
/// PostgreSQL's say `error:`), then its last lines; else its last
/// [`TAIL_LINES`] lines.
pub fn failure_summary(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() <= TAIL_LINES {
        return lines.join("\n");
    }
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("ERROR") || l.contains("error:"))
        .take(10)
        .collect();
    if errors.is_empty() {
        tail(text, TAIL_LINES)
    } else {
        format!("{}\n...\n{}", errors.join("\n"), tail(text, 5))
    }
}

/// The error of a command `what` that exited with `status` after printing
/// `stdout` and `stderr`.
fn command_failed(what: &str, status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> anyhow::Error {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    anyhow!("{what} failed ({status}):\n{}", failure_summary(&text))
}

/// The program a command runs, for messages.
fn program(cmd: &tokio::process::Command) -> String {
    Path::new(cmd.as_std().get_program()).display().to_string()
}

/// The first of `dirs`, in order, that holds the program `name`; else an
/// error naming where it looked and what to do (`install`, e.g. "install
/// Redis (apt install redis-server)").
pub fn find_program<P: AsRef<Path>>(name: &str, dirs: &[P], install: &str) -> Result<PathBuf> {
    if let Some(p) = dirs
        .iter()
        .map(|d| d.as_ref().join(name))
        .find(|p| p.exists())
    {
        return Ok(p);
    }
    let looked: Vec<String> = dirs
        .iter()
        .map(|d| d.as_ref().display().to_string())
        .collect();
    bail!("{name} not found in {}: {install}", looked.join(", "))
}

/// A command for `program` that runs in `dir`, as `acct` when given (its
/// uid and primary group; std also drops root's supplementary groups when
/// it sets the uid), else as the agent, with nothing of the agent's
/// environment but `PATH` (set to `path`) and `LANG=C.UTF-8`.
pub fn command(
    program: &Path,
    acct: Option<&Account>,
    path: &str,
    dir: &Path,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    if let Some(acct) = acct {
        cmd.uid(acct.uid.as_raw()).gid(acct.gid.as_raw());
    }
    cmd.env_clear()
        .env("PATH", path)
        .env("LANG", "C.UTF-8")
        .current_dir(dir);
    cmd
}

/// Runs `cmd` to the end (stdin from /dev/null). When it does not succeed,
/// fails with `what`, its exit status and what it printed that says why
/// ([`failure_summary`] of its stdout and stderr).
pub async fn run(cmd: &mut tokio::process::Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what} ({})", program(cmd)))?;
    if !out.status.success() {
        return Err(command_failed(what, out.status, &out.stdout, &out.stderr));
    }
    Ok(())
}

/// Opens a server's log for appending (created if missing).
pub fn open_log(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {} (the server's log) to append to", path.display()))
}

/// Spawns a server: stdin from /dev/null, stdout and stderr appended to
/// `log` (see [`open_log`]), in a process group of its own, so that a
/// Ctrl-C or SIGTERM aimed at the agent does not reach the database.
/// `what` names it in the error.
pub fn spawn_logged(
    cmd: &mut tokio::process::Command,
    log: std::fs::File,
    what: &str,
) -> Result<tokio::process::Child> {
    let out = log
        .try_clone()
        .with_context(|| format!("sharing the log file between {what}'s stdout and stderr"))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {what} ({})", program(cmd)))
}

/// The name `/proc/PID/comm` shows for a process running `program`: its
/// first 15 bytes.
fn comm_name(program: &str) -> &str {
    let mut end = program.len().min(COMM_LEN);
    while !program.is_char_boundary(end) {
        end -= 1;
    }
    &program[..end]
}

/// The pid a pid file names (its first line).
fn parse_pid_file(text: &str) -> Option<u32> {
    text.lines().next()?.trim().parse().ok()
}

/// The pid of a live process running `program` named by `pid_file`: None
/// when the file is missing or unreadable, or the pid is dead, a zombie
/// or another program's (a pid reused after a crash).
pub fn running_pid(pid_file: &Path, program: &str) -> Option<u32> {
    let pid = parse_pid_file(&std::fs::read_to_string(pid_file).ok()?)?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == comm_name(program) && super::process_alive(pid)).then_some(pid)
}

/// Which side of a [`pump`] failed, and after how many bytes.
pub enum PumpError {
    Read(std::io::Error, u64),
    Write(std::io::Error, u64),
}

/// Copies `from` to `to` until `from` ends, in 256 KiB buffers, calling
/// `each` with the bytes copied so far after every buffer; returns the
/// total. A tool's output into a backup stream, or a backup stream into a
/// tool's input: the callers tell a failed read (the source broke) from a
/// failed write (the sink gave up) by the error's side.
pub fn pump(
    from: &mut dyn std::io::Read,
    to: &mut dyn std::io::Write,
    mut each: impl FnMut(u64),
) -> std::result::Result<u64, PumpError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(done),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PumpError::Read(e, done)),
        };
        to.write_all(&buf[..n])
            .map_err(|e| PumpError::Write(e, done))?;
        done += n as u64;
        each(done);
    }
}

/// A tool's child process, killed (and reaped) if dropped before it ended:
/// a failed step never leaves a tool or a temporary server behind.
pub struct Reaped {
    pub child: std::process::Child,
    what: String,
}

impl Reaped {
    /// Takes charge of `child`; `what` names it in errors.
    pub fn new(child: std::process::Child, what: &str) -> Reaped {
        Reaped {
            child,
            what: what.to_string(),
        }
    }

    /// Spawns `cmd`, naming the program in the error.
    pub fn spawn(cmd: &mut std::process::Command, what: &str) -> Result<Reaped> {
        let child = cmd.spawn().with_context(|| {
            format!("starting {what} ({})", cmd.get_program().to_string_lossy())
        })?;
        Ok(Reaped::new(child, what))
    }

    /// Kills the child if it still runs, and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.what))
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory of this test's own, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("corral-os-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The account the tests run as (root or not: chown to oneself works).
    fn me() -> Account {
        Account {
            name: "me".into(),
            uid: nix::unistd::getuid(),
            gid: nix::unistd::getgid(),
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn tails_skip_blank_lines() {
        assert_eq!(tail("a\nb\n\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn failure_summaries() {
        // Short output: all of it.
        assert_eq!(failure_summary("one\n\ntwo\n"), "one\ntwo");
        // Long output without errors: its last lines.
        let long: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        let s = failure_summary(&long);
        assert!(s.starts_with("line 26\n") && s.ends_with("line 40"), "{s}");
        // Long output with errors: those first, then the end.
        let text = format!("ERROR 1045 (28000): Access denied\n{long}");
        assert_eq!(
            failure_summary(&text),
            "ERROR 1045 (28000): Access denied\n...\nline 36\nline 37\nline 38\nline 39\nline 40"
        );
    }

    #[tokio::test]
    async fn a_failed_command_says_what_and_why() {
        let dir = Scratch::new("run");
        let mut cmd = command(Path::new("/bin/sh"), None, "/usr/bin:/bin", &dir.0);
        cmd.arg("-c").arg(
            "i=1; while [ $i -le 40 ]; do echo out $i; i=$((i+1)); done; echo 'oops' >&2; exit 3",
        );
        let e = run(&mut cmd, "the test tool").await.unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("the test tool failed (exit status: 3):\n"),
            "{msg}"
        );
        // The last lines of stdout, then stderr.
        assert!(msg.ends_with("out 40\noops"), "{msg}");
        assert!(
            msg.contains("out 27\n") && !msg.contains("out 26\n"),
            "{msg}"
        );

        let mut ok = command(Path::new("/bin/sh"), None, "/usr/bin:/bin", &dir.0);
        ok.arg("-c")
            .arg("test \"$LANG\" = C.UTF-8 && test -z \"$HOME\"");
        run(&mut ok, "a clean environment").await.unwrap();

        let missing = dir.0.join("no-such-tool");
        let mut cmd = command(&missing, None, "/usr/bin:/bin", &dir.0);
        let msg = format!("{:#}", run(&mut cmd, "no-such-tool").await.unwrap_err());
        assert!(
            msg.starts_with(&format!("running no-such-tool ({})", missing.display())),
            "{msg}"
        );
    }

    #[test]
    fn write_owned_answers_whether_it_changed() {
        let dir = Scratch::new("write");
        let path = dir.0.join("a.conf");
        assert!(write_owned(&path, "x = 1\n", &me()).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "x = 1\n");
        assert_eq!(mode(&path), 0o600);
        assert!(!write_owned(&path, "x = 1\n", &me()).unwrap(), "unchanged");
        assert!(write_owned(&path, "x = 2\n", &me()).unwrap());
        assert!(!write_owned(&path, "x = 2\n", &me()).unwrap());

        let public = dir.0.join("b.cnf");
        assert!(write_readable(&public, "[x]\n").unwrap());
        assert_eq!(mode(&public), 0o644);
        assert!(!write_readable(&public, "[x]\n").unwrap(), "unchanged");
    }

    #[test]
    fn directories_and_removal() {
        let dir = Scratch::new("dirs");
        let owned = dir.0.join("a/run");
        mkdir_owned(&owned, 0o700, &me()).unwrap();
        assert_eq!(mode(&owned), 0o700);
        mkdir_owned(&owned, 0o750, &me()).unwrap();
        assert_eq!(mode(&owned), 0o750, "an existing directory's mode is set");
        let base = dir.0.join("b");
        mkdir(&base, 0o755).unwrap();
        assert_eq!(mode(&base), 0o755);

        let file = owned.join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(remove_file(&file).unwrap());
        assert!(!remove_file(&file).unwrap(), "already gone");
        remove_dir(&dir.0.join("a")).unwrap();
        assert!(!owned.exists());
        remove_dir(&dir.0.join("a")).unwrap();
        // Not a directory: the error names the path.
        let not_dir = base.join("file");
        std::fs::write(&not_dir, "x").unwrap();
        let msg = format!("{:#}", remove_dir(&not_dir).unwrap_err());
        assert!(msg.contains(&not_dir.display().to_string()), "{msg}");
    }

    #[test]
    fn log_tails() {
        let dir = Scratch::new("log");
        let log = dir.0.join("server.log");
        assert_eq!(
            log_tail(&log, 3),
            format!("({} cannot be read)", log.display())
        );
        // Longer than what is read: the end is there, the start is not.
        let text: String = (0..20_000).map(|i| format!("entry {i}\n\n")).collect();
        std::fs::write(&log, text).unwrap();
        assert_eq!(log_tail(&log, 3), "entry 19997\nentry 19998\nentry 19999");
        // Appending keeps what is there.
        use std::io::Write;
        writeln!(open_log(&log).unwrap(), "appended").unwrap();
        assert_eq!(log_tail(&log, 2), "entry 19999\nappended");
    }

    #[test]
    fn programs_are_found_or_named() {
        let dirs = ["/nonexistent", "/bin", "/usr/bin"];
        let sh = find_program("sh", &dirs, "install a shell").unwrap();
        assert!(sh.ends_with("sh") && sh.exists());
        let msg = find_program("no-such-server", &dirs, "install it (apt install x)")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "no-such-server not found in /nonexistent, /bin, /usr/bin: install it (apt install x)"
        );
    }

    #[test]
    fn accounts_are_never_root() {
        let msg = Account::lookup("root", "install it")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`root` user has uid 0"), "{msg}");
        let msg = Account::lookup("corral-no-such-user", "install Foo (apt install foo)")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "there is no `corral-no-such-user` user on this machine: install Foo (apt install foo)"
        );
    }

    #[test]
    fn pid_files() {
        assert_eq!(parse_pid_file("1234\n"), Some(1234));
        // PostgreSQL's postmaster.pid: the pid, then the data directory...
        assert_eq!(
            parse_pid_file(" 77 \n/var/lib/x\n1700000000\n5432\n"),
            Some(77)
        );
        assert_eq!(parse_pid_file(""), None);
        assert_eq!(parse_pid_file("x\n"), None);
        assert_eq!(comm_name("redis-server"), "redis-server");
        assert_eq!(comm_name("a-very-long-server-name"), "a-very-long-ser");
    }

    #[test]
    fn a_running_server_is_recognised_by_its_name() {
        let dir = Scratch::new("pid");
        let pid_file = dir.0.join("server.pid");
        assert_eq!(running_pid(&pid_file, "postgres"), None, "no pid file");
        let me = std::process::id();
        std::fs::write(&pid_file, format!("{me}\n")).unwrap();
        // This test's process runs, but it is not a postgres.
        assert_eq!(running_pid(&pid_file, "postgres"), None, "wrong comm");
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(running_pid(&pid_file, comm.trim_end()), Some(me));
        // The full program name, longer than comm holds, matches too.
        let exe = std::env::current_exe().unwrap();
        let exe = exe.file_name().unwrap().to_string_lossy();
        if exe.starts_with(comm.trim_end()) {
            assert_eq!(running_pid(&pid_file, &exe), Some(me));
        }
        std::fs::write(&pid_file, "not a pid\n").unwrap();
        assert_eq!(running_pid(&pid_file, comm.trim_end()), None);
    }
}
