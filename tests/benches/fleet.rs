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
use corral_tests::{bin, sh};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HEARTBEAT: Duration = Duration::from_secs(1);
const LEASE_MS: u32 = 4000;
/// An agent gives up on a heartbeat after four intervals.
const GIVE_UP: Duration = Duration::from_secs(4);
const GIB: u64 = 1 << 30;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// A CA (`corralctl pki init`), then the store as it stands once
/// `clusters` clusters of three run: each node enrolled (its certificate's
/// fingerprint and expiry recorded, as enrollment does), assigned, and its
/// agent's address known.
/// Returns the nodes and the CA certificate.
fn prepare(dir: &Path, grpc: &str, clusters: usize) -> Result<(Vec<Node>, String)> {
    let pki_dir = dir.join("pki");
    sh(
        &bin("corralctl").to_string_lossy(),
        &[
            "pki",
            "init",
            "--dir",
            &pki_dir.to_string_lossy(),
            "--coordinator",
            grpc,
        ],
    )?;
    let ca = CertAuthority::load(&pki_dir)?;
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    let secrets = SecretBox::load_or_create(&state.join("secret.key"))?;
    let store = Store::open(&state.join("corral.db"))?;
    let mut nodes = Vec::with_capacity(clusters * 3);
    let now = corral_proto::now_ms();
    store.tx(|tx| {
        for c in 0..clusters {
            let name = format!("fleet-{c:03}");
            store::insert_cluster(
                tx,
                &ClusterRow {
                    name: name.clone(),
                    engine: "postgres".into(),
                    mode: "primary-replica".into(),
                    state: "running".into(),
                    port: 5432,
                    database: "defaultdb".into(),
                    admin_user: "admin".into(),
                    admin_password_enc: secrets.seal(&corral_proto::random_password(32)?)?,
                    created_at_ms: now,
                    sync: false,
                    termination_protection: false,
                    replication_password_enc: Some(
                        secrets.seal(&corral_proto::random_password(32)?)?,
                    ),
                    term: 1,
                    auto_failover: true,
                    lease_ms: LEASE_MS,
                    heartbeat_ms: HEARTBEAT.as_millis() as u32,
                    prev_lease_ms: 0,
                    lease_changed_at_ms: 0,
                    allowlist_version: 0,
                },
            )?;
            let ids: Vec<String> = (1..=3).map(|i| format!("{name}-{i}")).collect();
            for (i, id) in ids.iter().enumerate() {
                let (csr, key_pem) = pki::new_csr(id)?;
                let cert_pem = ca.sign_node_csr(&csr, id)?;
                store::insert_node(
                    tx,
                    id,
                    &pki::fingerprint_pem(&cert_pem)?,
                    pki::not_after_ms(&cert_pem)?,
                )?;
                let role = if i == 0 { "primary" } else { "replica" };
                store::assign_node(tx, id, &name, role)?;
                let index = nodes.len();
                let address = format!("10.77.{}.{}:7401", index / 250, index % 250 + 1);
                // As a previous run of the coordinator recorded it: the
                // bench starts like a restart under an established fleet,
                // not like 1,000 first heartbeats after enrollment (each
                // of which writes its address).
                store::set_node_address(tx, id, &address)?;
                nodes.push(Node {
                    cluster: name.clone(),
                    role,
                    primary: ids[0].clone(),
                    others: ids.iter().filter(|o| *o != id).cloned().collect(),
                    address,
                    cert: CertKey { cert_pem, key_pem },
                    // One node in 50, across clusters and roles.
                    hot: (index % 50 == 7).then_some(if index % 100 == 7 {
                        Hot::Critical
                    } else {
                        Hot::Warning
                    }),
                    index,
                });
            }
        }
        Ok(())
    })?;
    Ok((nodes, ca.cert_pem().to_string()))
}

fn start_coordinator(dir: &Path, grpc: &str, http: &str) -> Result<Child> {
    // The default rules; an empty file keeps /etc/corral/coordinator.toml
    // out of the bench.
    let config = dir.join("coordinator.toml");
    std::fs::write(&config, "")?;
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let program = bin("corral-coordinator");
    Command::new(&program)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--pki-dir")
        .arg(dir.join("pki"))
        .args(["--listen", grpc, "--http-listen", http, "--config"])
        .arg(&config)
        .env("CORRAL_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Waits until the coordinator answers `/healthz`.
async fn wait_ready(http: &str, child: &mut Child) -> Result<()> {
    let began = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the coordinator exited: {status}");
        }
        if let Ok(Ok(body)) =
            tokio::time::timeout(Duration::from_secs(1), get(http, "/healthz")).await
        {
            if body.starts_with("ok") {
                return Ok(());
            }
        }
        if began.elapsed() > Duration::from_secs(20) {
            bail!("the coordinator did not answer /healthz on {http} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The body of `GET path` (HTTP/1.0: no chunked encoding to undo).
async fn get(http: &str, path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("a non-UTF-8 answer")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("an HTTP answer without a body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// `/metrics`, and how long it took.
async fn scrape(http: &str) -> Result<(String, Duration)> {
    let began = Instant::now();
    let text = get(http, "/metrics").await?;
    Ok((text, began.elapsed()))
}

/// The value of the sample written exactly `key` (name and labels).
fn value(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// WARN and ERROR lines of the coordinator's log, except the alerts the
/// bench means to fire.
fn log_warnings(log: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(log)?;
    Ok(text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("alert firing"))
        .map(str::to_string)
        .collect())
}

/// One node's agent: a mutual-TLS channel with the node's certificate and
/// a heartbeat every second from `first`, each sent in a task of its own
/// as the real agent does (a slow answer never delays the next).
async fn agent(
    node: Arc<Node>,
    ca_pem: Arc<String>,
    grpc: String,
    first: tokio::time::Instant,
    recorder: Arc<Recorder>,
) {
    let tls = tls::client_config(&ca_pem, Some(&node.cert), pki::COORDINATOR_DNS);
    let channel = tls::channel(&grpc, tls, Duration::from_secs(5)).expect("a channel");
    let client = AgentUpcallsClient::new(channel);
    let mut tick = tokio::time::interval_at(first, HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (node.index as u64 + 1);
    loop {
        tick.tick().await;
        seq += 1;
        let request = report(&node, seq, &mut rng);
        let phase = recorder.phase.load(Relaxed);
        if phase == DONE {
            continue;
        }
        let (mut client, node, recorder) = (client.clone(), node.clone(), recorder.clone());
        tokio::spawn(async move {
            let tally = &recorder.tallies[phase as usize];
            tally.sent.fetch_add(1, Relaxed);
            let began = Instant::now();
            let answer = tokio::time::timeout(GIVE_UP, client.heartbeat(request)).await;
            let took = began.elapsed();
            match answer {
                Ok(Ok(resp)) => {
                    tally.ok.fetch_add(1, Relaxed);
                    let at = recorder.start.elapsed().as_millis() as u64 + 1;
                    let _ =
                        recorder.first_ok_ms[node.index].compare_exchange(0, at, Relaxed, Relaxed);
                    tally
                        .latencies_us
                        .lock()
                        .unwrap()
                        .push(took.as_micros().min(u32::MAX as u128) as u32);
                    let a = resp.into_inner().assignment;
                    match a {
                        Some(a) if a.role == node.role && a.cluster == node.cluster => {
                            if node.role == "primary" && a.lease_ms == 0 {
                                tally.primary_without_lease.fetch_add(1, Relaxed);
                            }
                        }
                        _ => {
                            tally.wrong_assignment.fetch_add(1, Relaxed);
                        }
                    }
                }
                Ok(Err(status)) => {
                    let key = format!("{:?}: {}", status.code(), status.message());
                    *tally.errors.lock().unwrap().entry(key).or_default() += 1;
                }
                Err(_) => {
                    let key = format!("no answer within {} ms", GIVE_UP.as_millis());
                    *tally.errors.lock().unwrap().entry(key).or_default() += 1;
                }
            }
        });
    }
}

/// A pseudo-random number in [0, 1) (xorshift64).
fn rand(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// Heartbeat number `seq` of `node`: what an agent of a healthy PostgreSQL
/// member sends (the fields the coordinator reads: metrics, the engine's
/// state, role and replication, the lease, engine stats).
fn report(node: &Node, seq: u64, rng: &mut u64) -> pb::HeartbeatRequest {
    let mut r = || rand(rng);
    let (cpu, disk_used) = match node.hot {
        None => (5.0 + 25.0 * r(), 40 * GIB + (r() * GIB as f64) as u64),
        Some(Hot::Critical) => (95.0 + 3.0 * r(), 97 * GIB),
        Some(Hot::Warning) => (95.0 + 3.0 * r(), 90 * GIB),
    };
    let metrics = pb::Metrics {
        cpu_percent: cpu,
        memory_used_bytes: 2 * GIB + (r() * 2.0 * GIB as f64) as u64,
        memory_total_bytes: 8 * GIB,
        disk_used_bytes: disk_used,
        disk_total_bytes: 100 * GIB,
        net_rx_bytes_per_sec: 50_000.0 + 450_000.0 * r(),
        net_tx_bytes_per_sec: 50_000.0 + 450_000.0 * r(),
        load1: 0.2 + 1.3 * r(),
        load5: 0.5,
        load15: 0.5,
    };
    // WAL advances 64 KiB a second; replicas trail by a few KiB.
    let lsn = 0x0300_0000 + seq * 65_536;
    let primary = node.role == "primary";
    let mut stats = HashMap::from([("connections".to_string(), (10.0 + 40.0 * r()).round())]);
    let replication = if primary {
        pb::Replication {
            in_recovery: false,
            lsn,
            timeline: 1,
            system_identifier: format!("74{:015}", node.index / 3),
            standbys: node
                .others
                .iter()
                .map(|s| pb::Standby {
                    name: s.clone(),
                    state: "streaming".into(),
                    sent_lsn: lsn,
                    flush_lsn: lsn - 512,
                    replay_lsn: lsn - 1024,
                    replay_lag_ms: 1,
                    sync_state: "async".into(),
                })
                .collect(),
            ..Default::default()
        }
    } else {
        stats.insert("lag_seconds".into(), (r() * 0.5 * 1000.0).round() / 1000.0);
        pb::Replication {
            in_recovery: true,
            lsn: lsn - 1024,
            receive_lsn: lsn - 512,
            timeline: 1,
            system_identifier: format!("74{:015}", node.index / 3),
            streaming: true,
            upstream_host: format!("{}.node.corral", node.primary),
            upstream_lsn: lsn,
            ..Default::default()
        }
    };
    let lease = if primary {
        pb::LeaseStatus {
            held: true,
            remaining_ms: LEASE_MS - 1000,
            source: "coordinator".into(),
            ..Default::default()
        }
    } else {
        pb::LeaseStatus {
            confirmed_primary: node.primary.clone(),
            confirmation_remaining_ms: LEASE_MS,
            ..Default::default()
        }
    };
    pb::HeartbeatRequest {
        agent_address: node.address.clone(),
        interval_ms: HEARTBEAT.as_millis() as u32,
        metrics: Some(metrics),
        engine: Some(pb::EngineStatus {
            engine: "postgres".into(),
            cluster: node.cluster.clone(),
            state: pb::EngineState::Running as i32,
            role: node.role.into(),
            pid: 10_000 + node.index as u32,
            port: 5432,
            version: "15.14".into(),
            healthy: true,
            replication: Some(replication),
            term: 1,
            upstream: if primary {
                String::new()
            } else {
                node.primary.clone()
            },
            lease: Some(lease),
            checked_age_ms: 3,
            stats,
            ..Default::default()
        }),
        events: Vec::new(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}
