//! Slow, lossy links between a lab's members: every packet a member sends
//! on its `eth0` is held for a delay (uniform in `delay ± jitter`, so
//! packets may be reordered, as netem's jitter does) or dropped with
//! probability `loss`: `tc qdisc add dev eth0 root netem delay 100ms 50ms
//! loss 1%` in each namespace, which this machine's kernel cannot do (it
//! has no netem). Instead each member's OUTPUT chain queues its packets to
//! this process (iptables' NFQUEUE target), and one thread gives each its
//! verdict when its delay is over.
//!
//! Between two slowed members a packet is delayed once (at its sender),
//! so a round trip takes two delays. Dropping the [`SlowLinks`] removes the
//! rules, then lets every held packet go.

use crate::{sh, Lab};
use anyhow::{anyhow, Context, Result};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How a slowed link behaves.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub delay: Duration,
    pub jitter: Duration,
    /// Probability of a packet being dropped, 0.0..1.0.
    pub loss: f64,
}

/// The rule that queues a member's outgoing packets to this process.
const RULE: &[&str] = &["OUTPUT", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", "0"];

/// Slowed links; restored when dropped.
pub struct SlowLinks {
    namespaces: Vec<String>,
    stop: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Lab {
    /// Slows every link of `members` ("ctl", "vmI", "cli") as `link` says.
    pub fn slow_links(&self, members: &[&str], link: Link) -> Result<SlowLinks> {
        let namespaces: Vec<String> = members.iter().map(|m| self.ns(m)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, bound) = mpsc::channel();
        let worker = {
            let (namespaces, stop) = (namespaces.clone(), stop.clone());
            std::thread::spawn(move || hold(&namespaces, link, &stop, ready))
        };
        let mut slow = SlowLinks {
            namespaces: Vec::new(),
            stop,
            worker: Some(worker),
        };
        bound
            .recv()
            .map_err(|_| anyhow!("the packet-delaying thread ended before binding its queues"))??;
        // Queues first, rules second: a packet queued to nobody is dropped.
        for ns in namespaces {
            let mut args = vec!["netns", "exec", &ns, "iptables", "-w", "-A"];
            args.extend(RULE);
            sh("ip", &args).context("queueing packets to the test (is iptables installed?)")?;
            slow.namespaces.push(ns);
        }
        Ok(slow)
    }
}

impl Drop for SlowLinks {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let mut args = vec!["netns", "exec", ns, "iptables", "-w", "-D"];
            args.extend(RULE);
            let _ = sh("ip", &args);
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// A packet waiting for its verdict: when it may go, and where it is.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    due: std::cmp::Reverse<Instant>,
    queue: usize,
    index: u64,
}

/// The worker: binds queue 0 in each namespace (a netlink socket belongs
/// to the namespace it was opened in, so this thread enters each in turn),
/// then polls them all, holding each packet until it is due.
fn hold(namespaces: &[String], link: Link, stop: &AtomicBool, ready: mpsc::Sender<Result<()>>) {
    let mut queues = Vec::new();
    for ns in namespaces {
        match bind(ns) {
            Ok(q) => queues.push(q),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(std::process::id());
    let mut held = BinaryHeap::new();
    let mut messages = std::collections::HashMap::new();
    let mut next_index = 0u64;
    let spread = link.jitter.as_micros() as u64 * 2;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        for (i, q) in queues.iter_mut().enumerate() {
            while let Ok(mut msg) = q.recv() {
                if uniform(&mut rng) < link.loss {
                    msg.set_verdict(nfq::Verdict::Drop);
                    let _ = q.verdict(msg);
                    continue;
                }
                let offset = if spread == 0 {
                    0
                } else {
                    next(&mut rng) % (spread + 1)
                };
                let due =
                    now + link.delay.saturating_sub(link.jitter) + Duration::from_micros(offset);
                held.push(Held {
                    due: std::cmp::Reverse(due),
                    queue: i,
                    index: next_index,
                });
                messages.insert(next_index, msg);
                next_index += 1;
            }
        }
        while held.peek().is_some_and(|h| h.due.0 <= now) {
            let Some(h) = held.pop() else { break };
            if let Some(msg) = messages.remove(&h.index) {
                let _ = queues[h.queue].verdict(msg);
            }
        }
        // Arrivals are seen within a millisecond; that is the resolution.
        std::thread::sleep(Duration::from_millis(1));
    }
    while let Some(h) = held.pop() {
        if let Some(msg) = messages.remove(&h.index) {
            let _ = queues[h.queue].verdict(msg);
        }
    }
}

/// Queue 0 of namespace `ns`, non-blocking, copying only metadata.
fn bind(ns: &str) -> Result<nfq::Queue> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening network namespace {ns}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {ns}"))?;
    let mut q = nfq::Queue::open().context("opening a netfilter queue socket")?;
    q.bind(0).context("binding netfilter queue 0")?;
    q.set_copy_range(0, 0)?;
    q.set_queue_max_len(0, 65_536)?;
    q.set_nonblocking(true);
    Ok(q)
}

/// xorshift64*.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Uniform in 0.0..1.0.
fn uniform(state: &mut u64) -> f64 {
    (next(state) >> 11) as f64 / (1u64 << 53) as f64
}
