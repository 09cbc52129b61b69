//! Administrative connections: over the socket, to an upstream, and to a
//! temporary server started for one step.

use super::settings::{AGENT_SQL_MODE, QUERY_TIMEOUT, REPLICATION_USER, STOP_TIMEOUT};
use super::statements::Flavour;
use super::{tls, Admin};
use crate::engine::os::{log_tail, TAIL_LINES};
use crate::engine::Upstream;
use anyhow::{anyhow, bail, Context, Result};
use mysql_async::prelude::*;
use std::path::{Path, PathBuf};

pub(super) async fn connect_socket(socket: &Path) -> Result<Admin> {
    let opts = mysql_async::OptsBuilder::default()
        .socket(Some(socket.to_string_lossy().into_owned()))
        .user(Some("root"))
        .prefer_socket(true)
        .init(vec![format!("SET SESSION sql_mode = '{AGENT_SQL_MODE}'")]);
    let mut conn = tokio::time::timeout(QUERY_TIMEOUT, mysql_async::Conn::new(opts))
        .await
        .map_err(|_| anyhow!("connecting to {} timed out after 5 s", socket.display()))?
        .with_context(|| format!("connecting to {} as root", socket.display()))?;
    let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
    let version = version.unwrap_or_default();
    Ok(Admin {
        flavour: Flavour::detect(&version),
        version,
        conn,
    })
}

/// A TCP session with `up` as the replication user.
/// Over TLS when `ca` is given (the replication account requires it then).
pub(super) async fn connect_upstream(
    up: &Upstream,
    password: &str,
    ca: Option<&Path>,
) -> Result<mysql_async::Conn> {
    let opts = mysql_async::OptsBuilder::default()
        .ssl_opts(ca.map(tls::client_opts))
        .ip_or_hostname(up.host.clone())
        .tcp_port(up.port)
        .user(Some(REPLICATION_USER))
        .pass(Some(password.to_string()))
        // Not the upstream's socket, even on this very machine.
        .prefer_socket(false)
        .init(vec![format!("SET SESSION sql_mode = '{AGENT_SQL_MODE}'")]);
    tokio::time::timeout(QUERY_TIMEOUT, mysql_async::Conn::new(opts))
        .await
        .map_err(|_| anyhow!("connecting to {}:{} timed out after 5 s", up.host, up.port))?
        .with_context(|| {
            format!(
                "connecting to {} ({}:{}) as {REPLICATION_USER}",
                up.node, up.host, up.port
            )
        })
}

/// A server started by the driver for one step (clone, rejoin): no
/// network, no replication, its own socket; killed if dropped running.
pub(super) struct TempServer {
    pub(super) child: tokio::process::Child,
    pub(super) socket: PathBuf,
    pub(super) log: PathBuf,
}

impl TempServer {
    pub(super) async fn connect(&self) -> Result<Admin> {
        connect_socket(&self.socket).await
    }

    pub(super) async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!(
                "the temporary server exited with {status}; see {}:\n{}",
                self.log.display(),
                log_tail(&self.log, TAIL_LINES)
            ),
            Ok(Err(e)) => Err(e).context("waiting for the temporary server"),
            Err(_) => bail!(
                "the temporary server did not stop within {} s; see {}",
                STOP_TIMEOUT.as_secs(),
                self.log.display()
            ),
        }
    }
}

impl Drop for TempServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.start_kill();
        }
    }
}
