//! One client for the harness's writer and checker, whichever engine the
//! cluster runs: the URI's scheme says which (`postgresql://` through
//! tokio-postgres, `mysql://` through mysql_async, `redis://` through the
//! redis crate). A "row" in Redis is an element pushed onto a list named
//! after the table.

use anyhow::{anyhow, Result};
use std::time::Duration;

pub enum Client {
    Postgres(tokio_postgres::Client),
    Mysql(mysql_async::Conn),
    /// With the number of replicas each write waits for (`WAIT n`, from
    /// a `?wait=n` at the end of the URI; 0: none).
    Redis(redis::aio::MultiplexedConnection, u32),
}

/// How a statement failed.
pub enum Failure {
    /// The server answered with an error (a replica is read-only): the
    /// connection is still good.
    Refused(String),
    /// The connection broke, or the outcome is unknown.
    Broken(String),
}

/// How long a PostgreSQL connection waits for one host's TCP handshake
/// (docs/haproxy.cfg: what a client of the multi-host string should set).
pub const PER_HOST_CONNECT: Duration = Duration::from_millis(250);

impl Client {
    /// Connects (TCP and authentication) within `timeout`.
    pub async fn connect(uri: &str, timeout: Duration) -> Result<Client> {
        if uri.starts_with("redis://") {
            let (uri, wait) = match uri.rsplit_once("?wait=") {
                Some((u, n)) => (u, n.parse()?),
                None => (uri, 0),
            };
            let client = redis::Client::open(uri)?;
            let conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| anyhow!("connect timed out after {timeout:?}"))??;
            return Ok(Client::Redis(conn, wait));
        }
        if uri.starts_with("mysql://") {
            let opts = mysql_async::Opts::from_url(uri)?;
            let conn = tokio::time::timeout(timeout, mysql_async::Conn::new(opts))
                .await
                .map_err(|_| anyhow!("connect timed out after {timeout:?}"))??;
            return Ok(Client::Mysql(conn));
        }
        let mut config: tokio_postgres::Config = without_libpq_tls(uri).parse()?;
        // Per host of a multi-host string: a dead host (its packets
        // dropped, as a fenced or lost VM's are) costs this much before
        // the next is tried, at every reconnection.
        config.connect_timeout(timeout.min(PER_HOST_CONNECT));
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
            // mysql_async and redis notice on the next statement.
            Client::Mysql(_) | Client::Redis(..) => false,
        }
    }

    /// Inserts one row `(key_column = value, at = now())` into `table`
    /// (Redis: pushes `value` onto the list `table`); Ok once the server
    /// acknowledged the write.
    pub async fn insert_now<T>(
        &mut self,
        table: &str,
        column: &str,
        value: T,
    ) -> Result<(), Failure>
    where
        T: tokio_postgres::types::ToSql
            + Sync
            + Send
            + Into<mysql_async::Value>
            + redis::ToRedisArgs,
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
            Client::Redis(c, wait) => {
                let pushed: redis::RedisResult<i64> = redis::cmd("RPUSH")
                    .arg(table)
                    .arg(value)
                    .query_async(c)
                    .await;
                // WAIT: the write counts only once `wait` replicas have it.
                let pushed = match pushed {
                    Ok(_) if *wait > 0 => {
                        let got: redis::RedisResult<u32> =
                            redis::cmd("WAIT").arg(*wait).arg(1000).query_async(c).await;
                        match got {
                            Ok(n) if n >= *wait => Ok(0),
                            Ok(n) => {
                                return Err(Failure::Refused(format!(
                                    "WAIT: {n} of {wait} replicas have the write"
                                )))
                            }
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                };
                match pushed {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                        Err(Failure::Broken(e.to_string()))
                    }
                    // READONLY, NOREPLICAS, NOAUTH...: the server answered.
                    Err(e) => Err(Failure::Refused(e.to_string())),
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

impl Client {
    /// The ids in `table` (Redis: the list `table`), sorted.
    pub async fn ids(&mut self, table: &str) -> Result<Vec<i64>> {
        let mut ids: Vec<i64> = match self {
            Client::Postgres(c) => c
                .query(&format!("SELECT id::bigint FROM {table}"), &[])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?,
            Client::Mysql(c) => {
                use mysql_async::prelude::Queryable;
                c.query(format!("SELECT id FROM {table}")).await?
            }
            Client::Redis(c, _) => {
                redis::cmd("LRANGE")
                    .arg(table)
                    .arg(0)
                    .arg(-1)
                    .query_async(c)
                    .await?
            }
        };
        ids.sort_unstable();
        Ok(ids)
    }

    /// Runs `statement` (SQL, or a Redis command line split on spaces).
    pub async fn execute(&mut self, statement: &str) -> Result<()> {
        match self {
            Client::Postgres(c) => c.batch_execute(statement).await?,
            Client::Mysql(c) => {
                use mysql_async::prelude::Queryable;
                c.query_drop(statement).await?
            }
            Client::Redis(c, _) => {
                let mut words = statement.split_whitespace();
                let mut cmd = redis::cmd(words.next().unwrap_or("PING"));
                for w in words {
                    cmd.arg(w);
                }
                cmd.query_async::<redis::Value>(c).await?;
            }
        }
        Ok(())
    }
}

/// Runs `f` with a client of `uri` on a runtime of its own (the tests are
/// synchronous).
pub fn with_client<T>(uri: &str, f: impl AsyncFnOnce(&mut Client) -> Result<T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = Client::connect(uri, Duration::from_secs(3)).await?;
        f(&mut c).await
    })
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Refused(m) | Failure::Broken(m) => m,
        }
    }
}

/// The connection strings Corral prints ask libpq for TLS verified against
/// the cluster CA (`sslmode=verify-ca&sslrootcert=...`), which
/// tokio-postgres cannot parse. The harness's own client speaks plaintext,
/// which clusters accept unless created with `--require-tls`; TLS itself is
/// shown with psql and the engines' own views (tests/tests/dbtls.rs).
fn without_libpq_tls(uri: &str) -> String {
    let Some((base, query)) = uri.split_once('?') else {
        return uri.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.starts_with("sslmode=") && !kv.starts_with("sslrootcert="))
        .collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn libpq_tls_settings_are_left_out_and_the_rest_kept() {
        assert_eq!(
            super::without_libpq_tls(
                "postgresql://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write&sslmode=verify-ca&sslrootcert=/x/ca.crt"
            ),
            "postgresql://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write"
        );
        assert_eq!(
            super::without_libpq_tls("postgresql://h/db?sslmode=verify-ca"),
            "postgresql://h/db"
        );
        assert_eq!(
            super::without_libpq_tls("postgresql://h/db"),
            "postgresql://h/db"
        );
    }
}
