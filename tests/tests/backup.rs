//! Backups end to end, in namespace VMs, to a real S3-compatible server
//! (s3s-fs, which checks signatures): PostgreSQL, MariaDB and Redis round
//! trips into new clusters, PostgreSQL point-in-time recovery, a damaged
//! object refused by verify and restore while the cluster runs on,
//! retention, the final backup of a deleted cluster, and failures (an
//! unreachable target, a full disk) recorded with their reason and
//! announced as alerts.

use corral_tests::s3::S3Server;
use corral_tests::{wait_until, Lab, LabOptions};
use serde_json::Value;
use std::time::Duration;

/// A lab whose coordinator knows the S3 server as target `s3` (and any
/// `extra` configuration).
fn lab_with_s3(vms: usize, extra: &str) -> (Lab, S3Server) {
    let mut lab = Lab::start_with(LabOptions {
        vms,
        ..Default::default()
    })
    .unwrap();
    let s3 = S3Server::start(&lab.host_ip(), lab.dir()).unwrap();
    lab.opts.coordinator_config = Some(format!("{}\n{extra}", s3.target_toml("s3")));
    lab.stop_coordinator().unwrap();
    lab.start_coordinator().unwrap();
    for i in 1..=vms {
        lab.wait_node_state(&format!("vm{i}"), "up", Duration::from_secs(20))
            .unwrap();
    }
    (lab, s3)
}

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
    // A schedule makes the cluster archive its WAL to the target (and
    // takes no backup before next year).
    lab.ctl_ok(&[
        "backup", "schedule", "src", "--cron", "0 0 1 1 *", "--retain", "7", "--target", "s3",
    ])
    .unwrap();
    wait_until(Duration::from_secs(60), "WAL archiving to be configured", || {
        Ok(lab.operation("src", "configure_backups")?["state"] == "succeeded")
    })
    .unwrap();
    sql(
        &lab,
        &creds,
        1,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
    );
    let at_backup = sql(&lab, &creds, 1, "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t");

    let b = backup_now(&lab, "src", "s3");
    // Taken from the replica, so the primary is not loaded.
    assert_eq!((b["node"].as_str(), b["role"].as_str()), (Some("vm2"), Some("replica")), "{b}");
    assert_eq!(b["engine"], "postgres", "{b}");
    for key in ["sha256", "position", "key_id", "version"] {
        assert!(!b[key].as_str().unwrap_or_default().is_empty(), "{key}: {b}");
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
        "backup", "restore", "src", &id, "--into-new-cluster", "copy", "--nodes", "vm3",
    ])
    .unwrap();
    let copy = lab.ctl_json(&["cluster", "credentials", "copy"]).unwrap();
    assert_eq!(
        sql(&lab, &copy, 3, "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t"),
        at_backup
    );
    assert_eq!(sql(&lab, &copy, 3, "SELECT count(*) FROM t"), "5000");
    // A writable primary.
    sql(&lab, &copy, 3, "INSERT INTO t VALUES (0, 'new cluster')");

    // To the time between the two writes: the first, not the second.
    lab.ctl_ok(&[
        "backup", "restore", "src", &id, "--to-time", &between, "--into-new-cluster", "pitr",
        "--nodes", "vm4",
    ])
    .unwrap();
    let pitr = lab.ctl_json(&["cluster", "credentials", "pitr"]).unwrap();
    assert_eq!(
        sql(&lab, &pitr, 4, "SELECT string_agg(v, ',' ORDER BY id) FROM t WHERE id > 100000"),
        "first"
    );
    assert_eq!(sql(&lab, &pitr, 4, "SELECT count(*) FROM t"), "5001");

    // A time before the backup ended is refused, naming why.
    let out = lab
        .ctl(&[
            "backup", "restore", "src", &id, "--to-time", "2020-01-01T00:00:00Z",
            "--into-new-cluster", "never", "--nodes", "vm4",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("earlier backup"), "{err}");

    // Verify reads the sound object back and restores it in a scratch
    // directory.
    lab.ctl_ok(&["backup", "verify", "src", &id]).unwrap();
    let shown = lab.ctl_json(&["backup", "show", "src", &id]).unwrap();
    assert_eq!(shown["verify_ok"], true, "{shown}");
    assert!(
        shown["verify_summary"].as_str().unwrap().contains("PostgreSQL"),
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
    assert!(!out.status.success(), "verify of a damaged object succeeded");
    assert!(err.contains("is damaged"), "{err}");
    let shown = lab.ctl_json(&["backup", "show", "src", &id]).unwrap();
    assert_eq!(shown["verify_ok"], false, "{shown}");
    lab.ctl_ok(&["cluster", "delete", "copy", "--confirm", "copy", "--no-final-backup"])
        .unwrap();
    let out = lab
        .ctl(&[
            "backup", "restore", "src", &id, "--into-new-cluster", "bad", "--nodes", "vm3",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restore of a damaged object succeeded");
    assert!(err.contains("is damaged"), "{err}");
    assert_eq!(sql(&lab, &creds, 1, "SELECT count(*) FROM t"), "5002");
    sql(&lab, &creds, 1, "INSERT INTO t VALUES (100003, 'still writable')");
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
}
