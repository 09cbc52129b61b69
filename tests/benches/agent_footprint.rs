//! Agent footprint: steady-state resident memory and CPU use of
//! `corral-agent` at the default 1 s heartbeat interval, supervising a
//! single-node PostgreSQL cluster (health and replication check every 1 s).
//!
//! Run with `make bench` (release binaries). Prints figures; asserts nothing.
//! `CORRAL_BENCH_SECONDS` sets the sampling window (default 30).

use corral_tests::{bin, Lab, LabOptions};
use std::time::{Duration, Instant};

fn clock_ticks() -> f64 {
    // USER_HZ; 100 on every Linux this runs on, but ask.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime in ticks, from /proc/PID/stat.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("agent process");
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name: state(0) ... utime(11) stime(12).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let window = Duration::from_secs(
        std::env::var("CORRAL_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    println!(
        "binaries: {}",
        bin("corral-agent").parent().unwrap().display()
    );
    let lab = Lab::start_with(LabOptions {
        vms: 1,
        ..Default::default()
    })
    .expect("lab");
    lab.ctl_ok(&[
        "cluster", "create", "--name", "bench", "--engine", "postgres", "--node", "vm1",
    ])
    .expect("cluster create");
    let pid = *lab
        .pids_in_vm(1, "corral-agent")
        .first()
        .expect("agent pid");

    // Settle: connections made, allocator warmed, first samples taken.
    std::thread::sleep(Duration::from_secs(5));
    let hz = clock_ticks();
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    let mut rss_samples = Vec::new();
    while t0.elapsed() < window {
        rss_samples.push(status_kib(pid, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu_s = (cpu_ticks(pid) - c0) as f64 / hz;
    let elapsed = t0.elapsed().as_secs_f64();
    rss_samples.sort();
    let median = rss_samples[rss_samples.len() / 2];
    let max = *rss_samples.last().unwrap();
    let hwm = status_kib(pid, "VmHWM:");
    let heartbeats = lab
        .node("vm1")
        .unwrap()
        .map(|n| n["state"] == "up")
        .unwrap_or(false);

    println!("agent steady state over {elapsed:.1}s (heartbeat every 1 s, engine health check every 1 s):");
    println!(
        "  RSS            median {:.1} MiB, max {:.1} MiB, peak (VmHWM) {:.1} MiB",
        median as f64 / 1024.0,
        max as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "  CPU            {:.3}% of one core ({cpu_s:.2} s CPU in {elapsed:.1} s)",
        100.0 * cpu_s / elapsed
    );
    println!("  node still up  {heartbeats}");
}
