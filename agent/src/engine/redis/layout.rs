//! The driver's construction, its files and directories, its stored
//! secrets and upstream, and its config file.

use super::config::{min_replicas, render_conf, ConfInput, StoredSecrets};
use super::settings::{BIN_DIRS, MAX_SOCKET_PATH, SERVER_BIN};
use super::{acl, tls, Redis};
use crate::engine::os::{mkdir_owned, write_owned, Account};
use crate::engine::{os, Driver, EngineSpec, Upstream};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

impl Redis {
    /// A driver keeping its files under `<state_dir>/redis/`.
    pub fn new(state_dir: &Path, node_id: &str) -> Redis {
        let base = state_dir.join("redis");
        Redis {
            // Absolute: the server runs in another directory, and its
            // process title (how find_running recognises it) shows the
            // config file's absolute path.
            base: std::path::absolute(&base).unwrap_or(base),
            node_id: node_id.to_string(),
            bin: SERVER_BIN.to_string(),
            conn: tokio::sync::Mutex::new(None),
            role_lock: tokio::sync::Mutex::new(()),
            tls: Default::default(),
        }
    }

    /// Speaks TLS (when the cluster requires it) with the certificate
    /// `tls` holds (see tls.rs).
    pub fn with_tls(mut self, tls: std::sync::Arc<super::super::tls::EngineTls>) -> Redis {
        self.tls = tls;
        self
    }

    /// The server's copy of the node's certificate, if it has one.
    pub(super) fn tls_files(&self) -> Option<super::super::tls::TlsFiles> {
        self.tls.files_in(&self.base)
    }

    /// The same driver running `server` (a name looked for in the usual
    /// directories, or a path): `valkey-server` or `keydb-server` speak the
    /// same protocol and read the same configuration.
    pub fn with_server(mut self, server: &str) -> Redis {
        self.bin = server.to_string();
        self
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    /// The Unix socket the agent administers the server through.
    pub fn socket_path(&self) -> PathBuf {
        self.run_dir().join("redis.sock")
    }

    pub fn conf_path(&self) -> PathBuf {
        self.base.join("redis.conf")
    }

    pub(super) fn pid_path(&self) -> PathBuf {
        self.run_dir().join("redis.pid")
    }

    pub(super) fn secrets_path(&self) -> PathBuf {
        self.base.join("secrets.json")
    }

    pub(super) fn upstream_path(&self) -> PathBuf {
        self.base.join("upstream.json")
    }

    pub(super) fn fence_path(&self) -> PathBuf {
        self.base.join("fenced")
    }

    pub(super) fn stopped_path(&self) -> PathBuf {
        self.base.join("stopped.json")
    }

    pub(super) fn clone_dir(&self) -> PathBuf {
        self.base.join("data.clone")
    }

    pub(super) fn clone_conf_path(&self) -> PathBuf {
        self.base.join("clone.conf")
    }

    pub(super) fn clone_socket(&self) -> PathBuf {
        self.run_dir().join("clone.sock")
    }

    pub(super) fn clone_pid_path(&self) -> PathBuf {
        self.run_dir().join("clone.pid")
    }

    /// The base directory (root's, 0755), the run directory and the TLS
    /// files; returns whether the TLS files changed.
    pub(super) fn ensure_dirs(&self, acct: &Account) -> Result<bool> {
        os::mkdir(&self.base, 0o755)?;
        let socket = self.socket_path();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the socket path {} is longer than {MAX_SOCKET_PATH} bytes, which Unix sockets \
                 cannot hold: use a shorter --state-dir",
                socket.display()
            );
        }
        mkdir_owned(&self.run_dir(), 0o700, acct)?;
        self.tls.install_in(&self.base, acct)
    }

    pub(super) fn binary(&self) -> Result<PathBuf> {
        if self.bin.contains('/') {
            return Ok(PathBuf::from(&self.bin));
        }
        os::find_program(&self.bin, BIN_DIRS, "install it (apt install redis-server)")
    }

    /// Spawns the server on `conf` as the server user, its own process
    /// group, output appended to server.log.
    pub(super) fn spawn(&self, conf: &Path, acct: &Account) -> Result<tokio::process::Child> {
        let log = os::open_log(&self.log_path())?;
        os::spawn_logged(
            os::command(&self.binary()?, Some(acct), "/usr/bin:/bin", &self.base).arg(conf),
            log,
            &self.bin,
        )
    }

    pub(super) fn load_secrets(&self) -> Result<StoredSecrets> {
        let path = self.secrets_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no passwords on this node yet ({} is missing): the coordinator sends them with \
                 its next ConfigureEngine",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut secrets: StoredSecrets = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid", path.display()))?;
        if secrets.agent_password.is_empty() {
            // Written before the agent had a user of its own.
            secrets.agent_password = acl::new_agent_password()?;
            corral_proto::pki::write_private(&path, &serde_json::to_string(&secrets)?)?;
        }
        Ok(secrets)
    }

    /// The upstream the data follows (the replica marker), if any.
    pub(super) fn upstream(&self) -> Result<Option<Upstream>> {
        let path = self.upstream_path();
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                Ok(Some(serde_json::from_str(&t).with_context(|| {
                    format!("{} is not valid", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub(super) fn set_upstream(&self, up: &Upstream) -> Result<()> {
        if self.upstream()?.as_ref() == Some(up) {
            return Ok(());
        }
        corral_proto::pki::write_private(&self.upstream_path(), &serde_json::to_string(up)?)
    }

    pub(super) fn fenced(&self) -> bool {
        self.fence_path().exists()
    }

    /// Writes redis.conf for `spec` from the passwords, the replica marker
    /// and the fence; returns whether it changed.
    pub(super) fn write_config(&self, spec: &EngineSpec, acct: &Account) -> Result<bool> {
        let secrets = self.load_secrets()?;
        let upstream = self.upstream()?;
        let conf = render_conf(&ConfInput {
            port: spec.port,
            announce_port: spec.port,
            socket: &self.socket_path(),
            pidfile: &self.pid_path(),
            dir: &self.data_dir(),
            node_id: &self.node_id,
            admin_user: &spec.admin_user,
            secrets: &secrets,
            upstream: upstream.as_ref(),
            min_replicas: min_replicas(spec, self.fenced()),
        }) + &tls::conf(
            self.tls_files().as_ref(),
            spec.port,
            spec.require_client_tls,
        );
        write_owned(&self.conf_path(), &conf, acct)
    }
}
