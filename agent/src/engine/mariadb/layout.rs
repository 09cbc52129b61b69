//! The driver's construction, its files and directories, its config file
//! and its cached administrative session.

use super::config::{render_config, wants_semi_sync, ServerConfig};
use super::connection::connect_socket;
use super::gtid::server_id;
use super::settings::{binary, check_cnf_path, REPLICATION_USER, REPLICA_MARKER};
use super::statements::Flavour;
use super::{tls, Admin, Mariadb};
use crate::engine::os::{mkdir_owned, write_readable, Account};
use crate::engine::{os, EngineSpec, Upstream};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

impl Mariadb {
    /// A driver keeping its files under `<state_dir>/mariadb/`.
    pub fn new(state_dir: &Path, node_id: &str) -> Mariadb {
        Mariadb {
            base: state_dir.join("mariadb"),
            node_id: node_id.to_string(),
            conn: tokio::sync::Mutex::new(None),
            desired: std::sync::Mutex::new(None),
            restarted_replication: std::sync::Mutex::new(None),
            tls: Default::default(),
        }
    }

    /// Serves TLS, and replicates over it, with the certificate `tls`
    /// holds (see tls.rs).
    pub fn with_tls(mut self, tls: std::sync::Arc<super::super::tls::EngineTls>) -> Mariadb {
        self.tls = tls;
        self
    }

    /// The server's copy of the node's certificate, if it has one.
    pub(super) fn tls_files(&self) -> Option<super::super::tls::TlsFiles> {
        self.tls.files_in(&self.base)
    }

    /// CHANGE MASTER to `up` as the replication user, over TLS when this
    /// node has a certificate.
    pub(super) fn point_at(&self, f: Flavour, up: &Upstream, password: &str) -> String {
        f.change_source(
            &up.host,
            up.port,
            REPLICATION_USER,
            password,
            self.tls_ca().as_deref(),
        )
    }

    /// The CA a replica verifies its upstream with, if TLS is on.
    pub(super) fn tls_ca(&self) -> Option<PathBuf> {
        self.tls_files().map(|f| f.ca())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.base.join("tmp")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.run_dir().join("mariadbd.sock")
    }

    pub(super) fn pid_path(&self) -> PathBuf {
        self.run_dir().join("mariadbd.pid")
    }

    pub(super) fn temp_socket(&self) -> PathBuf {
        self.run_dir().join("temp.sock")
    }

    pub(super) fn temp_pid(&self) -> PathBuf {
        self.run_dir().join("temp.pid")
    }

    pub fn config_path(&self) -> PathBuf {
        self.base.join("my.cnf")
    }

    pub(super) fn temp_config_path(&self) -> PathBuf {
        self.base.join("temp.cnf")
    }

    pub fn fence_path(&self) -> PathBuf {
        self.base.join("fence.cnf")
    }

    pub(super) fn secrets_path(&self) -> PathBuf {
        self.base.join("secrets.json")
    }

    pub(super) fn marker_path(&self) -> PathBuf {
        self.data_dir().join(REPLICA_MARKER)
    }

    pub(super) fn clone_dir(&self) -> PathBuf {
        self.base.join("data.clone")
    }

    pub(super) fn initdb_dir(&self) -> PathBuf {
        self.base.join("data.initdb")
    }

    pub(super) fn old_dir(&self) -> PathBuf {
        self.base.join("data.old")
    }

    pub(super) fn standby(&self) -> bool {
        self.marker_path().exists()
    }

    pub(super) fn fenced(&self) -> bool {
        self.fence_path().exists()
    }

    /// The spec health checks converge to: the last prepared, else `spec`.
    pub(super) fn desired(&self, spec: &EngineSpec) -> EngineSpec {
        self.desired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| spec.clone())
    }

    pub(super) fn set_desired(&self, spec: Option<&EngineSpec>) {
        *self.desired.lock().unwrap_or_else(|p| p.into_inner()) = spec.cloned();
    }

    /// The base directory (root's, 0755), the run directory and the TLS
    /// files; returns whether the TLS files changed.
    pub(super) fn ensure_dirs(&self, acct: &Account) -> Result<bool> {
        os::mkdir(&self.base, 0o755)?;
        check_cnf_path(&self.base)?;
        // A Unix socket path holds at most 107 bytes.
        if self.socket_path().as_os_str().len() > 100 {
            bail!(
                "{} is too long for a Unix socket; use a shorter state directory",
                self.socket_path().display()
            );
        }
        mkdir_owned(&self.run_dir(), 0o700, acct)?;
        mkdir_owned(&self.tmp_dir(), 0o700, acct)?;
        self.tls.install_in(&self.base, acct)
    }

    /// A MariaDB program, run in the base directory as the mysql user
    /// (`acct`), or as the agent when None.
    pub(super) fn command(
        &self,
        program: &str,
        acct: Option<&Account>,
    ) -> Result<tokio::process::Command> {
        let mut cmd = os::command(
            &binary(program)?,
            acct,
            "/usr/sbin:/usr/bin:/sbin:/bin",
            &self.base,
        );
        // mariadb-install-db's bootstrap server takes its tmpdir from here.
        cmd.env("TMPDIR", self.tmp_dir());
        Ok(cmd)
    }

    pub(super) fn config(&self, spec: &EngineSpec) -> String {
        let (data, tmp, socket, pid, fence) = (
            self.data_dir(),
            self.tmp_dir(),
            self.socket_path(),
            self.pid_path(),
            self.fence_path(),
        );
        render_config(&ServerConfig {
            datadir: &data,
            tmpdir: &tmp,
            socket: &socket,
            pid_file: &pid,
            port: spec.port,
            server_id: server_id(&self.node_id),
            report_host: &self.node_id,
            read_only: spec.role != "primary" || self.standby(),
            semi_sync_master: wants_semi_sync(spec),
            temp: false,
            fence: &fence,
        }) + &tls::server_conf(self.tls_files().as_ref(), spec.require_client_tls)
    }

    /// Writes my.cnf for `spec`; returns whether it changed.
    pub(super) fn write_config(&self, spec: &EngineSpec) -> Result<bool> {
        write_readable(&self.config_path(), &self.config(spec))
    }

    pub(super) fn replication_password(&self) -> Result<String> {
        let path = self.secrets_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no replication password on this node yet ({} missing); the coordinator sends it \
                 with the engine's configuration",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        v.get("replication_password")
            .and_then(|p| p.as_str())
            .map(str::to_string)
            .with_context(|| format!("{} holds no replication_password", path.display()))
    }

    /// A session on the running server: the cached one, or a new one.
    pub(super) async fn admin<'a>(&self, slot: &'a mut Option<Admin>) -> Result<&'a mut Admin> {
        if slot.is_none() {
            *slot = Some(connect_socket(&self.socket_path()).await?);
        }
        slot.as_mut().ok_or_else(|| anyhow!("no connection"))
    }
}
