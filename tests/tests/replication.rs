//! PostgreSQL primary/replica clusters end to end, in namespaces: creation
//! with replicas, adding a node, streaming, lag reporting and sync mode.

use corral_tests::writer::Writer;
use corral_tests::{field_pairs, wait_until, Lab};
use serde_json::Value;
use std::time::Duration;

#[test]
fn three_node_cluster_streams_rows_to_both_replicas() {
    let lab = Lab::start(3).unwrap();
    lab.create_replicated("orders", "vm1,vm2,vm3", &[]).unwrap();
    let c = lab.ctl_json(&["cluster", "show", "orders"]).unwrap();
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["mode"], "primary-replica", "{c}");
    let roles = field_pairs(&c["nodes"], "id", "role");
    assert_eq!(
        roles,
        [("vm1", "primary"), ("vm2", "replica"), ("vm3", "replica")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );

    let creds = lab.ctl_json(&["cluster", "credentials", "orders"]).unwrap();
    let uri = creds["uri"].as_str().unwrap();
    assert!(uri.contains("target_session_attrs=read-write"), "{uri}");
    lab.psql(uri, "CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    lab.psql(
        uri,
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g",
    )
    .unwrap();
    for i in [2, 3] {
        let replica = lab.node_uri(&creds, i);
        wait_until(Duration::from_secs(10), &format!("rows on vm{i}"), || {
            Ok(lab
                .psql(&replica, "SELECT count(*), sum(id) FROM t")
                .ok()
                .as_deref()
                == Some("500|125250"))
        })
        .unwrap();
        // A replica is read-only.
        let err = lab
            .psql(&replica, "INSERT INTO t VALUES (1000, 'x')")
            .unwrap_err();
        assert!(format!("{err}").contains("read-only"), "{err}");
    }

    // node list: role, replication state and lag of each replica.
    wait_until(Duration::from_secs(10), "lag figures", || {
        let n = lab.cluster_node("orders", "vm2").unwrap();
        Ok(n["replication"] == "streaming" && n["lag_bytes"].as_i64() == Some(0))
    })
    .unwrap();
    let n1 = lab.cluster_node("orders", "vm1").unwrap();
    assert_eq!(
        n1["replication"], "",
        "a primary has no replication state: {n1}"
    );
    let table = lab.ctl_ok(&["node", "list"]).unwrap();
    assert!(
        table.contains("REPLICATION") && table.contains("LAG"),
        "{table}"
    );
    // The engine's own figures: client connections (the agent's own
    // health connection at least), a replica's replay lag in seconds.
    let (p, r) = (
        lab.node("vm1").unwrap().unwrap(),
        lab.node("vm2").unwrap().unwrap(),
    );
    assert!(
        p["engine"]["stats"]["connections"].as_f64().unwrap_or(0.0) >= 1.0,
        "{p}"
    );
    assert!(p["engine"]["stats"].get("lag_seconds").is_none(), "{p}");
    assert!(r["engine"]["stats"]["lag_seconds"].is_number(), "{r}");
    assert!(table.contains("streaming"), "{table}");
}

/// The ids in `table` on node `i`, in order.
fn ids_on(lab: &Lab, creds: &Value, i: usize, table: &str) -> Vec<i64> {
    lab.column_on(creds, i, &format!("SELECT id FROM {table} ORDER BY id"))
        .unwrap()
        .iter()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn in_recovery(lab: &Lab, creds: &Value, i: usize) -> bool {
    lab.column_on(creds, i, "SELECT pg_is_in_recovery()")
        .unwrap()
        == ["t"]
}

#[test]
fn switchover_under_a_writer_loses_no_acknowledged_row() {
    let lab = Lab::start(3).unwrap();
    let creds = lab.create_replicated("shop", "vm1,vm2,vm3", &[]).unwrap();
    let uri = creds["uri"].as_str().unwrap().to_string();
    lab.psql(
        &uri,
        "CREATE TABLE w (id bigint PRIMARY KEY, at timestamptz)",
    )
    .unwrap();

    let writer = Writer::start(&uri, "w", Duration::from_millis(10));
    wait_until(Duration::from_secs(10), "the writer to get going", || {
        Ok(writer.report().acked.len() > 50)
    })
    .unwrap();
    writer.take_longest_gap();
    wait_until(Duration::from_secs(10), "vm2 to be streaming", || {
        Ok(lab.cluster_node("shop", "vm2").unwrap()["replication"] == "streaming")
    })
    .unwrap();
    let out = lab
        .ctl_ok(&["node", "promote", "shop", "vm2", "--confirm", "vm2"])
        .unwrap();
    assert!(out.contains("done"), "{out}");
    // Let the writer land a few more on the new primary.
    let before = writer.report().acked.len();
    wait_until(Duration::from_secs(10), "writes on the new primary", || {
        Ok(writer.report().acked.len() > before + 50)
    })
    .unwrap();
    let pause = writer.take_longest_gap();
    let report = writer.finish();
    eprintln!(
        "switchover: {} acknowledged inserts, {} errors, writes paused for {} ms (last error: {})",
        report.acked.len(),
        report.errors,
        pause.as_millis(),
        report.last_error
    );

    // Roles moved; the old primary streams from the new one.
    let c = lab.ctl_json(&["cluster", "show", "shop"]).unwrap();
    let role = |id: &str| {
        c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap()["role"]
            .clone()
    };
    assert_eq!(role("vm2"), "primary", "{c}");
    assert_eq!(role("vm1"), "replica", "{c}");
    assert_eq!(role("vm3"), "replica", "{c}");
    assert!(!in_recovery(&lab, &creds, 2));
    assert!(
        in_recovery(&lab, &creds, 1),
        "the old primary must be a standby"
    );
    for n in ["vm1", "vm3"] {
        lab.wait_streaming("shop", n).unwrap();
    }

    // Every acknowledged row is on the new primary and on both replicas.
    let on_primary = ids_on(&lab, &creds, 2, "w");
    let missing: Vec<&i64> = report
        .acked
        .iter()
        .filter(|id| on_primary.binary_search(id).is_err())
        .collect();
    assert!(missing.is_empty(), "acknowledged rows lost: {missing:?}");
    for i in [1, 3] {
        wait_until(
            Duration::from_secs(10),
            &format!("vm{i} to have every row"),
            || Ok(ids_on(&lab, &creds, i, "w") == on_primary),
        )
        .unwrap();
    }

    // The operation log tells the story.
    let ops = lab
        .ctl_json(&["operation", "list", "--cluster", "shop"])
        .unwrap();
    let op = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "promote")
        .cloned()
        .unwrap();
    assert_eq!(op["state"], "succeeded", "{op}");
    let log: Vec<String> = op["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap().to_string())
        .collect();
    for step in [
        "stopping the primary vm1",
        "has replayed every write",
        "promoting vm2",
        "vm1 now follows vm2",
    ] {
        assert!(
            log.iter().any(|l| l.contains(step)),
            "no {step:?} in {log:#?}"
        );
    }
}
