//! A client that inserts a row every few milliseconds and records which
//! inserts the server acknowledged, to check that a switchover loses none and
//! to measure how long writes were refused.
//!
//! It connects with the cluster's multi-host connection string
//! (`target_session_attrs=read-write`), as an application would, so after a
//! switchover it finds the new primary by itself; a `mysql://` URI (one
//! host: HAProxy's, for MariaDB) is written to with mysql_async. An insert that fails is not
//! counted as acknowledged (its outcome is unknown to the client); the next
//! one uses a new id.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the writer saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Ids of acknowledged inserts, in order.
    pub acked: Vec<i64>,
    /// Inserts (or connection attempts) that failed.
    pub errors: u64,
    /// Longest time between two acknowledged inserts: the write
    /// unavailability window, when the writer was otherwise steady.
    pub longest_gap: Duration,
    /// The last error message seen, for diagnosis.
    pub last_error: String,
}

pub struct Writer {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts inserting `(id, at)` into `table` (which must exist) every
    /// `every`, through `uri`.
    pub fn start(uri: &str, table: &str, every: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let (uri, table) = (uri.to_string(), table.to_string());
        let (s, r) = (stop.clone(), report.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(run(&uri, &table, every, &s, &r));
        });
        Writer {
            stop,
            report,
            thread: Some(thread),
        }
    }

    /// A copy of the report so far.
    pub fn report(&self) -> Report {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops and returns the final report.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report()
    }

    /// The longest gap between acknowledgements since the writer started,
    /// resetting it (to measure one event at a time).
    pub fn take_longest_gap(&self) -> Duration {
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut r.longest_gap)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn connect(uri: &str) -> Result<tokio_postgres::Client> {
    let mut config: tokio_postgres::Config = uri.parse()?;
    config.connect_timeout(Duration::from_secs(2));
    let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A connection to either engine: the URI's scheme says which.
enum Client {
    Postgres(tokio_postgres::Client),
    Mysql(mysql_async::Conn),
}

impl Client {
    async fn connect(uri: &str) -> Result<Client> {
        if uri.starts_with("mysql://") {
            let opts = mysql_async::Opts::from_url(uri)?;
            let conn = tokio::time::timeout(Duration::from_secs(2), mysql_async::Conn::new(opts))
                .await
                .map_err(|_| anyhow::anyhow!("connect timed out"))??;
            Ok(Client::Mysql(conn))
        } else {
            Ok(Client::Postgres(connect(uri).await?))
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Client::Postgres(c) => c.is_closed(),
            Client::Mysql(_) => false,
        }
    }

    /// Inserts `(id, now())` into `table`; Ok once the server acknowledged
    /// the commit.
    async fn insert(&mut self, table: &str, id: i64) -> Result<()> {
        match self {
            Client::Postgres(c) => {
                let sql = format!("INSERT INTO {table} (id, at) VALUES ($1, now())");
                c.execute(&sql, &[&id]).await?;
            }
            Client::Mysql(c) => {
                use mysql_async::prelude::Queryable;
                let sql = format!("INSERT INTO {table} (id, at) VALUES (?, now())");
                c.exec_drop(sql, (id,)).await?;
            }
        }
        Ok(())
    }
}

async fn run(uri: &str, table: &str, every: Duration, stop: &AtomicBool, report: &Mutex<Report>) {
    let mut client: Option<Client> = None;
    let mut next_id: i64 = 1;
    let mut last_ack: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        let began = Instant::now();
        let outcome = async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = Some(Client::connect(uri).await?);
            }
            let c = client
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("no client"))?;
            let id = next_id;
            next_id += 1;
            tokio::time::timeout(Duration::from_secs(5), c.insert(table, id))
                .await
                .map_err(|_| anyhow::anyhow!("insert timed out"))??;
            Ok::<i64, anyhow::Error>(id)
        }
        .await;
        let now = Instant::now();
        {
            let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
            match outcome {
                Ok(id) => {
                    if let Some(prev) = last_ack {
                        r.longest_gap = r.longest_gap.max(now - prev);
                    }
                    last_ack = Some(now);
                    r.acked.push(id);
                }
                Err(e) => {
                    r.errors += 1;
                    r.last_error = format!("{e:#}");
                    client = None;
                }
            }
        }
        tokio::time::sleep(every.saturating_sub(began.elapsed())).await;
    }
}
