//! MariaDB primary/replica clusters end to end, in namespaces: creation
//! with replicas cloned from the primary, rows reaching every replica,
//! read-only replicas, a planned switchover, and a failover after killing
//! the primary's VM under a writer through HAProxy in semi-sync mode.
//! (MySQL 8 cannot be installed on Debian 12; its statements are
//! unit-tested in the agent.)

use corral_tests::ha::{self, vm_index, wait_acks};
use corral_tests::{wait_until, Lab};
use serde_json::Value;
use std::time::Duration;

/// `mariadb -e SQL` on VM `vm` as the cluster's admin user.
fn sql_on(lab: &Lab, creds: &Value, vm: usize, sql: &str) -> anyhow::Result<String> {
    lab.mariadb(creds, vm, sql)
}

fn create(lab: &Lab, name: &str, nodes: &str, extra: &[&str]) -> Value {
    lab.create_engine_cluster(name, "mariadb", nodes, extra)
        .unwrap()
}

fn wait_rows(lab: &Lab, creds: &Value, vm: usize, want: &str) {
    wait_until(
        Duration::from_secs(15),
        &format!("{want} rows on vm{vm}"),
        || Ok(sql_on(lab, creds, vm, "SELECT count(*) FROM t")? == want),
    )
    .unwrap();
}

#[test]
fn three_node_mariadb_cluster_replicates_and_switches_over() {
    let lab = Lab::start(3).unwrap();
    let creds = create(&lab, "shop", "vm1,vm2,vm3", &[]);
    let uri = creds["uri"].as_str().unwrap();
    assert!(uri.starts_with("mysql://admin:"), "{uri}");
    assert_eq!(creds["port"], 3306, "{creds}");
    let c = lab.ctl_json(&["cluster", "show", "shop"]).unwrap();
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["engine"], "mariadb", "{c}");

    // Rows written on the primary reach both replicas.
    sql_on(
        &lab,
        &creds,
        1,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT seq, concat('row ', seq) FROM seq_1_to_500",
    )
    .unwrap();
    for vm in [2, 3] {
        wait_rows(&lab, &creds, vm, "500");
        lab.wait_streaming("shop", &format!("vm{vm}")).unwrap();
    }
    // The engine's figures reach `node list`: connections, the GTID
    // sequence number, a replica's lag in seconds.
    wait_until(Duration::from_secs(5), "engine stats", || {
        let (p, r) = (
            lab.node("vm1")?.unwrap_or_default(),
            lab.node("vm2")?.unwrap_or_default(),
        );
        let (p, r) = (&p["engine"]["stats"], &r["engine"]["stats"]);
        Ok(p["connections"].as_f64().unwrap_or(0.0) >= 1.0
            && p["gtid_seq"].as_f64().unwrap_or(0.0) >= 2.0
            && r["gtid_seq"] == p["gtid_seq"]
            && r["lag_seconds"].is_number())
    })
    .unwrap();
    // Replicas are read-only, even for the admin user.
    let err = sql_on(&lab, &creds, 2, "INSERT INTO t VALUES (501, 'no')").unwrap_err();
    assert!(format!("{err}").contains("read-only"), "{err}");

    // Planned switchover to vm2: the old primary follows it.
    lab.ctl_ok(&["node", "promote", "shop", "vm2", "--confirm", "vm2"])
        .unwrap();
    assert_eq!(
        lab.wait_until_primary("shop", Duration::from_secs(10))
            .unwrap(),
        "vm2"
    );
    sql_on(&lab, &creds, 2, "INSERT INTO t VALUES (501, 'after')").unwrap();
    for vm in [1, 3] {
        wait_rows(&lab, &creds, vm, "501");
    }
    lab.wait_streaming("shop", "vm1").unwrap();
    let err = sql_on(&lab, &creds, 1, "INSERT INTO t VALUES (502, 'no')").unwrap_err();
    assert!(format!("{err}").contains("read-only"), "{err}");
}

#[test]
fn semi_sync_switchover_and_failover_lose_no_acknowledged_write() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster_of(&mut lab, "ha", "mariadb", &["--sync"]).unwrap();
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(15)).unwrap();
    assert_eq!(lab.health(1, "/primary").unwrap(), 200);
    assert_eq!(lab.health(2, "/primary").unwrap(), 503);

    // Planned switchover under the writer.
    writer.take_longest_gap();
    lab.ctl_ok(&["node", "promote", "ha", "vm2", "--confirm", "vm2"])
        .unwrap();
    wait_acks(&writer, 50, Duration::from_secs(15)).unwrap();
    eprintln!(
        "switchover: writes paused {} ms",
        writer.take_longest_gap().as_millis()
    );

    // Failover: the primary's VM dies.
    lab.kill_vm(2);
    let new = ha::wait_new_primary(&lab, "ha", "vm2", Duration::from_secs(30)).unwrap();
    wait_acks(&writer, 50, Duration::from_secs(30)).unwrap();
    eprintln!(
        "failover to {new}: writes paused {} ms",
        writer.take_longest_gap().as_millis()
    );
    // The old primary comes back and follows the new one.
    lab.restart_vm(2).unwrap();
    assert_eq!(
        ha::wait_settled(&lab, "ha", 3, Duration::from_secs(60)).unwrap(),
        new
    );
    wait_acks(&writer, 20, Duration::from_secs(10)).unwrap();
    let report = writer.finish();
    assert!(report.acked.len() > 100, "{report:?}");
    let v = check.finish().violations();
    assert!(v.is_empty(), "two nodes took writes at once: {v:?}");

    // Semi-sync: every acknowledged write is on the new primary, and then
    // on every node.
    let missing = ha::missing_on(&lab, &creds, vm_index(&new), &report.acked).unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    ha::wait_every_node_holds(&lab, &creds, 3, &report.acked, Duration::from_secs(15)).unwrap();
}

#[test]
fn a_replica_with_an_errant_transaction_is_resynced_to_the_primarys_data() {
    let lab = Lab::start(2).unwrap();
    let creds = create(&lab, "errant", "vm1,vm2", &[]);
    sql_on(
        &lab,
        &creds,
        1,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT seq, concat('row ', seq) FROM seq_1_to_100",
    )
    .unwrap();
    wait_rows(&lab, &creds, 2, "100");

    // By hand on the replica, as root over its socket (root is not held
    // back by read_only): a transaction the primary never had.
    let socket = lab.state_dir(2).join("mariadb/run/mariadbd.sock");
    let out = lab
        .in_ns(
            "vm2",
            "mariadb",
            &[
                "-S",
                &socket.to_string_lossy(),
                "-u",
                "root",
                "-e",
                "INSERT INTO defaultdb.t VALUES (1000, 'errant'); \
                 UPDATE defaultdb.t SET v = 'changed' WHERE id = 1",
            ],
        )
        .unwrap();
    corral_tests::assert_success(&out);
    assert_eq!(
        sql_on(&lab, &creds, 2, "SELECT count(*) FROM t").unwrap(),
        "101"
    );
    // The primary goes on writing.
    sql_on(&lab, &creds, 1, "INSERT INTO t VALUES (101, 'row 101')").unwrap();

    lab.ctl_ok(&[
        "cluster",
        "resync",
        "errant",
        "--node",
        "vm2",
        "--confirm",
        "errant",
    ])
    .unwrap();
    lab.wait_streaming("errant", "vm2").unwrap();
    // Exactly the primary's data: same rows, same values, no errant row.
    let all = "SET SESSION group_concat_max_len = 1000000; \
               SELECT group_concat(id, ':', v ORDER BY id SEPARATOR ',') FROM t";
    let primary = sql_on(&lab, &creds, 1, all).unwrap();
    wait_until(
        Duration::from_secs(15),
        "vm2 to hold the primary's rows",
        || Ok(sql_on(&lab, &creds, 2, all)? == primary),
    )
    .unwrap();
    assert!(
        !primary.contains("errant") && primary.contains("1:row 1,"),
        "{primary}"
    );
    // And it follows the primary again.
    sql_on(&lab, &creds, 1, "INSERT INTO t VALUES (102, 'row 102')").unwrap();
    wait_rows(&lab, &creds, 2, "102");
}

/// Runs `sql` as root over VM `vm`'s own socket (as an operator logged in
/// on the VM would).
fn root_sql(lab: &Lab, vm: usize, sql: &str) {
    let socket = lab.state_dir(vm).join("mariadb/run/mariadbd.sock");
    let out = lab
        .in_ns(
            &format!("vm{vm}"),
            "mariadb",
            &["-S", &socket.to_string_lossy(), "-u", "root", "-e", sql],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{sql} on vm{vm}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn with_a_plain_replica_beside_a_semi_sync_one_nothing_behind_is_promoted() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster_of(&mut lab, "mixed", "mariadb", &[]).unwrap();
    // vm3 becomes a plain (asynchronous) replica, then the cluster turns
    // semi-sync on: for the whole term, the primary counts one semi-sync
    // client for two replicas and cannot say which one acknowledges.
    root_sql(
        &lab,
        3,
        "SET GLOBAL rpl_semi_sync_slave_enabled = OFF; STOP SLAVE IO_THREAD; START SLAVE IO_THREAD",
    );
    lab.ctl_ok(&["cluster", "set", "mixed", "sync=on"]).unwrap();
    let writer = ha::writer(&lab, &creds);
    wait_acks(&writer, 50, Duration::from_secs(15)).unwrap();

    // The primary and the semi-sync replica die together. vm3 is up and
    // healthy, but may lack commits vm2 acknowledged: it must not be
    // promoted while vm2 cannot report.
    lab.kill_vm(2);
    lab.kill_vm(1);
    wait_until(
        Duration::from_secs(30),
        "the failover to be blocked",
        || {
            let c = lab.ctl_json(&["cluster", "show", "mixed"])?;
            Ok(c["failover_status"]
                .as_str()
                .is_some_and(|s| s.contains("vm2 may hold acknowledged commits")))
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let failovers = ha::operations(&lab, "mixed", "failover").unwrap();
    assert!(
        failovers.is_empty(),
        "promoted while blocked: {failovers:?}"
    );

    // vm2 comes back: it holds every acknowledged commit and is promoted.
    lab.restart_vm(2).unwrap();
    let new = ha::wait_new_primary(&lab, "mixed", "vm1", Duration::from_secs(60)).unwrap();
    wait_acks(&writer, 20, Duration::from_secs(30)).unwrap();
    let report = writer.finish();
    let missing = ha::missing_on(&lab, &creds, vm_index(&new), &report.acked).unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}
