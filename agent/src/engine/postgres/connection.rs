//! Connecting to the server over its socket and reading pg_controldata.

use super::settings::account;
use super::Postgres;
use crate::engine::EngineSpec;
use anyhow::{bail, Context, Result};
use std::process::Stdio;
use std::time::Duration;

impl Postgres {
    pub(super) async fn connect(&self, spec: &EngineSpec) -> Result<tokio_postgres::Client> {
        self.connect_port(spec.port).await
    }

    pub(super) async fn connect_port(&self, port: u16) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(self.socket_dir())
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .application_name("corral-agent")
            // The agent administers a fenced (read-only) primary too.
            .options("-c default_transaction_read_only=off")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// pg_controldata's fields of the stopped (or running) data directory.
    pub(super) async fn controldata(&self) -> Result<Vec<(String, String)>> {
        let acct = account()?;
        let out = self
            .command("pg_controldata", &acct)?
            .arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .output()
            .await
            .context("running pg_controldata")?;
        if !out.status.success() {
            bail!(
                "pg_controldata failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }
}
