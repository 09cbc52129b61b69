//! PostgreSQL: data directory, configuration, process and bootstrap.
//!
//! Layout under `<state>/postgres/`: `data/` (the cluster, owned by the
//! `postgres` user, 0700), `run/` (the Unix socket, 0700, so only `postgres`
//! and root can use the trusted local connection), `server.log`.
//!
//! The server runs as the `postgres` user, never root. Local connections
//! over the socket are trusted (that is how the agent administers it); every
//! TCP connection needs a SCRAM password.

use super::{Driver, EngineSpec};
use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::{chown, Gid, Uid, User};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

pub struct Postgres {
    bin_dir: PathBuf,
    base: PathBuf,
    /// The cached administrative connection used for health checks.
    conn: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

/// The OS account the server runs as.
struct Account {
    uid: Uid,
    gid: Gid,
}

fn account() -> Result<Account> {
    let user = User::from_name("postgres")
        .context("looking up the postgres user")?
        .ok_or_else(|| anyhow!("there is no `postgres` user on this machine: install PostgreSQL (apt install postgresql)"))?;
    if user.uid.is_root() {
        bail!("the `postgres` user has uid 0; the server must not run as root");
    }
    Ok(Account {
        uid: user.uid,
        gid: user.gid,
    })
}

/// A single-quoted postgresql.conf value.
fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// Runs a command and fails with its output when it does not succeed.
async fn run(cmd: &mut tokio::process::Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tail: Vec<&str> = text
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(())
}

/// Writes `contents` to `path` as the postgres user's file (0600), only if
/// it changed; returns whether it did.
fn write_owned(path: &Path, contents: &str, acct: &Account) -> Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(contents) {
        return Ok(false);
    }
    corral_proto::pki::write_private(path, contents)?;
    chown(path, Some(acct.uid), Some(acct.gid))
        .with_context(|| format!("chown {}", path.display()))?;
    Ok(true)
}

fn mkdir_owned(path: &Path, mode: u32, acct: &Account) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    chown(path, Some(acct.uid), Some(acct.gid))
        .with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

impl Postgres {
    pub fn new(bin_dir: PathBuf, state_dir: &Path) -> Postgres {
        Postgres {
            bin_dir,
            base: state_dir.join("postgres"),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    fn bin(&self, name: &str) -> Result<PathBuf> {
        let p = self.bin_dir.join(name);
        if !p.exists() {
            bail!(
                "{} not found: install PostgreSQL's server package (apt install postgresql) or point \
                 --pg-bin-dir at the directory holding initdb and postgres",
                p.display()
            );
        }
        Ok(p)
    }

    fn command(&self, name: &str, acct: &Account) -> Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(self.bin(name)?);
        cmd.uid(acct.uid.as_raw())
            // (std also drops root's supplementary groups when it sets the uid.)
            .gid(acct.gid.as_raw())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .current_dir(&self.base);
        Ok(cmd)
    }

    async fn initdb(&self, acct: &Account) -> Result<()> {
        // Into a scratch directory first, renamed into place when complete:
        // a crash half-way never leaves a data directory that looks usable.
        let scratch = self.base.join("data.initdb");
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)
                .with_context(|| format!("removing {}", scratch.display()))?;
        }
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

    fn config(&self, spec: &EngineSpec) -> String {
        format!(
            "# Written by corral-agent from the cluster's spec; edits here are overwritten.\n\
             listen_addresses = '*'\n\
             port = {port}\n\
             unix_socket_directories = {socket}\n\
             unix_socket_permissions = 0700\n\
             password_encryption = 'scram-sha-256'\n\
             cluster_name = {cluster}\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             log_connections = on\n",
            port = spec.port,
            socket = conf_quote(&self.socket_dir().to_string_lossy()),
            cluster = conf_quote(&spec.cluster),
        )
    }

    fn hba(&self) -> String {
        "# Written by corral-agent; edits here are overwritten.\n\
         # The socket directory is 0700: only postgres and the agent reach it.\n\
         local all all trust\n\
         host all all 0.0.0.0/0 scram-sha-256\n\
         host all all ::/0 scram-sha-256\n"
            .to_string()
    }

    async fn connect(&self, spec: &EngineSpec) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(self.socket_dir())
            .port(spec.port)
            .user("postgres")
            .dbname("postgres")
            .application_name("corral-agent")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

#[tonic::async_trait]
impl Driver for Postgres {
    async fn prepare(&self, spec: &EngineSpec) -> Result<()> {
        let acct = account()?;
        std::fs::create_dir_all(&self.base)
            .with_context(|| format!("creating {}", self.base.display()))?;
        std::fs::set_permissions(&self.base, std::fs::Permissions::from_mode(0o755))?;
        mkdir_owned(&self.socket_dir(), 0o700, &acct)?;
        if !self.data_dir().join("PG_VERSION").exists() {
            if self.data_dir().exists() {
                bail!(
                    "{} exists but is not a PostgreSQL data directory (no PG_VERSION): refusing to touch \
                     it; move it away if it holds nothing you need",
                    self.data_dir().display()
                );
            }
            self.initdb(&acct).await?;
        }
        let data = self.data_dir();
        let mut changed = write_owned(&data.join("corral.conf"), &self.config(spec), &acct)?;
        changed |= write_owned(&data.join("pg_hba.conf"), &self.hba(), &acct)?;
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
                // Settings that need a restart (port) are not changed in place.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::SIGHUP,
                );
            }
        }
        Ok(())
    }

    fn find_running(&self) -> Option<u32> {
        let pidfile = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let pid: u32 = pidfile.lines().next()?.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "postgres" && super::process_alive(pid)).then_some(pid)
    }

    async fn start(&self, _spec: &EngineSpec) -> Result<tokio::process::Child> {
        let acct = account()?;
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        *self.conn.lock().await = None;
        let child = self
            .command("postgres", &acct)?
            .arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C or SIGTERM aimed at the agent
            // does not reach the database.
            .process_group(0)
            .spawn()
            .context("starting postgres")?;
        tracing::info!(pid = child.id(), log = %log_path.display(), "postgres started");
        Ok(child)
    }

    async fn check(&self, spec: &EngineSpec) -> Result<String> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = Some(self.connect(spec).await?);
        }
        let client = conn.as_ref().ok_or_else(|| anyhow!("no connection"))?;
        match tokio::time::timeout(
            Duration::from_secs(5),
            client.query_one("SHOW server_version", &[]),
        )
        .await
        {
            Ok(Ok(row)) => Ok(row.get::<_, String>(0)),
            Ok(Err(e)) => {
                *conn = None;
                Err(e.into())
            }
            Err(_) => {
                *conn = None;
                bail!("health query timed out after 5s")
            }
        }
    }

    async fn bootstrap(&self, spec: &EngineSpec, admin_password: &str) -> Result<()> {
        let client = self
            .connect(spec)
            .await
            .context("connecting over the local socket")?;
        // Only the SCRAM verifier crosses to the server, never the password.
        let verifier = postgres_protocol::password::scram_sha_256(admin_password.as_bytes());
        let user = quote_ident(&spec.admin_user);
        let exists = !client
            .query(
                "SELECT 1 FROM pg_roles WHERE rolname = $1",
                &[&spec.admin_user],
            )
            .await?
            .is_empty();
        let verb = if exists { "ALTER" } else { "CREATE" };
        client
            .batch_execute(&format!(
                "{verb} ROLE {user} WITH LOGIN CREATEDB CREATEROLE PASSWORD {}",
                quote_literal(&verifier)
            ))
            .await
            .with_context(|| format!("{verb} ROLE {user}"))?;
        client
            .batch_execute(&format!("GRANT pg_monitor, pg_signal_backend TO {user}"))
            .await?;
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

    fn log_path(&self) -> PathBuf {
        self.base.join("server.log")
    }
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
