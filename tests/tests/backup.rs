//! Backups end to end, in namespace VMs, to a real S3-compatible server
//! (s3s-fs, which checks signatures): PostgreSQL, MariaDB and Redis round
//! trips into new clusters, PostgreSQL point-in-time recovery, a damaged
//! object refused by verify and restore while the cluster runs on,
//! retention, the final backup of a deleted cluster, and failures (an
//! unreachable target, a full disk) recorded with their reason and
//! announced as alerts.

use corral_tests::s3::{archive_wal, lab_with_s3, S3Server};
use corral_tests::{wait_until, Lab};
use serde_json::Value;
use std::time::Duration;

fn backups(lab: &Lab, cluster: &str) -> Vec<Value> {
    lab.ctl_json(&["backup", "list", cluster]).unwrap()["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Takes a backup of `cluster` to `target` and returns its record.
fn backup_now(lab: &Lab, cluster: &str, target: &str) -> Value {
    let before: Vec<String> = backups(lab, cluster)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    lab.ctl_ok(&["backup", "now", cluster, "--target", target])
        .unwrap();
    let b = backups(lab, cluster)
        .into_iter()
        .find(|b| !before.contains(&b["id"].as_str().unwrap().to_string()))
        .expect("the new backup is listed");
    assert_eq!(b["state"], "succeeded", "{b}");
    b
}

fn sql(lab: &Lab, creds: &Value, vm: usize, q: &str) -> String {
    lab.psql(&lab.node_uri(creds, vm), q).unwrap()
}

fn now_rfc3339() -> String {
    let ms = corral_proto::now_ms();
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[test]
fn postgres_backup_to_s3_restores_into_new_clusters_and_to_a_point_in_time() {
    let (lab, s3) = lab_with_s3(4, "");
    let creds = lab.create_replicated("src", "vm1,vm2", &[]).unwrap();
    // A schedule makes the cluster archive its WAL to the target.
    archive_wal(&lab, "src", "s3");
    sql(
        &lab,
        &creds,
        1,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
    );
    let at_backup = sql(
        &lab,
        &creds,
        1,
        "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t",
    );

    let b = backup_now(&lab, "src", "s3");
    // Taken from the replica, so the primary is not loaded.
    assert_eq!(
        (b["node"].as_str(), b["role"].as_str()),
        (Some("vm2"), Some("replica")),
        "{b}"
    );
    assert_eq!(b["engine"], "postgres", "{b}");
    for key in ["sha256", "position", "key_id", "version"] {
        assert!(
            !b[key].as_str().unwrap_or_default().is_empty(),
            "{key}: {b}"
        );
    }
    assert!(b["plain_bytes"].as_u64().unwrap() > 1_000_000, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let object = format!("backups/src/{id}.cbk");
    assert!(s3.objects().contains(&object), "{:?}", s3.objects());

    // Two writes with a point in time between them.
    sql(&lab, &creds, 1, "INSERT INTO t VALUES (100001, 'first')");
    std::thread::sleep(Duration::from_millis(1200));
    let between = now_rfc3339();
    std::thread::sleep(Duration::from_millis(1200));
    sql(&lab, &creds, 1, "INSERT INTO t VALUES (100002, 'second')");

    // To the end of the backup, into a new cluster: exactly the data at
    // backup time.
    lab.ctl_ok(&[
        "backup",
        "restore",
        "src",
        &id,
        "--into-new-cluster",
        "copy",
        "--nodes",
        "vm3",
    ])
    .unwrap();
    let copy = lab.ctl_json(&["cluster", "credentials", "copy"]).unwrap();
    assert_eq!(
        sql(
            &lab,
            &copy,
            3,
            "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t"
        ),
        at_backup
    );
    assert_eq!(sql(&lab, &copy, 3, "SELECT count(*) FROM t"), "5000");
    // A writable primary.
    sql(&lab, &copy, 3, "INSERT INTO t VALUES (0, 'new cluster')");

    // To the time between the two writes: the first, not the second.
    lab.ctl_ok(&[
        "backup",
        "restore",
        "src",
        &id,
        "--to-time",
        &between,
        "--into-new-cluster",
        "pitr",
        "--nodes",
        "vm4",
    ])
    .unwrap();
    let pitr = lab.ctl_json(&["cluster", "credentials", "pitr"]).unwrap();
    assert_eq!(
        sql(
            &lab,
            &pitr,
            4,
            "SELECT string_agg(v, ',' ORDER BY id) FROM t WHERE id > 100000"
        ),
        "first"
    );
    assert_eq!(sql(&lab, &pitr, 4, "SELECT count(*) FROM t"), "5001");

    // A time before the backup ended is refused, naming why.
    let out = lab
        .ctl(&[
            "backup",
            "restore",
            "src",
            &id,
            "--to-time",
            "2020-01-01T00:00:00Z",
            "--into-new-cluster",
            "never",
            "--nodes",
            "vm4",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("earlier backup"),
        "{err}"
    );

    // Verify reads the sound object back and restores it in a scratch
    // directory.
    lab.ctl_ok(&["backup", "verify", "src", &id]).unwrap();
    let shown = lab.ctl_json(&["backup", "show", "src", &id]).unwrap();
    assert_eq!(shown["verify_ok"], true, "{shown}");
    assert!(
        shown["verify_summary"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL"),
        "{shown}"
    );

    // One byte changed in the stored object: verify and restore refuse it
    // with a clear error, and the running cluster is untouched.
    let file = s3.object_file(&object);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let out = lab.ctl(&["backup", "verify", "src", &id]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "verify of a damaged object succeeded"
    );
    assert!(err.contains("is damaged"), "{err}");
    let shown = lab.ctl_json(&["backup", "show", "src", &id]).unwrap();
    assert_eq!(shown["verify_ok"], false, "{shown}");
    lab.ctl_ok(&[
        "cluster",
        "delete",
        "copy",
        "--confirm",
        "copy",
        "--no-final-backup",
    ])
    .unwrap();
    let out = lab
        .ctl(&[
            "backup",
            "restore",
            "src",
            &id,
            "--into-new-cluster",
            "bad",
            "--nodes",
            "vm3",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "restore of a damaged object succeeded"
    );
    assert!(err.contains("is damaged"), "{err}");
    assert_eq!(sql(&lab, &creds, 1, "SELECT count(*) FROM t"), "5002");
    sql(
        &lab,
        &creds,
        1,
        "INSERT INTO t VALUES (100003, 'still writable')",
    );
    let src = lab.ctl_json(&["cluster", "show", "src"]).unwrap();
    assert_eq!(src["state"], "running", "{src}");

    // In place with the damaged backup: refused before anything is touched.
    let out = lab
        .ctl(&["backup", "restore", "src", &id, "--confirm", "src"])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "in-place restore of a damaged object succeeded"
    );
    assert!(
        err.contains("is damaged") && err.contains("not touched"),
        "{err}"
    );
    assert_eq!(sql(&lab, &creds, 1, "SELECT count(*) FROM t"), "5003");
    lab.wait_streaming("src", "vm2").unwrap();

    // In place with a sound backup: every node erased, the primary
    // restored, the replica cloned again; the data is the backup's.
    let b2 = backup_now(&lab, "src", "s3");
    let id2 = b2["id"].as_str().unwrap().to_string();
    let at_b2 = sql(
        &lab,
        &creds,
        1,
        "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t",
    );
    sql(
        &lab,
        &creds,
        1,
        "INSERT INTO t VALUES (200000, 'after the second backup')",
    );
    lab.ctl_ok(&["backup", "restore", "src", &id2, "--confirm", "src"])
        .unwrap();
    assert_eq!(
        sql(
            &lab,
            &creds,
            1,
            "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t"
        ),
        at_b2
    );
    lab.wait_streaming("src", "vm2").unwrap();
    sql(
        &lab,
        &creds,
        1,
        "INSERT INTO t VALUES (300000, 'after the restore')",
    );
    wait_until(
        Duration::from_secs(15),
        "the re-cloned replica to have the row",
        || Ok(sql(&lab, &creds, 2, "SELECT count(*) FROM t WHERE id = 300000") == "1"),
    )
    .unwrap();
    let src = lab.ctl_json(&["cluster", "show", "src"]).unwrap();
    assert_eq!(src["state"], "running", "{src}");

    // Deleting a cluster takes a final backup first, kept 15 days.
    lab.ctl_ok(&["cluster", "delete", "pitr", "--confirm", "pitr"])
        .unwrap();
    let finals: Vec<Value> = backups(&lab, "pitr")
        .into_iter()
        .filter(|b| b["kind"] == "final")
        .collect();
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert_eq!(finals[0]["state"], "succeeded", "{finals:?}");
    let days = (finals[0]["expires_at_ms"].as_i64().unwrap() - corral_proto::now_ms()) as f64
        / 86_400_000.0;
    assert!((14.9..=15.0).contains(&days), "expires in {days} days");
    // It is usable after the cluster is gone: its node (vm4, local
    // target) reads it back and restores it in a scratch directory.
    let final_id = finals[0]["id"].as_str().unwrap();
    lab.ctl_ok(&["backup", "verify", "pitr", final_id]).unwrap();

    // Backup health in /metrics.
    let metrics = lab.coordinator_metrics().unwrap();
    for want in [
        "corral_backup_last_success_timestamp_seconds{cluster=\"src\"}",
        "corral_backups{cluster=\"pitr\",state=\"succeeded\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
}

fn mariadb(lab: &Lab, creds: &Value, vm: usize, q: &str) -> String {
    lab.mariadb(creds, vm, q).unwrap()
}

fn redis(lab: &Lab, creds: &Value, vm: usize, args: &[&str]) -> String {
    lab.redis_cli(creds, vm, args).unwrap()
}

#[test]
fn mariadb_and_redis_backups_to_s3_restore_into_new_clusters() {
    let (lab, s3) = lab_with_s3(4, "");

    // MariaDB: primary vm1, replica vm2; the backup comes from vm2.
    let shop = lab
        .create_engine_cluster("shop", "mariadb", "vm1,vm2", &[])
        .unwrap();
    mariadb(
        &lab,
        &shop,
        1,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT seq, md5(seq) FROM seq_1_to_3000",
    );
    let sum = "SELECT count(*), md5(group_concat(v ORDER BY id)) FROM t";
    let at_backup = mariadb(&lab, &shop, 1, sum);
    wait_until(Duration::from_secs(15), "the replica to catch up", || {
        Ok(mariadb(&lab, &shop, 2, sum) == at_backup)
    })
    .unwrap();
    let b = backup_now(&lab, "shop", "s3");
    assert_eq!(
        (b["node"].as_str(), b["role"].as_str()),
        (Some("vm2"), Some("replica")),
        "{b}"
    );
    assert!(!b["position"].as_str().unwrap().is_empty(), "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    assert!(s3.objects().contains(&format!("backups/shop/{id}.cbk")));
    mariadb(
        &lab,
        &shop,
        1,
        "INSERT INTO t VALUES (9999, 'after the backup')",
    );
    lab.ctl_ok(&[
        "backup",
        "restore",
        "shop",
        &id,
        "--into-new-cluster",
        "shop2",
        "--nodes",
        "vm3",
    ])
    .unwrap();
    let shop2 = lab.ctl_json(&["cluster", "credentials", "shop2"]).unwrap();
    assert_eq!(mariadb(&lab, &shop2, 3, sum), at_backup);
    mariadb(&lab, &shop2, 3, "INSERT INTO t VALUES (0, 'writable')");
    lab.ctl_ok(&["backup", "verify", "shop", &id]).unwrap();

    // Redis: a single node on vm4 (the backup comes from the primary),
    // restored onto vm1 once the MariaDB cluster is gone.
    let cache = lab
        .ctl_ok(&[
            "cluster", "create", "--name", "cache", "--engine", "redis", "--nodes", "vm4",
        ])
        .and_then(|_| lab.ctl_json(&["cluster", "credentials", "cache"]))
        .unwrap();
    for db in ["0", "3"] {
        for i in 0..200 {
            redis(
                &lab,
                &cache,
                4,
                &["-n", db, "SET", &format!("k{i}"), &format!("v{i}-{db}")],
            );
        }
    }
    redis(&lab, &cache, 4, &["HSET", "h", "a", "1", "b", "2"]);
    let b = backup_now(&lab, "cache", "s3");
    assert_eq!(b["node"], "vm4", "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    redis(&lab, &cache, 4, &["SET", "after", "the backup"]);
    lab.ctl_ok(&[
        "cluster",
        "delete",
        "shop",
        "--confirm",
        "shop",
        "--no-final-backup",
    ])
    .unwrap();
    lab.ctl_ok(&[
        "backup",
        "restore",
        "cache",
        &id,
        "--into-new-cluster",
        "cache2",
        "--nodes",
        "vm1",
    ])
    .unwrap();
    let cache2 = lab.ctl_json(&["cluster", "credentials", "cache2"]).unwrap();
    assert_eq!(redis(&lab, &cache2, 1, &["DBSIZE"]), "201");
    assert_eq!(redis(&lab, &cache2, 1, &["-n", "3", "DBSIZE"]), "200");
    assert_eq!(redis(&lab, &cache2, 1, &["-n", "3", "GET", "k17"]), "v17-3");
    assert_eq!(redis(&lab, &cache2, 1, &["HGET", "h", "b"]), "2");
    assert_eq!(redis(&lab, &cache2, 1, &["EXISTS", "after"]), "0");
    redis(&lab, &cache2, 1, &["SET", "new", "writable"]);
}

#[test]
fn retention_final_backups_and_failures() {
    let mut lab = Lab::start(2).unwrap();
    let s3 = S3Server::start(&lab.host_ip(), lab.dir()).unwrap();
    // A local target on a 1 MiB filesystem that fills up, and an S3
    // endpoint where nothing listens. (Mounted in vm1's mount namespace,
    // which `ip netns exec` made its own; it goes with the VM.)
    let tiny = lab.dir().join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    let dead_port = std::net::TcpListener::bind((lab.host_ip().as_str(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    lab.opts.coordinator_config = Some(format!(
        "[backup]\nfinal_backup_retain = \"40s\"\n\n{}\n\
         [backup.targets.dead]\nkind = \"s3\"\nendpoint = \"http://{}:{dead_port}\"\n\
         allow_http = true\nbucket = \"b\"\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\n\n\
         [backup.targets.tiny]\nkind = \"local\"\npath = \"{}\"\n",
        s3.target_toml("s3"),
        lab.host_ip(),
        tiny.display()
    ));
    lab.stop_coordinator().unwrap();
    lab.start_coordinator().unwrap();
    for vm in ["vm1", "vm2"] {
        lab.wait_node_state(vm, "up", Duration::from_secs(20))
            .unwrap();
    }
    lab.ctl_ok(&[
        "cluster", "create", "--name", "c", "--engine", "postgres", "--nodes", "vm1",
    ])
    .unwrap();
    let agent = lab.pids_in_vm(1, "corral-agent")[0];
    corral_tests::sh(
        "nsenter",
        &[
            &format!("--mount=/proc/{agent}/ns/mnt"),
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "tmpfs",
            tiny.to_str().unwrap(),
        ],
    )
    .unwrap();

    // A backup every 2 seconds, keeping 3: older ones are pruned (record
    // and object), the newest stay.
    lab.ctl_ok(&[
        "backup",
        "schedule",
        "c",
        "--cron",
        "*/2 * * * * *",
        "--retain",
        "3",
        "--target",
        "s3",
    ])
    .unwrap();
    let mut seen: Vec<String> = Vec::new();
    wait_until(
        Duration::from_secs(120),
        "6 scheduled backups, 3 kept",
        || {
            let listed: Vec<Value> = backups(&lab, "c")
                .into_iter()
                .filter(|b| b["kind"] == "scheduled" && b["state"] == "succeeded")
                .collect();
            for b in &listed {
                let id = b["id"].as_str().unwrap().to_string();
                if !seen.contains(&id) {
                    seen.push(id);
                }
            }
            Ok(seen.len() >= 6 && listed.len() == 3)
        },
    )
    .unwrap();
    // Next run next year, same retention: a backup still running finishes
    // and the next prune pass brings the count back to 3.
    lab.ctl_ok(&[
        "backup",
        "schedule",
        "c",
        "--cron",
        "0 0 1 1 *",
        "--retain",
        "3",
        "--target",
        "s3",
    ])
    .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let kept: Vec<String> = backups(&lab, "c")
        .iter()
        .filter(|b| b["kind"] == "scheduled" && b["state"] == "succeeded")
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    seen.sort();
    assert!(
        kept.iter().all(|k| *k >= seen[2]),
        "kept {kept:?} of {seen:?}"
    );
    let newest_seen = seen.last().unwrap();
    assert!(
        kept.iter().any(|k| k >= newest_seen),
        "newest {newest_seen} gone: {kept:?}"
    );
    let objects = s3.objects();
    for old in &seen[..2] {
        assert!(
            !objects.iter().any(|o| o.contains(old.as_str())),
            "{old} left in {objects:?}"
        );
    }
    for k in &kept {
        assert!(
            objects.iter().any(|o| o.contains(k.as_str())),
            "{k} missing: {objects:?}"
        );
    }

    // Archived WAL older than the oldest kept backup's start is pruned
    // too; what a kept backup needs stays.
    let horizon = backups(&lab, "c")
        .iter()
        .filter(|b| b["state"] == "succeeded")
        .filter_map(|b| b["start_wal"].as_str().map(str::to_string))
        .min()
        .unwrap();
    assert_eq!(horizon.len(), 24, "{horizon}");
    let segments = |objects: &[String]| -> Vec<String> {
        objects
            .iter()
            .filter(|o| o.starts_with("wal/c/"))
            .filter_map(|o| o.rsplit('/').next())
            .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
            .collect()
    };
    wait_until(
        Duration::from_secs(20),
        "WAL before the horizon to be pruned",
        || Ok(segments(&s3.objects()).iter().all(|n| *n >= horizon)),
    )
    .unwrap();
    let left = segments(&s3.objects());
    assert!(
        left.contains(&horizon),
        "segment {horizon} (needed) missing: {left:?}"
    );

    // A target nobody answers: the backup fails, is recorded failed with
    // the reason, and raises an alert; nothing is listed as good.
    let out = lab
        .ctl(&["backup", "now", "c", "--target", "dead"])
        .unwrap();
    assert!(!out.status.success());
    let failed: Vec<Value> = backups(&lab, "c")
        .into_iter()
        .filter(|b| b["target"] == "dead")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["state"], "failed", "{failed:?}");
    let reason = failed[0]["reason"].as_str().unwrap().to_lowercase();
    assert!(reason.contains("connect"), "{reason}");
    wait_until(Duration::from_secs(20), "the backup_failed alert", || {
        let h = lab.ctl_json(&["alerts", "history", "--cluster", "c"])?;
        Ok(h.to_string().contains("backup_failed"))
    })
    .unwrap();

    // A full disk: failed with the cause, and no partial file left.
    let out = lab
        .ctl(&["backup", "now", "c", "--target", "tiny"])
        .unwrap();
    assert!(!out.status.success());
    let full: Vec<Value> = backups(&lab, "c")
        .into_iter()
        .filter(|b| b["target"] == "tiny")
        .collect();
    assert_eq!(full[0]["state"], "failed", "{full:?}");
    let reason = full[0]["reason"].as_str().unwrap();
    assert!(reason.contains("No space left on device"), "{reason}");
    let leftovers = corral_tests::sh(
        "nsenter",
        &[
            &format!("--mount=/proc/{agent}/ns/mnt"),
            "find",
            tiny.to_str().unwrap(),
            "-type",
            "f",
        ],
    )
    .unwrap();
    assert!(leftovers.trim().is_empty(), "{leftovers}");
    let df = corral_tests::sh(
        "nsenter",
        &[
            &format!("--mount=/proc/{agent}/ns/mnt"),
            "df",
            "-k",
            tiny.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        df.contains("tmpfs"),
        "the target is not on the tiny filesystem: {df}"
    );
    let good = backups(&lab, "c")
        .iter()
        .filter(|b| b["state"] == "succeeded")
        .count();
    assert_eq!(good, 3);

    // The final backup of a deleted cluster outlives it until its expiry
    // (40 s here), then retention removes it.
    lab.ctl_ok(&["cluster", "delete", "c", "--confirm", "c"])
        .unwrap();
    let finals: Vec<Value> = backups(&lab, "c")
        .into_iter()
        .filter(|b| b["kind"] == "final")
        .collect();
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert_eq!(finals[0]["state"], "succeeded", "{finals:?}");
    let final_id = finals[0]["id"].as_str().unwrap().to_string();
    let expires = finals[0]["expires_at_ms"].as_i64().unwrap();
    // The cluster's other backups stay too (its schedule went with it).
    assert_eq!(
        backups(&lab, "c")
            .iter()
            .filter(|b| b["state"] == "succeeded")
            .count(),
        4
    );
    std::thread::sleep(Duration::from_secs(10));
    assert!(corral_proto::now_ms() < expires);
    assert!(backups(&lab, "c")
        .iter()
        .any(|b| b["id"] == final_id.as_str()));
    wait_until(
        Duration::from_secs(60),
        "the expired final backup to go",
        || {
            Ok(!backups(&lab, "c")
                .iter()
                .any(|b| b["id"] == final_id.as_str()))
        },
    )
    .unwrap();
    assert!(corral_proto::now_ms() >= expires);
}
