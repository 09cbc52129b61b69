//! PostgreSQL primary/replica clusters end to end, in namespaces: creation
//! with replicas, adding a node, streaming, lag reporting and sync mode.

use corral_tests::{wait_until, Lab};
use serde_json::Value;
use std::time::Duration;

/// A connection string for node `i` alone.
fn node_uri(lab: &Lab, creds: &Value, i: usize) -> String {
    format!(
        "postgresql://{}:{}@{}:5432/{}",
        creds["user"].as_str().unwrap(),
        creds["password"].as_str().unwrap(),
        lab.vm_ip(i),
        creds["database"].as_str().unwrap()
    )
}

fn cluster_node(lab: &Lab, cluster: &str, node: &str) -> Value {
    let c = lab.ctl_json(&["cluster", "show", cluster]).unwrap();
    c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == node)
        .cloned()
        .unwrap_or_else(|| panic!("{node} not in {c}"))
}

#[test]
fn three_node_cluster_streams_rows_to_both_replicas() {
    let lab = Lab::start(3).unwrap();
    lab.ctl_ok(&[
        "cluster",
        "create",
        "--name",
        "orders",
        "--engine",
        "postgres",
        "--mode",
        "primary-replica",
        "--nodes",
        "vm1,vm2,vm3",
    ])
    .unwrap();
    let c = lab.ctl_json(&["cluster", "show", "orders"]).unwrap();
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["mode"], "primary-replica", "{c}");
    let roles: Vec<(String, String)> = c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().into(),
                n["role"].as_str().unwrap().into(),
            )
        })
        .collect();
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
        let replica = node_uri(&lab, &creds, i);
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
        let n = cluster_node(&lab, "orders", "vm2");
        Ok(n["replication"] == "streaming" && n["lag_bytes"].as_i64() == Some(0))
    })
    .unwrap();
    let n1 = cluster_node(&lab, "orders", "vm1");
    assert_eq!(
        n1["replication"], "",
        "a primary has no replication state: {n1}"
    );
    let table = lab.ctl_ok(&["node", "list"]).unwrap();
    assert!(
        table.contains("REPLICATION") && table.contains("LAG"),
        "{table}"
    );
    assert!(table.contains("streaming"), "{table}");
}
