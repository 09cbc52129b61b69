//! Every refusal of the node and cluster lifecycle commands (node add,
//! remove, promote and reboot; cluster set, resync and delete), in
//! namespaces: the command fails with a message naming the reason, and the
//! clusters, the node assignments and the operation record are exactly as
//! they were. A second operation on a cluster is refused while one runs,
//! naming the running one.

use corral_tests::client::with_client;
use corral_tests::{field_pairs, wait_until, Lab};
use serde_json::{json, Value};
use std::time::Duration;

/// Everything a refused lifecycle command could have changed: each
/// cluster's settings and members, every operation ever recorded, and which
/// cluster (and role) each node serves.
#[derive(Debug, PartialEq)]
struct Snapshot {
    clusters: Vec<Value>,
    operations: Vec<Value>,
    nodes: Vec<Value>,
}

fn snapshot(lab: &Lab) -> Snapshot {
    let list = lab.ctl_json(&["cluster", "list"]).unwrap();
    let mut clusters: Vec<Value> = list["clusters"]
        .as_array()
        .unwrap_or_else(|| panic!("no clusters array in {list}"))
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap();
            // The detail view, as an operator would check it.
            let c = lab.ctl_json(&["cluster", "show", name]).unwrap();
            for flag in ["sync", "termination_protection"] {
                assert!(c[flag].is_boolean(), "{flag} missing from {c}");
            }
            let mut members = field_pairs(&c["nodes"], "id", "role");
            members.sort();
            json!({
                "name": c["name"],
                "engine": c["engine"],
                "mode": c["mode"],
                "state": c["state"],
                "sync": c["sync"],
                "termination_protection": c["termination_protection"],
                "auto_failover": c["auto_failover"],
                "lease_ms": c["lease_ms"],
                "heartbeat_interval_ms": c["heartbeat_interval_ms"],
                "term": c["term"],
                "nodes": members,
            })
        })
        .collect();
    clusters.sort_by_key(|c| c["name"].as_str().unwrap_or_default().to_string());
    // Ids and kinds, not states: an operation accepted before the refusal
    // may still be moving along.
    let ops = lab.ctl_json(&["operation", "list"]).unwrap();
    let mut operations: Vec<Value> = ops["operations"]
        .as_array()
        .unwrap_or_else(|| panic!("no operations array in {ops}"))
        .iter()
        .map(|o| json!([o["id"], o["cluster"], o["kind"]]))
        .collect();
    operations.sort_by_key(|o| o.to_string());
    let nodes = lab.ctl_json(&["node", "list"]).unwrap();
    let mut nodes: Vec<Value> = nodes["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes array in {nodes}"))
        .iter()
        .map(|n| json!([n["id"], n["cluster"], n["role"]]))
        .collect();
    nodes.sort_by_key(|n| n.to_string());
    Snapshot {
        clusters,
        operations,
        nodes,
    }
}

/// Runs `corralctl ARGS`, which must fail with every one of `expected` in
/// its error and leave everything as it was; returns stderr.
fn refused(lab: &Lab, args: &[&str], expected: &[&str]) -> String {
    let cmd = format!("corralctl {}", args.join(" "));
    let before = snapshot(lab);
    let out = lab.ctl(args).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{cmd} succeeded but must be refused; stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    for e in expected {
        assert!(
            stderr.contains(e),
            "{cmd}: the error lacks {e:?}; stderr:\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{cmd}: {stderr}");
    let after = snapshot(lab);
    assert_eq!(before, after, "{cmd} was refused but changed the cluster");
    stderr
}

fn create(lab: &Lab, name: &str, mode: &str, nodes: &str) {
    create_engine(lab, name, "postgres", mode, nodes);
}

fn create_engine(lab: &Lab, name: &str, engine: &str, mode: &str, nodes: &str) {
    lab.ctl_ok(&[
        "cluster", "create", "--name", name, "--engine", engine, "--mode", mode, "--nodes", nodes,
    ])
    .unwrap();
    let c = lab.ctl_json(&["cluster", "show", name]).unwrap();
    assert_eq!(c["state"], "running", "{c}");
}

fn uri(lab: &Lab, cluster: &str) -> String {
    lab.uri(cluster).unwrap()
}

/// The value of `field` of `cluster` as `cluster show` reports it.
fn cluster_field(lab: &Lab, cluster: &str, field: &str) -> Value {
    lab.ctl_json(&["cluster", "show", cluster]).unwrap()[field].clone()
}

#[test]
fn refused_lifecycle_commands_change_nothing() {
    lifecycle_refusals("postgres");
}

#[test]
fn refused_lifecycle_commands_change_nothing_on_mariadb() {
    lifecycle_refusals("mariadb");
}

#[test]
fn refused_lifecycle_commands_change_nothing_on_redis() {
    lifecycle_refusals("redis");
}

/// 100 marker rows (Redis: list elements) on cluster c1's primary.
fn write_marker(lab: &Lab, creds: &Value) {
    let statements: Vec<String> = match corral_tests::uri_scheme(creds) {
        "redis" => {
            let ids: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
            vec![format!("RPUSH marker {}", ids.join(" "))]
        }
        "mysql" => vec![
            "CREATE TABLE marker (id int PRIMARY KEY)".into(),
            "INSERT INTO marker SELECT seq FROM seq_1_to_100".into(),
        ],
        _ => vec![
            "CREATE TABLE marker (id int PRIMARY KEY)".into(),
            "INSERT INTO marker SELECT generate_series(1, 100)".into(),
        ],
    };
    with_client(&lab.node_uri(creds, 1), async |c| {
        for st in &statements {
            c.execute(st).await?;
        }
        Ok(())
    })
    .unwrap();
}

fn marker_count(lab: &Lab, creds: &Value) -> usize {
    with_client(&lab.node_uri(creds, 1), async |c| c.ids("marker").await)
        .unwrap()
        .len()
}

/// Every refusal of the lifecycle commands on a cluster of `engine`.
fn lifecycle_refusals(engine: &str) {
    let lab = Lab::start(5).unwrap();
    create_engine(&lab, "c1", engine, "primary-replica", "vm1,vm2,vm3");
    create_engine(&lab, "s1", engine, "single", "vm4");
    // vm5 stays free.
    let creds = lab.ctl_json(&["cluster", "credentials", "c1"]).unwrap();
    write_marker(&lab, &creds);
    for n in ["vm2", "vm3"] {
        lab.wait_streaming("c1", n).unwrap();
    }
    let start = snapshot(&lab);

    // node remove
    refused(
        &lab,
        &["node", "remove", "c1", "vm1", "--confirm", "vm1"],
        &["vm1 is the primary of cluster c1; promote another node first"],
    );
    refused(
        &lab,
        &["node", "remove", "c1", "vm2"],
        &["repeat the node name to confirm", "--confirm vm2"],
    );
    refused(
        &lab,
        &["node", "remove", "c1", "vm2", "--confirm", "vm3"],
        &["repeat the node name to confirm", "--confirm vm2"],
    );
    refused(
        &lab,
        &["node", "remove", "s1", "vm4", "--confirm", "vm4"],
        &["vm4 is the last node of cluster s1", "cluster delete s1"],
    );
    refused(
        &lab,
        &["node", "remove", "c1", "vm4", "--confirm", "vm4"],
        &["\"vm4\" is not a member of cluster c1"],
    );
    refused(
        &lab,
        &["node", "remove", "nosuch", "vm2", "--confirm", "vm2"],
        &["no cluster named \"nosuch\""],
    );

    // node promote
    refused(
        &lab,
        &["node", "promote", "c1", "vm1", "--confirm", "vm1"],
        &["vm1 is already the primary of cluster c1"],
    );
    refused(
        &lab,
        &["node", "promote", "c1", "vm2"],
        &["repeat the node name to confirm", "--confirm vm2"],
    );
    refused(
        &lab,
        &["node", "promote", "c1", "vm2", "--confirm", "vm3"],
        &["repeat the node name to confirm", "--confirm vm2"],
    );
    refused(
        &lab,
        &["node", "promote", "c1", "vm5", "--confirm", "vm5"],
        &["\"vm5\" is not a member of cluster c1"],
    );
    refused(
        &lab,
        &["node", "promote", "nosuch", "vm2", "--confirm", "vm2"],
        &["no cluster named \"nosuch\""],
    );

    // node reboot
    refused(
        &lab,
        &["node", "reboot", "c1", "vm1"],
        &[
            "vm1 is the primary of cluster c1",
            "restarting it pauses writes",
            "--force",
        ],
    );
    refused(
        &lab,
        &["node", "reboot", "s1", "vm4"],
        &[
            "vm4 is the primary of cluster s1",
            "restarting it pauses writes",
        ],
    );
    refused(
        &lab,
        &["node", "reboot", "c1", "vm4"],
        &["\"vm4\" is not a member of cluster c1"],
    );

    // cluster resync
    refused(
        &lab,
        &["cluster", "resync", "s1", "--confirm", "s1"],
        &["cluster s1 has a single node: there is no replica to resync"],
    );
    refused(
        &lab,
        &[
            "cluster",
            "resync",
            "c1",
            "--node",
            "vm1",
            "--confirm",
            "c1",
        ],
        &["vm1 is the primary, the source every replica is cloned from"],
    );
    refused(
        &lab,
        &[
            "cluster",
            "resync",
            "c1",
            "--node",
            "vm4",
            "--confirm",
            "c1",
        ],
        &["\"vm4\" is not a member of cluster c1"],
    );
    refused(
        &lab,
        &["cluster", "resync", "c1"],
        &["repeat the cluster name to confirm", "--confirm c1"],
    );
    refused(
        &lab,
        &["cluster", "resync", "c1", "--confirm", "wrong"],
        &["repeat the cluster name to confirm", "--confirm c1"],
    );
    refused(
        &lab,
        &["cluster", "resync", "nosuch", "--confirm", "nosuch"],
        &["no cluster named \"nosuch\""],
    );

    // cluster delete and termination protection
    let before = snapshot(&lab);
    lab.ctl_ok(&["cluster", "set", "c1", "termination-protection=on"])
        .unwrap();
    assert_eq!(cluster_field(&lab, "c1", "termination_protection"), true);
    assert_ne!(
        snapshot(&lab),
        before,
        "the snapshot must see termination protection change"
    );
    refused(
        &lab,
        &["cluster", "delete", "c1", "--confirm", "c1"],
        &[
            "cluster c1 has termination protection on",
            "termination-protection=off",
        ],
    );
    lab.ctl_ok(&["cluster", "set", "c1", "termination-protection=off"])
        .unwrap();
    assert_eq!(cluster_field(&lab, "c1", "termination_protection"), false);
    refused(
        &lab,
        &["cluster", "delete", "c1"],
        &["repeat the cluster name to confirm", "--confirm c1"],
    );
    refused(
        &lab,
        &["cluster", "delete", "c1", "--confirm", "s1"],
        &["repeat the cluster name to confirm", "--confirm c1"],
    );
    refused(
        &lab,
        &["cluster", "delete", "nosuch", "--confirm", "nosuch"],
        &["no cluster named \"nosuch\""],
    );

    // cluster set
    refused(
        &lab,
        &["cluster", "set", "s1", "sync=on"],
        &["sync=on needs at least one replica", "node add s1"],
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "sync=maybe"],
        &["invalid value \"maybe\" for sync: use on or off"],
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "colour=on"],
        &["unknown setting \"colour\""],
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "sync"],
        &["invalid setting \"sync\": use KEY=VALUE"],
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "lease=500ms"],
        &[
            "lease 500 ms is outside 1000..=60000 ms",
            "nothing was changed",
        ],
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "heartbeat=1s"],
        &["a lease of 1000 ms must span at least 3 heartbeats of 1000 ms"],
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "profile=fast"],
        &[
            "unknown profile \"fast\": use lan or wan",
            "nothing was changed",
        ],
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "profile=wan", "lease=2s"],
        &["give either the profile or lease=DURATION heartbeat=DURATION, not both"],
    );
    // A profile sets both timings, and `cluster show` names it.
    let timing = |c: &Value| {
        (
            c["lease_ms"].as_u64(),
            c["heartbeat_interval_ms"].as_u64(),
            c["profile"].as_str().map(str::to_string),
        )
    };
    lab.ctl_ok(&["cluster", "set", "c1", "profile=wan"])
        .unwrap();
    let c = lab.ctl_json(&["cluster", "show", "c1"]).unwrap();
    assert_eq!(
        timing(&c),
        (Some(4000), Some(1000), Some("wan".into())),
        "{c}"
    );
    lab.ctl_ok(&["cluster", "set", "c1", "profile=lan"])
        .unwrap();
    let c = lab.ctl_json(&["cluster", "show", "c1"]).unwrap();
    assert_eq!(
        timing(&c),
        (Some(1000), Some(250), Some("lan".into())),
        "{c}"
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "lease=soon"],
        &["invalid duration \"soon\""],
    );
    refused(
        &lab,
        &["cluster", "set", "c1", "auto-failover=perhaps"],
        &["invalid value \"perhaps\" for auto-failover"],
    );
    refused(
        &lab,
        &["cluster", "set", "nosuch", "sync=on"],
        &["no cluster named \"nosuch\""],
    );

    // node add
    refused(
        &lab,
        &["node", "add", "c1", "vm2"],
        &["node vm2 already belongs to cluster c1"],
    );
    refused(
        &lab,
        &["node", "add", "s1", "vm1"],
        &["node vm1 already belongs to cluster c1"],
    );
    refused(
        &lab,
        &["node", "add", "nosuch", "vm5"],
        &["no cluster named \"nosuch\""],
    );
    refused(
        &lab,
        &["node", "add", "c1", "vm9"],
        &["unknown node \"vm9\""],
    );

    // Nothing above changed anything: same clusters, members, roles,
    // settings and operations as before the first refusal.
    assert_eq!(snapshot(&lab), start);
    // And the data and the replication are untouched.
    assert_eq!(marker_count(&lab, &creds), 100);
    for n in ["vm2", "vm3"] {
        lab.wait_streaming("c1", n).unwrap();
    }

    // The only replica of a sync cluster cannot be removed: every commit
    // waits for it.
    let before = snapshot(&lab);
    lab.ctl_ok(&["node", "add", "s1", "vm5"]).unwrap();
    assert_ne!(
        snapshot(&lab),
        before,
        "the snapshot must see a node join and its operation"
    );
    lab.ctl_ok(&["cluster", "set", "s1", "sync=on"]).unwrap();
    assert_eq!(cluster_field(&lab, "s1", "sync"), true);
    refused(
        &lab,
        &["node", "remove", "s1", "vm5", "--confirm", "vm5"],
        &[
            "vm5 is the only replica and cluster s1 has sync=on",
            "sync=off",
        ],
    );
    let s1 = lab.ctl_json(&["cluster", "show", "s1"]).unwrap();
    assert_eq!(s1["sync"], true, "{s1}");
    assert_eq!(s1["nodes"].as_array().unwrap().len(), 2, "{s1}");
}

#[test]
fn a_busy_cluster_and_down_nodes_refuse_operations() {
    let mut lab = Lab::start(4).unwrap();
    create(&lab, "c1", "primary-replica", "vm1,vm2,vm3");
    // vm4 stays free.
    let c1 = uri(&lab, "c1");
    // Enough data that re-cloning both replicas takes a while.
    lab.psql(
        &c1,
        "CREATE TABLE big AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 200000) g",
    )
    .unwrap();
    for n in ["vm2", "vm3"] {
        lab.wait_streaming("c1", n).unwrap();
    }

    // Two operations on one cluster never run at once: the second is
    // refused, naming the one that holds the cluster.
    let resync = lab
        .ctl_json(&["cluster", "resync", "c1", "--confirm", "c1", "--no-wait"])
        .unwrap();
    let id = resync["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {resync}"))
        .to_string();
    assert_eq!(resync["kind"], "resync", "{resync}");
    let err = refused(
        &lab,
        &["node", "reboot", "c1", "vm2"],
        &[
            &format!("operation {id} (resync)"),
            "on cluster c1 (requested by admin)",
            &format!("corralctl operation show {id}"),
        ],
    );
    assert!(
        err.contains("is running on cluster c1") || err.contains("is pending on cluster c1"),
        "{err}"
    );
    // Nor is the cluster deleted from under the resync.
    refused(
        &lab,
        &["cluster", "delete", "c1", "--confirm", "c1"],
        &[&format!("operation {id} (resync)"), "on cluster c1"],
    );
    wait_until(Duration::from_secs(120), "the resync to succeed", || {
        let op = lab.ctl_json(&["operation", "show", &id])?;
        match op["state"].as_str() {
            Some("succeeded") => Ok(true),
            Some("failed") => panic!("the resync failed: {op}"),
            _ => Ok(false),
        }
    })
    .unwrap();
    for n in ["vm2", "vm3"] {
        lab.wait_streaming("c1", n).unwrap();
    }
    assert_eq!(lab.psql(&c1, "SELECT count(*) FROM big").unwrap(), "200000");

    // A replica that is down is not promoted, nor rebooted.
    lab.kill_vm(3);
    lab.wait_node_state("vm3", "down", Duration::from_secs(15))
        .unwrap();
    refused(
        &lab,
        &["node", "promote", "c1", "vm3", "--confirm", "vm3"],
        &[
            "refusing to promote vm3",
            "vm3 is not up",
            "Nothing was changed",
        ],
    );
    refused(
        &lab,
        &["node", "reboot", "c1", "vm3"],
        &["vm3 is down (no recent heartbeat)"],
    );

    // A free node that is down is not added.
    lab.kill_vm(4);
    lab.wait_node_state("vm4", "down", Duration::from_secs(15))
        .unwrap();
    refused(&lab, &["node", "add", "c1", "vm4"], &["node vm4 is not up"]);

    // With the primary down: no planned switchover (it cannot be stopped
    // first), no new replica (nothing to clone from), no restart. Without
    // auto-failover, so the coordinator does not promote vm2 (about a
    // second after the kill) while these are refused.
    lab.ctl_ok(&["cluster", "set", "c1", "auto-failover=off"])
        .unwrap();
    lab.kill_vm(1);
    lab.wait_node_state("vm1", "down", Duration::from_secs(15))
        .unwrap();
    refused(
        &lab,
        &["node", "promote", "c1", "vm2", "--confirm", "vm2"],
        &["refusing to promote vm2", "the primary vm1 is down"],
    );
    refused(
        &lab,
        &["node", "add", "c1", "vm4"],
        &["the primary vm1 is down; a new replica is cloned from it"],
    );
    refused(
        &lab,
        &["node", "reboot", "c1", "vm1", "--force"],
        &["vm1 is down (no recent heartbeat)"],
    );
    let c = lab.ctl_json(&["cluster", "show", "c1"]).unwrap();
    assert_eq!(c["state"], "running", "{c}");
}
