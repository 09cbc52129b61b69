//! Write unavailability of an automatic failover: the primary's VM is
//! killed (every process in its namespace, SIGKILL) while a client inserts a
//! row every 10 ms through HAProxy, which routes by the agents' `/primary`
//! health check. Default settings (async replication, the default lease
//! and heartbeat); `CORRAL_BENCH_SYNC=1` measures sync mode instead.
//! `CORRAL_BENCH_FAILOVERS` runs (default 20); after each the old
//! primary's VM is restarted and rejoins as a replica.
//! `CORRAL_BENCH_ENGINE` picks the engine (postgres, the default, or
//! redis; for Redis the writer pushes onto a list, and
//! `CORRAL_BENCH_WAIT=1` counts a write only once a replica has it).
//! `CORRAL_BENCH_VIA=uri` writes through the cluster's multi-host
//! connection string instead of HAProxy (PostgreSQL's: libpq-style
//! `target_session_attrs=read-write`); `CORRAL_BENCH_PROFILE=wan` runs
//! with that timing profile (`cluster set C profile=wan`).
//! Afterwards it counts the acknowledged writes missing on the last
//! primary.
//!
//! Per run: the client's longest gap between two acknowledged inserts (the
//! write unavailability), and from the coordinator's record the time from
//! the kill to the failover's detection and from detection to the new
//! primary's promotion. Prints min / median / p95 / max; asserts nothing
//! about speed. Run with `make bench` (release binaries).

use corral_tests::ha::{self, events, vm_index, wait_acks};
use corral_tests::writer::Writer;
use corral_tests::{env_num, Lab};
use std::time::Duration;

/// min, median, p95, max.
fn stats(mut v: Vec<f64>) -> [f64; 4] {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    [v[0], at(0.5), at(0.95), v[v.len() - 1]]
}

fn line(what: &str, v: Vec<f64>) {
    let [min, med, p95, max] = stats(v);
    println!("  {what:<28} min {min:>6.0} ms   median {med:>6.0} ms   p95 {p95:>6.0} ms   max {max:>6.0} ms");
}

fn main() {
    let runs = env_num("CORRAL_BENCH_FAILOVERS", 20) as usize;
    let sync = env_num("CORRAL_BENCH_SYNC", 0) == 1;
    let wait = env_num("CORRAL_BENCH_WAIT", 0) == 1;
    let engine = std::env::var("CORRAL_BENCH_ENGINE").unwrap_or_else(|_| "postgres".into());
    let via_uri = std::env::var("CORRAL_BENCH_VIA").is_ok_and(|v| v == "uri");
    let profile = std::env::var("CORRAL_BENCH_PROFILE").unwrap_or_else(|_| "lan".into());
    let mut lab = Lab::start(3).unwrap();
    let flags: &[&str] = if sync { &["--sync"] } else { &[] };
    let creds = ha::cluster_of(&mut lab, "bench", &engine, flags).unwrap();
    // A profile's name, or settings of its own: "lease=2s,heartbeat=500ms".
    let settings: Vec<String> = if profile.contains('=') {
        profile.split(',').map(str::to_string).collect()
    } else {
        vec![format!("profile={profile}")]
    };
    let mut set = vec!["cluster", "set", "bench"];
    set.extend(settings.iter().map(String::as_str));
    lab.ctl_ok(&set).unwrap();
    let mut through = if via_uri {
        creds["uri"]
            .as_str()
            .expect("a connection string")
            .to_string()
    } else {
        lab.haproxy_uri(&creds)
    };
    if wait {
        through.push_str("?wait=1");
    }
    let writer = Writer::start(&through, ha::WRITES, Duration::from_millis(10));
    wait_acks(&writer, 100, Duration::from_secs(10)).unwrap();
    let (mut gaps, mut detect, mut promote) = (Vec::new(), Vec::new(), Vec::new());
    let mut primary = "vm1".to_string();
    for run in 1..=runs {
        primary = ha::wait_settled(&lab, "bench", 3, Duration::from_secs(90)).unwrap();
        wait_acks(&writer, 100, Duration::from_secs(10)).unwrap();
        writer.take_longest_gap();
        let killed_at = corral_proto::now_ms();
        lab.kill_vm(vm_index(&primary));
        let new = ha::wait_new_primary(&lab, "bench", &primary, Duration::from_secs(60)).unwrap();
        wait_acks(&writer, 100, Duration::from_secs(30)).unwrap();
        let gap = writer.take_longest_gap().as_secs_f64() * 1000.0;
        let ev = events(&lab, "bench").unwrap();
        let started = ev
            .iter()
            .filter(|e| e.0 == "failover_started" && e.2 >= killed_at)
            .map(|e| e.2)
            .min()
            .unwrap_or(killed_at);
        let promoted = ev
            .iter()
            .filter(|e| e.0 == "promoted" && e.1 == new && e.2 >= killed_at)
            .map(|e| e.2)
            .min()
            .unwrap_or(started);
        println!(
            "run {run:>2}: {primary} killed, {new} took over: writes paused {gap:>5.0} ms \
             (detected after {} ms, promoted {} ms later)",
            started - killed_at,
            promoted - started
        );
        gaps.push(gap);
        detect.push((started - killed_at) as f64);
        promote.push((promoted - started) as f64);
        lab.restart_vm(vm_index(&primary)).unwrap();
        primary = new;
    }
    let _ = primary;
    let report = writer.finish();
    let c = lab.ctl_json(&["cluster", "show", "bench"]).unwrap();
    println!(
        "\n{engine}: failover write unavailability over {runs} kills of the primary's VM \
         (writer every 10 ms through {}, profile {profile}: lease {} ms, heartbeat {} ms, {}{}):",
        if via_uri {
            "the multi-host connection string"
        } else {
            "HAProxy"
        },
        c["lease_ms"],
        c["heartbeat_interval_ms"],
        if sync { "sync mode" } else { "async mode" },
        if wait {
            ", each write waiting for a replica"
        } else {
            ""
        }
    );
    line("client-observed pause", gaps);
    line("kill -> failover detected", detect);
    line("detected -> promoted", promote);
    println!(
        "  {} inserts acknowledged, {} failed attempts",
        report.acked.len(),
        report.errors
    );
    let p = vm_index(&ha::wait_settled(&lab, "bench", 3, Duration::from_secs(90)).unwrap());
    let missing = ha::missing_on(&lab, &creds, p, &report.acked).unwrap();
    println!(
        "  {} acknowledged inserts missing afterwards",
        missing.len()
    );
    // Only sync mode promises none (Redis's only with WAIT).
    let promised = (sync && engine != "redis") || wait;
    if promised {
        assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    } else {
        println!(
            "  (without a synchronous acknowledgement, writes acknowledged but not yet \
             replicated may be lost, at most the failover lag limit)"
        );
    }
}
