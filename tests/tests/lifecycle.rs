//! The node lifecycle of a PostgreSQL primary/replica cluster, in namespaces:
//! resync of a diverged replica, reboot, remove and re-add, delete; sync
//! mode; and a coordinator restart in the middle of adding a node.

use corral_tests::{count_where, wait_until, Lab};
use serde_json::Value;
use std::time::Duration;

fn create(lab: &Lab, name: &str, nodes: &str, extra: &[&str]) -> Value {
    lab.create_replicated(name, nodes, extra).unwrap()
}

/// Runs SQL on VM `i` over its local socket as the postgres superuser,
/// bypassing Corral: how an operator (or a mistake) changes a node by hand.
fn local_sql(lab: &Lab, i: usize, sql: &str) -> String {
    let socket = lab.state_dir(i).join("postgres/run");
    let out = lab
        .in_ns(
            &format!("vm{i}"),
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                "psql",
                "-X",
                "-A",
                "-t",
                "-h",
                &socket.to_string_lossy(),
                "-d",
                "defaultdb",
                "-c",
                sql,
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn rows(lab: &Lab, creds: &Value, i: usize) -> Vec<String> {
    lab.column_on(creds, i, "SELECT id || ':' || v FROM t ORDER BY id")
        .unwrap()
}

fn succeeded(lab: &Lab, cluster: &str, kind: &str) -> Vec<String> {
    let op = lab.operation(cluster, kind).unwrap();
    assert_eq!(op["state"], "succeeded", "{op}");
    Lab::operation_log(&op)
}

fn node_cluster(lab: &Lab, node: &str) -> String {
    lab.node(node).unwrap().unwrap()["cluster"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn resync_reboot_remove_readd_and_delete() {
    let lab = Lab::start(3).unwrap();
    let creds = create(&lab, "life", "vm1,vm2,vm3", &[]);
    let uri = creds["uri"].as_str().unwrap();
    lab.psql(uri, "CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    lab.psql(
        uri,
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
    )
    .unwrap();
    lab.wait_streaming("life", "vm3").unwrap();
    let expected = rows(&lab, &creds, 1);
    assert_eq!(expected.len(), 2000);

    // vm3 diverges: promoted by hand and written to.
    local_sql(&lab, 3, "SELECT pg_promote()");
    wait_until(Duration::from_secs(10), "vm3 to leave recovery", || {
        Ok(local_sql(&lab, 3, "SELECT pg_is_in_recovery()") == "f")
    })
    .unwrap();
    local_sql(&lab, 3, "DELETE FROM t WHERE id <= 10; UPDATE t SET v = 'rogue' WHERE id = 500; CREATE TABLE rogue (x int)");
    assert_ne!(rows(&lab, &creds, 3), expected);

    let out = lab
        .ctl_ok(&[
            "cluster",
            "resync",
            "life",
            "--node",
            "vm3",
            "--confirm",
            "life",
        ])
        .unwrap();
    assert!(out.contains("done"), "{out}");
    let log = succeeded(&lab, "life", "resync");
    assert!(
        log.iter()
            .any(|l| l.contains("cloned") && l.contains("MB/s")),
        "{log:#?}"
    );
    assert_eq!(
        rows(&lab, &creds, 3),
        expected,
        "vm3 matches the primary row for row"
    );
    assert_eq!(
        lab.column_on(
            &creds,
            3,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'rogue'"
        )
        .unwrap(),
        ["0"]
    );
    assert_eq!(
        lab.column_on(&creds, 3, "SELECT pg_is_in_recovery()")
            .unwrap(),
        ["t"]
    );
    lab.wait_streaming("life", "vm3").unwrap();

    // Reboot a replica: it restarts and streams again.
    let pid_before = lab.pids_in_vm(2, "postgres");
    lab.ctl_ok(&["node", "reboot", "life", "vm2"]).unwrap();
    let log = succeeded(&lab, "life", "reboot");
    assert!(
        log.iter().any(|l| l.contains("vm2 is streaming")),
        "{log:#?}"
    );
    assert_ne!(
        lab.pids_in_vm(2, "postgres"),
        pid_before,
        "postgres was restarted"
    );
    // Reboot the primary with --force: writes pause, then work again.
    let out = lab
        .ctl(&["node", "reboot", "life", "vm1", "--force"])
        .unwrap();
    corral_tests::assert_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("writes to life pause"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.psql(uri, "INSERT INTO t VALUES (9001, 'after reboot')")
        .unwrap();

    // Remove vm3: engine stopped, data erased, slot dropped, node free.
    lab.ctl_ok(&["node", "remove", "life", "vm3", "--confirm", "vm3"])
        .unwrap();
    succeeded(&lab, "life", "remove_node");
    assert_eq!(node_cluster(&lab, "vm3"), "");
    assert!(
        lab.pids_in_vm(3, "postgres").is_empty(),
        "postgres still runs on vm3"
    );
    assert!(!lab.state_dir(3).join("postgres/data").exists());
    assert!(!lab.state_dir(3).join("engine.json").exists());
    assert_eq!(
        lab.psql(
            uri,
            "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots"
        )
        .unwrap(),
        "corral_vm2"
    );

    // ... and add it back: cloned afresh, streaming, every row there.
    lab.ctl_ok(&["node", "add", "life", "vm3"]).unwrap();
    succeeded(&lab, "life", "add_node");
    lab.wait_streaming("life", "vm3").unwrap();
    wait_until(Duration::from_secs(10), "vm3 to have every row", || {
        Ok(rows(&lab, &creds, 3) == rows(&lab, &creds, 1))
    })
    .unwrap();

    // Delete: every engine stopped, every node's data erased, nodes free,
    // the audit trail keeps the record.
    lab.ctl_ok(&["cluster", "delete", "life", "--confirm", "life"])
        .unwrap();
    let clusters = lab.ctl_json(&["cluster", "list"]).unwrap();
    assert_eq!(
        clusters["clusters"].as_array().map(Vec::len).unwrap_or(0),
        0,
        "{clusters}"
    );
    for i in 1..=3 {
        assert_eq!(node_cluster(&lab, &format!("vm{i}")), "");
        assert!(
            lab.pids_in_vm(i, "postgres").is_empty(),
            "postgres still runs on vm{i}"
        );
        assert!(!lab.state_dir(i).join("postgres/data").exists());
    }
    let ops = lab
        .ctl_json(&["operation", "list", "--cluster", "life"])
        .unwrap();
    let kinds: Vec<&str> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "create_cluster",
            "resync",
            "reboot",
            "reboot",
            "remove_node",
            "add_node",
            "delete_cluster"
        ]
    );
    let audit = lab.ctl_json(&["audit", "list"]).unwrap();
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "cluster.delete" && a["result"] == "ok"),
        "{audit}"
    );
    // The freed nodes can serve a new cluster.
    create(&lab, "again", "vm2,vm3", &[]);
}

#[test]
fn sync_mode_makes_commits_wait_for_a_replica() {
    let mut lab = Lab::start(3).unwrap();
    let creds = create(&lab, "safe", "vm1,vm2,vm3", &["--sync"]);
    let uri = creds["uri"].as_str().unwrap().to_string();
    let c = lab.ctl_json(&["cluster", "show", "safe"]).unwrap();
    assert_eq!(c["sync"], true, "{c}");
    assert_eq!(
        lab.psql(&uri, "SHOW synchronous_standby_names").unwrap(),
        "ANY 1 (\"vm2\", \"vm3\")"
    );
    for n in ["vm2", "vm3"] {
        wait_until(
            Duration::from_secs(10),
            &format!("{n} to be a sync standby"),
            || Ok(lab.cluster_node("safe", n)?["replication"] == "sync"),
        )
        .unwrap();
    }
    lab.psql(&uri, "CREATE TABLE t (id int)").unwrap();

    // Off and on again through `cluster set`.
    lab.ctl_ok(&["cluster", "set", "safe", "sync=off"]).unwrap();
    assert_eq!(
        lab.psql(&uri, "SHOW synchronous_standby_names").unwrap(),
        ""
    );
    lab.ctl_ok(&["cluster", "set", "safe", "sync=on"]).unwrap();
    assert_eq!(
        lab.psql(&uri, "SHOW synchronous_standby_names").unwrap(),
        "ANY 1 (\"vm2\", \"vm3\")"
    );

    // With both replicas gone, a commit is not acknowledged.
    lab.kill_vm(2);
    lab.kill_vm(3);
    let out = lab
        .in_ns(
            "cli",
            "timeout",
            &[
                "3",
                "psql",
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                &uri,
                "-c",
                "INSERT INTO t VALUES (1)",
            ],
        )
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(124),
        "the commit returned without a replica: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn coordinator_restart_during_add_node_neither_doubles_nor_abandons_it() {
    let mut lab = Lab::start(2).unwrap();
    lab.ctl_ok(&[
        "cluster", "create", "--name", "big", "--engine", "postgres", "--nodes", "vm1",
    ])
    .unwrap();
    let creds = lab.ctl_json(&["cluster", "credentials", "big"]).unwrap();
    let uri = creds["uri"].as_str().unwrap();
    // About 300 MB, so the clone takes a few seconds.
    lab.psql(
        uri,
        "CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 30) AS v FROM generate_series(1, 300000) g",
    )
    .unwrap();

    let out = lab
        .ctl_json(&["node", "add", "big", "vm2", "--no-wait"])
        .unwrap();
    let op_id = out["id"].as_str().unwrap().to_string();
    let scratch = lab.state_dir(2).join("postgres/data.clone");
    wait_until(Duration::from_secs(30), "the clone to start on vm2", || {
        Ok(scratch.exists())
    })
    .unwrap();
    lab.stop_coordinator().unwrap();
    assert!(
        scratch.exists(),
        "the clone finished before the coordinator stopped; grow the table"
    );
    lab.start_coordinator().unwrap();

    wait_until(
        Duration::from_secs(120),
        "the add-node operation to end",
        || {
            let op = lab.ctl_json(&["operation", "show", &op_id])?;
            Ok(op["state"] == "succeeded" || op["state"] == "failed")
        },
    )
    .unwrap();
    let op = lab.ctl_json(&["operation", "show", &op_id]).unwrap();
    assert_eq!(op["state"], "succeeded", "{op}");
    let log = Lab::operation_log(&op);
    assert!(
        log.iter().any(|l| l.contains("coordinator restarted")),
        "{log:#?}"
    );
    // The clone ran once: the resumed operation waited for it.
    let events = lab.ctl_json(&["event", "list", "--node", "vm2"]).unwrap();
    let clones = count_where(&events["events"], "kind", "clone_started");
    assert_eq!(clones, 1, "{events}");
    lab.wait_streaming("big", "vm2").unwrap();
    assert_eq!(
        lab.column_on(&creds, 2, "SELECT count(*) FROM t").unwrap(),
        ["300000"]
    );
}

#[test]
fn a_lagging_replica_is_not_promoted_without_force() {
    let lab = Lab::start(2).unwrap();
    let creds = create(&lab, "slow", "vm1,vm2", &[]);
    let uri = creds["uri"].as_str().unwrap();
    lab.wait_streaming("slow", "vm2").unwrap();
    // vm2 keeps receiving WAL but stops replaying it.
    local_sql(&lab, 2, "SELECT pg_wal_replay_pause()");
    lab.psql(
        uri,
        "CREATE TABLE t AS SELECT g AS id, repeat('x', 1000) AS v FROM generate_series(1, 30000) g",
    )
    .unwrap();
    wait_until(Duration::from_secs(20), "vm2 to lag 16 MiB", || {
        Ok(lab.cluster_node("slow", "vm2")?["lag_bytes"]
            .as_i64()
            .unwrap_or(0)
            > 16 << 20)
    })
    .unwrap();
    let ops_before = lab
        .ctl_json(&["operation", "list", "--cluster", "slow"])
        .unwrap();
    let out = lab
        .ctl(&["node", "promote", "slow", "vm2", "--confirm", "vm2"])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refusing to promote vm2") && stderr.contains("bytes behind the primary"),
        "{stderr}"
    );
    assert_eq!(
        lab.ctl_json(&["operation", "list", "--cluster", "slow"])
            .unwrap(),
        ops_before,
        "a refused promotion records no operation"
    );
    assert_eq!(lab.cluster_node("slow", "vm1").unwrap()["role"], "primary");

    // Once it has caught up, the same request goes through.
    local_sql(&lab, 2, "SELECT pg_wal_replay_resume()");
    wait_until(Duration::from_secs(20), "vm2 to catch up", || {
        Ok(lab.cluster_node("slow", "vm2")?["lag_bytes"].as_i64() == Some(0))
    })
    .unwrap();
    lab.ctl_ok(&["node", "promote", "slow", "vm2", "--confirm", "vm2"])
        .unwrap();
    assert_eq!(lab.cluster_node("slow", "vm2").unwrap()["role"], "primary");
    assert_eq!(
        lab.column_on(&creds, 2, "SELECT count(*) FROM t").unwrap(),
        ["30000"]
    );
}
