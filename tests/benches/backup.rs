//! Backup and restore throughput of a PostgreSQL database of at least
//! `CORRAL_BENCH_MB` MiB (default 1024), side by side with plain
//! `pg_basebackup` to the same disk, on a three-VM lab in namespaces (every
//! VM's data, the backups and the S3 server's files are under
//! /tmp/corral-tests, one filesystem).
//!
//! 1. A single-node cluster `src` on vm1 is filled with rows of distinct
//!    md5 strings (hex, which compresses about 2x, like real data; not
//!    zeros), vacuumed and checkpointed. The backups come from vm1, its
//!    primary (the only node).
//! 2. Plain PostgreSQL: `pg_basebackup -Ft -X fetch -c fast` (a tar, like
//!    Corral's) run as `postgres` in vm1 against the server's Unix socket,
//!    into a directory on the same disk; then a plain restore, `tar -x` of
//!    that tar into a new directory plus a `sync` of the filesystem (Corral's
//!    restore ends durable too).
//! 3. Corral: `corralctl backup now src --target disk` (a local target: a
//!    directory every VM sees, as a shared mount would be, on the same
//!    disk) and `--target s3` (s3s-fs on the host, the same disk): wall time
//!    of the command and the record's own started -> finished.
//! 4. Corral restores: `corralctl backup restore src ID --into-new-cluster
//!    r1 --nodes vm3` from each backup, whose wall time includes creating
//!    the cluster and PostgreSQL's recovery; r1 is deleted afterwards.
//!
//! `CORRAL_BENCH_RUNS` (default 1) repeats steps 2-4; medians are reported.
//! MB are 10^6 bytes; "db MB/s" is the database size over the seconds, the
//! one figure comparable across methods. Asserts only correctness: every
//! restored cluster holds exactly the source's rows.
//!
//! Run with `make bench` (release binaries).

use corral_tests::s3::S3Server;
use corral_tests::{env_num, sh, Lab};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const CLUSTER: &str = "src";
const RESTORED: &str = "r1";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

/// The newest PostgreSQL's binaries, as the agent picks them.
fn pg_bin(tool: &str) -> String {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    let v = versions
        .last()
        .expect("PostgreSQL under /usr/lib/postgresql");
    format!("/usr/lib/postgresql/{v}/bin/{tool}")
}

/// Bytes under `path` (`du -sb`).
fn du(path: &Path) -> u64 {
    sh("du", &["-sb", &path.to_string_lossy()])
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Flushes dirty pages, so that one measurement's writes are not paid by
/// the next one.
fn sync() {
    sh("sync", &[]).unwrap();
}

/// A command in a VM's namespace, which must succeed.
fn in_ns_ok(lab: &Lab, ns: &str, program: &str, args: &[&str]) -> String {
    let out = lab.in_ns(ns, program, args).unwrap();
    assert!(
        out.status.success(),
        "{program} {} in {ns} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `sql` as the `postgres` superuser over vm1's Unix socket (CHECKPOINT
/// needs it; the cluster's admin role is not a superuser).
fn superuser_sql(lab: &Lab, port: &str, sql: &str) -> String {
    let socket = lab.state_dir(1).join("postgres/run");
    in_ns_ok(
        lab,
        "vm1",
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            &pg_bin("psql"),
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &socket.to_string_lossy(),
            "-p",
            port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            sql,
        ],
    )
}

/// A lab of three VMs whose coordinator knows the S3 server as target `s3`
/// and a directory on the lab's disk as target `disk`.
fn lab_with_s3() -> (Lab, S3Server) {
    let mut lab = Lab::start(3).unwrap();
    let s3 = S3Server::start(&lab.host_ip(), lab.dir()).unwrap();
    // `disk`: a local target whose directory every VM sees (as a shared
    // mount would be), on the same filesystem as the data.
    let shared = lab.dir().join("shared-backups");
    std::fs::create_dir_all(&shared).unwrap();
    lab.opts.coordinator_config = Some(format!(
        "{}\n[backup.targets.disk]\nkind = \"local\"\npath = \"{}\"\n",
        s3.target_toml("s3"),
        shared.display()
    ));
    lab.stop_coordinator().unwrap();
    lab.start_coordinator().unwrap();
    for i in 1..=3 {
        lab.wait_node_state(&format!("vm{i}"), "up", Duration::from_secs(30))
            .unwrap();
    }
    (lab, s3)
}

/// The source's fingerprint: row count and a checksum of the values.
const FINGERPRINT: &str =
    "SELECT count(*) || ' rows, checksum ' || sum(hashtext(v)::bigint) FROM t";

/// Fills `src` with batches of ~100 MB (rows of 30 distinct md5 strings,
/// 960 bytes of hex) until the database holds at least `target` bytes.
/// Returns the database's size.
fn fill(lab: &Lab, uri: &str, port: &str, target: u64) -> u64 {
    lab.psql(
        uri,
        "CREATE TABLE t (id bigint PRIMARY KEY, n int, v text NOT NULL)",
    )
    .unwrap();
    let began = Instant::now();
    let batch = 100_000u64;
    let mut next = 1u64;
    let size = |lab: &Lab| -> u64 {
        lab.psql(uri, "SELECT pg_database_size(current_database())")
            .unwrap()
            .parse()
            .unwrap()
    };
    while size(lab) < target {
        lab.psql(
            uri,
            &format!(
                "INSERT INTO t SELECT g, (g * 7919) % 100000, \
                 (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, 30) i) \
                 FROM generate_series({next}::bigint, {}::bigint) g",
                next + batch - 1
            ),
        )
        .unwrap();
        next += batch;
    }
    // Hint bits and the visibility map set, everything on disk: the copies
    // that follow read a settled database.
    lab.psql(uri, "VACUUM (ANALYZE) t").unwrap();
    superuser_sql(lab, port, "CHECKPOINT");
    let bytes = size(lab);
    println!(
        "source: cluster {CLUSTER}, single node on vm1 (primary); database {} = {bytes} bytes ({:.1} MB, {:.2} GiB), {} rows, written in {:.0}s",
        lab.psql(uri, "SELECT current_database()").unwrap(),
        mb(bytes as f64),
        bytes as f64 / (1u64 << 30) as f64,
        next - 1,
        began.elapsed().as_secs_f64()
    );
    bytes
}

/// One measurement.
#[derive(Clone, Default)]
struct Sample {
    secs: f64,
    /// Bytes that went through (tar bytes; a backup's plain bytes).
    moved: u64,
    /// Bytes left on the target (none for a restore).
    stored: Option<u64>,
    /// The record's own started -> finished, for Corral backups.
    record_secs: Option<f64>,
}

struct Method {
    name: &'static str,
    samples: Vec<Sample>,
}

/// Plain pg_basebackup, then a plain restore of its tar (tar -x + sync).
fn plain(lab: &Lab, port: &str, run: usize) -> (Sample, Sample) {
    let root = lab.dir().join("plain");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    sh("chown", &["postgres:postgres", &root.to_string_lossy()]).unwrap();
    let copy = root.join("basebackup");
    let socket = lab.state_dir(1).join("postgres/run");
    sync();
    let began = Instant::now();
    in_ns_ok(
        lab,
        "vm1",
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            &pg_bin("pg_basebackup"),
            "-h",
            &socket.to_string_lossy(),
            "-p",
            port,
            "-U",
            "postgres",
            "-w",
            "-D",
            &copy.to_string_lossy(),
            "-F",
            "t",
            "-X",
            "fetch",
            "-c",
            "fast",
        ],
    );
    let secs = began.elapsed().as_secs_f64();
    let tar_bytes = du(&copy);
    println!(
        "run {run}: plain pg_basebackup -Ft -X fetch: {:.1} MB of tar in {secs:.2}s",
        mb(tar_bytes as f64)
    );
    let backup = Sample {
        secs,
        moved: tar_bytes,
        stored: Some(tar_bytes),
        record_secs: None,
    };

    let restored = root.join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    sync();
    let began = Instant::now();
    in_ns_ok(
        lab,
        "vm1",
        "tar",
        &[
            "-x",
            "-f",
            &copy.join("base.tar").to_string_lossy(),
            "-C",
            &restored.to_string_lossy(),
        ],
    );
    let tar_secs = began.elapsed().as_secs_f64();
    sh("sync", &["-f", &restored.to_string_lossy()]).unwrap();
    let secs = began.elapsed().as_secs_f64();
    let out_bytes = du(&restored);
    assert!(
        restored.join("PG_VERSION").exists(),
        "the plain restore holds no data directory"
    );
    println!(
        "run {run}: plain restore (tar -x, then sync): {:.1} MB extracted in {tar_secs:.2}s + sync = {secs:.2}s",
        mb(out_bytes as f64)
    );
    let restore = Sample {
        secs,
        moved: out_bytes,
        stored: None,
        record_secs: None,
    };
    std::fs::remove_dir_all(&root).unwrap();
    (backup, restore)
}

fn backups(lab: &Lab) -> Vec<Value> {
    lab.ctl_json(&["backup", "list", CLUSTER]).unwrap()["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The `log` of an operation, as "+12.3s message" lines.
fn print_op_log(lab: &Lab, cluster: &str, kind: &str) {
    let Ok(op) = lab.operation(cluster, kind) else {
        return;
    };
    let t0 = op["created_at_ms"].as_i64().unwrap_or(0);
    for l in op["log"].as_array().into_iter().flatten() {
        let at = l["at_ms"].as_i64().unwrap_or(t0);
        println!(
            "      +{:6.2}s {}",
            (at - t0) as f64 / 1000.0,
            l["message"].as_str().unwrap_or_default()
        );
    }
}

/// `backup now` to `target`: the sample and the backup's record.
fn corral_backup(lab: &Lab, target: &str, run: usize, verbose: bool) -> (Sample, Value) {
    let before: Vec<Value> = backups(lab).iter().map(|b| b["id"].clone()).collect();
    sync();
    let began = Instant::now();
    lab.ctl_ok(&["backup", "now", CLUSTER, "--target", target])
        .unwrap();
    let secs = began.elapsed().as_secs_f64();
    let b = backups(lab)
        .into_iter()
        .find(|b| !before.contains(&b["id"]))
        .expect("the new backup is listed");
    assert_eq!(b["state"], "succeeded", "{b}");
    let plain = b["plain_bytes"].as_u64().unwrap();
    let stored = b["stored_bytes"].as_u64().unwrap();
    let record = (b["finished_at_ms"].as_i64().unwrap() - b["started_at_ms"].as_i64().unwrap())
        as f64
        / 1000.0;
    println!(
        "run {run}: corral backup to {target}: {} from {} ({}), {:.1} MB plain, {:.1} MB stored (ratio {:.2}), command {secs:.2}s, record {record:.2}s",
        b["id"].as_str().unwrap_or_default(),
        b["node"].as_str().unwrap_or_default(),
        b["role"].as_str().unwrap_or_default(),
        mb(plain as f64),
        mb(stored as f64),
        plain as f64 / stored as f64,
    );
    if verbose {
        print_op_log(lab, CLUSTER, "backup");
    }
    (
        Sample {
            secs,
            moved: plain,
            stored: Some(stored),
            record_secs: Some(record),
        },
        b,
    )
}

fn restore_cmd(lab: &Lab, id: &str) -> std::process::Output {
    lab.ctl(&[
        "backup",
        "restore",
        CLUSTER,
        id,
        "--into-new-cluster",
        RESTORED,
        "--nodes",
        "vm3",
    ])
    .unwrap()
}

fn delete_restored(lab: &Lab) {
    let listed = lab.ctl_json(&["cluster", "list"]).unwrap().to_string();
    if listed.contains(&format!("\"{RESTORED}\"")) {
        lab.ctl_ok(&[
            "cluster",
            "delete",
            RESTORED,
            "--confirm",
            RESTORED,
            "--no-final-backup",
        ])
        .unwrap();
    }
}

/// Restores backup `b` into r1 on vm3, checks its rows, deletes r1.
fn corral_restore(lab: &Lab, b: &Value, fingerprint: &str, run: usize, verbose: bool) -> Sample {
    let id = b["id"].as_str().unwrap();
    let target = b["target"].as_str().unwrap();
    let plain = b["plain_bytes"].as_u64().unwrap();
    sync();
    let began = Instant::now();
    let out = restore_cmd(lab, id);
    let secs = began.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "restore of {id} from {target} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let creds = lab.ctl_json(&["cluster", "credentials", RESTORED]).unwrap();
    let got = lab.psql(&lab.node_uri(&creds, 3), FINGERPRINT).unwrap();
    assert_eq!(
        got, fingerprint,
        "the cluster restored from {target} differs from the source"
    );
    println!(
        "run {run}: corral restore from {target} into {RESTORED} on vm3: {:.1} MB plain in {secs:.2}s (rows check: {got})",
        mb(plain as f64)
    );
    if verbose {
        print_op_log(lab, RESTORED, "create_cluster");
    }
    delete_restored(lab);
    Sample {
        secs,
        moved: plain,
        stored: None,
        record_secs: None,
    }
}

fn main() {
    let wall = Instant::now();
    let target_mib = env_num("CORRAL_BENCH_MB", 1024);
    let runs = env_num("CORRAL_BENCH_RUNS", 1).max(1) as usize;
    let (lab, _s3) = lab_with_s3();
    lab.ctl_ok(&[
        "cluster", "create", "--name", CLUSTER, "--engine", "postgres", "--nodes", "vm1",
    ])
    .unwrap();
    let creds = lab.ctl_json(&["cluster", "credentials", CLUSTER]).unwrap();
    let uri = lab.node_uri(&creds, 1);
    let port = creds["port"].as_u64().unwrap_or(5432).to_string();
    let db_bytes = fill(&lab, &uri, &port, target_mib << 20);
    let fingerprint = lab.psql(&uri, FINGERPRINT).unwrap();
    println!("source fingerprint: {fingerprint}");
    println!("all on one filesystem: {}", {
        let df = sh(
            "df",
            &[
                "-h",
                "--output=source,size,avail",
                &lab.dir().to_string_lossy(),
            ],
        )
        .unwrap();
        df.lines().last().unwrap_or_default().to_string()
    });

    let mut methods: Vec<Method> = [
        "plain pg_basebackup -Ft (same disk)",
        "plain restore: tar -x + sync",
        "corral backup -> disk (local target)",
        "corral backup -> s3 (s3s-fs)",
        "corral restore <- disk (new cluster)",
        "corral restore <- s3 (new cluster)",
    ]
    .into_iter()
    .map(|name| Method {
        name,
        samples: Vec::new(),
    })
    .collect();
    for run in 1..=runs {
        println!();
        let verbose = run == 1;
        let (b, r) = plain(&lab, &port, run);
        methods[0].samples.push(b);
        methods[1].samples.push(r);
        let (s, local) = corral_backup(&lab, "disk", run, verbose);
        methods[2].samples.push(s);
        let (s, s3) = corral_backup(&lab, "s3", run, verbose);
        methods[3].samples.push(s);
        let s = corral_restore(&lab, &local, &fingerprint, run, verbose);
        methods[4].samples.push(s);
        let s = corral_restore(&lab, &s3, &fingerprint, run, verbose);
        methods[5].samples.push(s);
        for b in [&local, &s3] {
            let id = b["id"].as_str().unwrap();
            lab.ctl_ok(&["backup", "delete", CLUSTER, id, "--confirm", id])
                .unwrap();
        }
    }

    println!();
    println!(
        "PostgreSQL backup/restore throughput: database {:.1} MB ({db_bytes} bytes), single node on vm1, backups taken from vm1 (primary), restores onto vm3; {} (MB = 10^6 bytes)",
        mb(db_bytes as f64),
        if runs == 1 {
            "one run".to_string()
        } else {
            format!("median of {runs} runs")
        }
    );
    println!(
        "{:<38} {:>9} {:>9} {:>11} {:>12} {:>12} {:>6}",
        "method", "seconds", "db MB/s", "moved MB/s", "moved MB", "stored MB", "ratio"
    );
    let plain_secs = median(methods[0].samples.iter().map(|s| s.secs).collect());
    let plain_restore_secs = median(methods[1].samples.iter().map(|s| s.secs).collect());
    for m in &methods {
        let secs = median(m.samples.iter().map(|s| s.secs).collect());
        let moved = median(m.samples.iter().map(|s| s.moved as f64).collect());
        let stored = m
            .samples
            .iter()
            .map(|s| s.stored.map(|b| b as f64))
            .collect::<Option<Vec<f64>>>()
            .map(median);
        println!(
            "{:<38} {:>9.2} {:>9.1} {:>11.1} {:>12.1} {:>12} {:>6}",
            m.name,
            secs,
            mb(db_bytes as f64) / secs,
            mb(moved) / secs,
            mb(moved),
            stored.map_or("-".into(), |s| format!("{:.1}", mb(s))),
            stored.map_or("-".into(), |s| format!("{:.2}", moved / s)),
        );
    }
    println!();
    for (i, base) in [
        (2, plain_secs),
        (3, plain_secs),
        (4, plain_restore_secs),
        (5, plain_restore_secs),
    ] {
        let m = &methods[i];
        let secs = median(m.samples.iter().map(|s| s.secs).collect());
        let record = m
            .samples
            .iter()
            .map(|s| s.record_secs)
            .collect::<Option<Vec<f64>>>()
            .map(median);
        println!(
            "{}: {:.0}% of the plain tool's throughput{}",
            m.name,
            base / secs * 100.0,
            record.map_or(String::new(), |r| format!(
                " (record started->finished {r:.2}s = {:.1} db MB/s; the rest is the CLI and coordinator)",
                mb(db_bytes as f64) / r
            ))
        );
    }
    println!("bench took {:.0}s", wall.elapsed().as_secs_f64());
}
