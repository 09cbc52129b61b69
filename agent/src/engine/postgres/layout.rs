//! The driver's construction, its files and directories, its binaries and
//! initdb.

use super::Postgres;
use crate::engine::os;
use crate::engine::os::{mkdir_owned, run, Account};
use crate::engine::tls::{EngineTls, TlsFiles};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

impl Postgres {
    pub fn new(bin_dir: PathBuf, state_dir: &Path, node_id: &str) -> Postgres {
        Postgres {
            bin_dir,
            base: state_dir.join("postgres"),
            node_id: node_id.to_string(),
            conn: tokio::sync::Mutex::new(None),
            fence_files: std::sync::Mutex::new(()),
            tls: Default::default(),
        }
    }

    /// Serves TLS with the certificate `tls` holds (see `tls.rs`).
    pub fn with_tls(mut self, tls: std::sync::Arc<EngineTls>) -> Postgres {
        self.tls = tls;
        self
    }

    /// The server's copy of the node's certificate, if it has one.
    pub(super) fn tls_files(&self) -> Option<TlsFiles> {
        self.tls.files_in(&self.base)
    }

    /// Installs the node's current certificate for the server; returns
    /// whether the files changed.
    pub(super) fn install_tls(&self, acct: &Account) -> Result<bool> {
        self.tls.install_in(&self.base, acct)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.base.join("run")
    }

    /// The base directory (root's, 0755), the socket directory and the
    /// TLS files; returns whether the TLS files changed.
    pub(super) fn ensure_dirs(&self, acct: &Account) -> Result<bool> {
        os::mkdir(&self.base, 0o755)?;
        mkdir_owned(&self.socket_dir(), 0o700, acct)?;
        self.install_tls(acct)
    }

    pub(super) fn bin(&self, name: &str) -> Result<PathBuf> {
        os::find_program(
            name,
            &[&self.bin_dir],
            "install PostgreSQL's server package (apt install postgresql) or point --pg-bin-dir \
             at the directory holding initdb and postgres",
        )
    }

    /// A PostgreSQL program, run as the postgres user in the base directory.
    pub(super) fn command(&self, name: &str, acct: &Account) -> Result<tokio::process::Command> {
        Ok(os::command(
            &self.bin(name)?,
            Some(acct),
            "/usr/bin:/bin",
            &self.base,
        ))
    }

    pub(super) async fn initdb(&self, acct: &Account) -> Result<()> {
        // Into a scratch directory first, renamed into place when complete:
        // a crash half-way never leaves a data directory that looks usable.
        let scratch = self.base.join("data.initdb");
        os::remove_dir(&scratch)?;
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

    pub(super) fn pgpass_path(&self) -> PathBuf {
        self.base.join("pgpass")
    }

    pub(super) fn clone_dir(&self) -> PathBuf {
        self.base.join("data.clone")
    }
}
