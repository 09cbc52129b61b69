//! One SQL client for the harness's writer and checker, whichever engine
//! the cluster runs: the URI's scheme says which (`postgresql://` through
//! tokio-postgres, `mysql://` through mysql_async).

use anyhow::{anyhow, Result};
use std::time::Duration;

pub enum Client {
    Postgres(tokio_postgres::Client),
    Mysql(mysql_async::Conn),
}

/// How a statement failed.
pub enum Failure {
    /// The server answered with an error (a replica is read-only): the
    /// connection is still good.
    Refused(String),
    /// The connection broke, or the outcome is unknown.
    Broken(String),
}

impl Client {
    /// Connects (TCP and authentication) within `timeout`.
    pub async fn connect(uri: &str, timeout: Duration) -> Result<Client> {
        if uri.starts_with("mysql://") {
            let opts = mysql_async::Opts::from_url(uri)?;
            let conn = tokio::time::timeout(timeout, mysql_async::Conn::new(opts))
                .await
                .map_err(|_| anyhow!("connect timed out after {timeout:?}"))??;
            return Ok(Client::Mysql(conn));
        }
        let mut config: tokio_postgres::Config = uri.parse()?;
        config.connect_timeout(timeout);
        // connect_timeout bounds each TCP connect; this bounds
        // authentication too (a node that accepts but never answers).
        let (client, conn) = tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| anyhow!("connect timed out after {timeout:?}"))??;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client::Postgres(client))
    }

    /// Whether the connection is known to be gone.
    pub fn is_closed(&self) -> bool {
        match self {
            Client::Postgres(c) => c.is_closed(),
            // mysql_async notices on the next statement.
            Client::Mysql(_) => false,
        }
    }

    /// Inserts one row `(key_column = value, at = now())` into `table`;
    /// Ok once the server acknowledged the commit.
    pub async fn insert_now<T>(
        &mut self,
        table: &str,
        column: &str,
        value: T,
    ) -> Result<(), Failure>
    where
        T: tokio_postgres::types::ToSql + Sync + Into<mysql_async::Value>,
    {
        match self {
            Client::Postgres(c) => {
                let sql = format!("INSERT INTO {table} ({column}, at) VALUES ($1, now())");
                match c.execute(&sql, &[&value]).await {
                    Ok(_) => Ok(()),
                    // A server error on a live connection: refused. The
                    // message with its causes: tokio-postgres' own is only
                    // "db error", the server's reason is in the source.
                    Err(e) if e.as_db_error().is_some() && !c.is_closed() => {
                        Err(Failure::Refused(format!("{:#}", anyhow::Error::from(e))))
                    }
                    Err(e) => Err(Failure::Broken(format!("{:#}", anyhow::Error::from(e)))),
                }
            }
            Client::Mysql(c) => {
                use mysql_async::prelude::Queryable;
                let sql = format!("INSERT INTO {table} ({column}, at) VALUES (?, now(6))");
                let params = mysql_async::Params::Positional(vec![value.into()]);
                c.exec_drop(sql, params).await.map_err(|e| match e {
                    mysql_async::Error::Server(s) => Failure::Refused(s.to_string()),
                    e => Failure::Broken(e.to_string()),
                })
            }
        }
    }
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Refused(m) | Failure::Broken(m) => m,
        }
    }
}
