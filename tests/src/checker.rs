//! A split-brain detector: writes to every node of a cluster directly and
//! at the same time, every ~50 ms, and reports any moment at which two
//! nodes both acknowledged a write.
//!
//! The [`crate::writer::Writer`] goes through the multi-host connection
//! string and so only ever talks to one node; it proves no acknowledged row
//! is lost, but would not notice an old primary that still accepts writes
//! next to the new one. This checker holds a connection to each node alone
//! and, each round, inserts `(node, now())` into every node concurrently.
//! A replica refuses (read-only); an unreachable node fails. Only an
//! acknowledged insert counts as a success, because only then do we know
//! the node committed it (a timed-out insert may or may not have).
//!
//! Two successes on different nodes are a violation when
//! - their intervals overlap: each insert committed somewhere between its
//!   start (the statement being sent) and its end (the acknowledgement), so
//!   overlapping intervals mean both nodes may have been writable at the
//!   same instant; or
//! - they are in the same round, even if the scheduler happened to record
//!   them one after the other.
//!
//! A clean failover is one node's successes, then a gap of failures, then
//! another node's successes. The checker only sees what the test process
//! can reach: a node cut off from the host by [`Lab::isolate`] cannot be
//! probed, so tests partition with [`Lab::cut`] when they want the checker
//! to keep watching both sides.
//!
//! [`Lab::isolate`]: crate::Lab::isolate
//! [`Lab::cut`]: crate::Lab::cut

use crate::client::{Client, Failure};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time between the starts of two rounds.
pub const ROUND: Duration = Duration::from_millis(50);
/// A (re)connection, TCP and authentication, must finish within this: a
/// node that takes longer is as good as down for a primary's clients, and
/// waiting longer would leave it unprobed for rounds on end.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// An insert must be acknowledged within this, or it counts as failed
/// (outcome unknown) and the connection is replaced.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_millis(300);

/// One insert attempt on one node.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The node id the URI was given under.
    pub node: String,
    /// Which round it belongs to: rounds start every [`ROUND`] and every
    /// node is probed at the start of each (a node whose probe hangs skips
    /// the rounds it missed).
    pub round: u64,
    /// When the insert was sent (after any reconnection: connecting is not
    /// writing, and counting it would widen the interval and report a
    /// quick clean hand-over as an overlap).
    pub start: Instant,
    /// When it was acknowledged, failed or timed out.
    pub end: Instant,
    /// Acknowledged: the node committed the row.
    pub ok: bool,
}

/// What the checker saw.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Probes per node (every node given to [`WriteChecker::start`] is a
    /// key once the checker ran one round).
    pub probes: BTreeMap<String, u64>,
    /// Acknowledged inserts per node.
    pub successes: BTreeMap<String, u64>,
    /// The last error each node gave, for diagnosis.
    pub last_error: BTreeMap<String, String>,
    /// Every probe, in the order they finished.
    pub log: Vec<Probe>,
}

impl CheckReport {
    /// One report of several checkers' probes (their rounds kept apart:
    /// only overlapping times then count as violations between them).
    pub fn merged(reports: &[CheckReport]) -> CheckReport {
        let log = reports
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.log.iter().cloned().map(move |mut p| {
                    p.round += (i as u64) << 40;
                    p
                })
            })
            .collect();
        CheckReport::from_probes(log)
    }

    /// A report of `log` alone (counts derived from it).
    pub fn from_probes(log: Vec<Probe>) -> CheckReport {
        let mut r = CheckReport::default();
        for p in log {
            r.record(p, None);
        }
        r
    }

    fn record(&mut self, p: Probe, error: Option<String>) {
        *self.probes.entry(p.node.clone()).or_default() += 1;
        let successes = self.successes.entry(p.node.clone()).or_default();
        if p.ok {
            *successes += 1;
        }
        if let Some(e) = error {
            self.last_error.insert(p.node.clone(), e);
        }
        self.log.push(p);
    }

    /// Every pair of acknowledged inserts on different nodes that overlap
    /// in time or share a round, described with times relative to the
    /// first probe. Empty: no two nodes were ever writable together, as far
    /// as the probes can tell.
    pub fn violations(&self) -> Vec<String> {
        let Some(t0) = self.log.iter().map(|p| p.start).min() else {
            return Vec::new();
        };
        let mut ok: Vec<&Probe> = self.log.iter().filter(|p| p.ok).collect();
        ok.sort_by_key(|p| (p.start, p.end));
        // Pairs (i, j), i < j, with the reasons each was flagged.
        let mut pairs: BTreeMap<(usize, usize), BTreeSet<&str>> = BTreeMap::new();
        for i in 0..ok.len() {
            // Sorted by start: once a probe starts after i ended, neither it
            // nor any later one overlaps i.
            for j in i + 1..ok.len() {
                if ok[j].start > ok[i].end {
                    break;
                }
                if ok[j].node != ok[i].node {
                    pairs.entry((i, j)).or_default().insert("overlapping");
                }
            }
        }
        let mut by_round: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, p) in ok.iter().enumerate() {
            by_round.entry(p.round).or_default().push(i);
        }
        for idx in by_round.values() {
            for (n, &i) in idx.iter().enumerate() {
                for &j in &idx[n + 1..] {
                    if ok[i].node != ok[j].node {
                        let key = (i.min(j), i.max(j));
                        pairs.entry(key).or_default().insert("same round");
                    }
                }
            }
        }
        let at = |p: &Probe| {
            format!(
                "{} acked a write in round {} at +{:.3}s..+{:.3}s",
                p.node,
                p.round,
                (p.start - t0).as_secs_f64(),
                (p.end - t0).as_secs_f64()
            )
        };
        pairs
            .into_iter()
            .map(|((i, j), why)| {
                let why: Vec<&str> = why.into_iter().collect();
                format!(
                    "split brain ({}): {} and {}",
                    why.join(", "),
                    at(ok[i]),
                    at(ok[j])
                )
            })
            .collect()
    }
}

/// The running checker; [`WriteChecker::finish`] stops it.
pub struct WriteChecker {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<CheckReport>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriteChecker {
    /// Starts probing: `uris` are (node id, connection string reaching that
    /// node alone, as [`crate::Lab::node_uri`] makes), `table` a table with
    /// columns `node text` and `at timestamptz` that the test created
    /// beforehand on the cluster (it reaches the replicas by replication).
    pub fn start(uris: Vec<(String, String)>, table: &str) -> WriteChecker {
        Self::start_in(None, uris, table)
    }

    /// [`WriteChecker::start`] from inside network namespace `netns` (its
    /// full name, e.g. `crl3-vm1`): with a URI to 127.0.0.1 it probes a
    /// node from the node itself, which no network cut can hide.
    pub fn start_in(
        netns: Option<String>,
        uris: Vec<(String, String)>,
        table: &str,
    ) -> WriteChecker {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(CheckReport::default()));
        let table = table.to_string();
        let (s, r) = (stop.clone(), report.clone());
        // Its own thread and current-thread runtime, as the writer: the
        // tests themselves are synchronous.
        let thread = std::thread::spawn(move || {
            if let Some(ns) = netns {
                // Sockets opened by this thread from here on live in `ns`.
                let f = std::fs::File::open(format!("/var/run/netns/{ns}"))
                    .unwrap_or_else(|e| panic!("opening namespace {ns}: {e}"));
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("entering namespace {ns}: {e}"));
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(run(uris, table, s, r));
        });
        WriteChecker {
            stop,
            report,
            thread: Some(thread),
        }
    }

    /// A copy of the report so far (to wait for a node's first success).
    pub fn report(&self) -> CheckReport {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops (within a round and the timeouts of a probe in flight) and
    /// returns the final report.
    pub fn finish(mut self) -> CheckReport {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report()
    }
}

impl Drop for WriteChecker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One probe of one node: reconnects if needed, inserts, and hands back the
/// connection if it is still good.
async fn probe(
    node: String,
    uri: &str,
    table: &str,
    client: Option<Client>,
    round: u64,
) -> (Option<Client>, Probe, Option<String>) {
    let mut client = match client.filter(|c| !c.is_closed()) {
        Some(c) => c,
        None => match Client::connect(uri, CONNECT_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => {
                let now = Instant::now();
                let p = Probe {
                    node,
                    round,
                    start: now,
                    end: now,
                    ok: false,
                };
                return (None, p, Some(format!("connecting: {e:#}")));
            }
        },
    };
    let start = Instant::now();
    let outcome = tokio::time::timeout(
        STATEMENT_TIMEOUT,
        client.insert_now(table, "node", node.clone()),
    )
    .await;
    let end = Instant::now();
    let (keep, error) = match outcome {
        Ok(Ok(())) => (true, None),
        // The server refused (a replica is read-only): the connection is
        // fine, keep it so the next probe costs no authentication.
        Ok(Err(Failure::Refused(e))) => (true, Some(e)),
        Ok(Err(Failure::Broken(e))) => (false, Some(e)),
        // The insert may still be running, or commit later: drop the
        // connection rather than queue the next probe behind it.
        Err(_) => (
            false,
            Some(format!("insert timed out after {STATEMENT_TIMEOUT:?}")),
        ),
    };
    let p = Probe {
        node,
        round,
        start,
        end,
        ok: error.is_none(),
    };
    (keep.then_some(client), p, error)
}

async fn run(
    uris: Vec<(String, String)>,
    table: String,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<CheckReport>>,
) {
    // One task per node, all ticking on the same clock: each tick is a
    // round and every node is probed at its start, concurrently. A node
    // whose probe hangs (cut off: up to the connect plus statement
    // timeouts) skips the ticks it missed instead of delaying the others,
    // so the nodes that answer keep being probed every 50 ms.
    let t0 = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (node, uri) in uris {
        let (table, stop, report) = (table.clone(), stop.clone(), report.clone());
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval_at(t0, ROUND);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut client = None;
            loop {
                let tick = ticks.tick().await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let round = ((tick - t0).as_nanos() / ROUND.as_nanos()) as u64;
                let (kept, p, error) =
                    probe(node.clone(), &uri, &table, client.take(), round).await;
                client = kept;
                report
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(p, error);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe of `node` in `round` from `start` to `end` ms after `t0`.
    fn p(t0: Instant, node: &str, round: u64, start: u64, end: u64, ok: bool) -> Probe {
        Probe {
            node: node.into(),
            round,
            start: t0 + Duration::from_millis(start),
            end: t0 + Duration::from_millis(end),
            ok,
        }
    }

    #[test]
    fn a_clean_hand_over_is_no_violation() {
        let t0 = Instant::now();
        let mut log = Vec::new();
        for r in 0..20u64 {
            let s = r * 50;
            // vm1 is primary for rounds 0-7 and vm2 from round 8 on: the
            // tightest hand-over the checker can see, in adjacent rounds.
            // vm3 is a replica throughout. Failed probes overlap
            // everything, and count for nothing.
            log.push(p(t0, "vm1", r, s, s + 3, r < 8));
            log.push(p(t0, "vm2", r, s + 1, s + 4, r >= 8));
            log.push(p(t0, "vm3", r, s, s + 2, false));
        }
        let r = CheckReport::from_probes(log);
        assert_eq!(r.violations(), Vec::<String>::new());
        assert_eq!(r.successes["vm1"], 8);
        assert_eq!(r.successes["vm2"], 12);
        assert_eq!(r.successes["vm3"], 0);
        assert_eq!(r.probes["vm3"], 20);
    }

    #[test]
    fn overlapping_successes_on_two_nodes_are_flagged() {
        let t0 = Instant::now();
        let r = CheckReport::from_probes(vec![
            p(t0, "vm1", 0, 0, 10, true),
            p(t0, "vm2", 1, 5, 15, true),
            // Same node overlapping itself is fine.
            p(t0, "vm1", 1, 8, 12, false),
            p(t0, "vm1", 2, 100, 101, true),
        ]);
        let v = r.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("overlapping"), "{v:?}");
        assert!(
            v[0].contains("vm1 acked a write in round 0 at +0.000s..+0.010s"),
            "{v:?}"
        );
        assert!(v[0].contains("vm2 acked a write in round 1"), "{v:?}");
    }

    #[test]
    fn two_successes_in_one_round_are_flagged_even_without_overlap() {
        let t0 = Instant::now();
        let r = CheckReport::from_probes(vec![
            p(t0, "vm1", 3, 150, 151, true),
            p(t0, "vm2", 3, 152, 160, true),
            p(t0, "vm3", 3, 150, 170, false),
        ]);
        let v = r.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("same round"), "{v:?}");
        assert!(!v[0].contains("overlapping"), "{v:?}");
    }

    #[test]
    fn a_pair_flagged_twice_is_reported_once() {
        let t0 = Instant::now();
        let r = CheckReport::from_probes(vec![
            p(t0, "vm1", 0, 0, 10, true),
            p(t0, "vm2", 0, 1, 9, true),
        ]);
        let v = r.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("overlapping, same round"), "{v:?}");
    }

    #[test]
    fn an_empty_report_has_no_violations() {
        assert!(CheckReport::default().violations().is_empty());
    }
}
