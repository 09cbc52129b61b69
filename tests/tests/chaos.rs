//! Chaos: consecutive random faults (kill the primary's VM, kill a
//! replica's VM, cut a node off the network, kill and restart the
//! coordinator, kill or freeze the primary's agent alone, its engine left
//! running) under a writer in sync mode, each followed by the cluster
//! settling. At the end: no acknowledged write lost, never two writable
//! primaries, every node streaming.
//!
//! `CORRAL_CHAOS_FAULTS` (default 50) sets the number of faults and
//! `CORRAL_CHAOS_SEED` replays a run (the seed is printed).

use corral_tests::checker::CheckReport;
use corral_tests::ha::{self, operations, vm_index, wait_acks};
use corral_tests::Lab;
use std::time::{Duration, Instant};

/// xorshift64*: enough to pick faults, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SETTLE: Duration = Duration::from_secs(90);

#[test]
fn fifty_random_faults_lose_no_acknowledged_write() {
    let faults: usize = corral_tests::env_num("CORRAL_CHAOS_FAULTS", 50);
    let seed: u64 = std::env::var("CORRAL_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| corral_proto::now_ms() as u64 | 1);
    eprintln!("chaos: {faults} faults, CORRAL_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "chaos", &["--sync"]).unwrap();
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    let mut primary = "vm1".to_string();
    for n in 1..=faults {
        let began = Instant::now();
        let p = vm_index(&primary);
        let replicas: Vec<usize> = (1..=3).filter(|i| *i != p).collect();
        let what = match rng.below(5) {
            0 => {
                lab.kill_vm(p);
                let new = ha::wait_new_primary(&lab, "chaos", &primary, SETTLE).unwrap();
                std::thread::sleep(Duration::from_millis(rng.below(2000)));
                lab.restart_vm(p).unwrap();
                format!("killed the primary's VM {primary}; {new} took over")
            }
            1 => {
                let r = replicas[rng.below(2) as usize];
                lab.kill_vm(r);
                std::thread::sleep(Duration::from_millis(500 + rng.below(2500)));
                lab.restart_vm(r).unwrap();
                format!("killed replica vm{r}'s VM")
            }
            2 => {
                let v = 1 + rng.below(3) as usize;
                lab.isolate(v).unwrap();
                if v == p {
                    let new = ha::wait_new_primary(&lab, "chaos", &primary, SETTLE).unwrap();
                    lab.reconnect(v).unwrap();
                    format!("cut the primary {primary} off the network; {new} took over")
                } else {
                    std::thread::sleep(Duration::from_millis(1000 + rng.below(3000)));
                    lab.reconnect(v).unwrap();
                    format!("cut replica vm{v} off the network")
                }
            }
            3 => {
                // The agent alone: its engine keeps running, fenced by the
                // kernel's lease gate only.
                let signal = ["KILL", "STOP", "TERM"][rng.below(3) as usize];
                lab.signal_agent(p, signal).unwrap();
                let new = ha::wait_new_primary(&lab, "chaos", &primary, SETTLE).unwrap();
                std::thread::sleep(Duration::from_millis(rng.below(2000)));
                if signal == "STOP" {
                    lab.signal_agent(p, "CONT").unwrap();
                } else {
                    lab.restart_vm(p).unwrap();
                }
                format!("SIG{signal} to the primary's agent only ({primary}); {new} took over")
            }
            _ => {
                lab.kill_coordinator();
                std::thread::sleep(Duration::from_millis(rng.below(3000)));
                lab.start_coordinator().unwrap();
                "killed and restarted the coordinator".to_string()
            }
        };
        primary = ha::wait_settled(&lab, "chaos", 3, SETTLE)
            .unwrap_or_else(|e| panic!("fault {n} ({what}): the cluster did not settle: {e:#}"));
        wait_acks(&writer, 20, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("fault {n} ({what}): writes did not resume: {e:#}"));
        eprintln!(
            "fault {n:>2}: {what}; settled in {:.1}s with {primary} primary",
            began.elapsed().as_secs_f64()
        );
        if began.elapsed() > Duration::from_secs(10) {
            // Slow to settle: say which operations it took.
            let since = corral_proto::now_ms() - began.elapsed().as_millis() as i64;
            let ops = lab
                .ctl_json(&["operation", "list", "--cluster", "chaos"])
                .unwrap();
            for o in ops["operations"].as_array().unwrap() {
                if o["created_at_ms"].as_i64().unwrap_or(0) >= since {
                    eprintln!(
                        "          {} {} {}: {}",
                        o["kind"],
                        o["state"],
                        o["error"],
                        Lab::operation_log(o).join(" | ")
                    );
                }
            }
        }
    }
    let report = writer.finish();
    let seen = check.finish();
    let v = CheckReport::violations(&seen);
    assert!(v.is_empty(), "two nodes took writes at once: {v:?}");
    ha::wait_every_node_holds(&lab, &creds, 3, &report.acked, Duration::from_secs(20)).unwrap();
    let failovers = operations(&lab, "chaos", "failover").unwrap();
    eprintln!(
        "chaos done: {} writes acknowledged, none lost; {} failovers; no overlap of writable primaries",
        report.acked.len(),
        failovers.len()
    );
}
