//! Fleet: the coordinator's CPU and memory with 1,000 nodes heartbeating
//! every second, the round trip of those heartbeats, and the time one
//! alert evaluation takes over that fleet.
//!
//! No agent or engine runs. The bench writes the store the way `corralctl
//! cluster create` leaves it once the clusters run (333 PostgreSQL
//! primary-replica clusters of three nodes, each node enrolled with a
//! certificate signed by the CA), starts the real coordinator on loopback,
//! and plays every node's agent in this process: one mutual-TLS channel per
//! node with its own certificate, a heartbeat every second (first ones
//! spread over a second) carrying metrics and a healthy engine's status (a
//! primary streaming to both replicas), so the failover monitor judges
//! every cluster healthy and never calls an agent. One node in 50 reports
//! CPU at 95 % and a nearly full disk (half above the critical threshold,
//! half above the warning one), so the alert rules have work to do.
//!
//! The clusters run with a 1 s heartbeat and a 4 s lease (`cluster set C
//! heartbeat=1000 lease=4000`: the default ratio of four heartbeats per
//! lease at the bench's pace).
//!
//! Run with `make bench` (release binaries). `CORRAL_BENCH_NODES` (default
//! 1000), `CORRAL_BENCH_WARMUP` (s, default 15) and `CORRAL_BENCH_SECONDS`
//! (the measured window, default 60) change the run. Exits non-zero when
//! the setup fails, when the coordinator started any operation (a failover
//! or rejoin would mean the simulation is not a healthy fleet), or when the
//! expected alerts did not fire; asserts nothing about speed.

use anyhow::{bail, Context, Result};
use corral_coordinator::secrets::SecretBox;
use corral_coordinator::store::{self, ClusterRow, Store};
use corral_proto::pb::agent_upcalls_client::AgentUpcallsClient;
use corral_proto::pki::{self, CertAuthority, CertKey};
use corral_proto::{pb, tls};
use corral_tests::procstat::{clock_ticks, cpu_ticks, status_kib};
use corral_tests::{bin, env_num, sh};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "fleet/agent.rs"]
mod agent;
#[path = "fleet/scrape.rs"]
mod scrape;
#[path = "fleet/setup.rs"]
mod setup;
use agent::*;
use scrape::*;
use setup::*;

const HEARTBEAT: Duration = Duration::from_secs(1);
const LEASE_MS: u32 = 4000;
/// An agent gives up on a heartbeat after four intervals.
const GIVE_UP: Duration = Duration::from_secs(4);
const GIB: u64 = 1 << 30;

fn main() -> ExitCode {
    // `cargo bench` passes --bench; nothing else to parse.
    tls::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What a simulated node reports, fixed at setup.
struct Node {
    cluster: String,
    role: &'static str,
    /// The primary of its cluster (a replica's upstream).
    primary: String,
    /// The other members (a primary's standbys).
    others: Vec<String>,
    /// Its fake agent address (never called: no operation runs).
    address: String,
    cert: CertKey,
    hot: Option<Hot>,
    index: usize,
}

#[derive(Clone, Copy)]
enum Hot {
    /// Disk above `disk_critical_percent` (95 by default).
    Critical,
    /// Disk above `disk_warning_percent` (85 by default).
    Warning,
}

/// The coordinator process and the bench's directory; both go away on
/// drop (the directory stays when the bench failed, for its log).
struct Guard {
    child: Option<Child>,
    dir: PathBuf,
    keep: bool,
}

impl Guard {
    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// SIGTERM, so the coordinator writes its open metrics history.
    fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            sh("kill", &["-TERM", &c.id().to_string()])?;
            let began = Instant::now();
            while c.try_wait()?.is_none() {
                if began.elapsed() > Duration::from_secs(20) {
                    c.kill()?;
                    bail!("the coordinator did not stop within 20 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.keep {
            eprintln!("kept {} (coordinator.log)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Counts of one phase (warm-up or window) as the simulated agents saw them.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    /// Answers whose assignment was not the role of record (a failover
    /// moved it, or the node was not found).
    wrong_assignment: AtomicU64,
    /// Answers to a primary that carried no lease: the coordinator did not
    /// see it as a healthy primary.
    primary_without_lease: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    latencies_us: Mutex<Vec<u32>>,
}

/// Which [`Tally`] a heartbeat counts in: by when it was sent.
struct Recorder {
    phase: AtomicU8,
    tallies: [Tally; 2],
    /// Per node: when its first heartbeat was answered, in ms after the
    /// first one was sent, plus one (0: not yet). A coordinator that
    /// (re)starts with a whole fleet reconnecting pays every TLS handshake
    /// at once; a node not heard within three intervals is called down.
    first_ok_ms: Vec<AtomicU64>,
    start: tokio::time::Instant,
}

const WARMUP: u8 = 0;
const WINDOW: u8 = 1;
const DONE: u8 = 2;

async fn run() -> Result<()> {
    let nodes_wanted = env_num("CORRAL_BENCH_NODES", 1000).max(3) as usize;
    let warmup = Duration::from_secs(env_num("CORRAL_BENCH_WARMUP", 15));
    let window = Duration::from_secs(env_num("CORRAL_BENCH_SECONDS", 60).max(1));
    let clusters = nodes_wanted / 3;
    println!(
        "binaries: {}",
        bin("corral-coordinator").parent().unwrap().display()
    );
    let dir = std::env::temp_dir().join(format!("corral-bench-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut guard = Guard {
        child: None,
        dir: dir.clone(),
        keep: true,
    };
    let grpc = format!("127.0.0.1:{}", free_port()?);
    let http = format!("127.0.0.1:{}", free_port()?);

    let began = Instant::now();
    let (nodes, ca_pem) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        let grpc = grpc.clone();
        move || prepare(&dir, &grpc, clusters)
    })
    .await??;
    let nodes: Vec<Arc<Node>> = nodes.into_iter().map(Arc::new).collect();
    println!(
        "setup: {} clusters, {} nodes enrolled with certificates, in {:.1} s",
        clusters,
        nodes.len(),
        began.elapsed().as_secs_f64()
    );

    guard.child = Some(start_coordinator(&dir, &grpc, &http)?);
    let pid = guard.pid();
    wait_ready(&http, guard.child.as_mut().unwrap()).await?;

    // The agents, first heartbeats spread over the first second.
    let n = nodes.len();
    let start = tokio::time::Instant::now();
    let recorder = Arc::new(Recorder {
        phase: AtomicU8::new(WARMUP),
        tallies: Default::default(),
        first_ok_ms: (0..n).map(|_| AtomicU64::new(0)).collect(),
        start,
    });
    let ca_pem = Arc::new(ca_pem);
    let agents: Vec<_> = nodes
        .iter()
        .map(|node| {
            let at = start + HEARTBEAT * node.index as u32 / n as u32;
            tokio::spawn(agent(
                node.clone(),
                ca_pem.clone(),
                grpc.clone(),
                at,
                recorder.clone(),
            ))
        })
        .collect();

    tokio::time::sleep(warmup).await;
    let hz = clock_ticks();
    let me = std::process::id() as i32;
    let (m0, _) = scrape(&http).await?;
    recorder.phase.store(WINDOW, Relaxed);
    let t0 = Instant::now();
    let (c0, b0) = (cpu_ticks(pid), cpu_ticks(me));
    let mut rss = Vec::new();
    while t0.elapsed() < window {
        rss.push(status_kib(pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    recorder.phase.store(DONE, Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let coord_cpu = (cpu_ticks(pid) - c0) as f64 / hz;
    let bench_cpu = (cpu_ticks(me) - b0) as f64 / hz;
    let hwm = status_kib(pid, "VmHWM:");
    let (m1, _) = scrape(&http).await?;
    // A few more scrapes, for their cost.
    let mut scrapes = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let (text, took) = scrape(&http).await?;
        size = text.len();
        scrapes.push(took.as_secs_f64() * 1000.0);
    }
    // The coordinator stops before the agents do: agents going silent
    // under a running coordinator would be judged down and failed over.
    guard.stop()?;
    for a in &agents {
        a.abort();
    }

    let w = &recorder.tallies[WINDOW as usize];
    let mut lat = std::mem::take(&mut *w.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(f64::NAN, |us| *us as f64 / 1000.0)
    };
    rss.sort_unstable();
    let metric = |m: &str, key: &str| value(m, key).unwrap_or(f64::NAN);
    let delta = |key: &str| metric(&m1, key) - metric(&m0, key);
    let evaluations = delta("corral_coordinator_alert_evaluations_total");
    let eval_seconds = delta("corral_coordinator_alert_evaluation_seconds_total");
    let served = delta("corral_coordinator_heartbeats_total");
    scrapes.sort_by(f64::total_cmp);

    // What the coordinator recorded.
    let (operations, events, alerts) = {
        let s = Store::open(&dir.join("state/corral.db"))?;
        s.read(|c| {
            Ok((
                store::list_operations(c, None)?,
                store::events_after(c, 0, 1_000_000)?,
                store::alert_history(c, None, u32::MAX)?,
            ))
        })?
    };
    let mut event_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        *event_kinds.entry(e.kind.as_str()).or_default() += 1;
    }
    let mut alert_names: BTreeMap<String, usize> = BTreeMap::new();
    for a in &alerts {
        *alert_names
            .entry(format!("{} {}", a.alert.name, a.state))
            .or_default() += 1;
    }
    let history = file_size(&dir.join("state/metrics.db"));
    let history_wal = file_size(&dir.join("state/metrics.db-wal"));
    let warnings = log_warnings(&dir.join("coordinator.log"))?;
    let errors: BTreeMap<String, u64> = w.errors.lock().unwrap().clone();
    let error_count: u64 = errors.values().sum();
    let mut first: Vec<u64> = recorder
        .first_ok_ms
        .iter()
        .map(|a| a.load(Relaxed))
        .collect();
    let never = first.iter().filter(|t| **t == 0).count();
    first.retain(|t| *t > 0);
    first.sort_unstable();
    let warm = &recorder.tallies[WARMUP as usize];
    let warm_errors: u64 = warm.errors.lock().unwrap().values().sum();

    println!(
        "coordinator with {} simulated nodes ({clusters} PostgreSQL clusters of 3), a heartbeat \
         every {} ms each, {} s warm-up, measured over {elapsed:.1} s:",
        n,
        HEARTBEAT.as_millis(),
        warmup.as_secs()
    );
    println!(
        "  coordinator   CPU {:.1}% of one core ({coord_cpu:.1} s in {elapsed:.1} s); RSS median {:.1} MiB, \
         max {:.1} MiB, peak (VmHWM) {:.1} MiB",
        100.0 * coord_cpu / elapsed,
        rss[rss.len() / 2] as f64 / 1024.0,
        *rss.last().unwrap() as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "  heartbeats    {:.0}/s answered ({} sent, {} ok, {error_count} errors; coordinator counted \
         {:.0}/s); {} errors during warm-up",
        w.ok.load(Relaxed) as f64 / elapsed,
        w.sent.load(Relaxed),
        w.ok.load(Relaxed),
        served / elapsed,
        warm_errors
    );
    println!(
        "  first answer  median {:.2} s, last {:.2} s after the first heartbeat was sent \
         (all {n} connecting at once over 1 s; {never} never answered)",
        first
            .get(first.len() / 2)
            .map_or(f64::NAN, |t| *t as f64 / 1000.0),
        first.last().map_or(f64::NAN, |t| *t as f64 / 1000.0),
    );
    println!(
        "  round trip    p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms (as the agents see it)",
        pct(0.50),
        pct(0.95),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "  alert rules   {:.0} evaluations, mean {:.2} ms, last {:.2} ms; firing: {:.0} critical, \
         {:.0} warning",
        evaluations,
        1000.0 * eval_seconds / evaluations,
        1000.0 * metric(&m1, "corral_coordinator_last_alert_evaluation_seconds"),
        metric(&m1, "corral_alerts_firing{severity=\"critical\"}"),
        metric(&m1, "corral_alerts_firing{severity=\"warning\"}"),
    );
    println!(
        "  /metrics      {:.0} KiB, scrape median {:.1} ms, max {:.1} ms",
        size as f64 / 1024.0,
        scrapes[scrapes.len() / 2],
        scrapes.last().unwrap()
    );
    println!(
        "  history       metrics.db {:.1} MiB (+ WAL {:.1} MiB) after {:.0} s",
        history as f64 / (1024.0 * 1024.0),
        history_wal as f64 / (1024.0 * 1024.0),
        (warmup.as_secs_f64() + elapsed)
    );
    println!(
        "  this process  (the {n} simulated agents) CPU {:.1}% of one core",
        100.0 * bench_cpu / elapsed
    );
    println!(
        "  record        operations {}, events {:?}, alerts {:?}",
        operations.len(),
        event_kinds,
        alert_names
    );
    println!(
        "  sanity        wrong assignments {}, primaries answered without a lease {}, \
         coordinator warnings {}",
        w.wrong_assignment.load(Relaxed),
        w.primary_without_lease.load(Relaxed),
        warnings.len()
    );
    for (e, count) in &errors {
        println!("    error x{count}: {e}");
    }
    for line in warnings.iter().take(5) {
        println!("    log: {line}");
    }

    let mut failures = Vec::new();
    if !operations.is_empty() {
        for o in operations.iter().take(5) {
            println!(
                "    operation {} {} on {}: {} {}",
                o.id, o.kind, o.cluster, o.state, o.params
            );
        }
        failures.push(format!(
            "the coordinator started {} operations: the simulated fleet was not healthy",
            operations.len()
        ));
    }
    let hot_critical = nodes
        .iter()
        .filter(|n| matches!(n.hot, Some(Hot::Critical)))
        .count();
    let critical = metric(&m1, "corral_alerts_firing{severity=\"critical\"}");
    if hot_critical > 0 && (critical.is_nan() || critical < 1.0) {
        failures.push("no critical alert fired for the nodes with a full disk".into());
    }
    if w.wrong_assignment.load(Relaxed) > 0 {
        failures.push("some heartbeats were answered with another role than the store's".into());
    }
    if w.ok.load(Relaxed) == 0 {
        failures.push("no heartbeat was answered".into());
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    guard.keep = false;
    Ok(())
}
