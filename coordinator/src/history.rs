//! Metrics history per node: the last hour at the heartbeat's resolution
//! and the last 7 days in 5-minute buckets (average and maximum).
//!
//! Memory holds only what has not been written yet: each node's current
//! minute of samples and its current 5-minute bucket (a few KB per node).
//! A closed minute becomes one row of `raw` (its samples packed in a blob),
//! a closed bucket one row of `agg`; a writer task stores them every few
//! seconds in one transaction, in `metrics.db` beside the main store (its
//! own file and connection, so history never holds up heartbeats or
//! operations). A graceful stop writes the open minutes and buckets too;
//! a crash loses at most the last minute.
//!
//! Values are stored as f32: ample for gauges (byte counts keep 7
//! significant digits).

use anyhow::{Context, Result};
use corral_proto::pb;
use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// The series kept, in the order of [`Sample::v`].
pub const FIELDS: [&str; 10] = [
    "cpu_percent",
    "memory_used_bytes",
    "memory_total_bytes",
    "disk_used_bytes",
    "disk_total_bytes",
    "net_rx_bytes_per_sec",
    "net_tx_bytes_per_sec",
    "load1",
    "connections",
    "lag_seconds",
];
const N: usize = FIELDS.len();

const MINUTE_MS: i64 = 60_000;
/// Width of a downsampled bucket.
pub const BUCKET_MS: i64 = 5 * MINUTE_MS;
/// How far back samples at full resolution are kept.
pub const RAW_KEEP_MS: i64 = 65 * MINUTE_MS;
/// How far back downsampled buckets are kept.
pub const AGG_KEEP_MS: i64 = 7 * 24 * 3600 * 1000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at_ms: i64,
    pub v: [f32; N],
}

impl Sample {
    /// What a heartbeat reported.
    pub fn of(at_ms: i64, m: &pb::Metrics, engine: &pb::EngineStatus) -> Sample {
        let stat = |k: &str| engine.stats.get(k).copied().unwrap_or(0.0) as f32;
        Sample {
            at_ms,
            v: [
                m.cpu_percent as f32,
                m.memory_used_bytes as f32,
                m.memory_total_bytes as f32,
                m.disk_used_bytes as f32,
                m.disk_total_bytes as f32,
                m.net_rx_bytes_per_sec as f32,
                m.net_tx_bytes_per_sec as f32,
                m.load1 as f32,
                stat("connections"),
                stat("lag_seconds"),
            ],
        }
    }
}

/// A node's samples not yet written.
#[derive(Default)]
struct Open {
    minute_ms: i64,
    samples: Vec<Sample>,
    bucket: Bucket,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    start_ms: i64,
    n: u32,
    sum: [f64; N],
    max: [f32; N],
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            start_ms: 0,
            n: 0,
            sum: [0.0; N],
            max: [f32::MIN; N],
        }
    }
}

impl Bucket {
    fn add(&mut self, s: &Sample) {
        self.n += 1;
        for i in 0..N {
            self.sum[i] += f64::from(s.v[i]);
            self.max[i] = self.max[i].max(s.v[i]);
        }
    }

    /// The bucket's average as a sample at its start, and its maxima.
    fn point(&self) -> (Sample, [f32; N]) {
        let mut v = [0f32; N];
        for (i, x) in v.iter_mut().enumerate() {
            *x = (self.sum[i] / f64::from(self.n.max(1))) as f32;
        }
        (
            Sample {
                at_ms: self.start_ms,
                v,
            },
            self.max,
        )
    }

    /// Two parts of the same bucket (written before and after a restart).
    fn merge(&mut self, o: &Bucket) {
        self.n += o.n;
        for i in 0..N {
            self.sum[i] += o.sum[i];
            self.max[i] = self.max[i].max(o.max[i]);
        }
    }
}

enum Row {
    Raw {
        node: String,
        minute_ms: i64,
        samples: Vec<Sample>,
    },
    Agg {
        node: String,
        bucket: Bucket,
    },
}

/// A node's history over a window, as [`History::query`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The spacing of the points: the heartbeat interval's samples (0) or
    /// downsampled buckets ([`BUCKET_MS`]).
    pub resolution_ms: i64,
    pub points: Vec<Sample>,
    /// Per point, the bucket's maxima (downsampled series only).
    pub max: Vec<[f32; N]>,
}

pub struct History {
    db: Mutex<Connection>,
    open: Mutex<HashMap<String, Open>>,
    pending: Mutex<Vec<Row>>,
}

impl History {
    pub fn open(path: &Path) -> Result<History> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the metrics history {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS raw (node TEXT NOT NULL, minute_ms INTEGER NOT NULL,
                 samples BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS raw_by_node ON raw(node, minute_ms);
             CREATE TABLE IF NOT EXISTS agg (node TEXT NOT NULL, bucket_ms INTEGER NOT NULL,
                 n INTEGER NOT NULL, sum BLOB NOT NULL, max BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS agg_by_node ON agg(node, bucket_ms);",
        )
        .with_context(|| format!("preparing the metrics history {}", path.display()))?;
        Ok(History {
            db: Mutex::new(conn),
            open: Mutex::new(HashMap::new()),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Records a heartbeat's sample. Cheap: memory only.
    pub fn record(&self, node: &str, s: Sample) {
        let mut closed = Vec::new();
        {
            let mut open = lock(&self.open);
            let o = match open.get_mut(node) {
                Some(o) => o,
                None => open.entry(node.to_string()).or_default(),
            };
            let minute = s.at_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
            if minute != o.minute_ms && !o.samples.is_empty() {
                closed.push(Row::Raw {
                    node: node.to_string(),
                    minute_ms: o.minute_ms,
                    samples: std::mem::take(&mut o.samples),
                });
            }
            o.minute_ms = minute;
            o.samples.push(s);
            let bucket = s.at_ms.div_euclid(BUCKET_MS) * BUCKET_MS;
            if bucket != o.bucket.start_ms && o.bucket.n > 0 {
                closed.push(Row::Agg {
                    node: node.to_string(),
                    bucket: std::mem::take(&mut o.bucket),
                });
            }
            o.bucket.start_ms = bucket;
            o.bucket.add(&s);
        }
        if !closed.is_empty() {
            lock(&self.pending).append(&mut closed);
        }
    }

    /// Writes what is pending; with `everything`, the open minutes and
    /// buckets too (at shutdown). Returns the rows written.
    pub fn flush(&self, everything: bool) -> Result<usize> {
        if everything {
            let mut open = lock(&self.open);
            let mut pending = lock(&self.pending);
            for (node, o) in open.drain() {
                if !o.samples.is_empty() {
                    pending.push(Row::Raw {
                        node: node.clone(),
                        minute_ms: o.minute_ms,
                        samples: o.samples,
                    });
                }
                if o.bucket.n > 0 {
                    pending.push(Row::Agg {
                        node,
                        bucket: o.bucket,
                    });
                }
            }
        }
        let rows = std::mem::take(&mut *lock(&self.pending));
        if rows.is_empty() {
            return Ok(0);
        }
        let mut db = lock(&self.db);
        let tx = db.transaction()?;
        {
            let mut raw = tx.prepare_cached("INSERT INTO raw VALUES (?1, ?2, ?3)")?;
            let mut agg = tx.prepare_cached("INSERT INTO agg VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for row in &rows {
                match row {
                    Row::Raw {
                        node,
                        minute_ms,
                        samples,
                    } => {
                        raw.execute(params![node, minute_ms, pack(*minute_ms, samples)])?;
                    }
                    Row::Agg { node, bucket } => {
                        agg.execute(params![
                            node,
                            bucket.start_ms,
                            bucket.n,
                            pack_f64(&bucket.sum),
                            pack_f32(&bucket.max)
                        ])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(rows.len())
    }

    /// Deletes what is older than the windows kept.
    pub fn prune(&self, now_ms: i64) -> Result<()> {
        let db = lock(&self.db);
        db.execute(
            "DELETE FROM raw WHERE minute_ms < ?1",
            [now_ms - RAW_KEEP_MS],
        )?;
        db.execute(
            "DELETE FROM agg WHERE bucket_ms < ?1",
            [now_ms - AGG_KEEP_MS],
        )?;
        Ok(())
    }

    /// `node`'s samples since `since_ms`: at full resolution when the
    /// window fits in the last hour, else downsampled.
    pub fn query(&self, node: &str, since_ms: i64, now_ms: i64) -> Result<Series> {
        if now_ms - since_ms <= 60 * MINUTE_MS {
            self.query_raw(node, since_ms)
        } else {
            self.query_agg(node, since_ms)
        }
    }

    fn query_raw(&self, node: &str, since_ms: i64) -> Result<Series> {
        let mut points = Vec::new();
        {
            let db = lock(&self.db);
            let mut st = db.prepare_cached(
                "SELECT minute_ms, samples FROM raw WHERE node = ?1 AND minute_ms >= ?2",
            )?;
            let rows = st.query_map(
                params![node, since_ms.div_euclid(MINUTE_MS) * MINUTE_MS],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )?;
            for row in rows {
                let (minute, blob) = row?;
                points.extend(unpack(minute, &blob));
            }
        }
        for row in lock(&self.pending).iter() {
            if let Row::Raw {
                node: n, samples, ..
            } = row
            {
                if n == node {
                    points.extend_from_slice(samples);
                }
            }
        }
        if let Some(o) = lock(&self.open).get(node) {
            points.extend_from_slice(&o.samples);
        }
        points.retain(|s| s.at_ms >= since_ms);
        points.sort_by_key(|s| s.at_ms);
        points.dedup_by_key(|s| s.at_ms);
        Ok(Series {
            resolution_ms: 0,
            points,
            max: Vec::new(),
        })
    }

    fn query_agg(&self, node: &str, since_ms: i64) -> Result<Series> {
        let mut buckets: std::collections::BTreeMap<i64, Bucket> = Default::default();
        let mut add = |b: Bucket| {
            buckets
                .entry(b.start_ms)
                .and_modify(|x| x.merge(&b))
                .or_insert(b);
        };
        {
            let db = lock(&self.db);
            let mut st = db.prepare_cached(
                "SELECT bucket_ms, n, sum, max FROM agg WHERE node = ?1 AND bucket_ms >= ?2",
            )?;
            let rows = st.query_map(params![node, since_ms - BUCKET_MS], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })?;
            for row in rows {
                let (start_ms, n, sum, max) = row?;
                if let (Some(sum), Some(max)) = (unpack_f64(&sum), unpack_f32(&max)) {
                    add(Bucket {
                        start_ms,
                        n,
                        sum,
                        max,
                    });
                }
            }
        }
        for row in lock(&self.pending).iter() {
            if let Row::Agg { node: n, bucket } = row {
                if n == node {
                    add(*bucket);
                }
            }
        }
        if let Some(o) = lock(&self.open).get(node).filter(|o| o.bucket.n > 0) {
            add(o.bucket);
        }
        let (points, max) = buckets
            .values()
            .filter(|b| b.start_ms + BUCKET_MS > since_ms)
            .map(Bucket::point)
            .unzip();
        Ok(Series {
            resolution_ms: BUCKET_MS,
            points,
            max,
        })
    }
}

/// Writes pending rows every few seconds and prunes every minute, until
/// the task is dropped.
pub async fn run(history: std::sync::Arc<History>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last_prune = 0i64;
    loop {
        tick.tick().await;
        let h = history.clone();
        let result = tokio::task::spawn_blocking(move || {
            h.flush(false)?;
            let now = corral_proto::now_ms();
            if now - last_prune >= MINUTE_MS {
                h.prune(now)?;
                last_prune = now;
            }
            anyhow::Ok(last_prune)
        })
        .await;
        match result {
            Ok(Ok(p)) => last_prune = p,
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "metrics history: writing")
            }
            Err(e) => tracing::error!(error = %e, "metrics history: writer task"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Samples of one minute: per sample its offset in the minute (u32 ms)
/// and its values, little-endian.
fn pack(minute_ms: i64, samples: &[Sample]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * (4 + 4 * N));
    for s in samples {
        out.extend_from_slice(
            &((s.at_ms - minute_ms).clamp(0, i64::from(u32::MAX)) as u32).to_le_bytes(),
        );
        for x in s.v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

fn unpack(minute_ms: i64, blob: &[u8]) -> Vec<Sample> {
    blob.chunks_exact(4 + 4 * N)
        .map(|c| {
            let off = u32::from_le_bytes(c[..4].try_into().unwrap_or_default());
            let mut v = [0f32; N];
            for (i, x) in v.iter_mut().enumerate() {
                let at = 4 + 4 * i;
                *x = f32::from_le_bytes(c[at..at + 4].try_into().unwrap_or_default());
            }
            Sample {
                at_ms: minute_ms + i64::from(off),
                v,
            }
        })
        .collect()
}

fn pack_f32(v: &[f32; N]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pack_f64(v: &[f64; N]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn unpack_f32(b: &[u8]) -> Option<[f32; N]> {
    if b.len() != 4 * N {
        return None;
    }
    let mut v = [0f32; N];
    for (i, c) in b.chunks_exact(4).enumerate() {
        v[i] = f32::from_le_bytes(c.try_into().ok()?);
    }
    Some(v)
}

fn unpack_f64(b: &[u8]) -> Option<[f64; N]> {
    if b.len() != 8 * N {
        return None;
    }
    let mut v = [0f64; N];
    for (i, c) in b.chunks_exact(8).enumerate() {
        v[i] = f64::from_le_bytes(c.try_into().ok()?);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = corral_proto::unique_temp_dir(&format!("corral-history-{name}")).unwrap();
        dir.join("metrics.db")
    }

    fn s(at_ms: i64, cpu: f32) -> Sample {
        let mut v = [0f32; N];
        v[0] = cpu;
        v[1] = 3.0e9;
        Sample { at_ms, v }
    }

    #[test]
    fn packing_round_trips() {
        let samples = vec![s(60_000, 1.5), s(60_999, 99.0), s(119_999, 0.0)];
        assert_eq!(unpack(60_000, &pack(60_000, &samples)), samples);
        assert!(unpack(0, &[1, 2, 3]).is_empty());
        assert_eq!(unpack_f32(&[0; 3]), None);
    }

    #[test]
    fn the_last_hour_at_full_resolution_across_restart() {
        let path = tmp("raw");
        let t0 = 1_000 * MINUTE_MS;
        {
            let h = History::open(&path).unwrap();
            for i in 0..180 {
                h.record("vm1", s(t0 + i * 1000, i as f32));
                h.record("vm2", s(t0 + i * 1000, 1.0));
            }
            // Two closed minutes per node are pending, the third is open.
            assert_eq!(lock(&h.pending).len(), 4);
            let q = h.query("vm1", t0 + 30_000, t0 + 180_000).unwrap();
            assert_eq!(q.points.len(), 150, "pending and open samples count");
            assert_eq!(q.points[0], s(t0 + 30_000, 30.0));
            h.flush(false).unwrap();
            assert!(lock(&h.pending).is_empty());
            h.flush(true).unwrap(); // a graceful stop
        }
        let h = History::open(&path).unwrap();
        let q = h.query("vm1", t0, t0 + 180_000).unwrap();
        assert_eq!(q.resolution_ms, 0);
        assert_eq!(q.points.len(), 180);
        assert!(q.points.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
        assert_eq!(q.points[179], s(t0 + 179_000, 179.0));
        // Pruned after an hour and five minutes.
        h.prune(t0 + RAW_KEEP_MS + 2 * MINUTE_MS).unwrap();
        assert_eq!(
            h.query("vm1", t0, t0 + 180_000).unwrap().points.len(),
            60,
            "the third minute is still inside the window"
        );
    }

    #[test]
    fn days_are_downsampled_to_averages_and_maxima() {
        let path = tmp("agg");
        let h = History::open(&path).unwrap();
        let t0 = 10_000 * BUCKET_MS;
        // Three buckets: cpu 10 then 30 alternating, with one spike.
        for i in 0..(3 * 300) {
            let cpu = if i == 100 {
                100.0
            } else if i % 2 == 0 {
                10.0
            } else {
                30.0
            };
            h.record("vm1", s(t0 + i * 1000, cpu));
        }
        h.flush(true).unwrap();
        // A restart in the middle of the next bucket writes it in two parts.
        h.record("vm1", s(t0 + 3 * BUCKET_MS, 50.0));
        h.flush(true).unwrap();
        h.record("vm1", s(t0 + 3 * BUCKET_MS + 1000, 70.0));
        let now = t0 + 2 * 3_600_000;
        let q = h.query("vm1", now - 24 * 3_600_000, now).unwrap();
        assert_eq!(q.resolution_ms, BUCKET_MS);
        assert_eq!(q.points.len(), 4);
        assert_eq!(q.points[0].at_ms, t0);
        assert!((q.points[1].v[0] - 20.0).abs() < 0.01, "{:?}", q.points[1]);
        assert_eq!(q.max[0][0], 100.0);
        assert_eq!(q.max[1][0], 30.0);
        assert!((q.points[3].v[0] - 60.0).abs() < 0.01, "merged halves");
        h.prune(t0 + AGG_KEEP_MS + 2 * BUCKET_MS).unwrap();
        let q = h.query("vm1", t0 - 1, t0 + AGG_KEEP_MS).unwrap();
        assert_eq!(q.points.len(), 2, "the first two buckets expired");
    }
}
