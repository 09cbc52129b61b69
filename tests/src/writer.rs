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

use crate::client::Client;
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

async fn run(uri: &str, table: &str, every: Duration, stop: &AtomicBool, report: &Mutex<Report>) {
    let mut client: Option<Client> = None;
    let mut next_id: i64 = 1;
    let mut last_ack: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        let began = Instant::now();
        let outcome = async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = Some(Client::connect(uri, Duration::from_secs(2)).await?);
            }
            let c = client
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("no client"))?;
            let id = next_id;
            next_id += 1;
            tokio::time::timeout(Duration::from_secs(5), c.insert_now(table, "id", id))
                .await
                .map_err(|_| anyhow::anyhow!("insert timed out"))?
                .map_err(|f| anyhow::anyhow!("{}", f.message()))?;
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
