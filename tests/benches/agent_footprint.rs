//! Agent footprint: steady-state resident memory and CPU use of
//! `corral-agent` on the primary and on a replica of a three-node
//! PostgreSQL cluster with default settings (a heartbeat with a health
//! check every 250 ms, the primary's confirmation rounds, the guardian),
//! and how the memory splits between the heap and stacks (anonymous) and
//! the pages of the binary and libraries it touched (file-backed).
//!
//! Run with `make bench` (release binaries). Prints figures; asserts nothing.
//! `CORRAL_BENCH_SECONDS` sets the sampling window (default 60: CPU time
//! is counted in 10 ms ticks); `CORRAL_BENCH_SMAPS=1` also lists the
//! primary's mappings of 256 kB or more.

use corral_tests::procstat::{clock_ticks, cpu_ticks, status_kib};
use corral_tests::{bin, Lab};
use std::time::{Duration, Instant};

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let window = Duration::from_secs(corral_tests::env_num("CORRAL_BENCH_SECONDS", 60));
    println!(
        "binaries: {}",
        bin("corral-agent").parent().unwrap().display()
    );
    let lab = Lab::start(3).expect("lab");
    lab.create_replicated("bench", "vm1,vm2,vm3", &[])
        .expect("cluster create");
    let c = lab
        .ctl_json(&["cluster", "show", "bench"])
        .expect("cluster show");
    let pids: Vec<(&str, i32)> = [("primary vm1", 1), ("replica vm2", 2)]
        .into_iter()
        .map(|(name, i)| {
            (
                name,
                *lab.pids_in_vm(i, "corral-agent")
                    .first()
                    .expect("agent pid"),
            )
        })
        .collect();

    // Settle: connections made, allocator warmed, first samples taken.
    std::thread::sleep(Duration::from_secs(5));
    let hz = clock_ticks();
    // The working set: clear the pages' referenced bits now, read how many
    // were referenced again at the end (what the agent keeps using, as
    // opposed to pages it touched once and still maps).
    for (_, p) in &pids {
        let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "1");
    }
    let t0 = Instant::now();
    let c0: Vec<u64> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let mut rss_samples: Vec<Vec<u64>> = vec![Vec::new(); pids.len()];
    while t0.elapsed() < window {
        for (i, (_, p)) in pids.iter().enumerate() {
            rss_samples[i].push(status_kib(*p, "VmRSS:"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "agent steady state over {elapsed:.1}s in a three-node cluster (heartbeat every {} ms \
         with a health check, metrics every second, confirmation rounds every one or two \
         heartbeats, lease {} ms):",
        c["heartbeat_interval_ms"], c["lease_ms"]
    );
    for (i, (name, pid)) in pids.iter().enumerate() {
        let cpu_s = (cpu_ticks(*pid) - c0[i]) as f64 / hz;
        let samples = &mut rss_samples[i];
        samples.sort();
        let median = samples[samples.len() / 2];
        let max = *samples.last().unwrap();
        let hwm = status_kib(*pid, "VmHWM:");
        println!(
            "  {name:<12} RSS median {:.1} MiB, max {:.1} MiB, peak (VmHWM) {:.1} MiB; \
             CPU {:.3}% of one core ({cpu_s:.2} s in {elapsed:.1} s)",
            median as f64 / 1024.0,
            max as f64 / 1024.0,
            hwm as f64 / 1024.0,
            100.0 * cpu_s / elapsed
        );
        // Where the memory is: the heap and stacks, or pages of the
        // binary and libraries (shared with nothing else here).
        println!(
            "  {:<12} of which anonymous {:.1} MiB, file-backed {:.1} MiB; {} threads; pages used \
             during the window (smaps Referenced) {:.1} MiB",
            "",
            status_kib(*pid, "RssAnon:") as f64 / 1024.0,
            status_kib(*pid, "RssFile:") as f64 / 1024.0,
            status_kib(*pid, "Threads:"),
            referenced_kib(*pid) as f64 / 1024.0
        );
    }
    if std::env::var_os("CORRAL_BENCH_SMAPS").is_some() {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", pids[0].1)).unwrap();
        let mut lines = smaps.lines().peekable();
        while let Some(l) = lines.next() {
            if l.contains('-') && !l.starts_with(|c: char| c.is_ascii_uppercase()) {
                let rss = lines.clone().find(|x| x.starts_with("Rss:")).unwrap_or("");
                let kb: u64 = rss
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if kb >= 256 {
                    println!("    {kb:>6} kB  {l}");
                }
            }
        }
    }
    let up = (1..=3).all(|i| {
        lab.node(&format!("vm{i}"))
            .ok()
            .flatten()
            .is_some_and(|n| n["state"] == "up")
    });
    println!("  every node still up: {up}");
}

/// The sum of the `Referenced:` lines of /proc/PID/smaps, in KiB.
fn referenced_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("Referenced:"))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
