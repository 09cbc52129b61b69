//! Switchover and replica bootstrap, measured on a three-VM PostgreSQL
//! cluster in namespaces.
//!
//! 1. Write unavailability of a planned switchover (`node promote`), over
//!    `CORRAL_BENCH_SWITCHOVERS` switchovers (default 10) cycling through
//!    the nodes, with a client inserting a row every 10 ms through the
//!    cluster's multi-host connection string. Two figures per switchover: the
//!    longest gap between two acknowledged inserts as the client saw it, and
//!    the pause the coordinator reports (primary stopped -> new primary
//!    promoted). Afterwards every acknowledged row must be on the primary.
//! 2. Replica bootstrap throughput: `node add` of a replica to a cluster
//!    holding `CORRAL_BENCH_MB` MB (default 256), side by side with plain
//!    `pg_basebackup -X stream -c fast` of the same data between the same
//!    namespaces (and the same with `--progress`, which makes the server
//!    size the data first). Three runs each, median reported, each over
//!    the bytes the plain copy holds (data and WAL).
//!
//! `CORRAL_BENCH_ENGINE=mariadb|redis` measures part 1 on that engine
//! instead (the writer goes through HAProxy, which routes by the agents'
//! health endpoints; `CORRAL_BENCH_SYNC=1` for semi-sync), and skips part
//! 2, which compares with PostgreSQL's own tool.
//!
//! Run with `make bench` (release binaries). Prints figures; asserts only
//! that no acknowledged write was lost.

use corral_tests::ha;
use corral_tests::writer::Writer;
use corral_tests::{env_num, wait_until, Lab};
use std::time::{Duration, Instant};

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// "... writes were paused for 123 ms" from the promote operation's log.
fn reported_pause(lab: &Lab, cluster: &str) -> f64 {
    let op = lab.operation(cluster, "promote").unwrap();
    Lab::operation_log(&op)
        .iter()
        .find_map(|l| {
            l.split("writes were paused for ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn switchovers(lab: &mut Lab, n: usize, engine: &str, sync: bool) {
    let flags: &[&str] = if sync { &["--sync"] } else { &[] };
    let (creds, uri) = if engine == "postgres" {
        // Through the multi-host connection string, as an application.
        let creds = lab
            .create_replicated("bench", "vm1,vm2,vm3", flags)
            .unwrap();
        let uri = creds["uri"].as_str().unwrap().to_string();
        lab.psql(
            &uri,
            &format!(
                "CREATE TABLE {} (id bigint PRIMARY KEY, at timestamptz)",
                ha::WRITES
            ),
        )
        .unwrap();
        (creds, uri)
    } else {
        let creds = ha::cluster_of(lab, "bench", engine, flags).unwrap();
        let uri = lab.haproxy_uri(&creds);
        (creds, uri)
    };
    let writer = Writer::start(&uri, ha::WRITES, Duration::from_millis(10));
    let mut client = Vec::new();
    let mut coordinator = Vec::new();
    let mut primary = 1;
    for round in 0..n {
        let target = primary % 3 + 1;
        let node = format!("vm{target}");
        lab.wait_streaming("bench", &node).unwrap();
        let acked = writer.report().acked.len();
        wait_until(Duration::from_secs(10), "the writer", || {
            Ok(writer.report().acked.len() > acked + 30)
        })
        .unwrap();
        writer.take_longest_gap();
        lab.ctl_ok(&["node", "promote", "bench", &node, "--confirm", &node])
            .unwrap();
        let acked = writer.report().acked.len();
        wait_until(Duration::from_secs(10), "writes on the new primary", || {
            Ok(writer.report().acked.len() > acked + 30)
        })
        .unwrap();
        let gap = writer.take_longest_gap().as_secs_f64() * 1000.0;
        let reported = reported_pause(lab, "bench");
        println!(
            "switchover {:2}: vm{primary} -> {node}: client saw writes pause {gap:6.0} ms; coordinator reports {reported:4.0} ms",
            round + 1
        );
        client.push(gap);
        coordinator.push(reported);
        primary = target;
    }
    let report = writer.finish();
    let lost = ha::missing_on(lab, &creds, primary, &report.acked)
        .unwrap()
        .len();
    let (a, b, c) = stats(client);
    let (d, e, f) = stats(coordinator);
    println!();
    println!(
        "{engine}{}: switchover write unavailability over {n} switchovers (writer inserting every 10 ms):",
        if sync { " (sync)" } else { "" }
    );
    println!("  client-observed   min {a:6.0} ms   median {b:6.0} ms   max {c:6.0} ms");
    println!("  coordinator pause min {d:6.0} ms   median {e:6.0} ms   max {f:6.0} ms");
    println!(
        "  {} inserts acknowledged, {} failed attempts, {lost} acknowledged rows lost",
        report.acked.len(),
        report.errors
    );
    assert_eq!(lost, 0, "acknowledged rows were lost");
    lab.ctl_ok(&["cluster", "delete", "bench", "--confirm", "bench"])
        .unwrap();
}

/// The seconds of "cloned 123.4 MB to vm2 in 1.2s (98.7 MB/s)" in the
/// add-node log: the agent's clone step, from its start to the data
/// directory in place.
fn clone_secs(lab: &Lab, cluster: &str) -> f64 {
    let op = lab.operation(cluster, "add_node").unwrap();
    let line = Lab::operation_log(&op)
        .into_iter()
        .find(|l| l.starts_with("cloned "))
        .expect("a clone line");
    line.split(" in ")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap()
}

/// Plain `pg_basebackup -X stream -c fast` (plus `extra`) from vm1 into a
/// scratch directory of vm2, with the replication role's password that
/// node add left on vm2: (seconds, bytes copied, `du -sb`).
fn plain_basebackup(lab: &Lab, extra: &[&str]) -> (f64, f64) {
    let pgpass = lab.state_dir(2).join("postgres/pgpass");
    let target = format!("/tmp/corral-bench-basebackup-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&target);
    let ip = lab.vm_ip(1);
    let pass = format!("PGPASSFILE={}", pgpass.display());
    let mut args = vec![
        "-u",
        "postgres",
        "--",
        "env",
        &pass,
        "pg_basebackup",
        "-h",
        &ip,
        "-U",
        "corral_replication",
        "-D",
        &target,
        "-X",
        "stream",
        "-c",
        "fast",
        "-w",
    ];
    args.extend(extra);
    // The previous copy's dirty pages written out first, so this one does
    // not pay for them.
    corral_tests::sh("sync", &[]).unwrap();
    let began = Instant::now();
    let out = lab.in_ns("vm2", "runuser", &args).unwrap();
    let secs = began.elapsed().as_secs_f64();
    corral_tests::assert_success(&out);
    let du = corral_tests::sh("du", &["-sb", &target]).unwrap();
    let bytes: f64 = du.split_whitespace().next().unwrap().parse().unwrap();
    let _ = std::fs::remove_dir_all(&target);
    (secs, bytes)
}

fn bootstrap(lab: &Lab, mb: u64) {
    lab.ctl_ok(&[
        "cluster", "create", "--name", "boot", "--engine", "postgres", "--nodes", "vm1",
    ])
    .unwrap();
    let creds = lab.ctl_json(&["cluster", "credentials", "boot"]).unwrap();
    let uri = creds["uri"].as_str().unwrap();
    // Rows of ~1 KB.
    let rows = mb * 1000;
    let began = Instant::now();
    lab.psql(
        uri,
        &format!(
            "CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 30) AS v FROM generate_series(1, {rows}) g"
        ),
    )
    .unwrap();
    let size = lab
        .psql(uri, "SELECT pg_database_size('defaultdb') / 1000000")
        .unwrap();
    println!(
        "\nbootstrap data: {size} MB in defaultdb (written in {:.1}s)",
        began.elapsed().as_secs_f64()
    );
    // Throughput over the same bytes for all three: what plain
    // pg_basebackup copied (data and the WAL streamed alongside).
    let (mut ours, mut plain, mut progress) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=3 {
        // Corral: node add (slot, pg_basebackup, start, stream).
        corral_tests::sh("sync", &[]).unwrap();
        let began = Instant::now();
        lab.ctl_ok(&["node", "add", "boot", "vm2"]).unwrap();
        let whole = began.elapsed().as_secs_f64();
        let secs = clone_secs(lab, "boot");
        let (plain_secs, bytes) = plain_basebackup(lab, &[]);
        let (progress_secs, _) = plain_basebackup(lab, &["--progress"]);
        let mbs = |secs: f64| bytes / 1e6 / secs;
        println!(
            "run {run}: {:.1} MB: corral node add clone {secs:.2}s = {:.1} MB/s (whole operation \
             incl. streaming check {whole:.2}s); plain pg_basebackup {plain_secs:.2}s = {:.1} MB/s; \
             with --progress {progress_secs:.2}s = {:.1} MB/s",
            bytes / 1e6,
            mbs(secs),
            mbs(plain_secs),
            mbs(progress_secs)
        );
        ours.push(mbs(secs));
        plain.push(mbs(plain_secs));
        progress.push(mbs(progress_secs));
        lab.ctl_ok(&["node", "remove", "boot", "vm2", "--confirm", "vm2"])
            .unwrap();
    }
    let (_, ours, _) = stats(ours);
    let (_, plain, _) = stats(plain);
    let (_, progress, _) = stats(progress);
    println!(
        "\nreplica bootstrap throughput (median of 3): corral node add {ours:.1} MB/s, plain \
         pg_basebackup {plain:.1} MB/s ({:.2}x), plain with --progress {progress:.1} MB/s",
        ours / plain
    );
}

fn main() {
    let n = env_num("CORRAL_BENCH_SWITCHOVERS", 10) as usize;
    let mb = env_num("CORRAL_BENCH_MB", 256);
    let engine = std::env::var("CORRAL_BENCH_ENGINE").unwrap_or_else(|_| "postgres".into());
    let sync = env_num("CORRAL_BENCH_SYNC", 0) == 1;
    let mut lab = Lab::start(3).unwrap();
    // CORRAL_BENCH_SWITCHOVERS=0: the bootstrap comparison alone.
    if n > 0 {
        switchovers(&mut lab, n, &engine, sync);
    }
    if engine == "postgres" {
        bootstrap(&lab, mb);
    }
}
