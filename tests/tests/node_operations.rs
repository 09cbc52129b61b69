//! The node operations that succeed, on MariaDB and Redis clusters (the
//! PostgreSQL ones are in lifecycle.rs; every refusal, for all three
//! engines, in refusals.rs): reboot a replica and the primary, resync a
//! replica, remove one (engine stopped, data erased, node free) and add it
//! back (cloned afresh), then delete the cluster (every engine stopped,
//! every node's data erased).

use corral_tests::client::with_client;
use corral_tests::{wait_until, Lab};
use serde_json::Value;
use std::time::Duration;

/// The engine's data directory under a node's state directory, and the
/// name of its server process.
fn layout(engine: &str) -> (&'static str, &'static str) {
    match engine {
        "redis" => ("redis/data", "redis-server"),
        _ => ("mariadb/data", "mariadbd"),
    }
}

fn marker_statements(engine: &str, from: u32, to: u32) -> Vec<String> {
    let ids: Vec<String> = (from..=to).map(|i| i.to_string()).collect();
    match engine {
        "redis" => vec![format!("RPUSH marker {}", ids.join(" "))],
        _ => vec![
            "CREATE TABLE IF NOT EXISTS marker (id int PRIMARY KEY)".into(),
            format!("INSERT INTO marker VALUES ({})", ids.join("),(")),
        ],
    }
}

fn write(lab: &Lab, creds: &Value, vm: usize, statements: &[String]) {
    with_client(&lab.node_uri(creds, vm), async |c| {
        for st in statements {
            c.execute(st).await?;
        }
        Ok(())
    })
    .unwrap();
}

fn marker(lab: &Lab, creds: &Value, vm: usize) -> anyhow::Result<Vec<i64>> {
    with_client(&lab.node_uri(creds, vm), async |c| c.ids("marker").await)
}

fn succeeded(lab: &Lab, cluster: &str, kind: &str) {
    let op = lab.operation(cluster, kind).unwrap();
    assert_eq!(op["state"], "succeeded", "{op}");
}

fn node_cluster(lab: &Lab, node: &str) -> String {
    lab.node(node).unwrap().unwrap()["cluster"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn node_operations(engine: &str) {
    let lab = Lab::start(3).unwrap();
    let creds = lab
        .create_engine_cluster("ops", engine, "vm1,vm2,vm3", &[])
        .unwrap();
    let (data, process) = layout(engine);
    write(&lab, &creds, 1, &marker_statements(engine, 1, 100));
    let all = |vm: usize, n: usize| {
        wait_until(
            Duration::from_secs(15),
            &format!("{n} marker rows on vm{vm}"),
            || Ok(marker(&lab, &creds, vm).map(|m| m.len()).unwrap_or(0) == n),
        )
        .unwrap();
    };
    all(2, 100);
    all(3, 100);

    // Reboot a replica: a new process, streaming again.
    let before = lab.pids_in_vm(2, process);
    lab.ctl_ok(&["node", "reboot", "ops", "vm2"]).unwrap();
    succeeded(&lab, "ops", "reboot");
    assert_ne!(lab.pids_in_vm(2, process), before, "{process} restarted");
    lab.wait_streaming("ops", "vm2").unwrap();
    // Reboot the primary (--force): writes work again afterwards.
    lab.ctl_ok(&["node", "reboot", "ops", "vm1", "--force"])
        .unwrap();
    write(&lab, &creds, 1, &marker_statements(engine, 101, 110));
    all(2, 110);

    // Resync a replica: erased and cloned again, every row there.
    lab.ctl_ok(&[
        "cluster",
        "resync",
        "ops",
        "--node",
        "vm3",
        "--confirm",
        "ops",
    ])
    .unwrap();
    succeeded(&lab, "ops", "resync");
    lab.wait_streaming("ops", "vm3").unwrap();
    all(3, 110);

    // Remove vm3: engine stopped, data erased, node free; add it back.
    lab.ctl_ok(&["node", "remove", "ops", "vm3", "--confirm", "vm3"])
        .unwrap();
    succeeded(&lab, "ops", "remove_node");
    assert_eq!(node_cluster(&lab, "vm3"), "");
    assert!(
        lab.pids_in_vm(3, process).is_empty(),
        "{process} still runs on vm3"
    );
    assert!(!lab.state_dir(3).join(data).exists());
    assert!(!lab.state_dir(3).join("engine.json").exists());
    lab.ctl_ok(&["node", "add", "ops", "vm3"]).unwrap();
    succeeded(&lab, "ops", "add_node");
    lab.wait_streaming("ops", "vm3").unwrap();
    all(3, 110);

    // Delete: every engine stopped, every node's data erased, nodes free.
    lab.ctl_ok(&["cluster", "delete", "ops", "--confirm", "ops"])
        .unwrap();
    for i in 1..=3 {
        assert_eq!(node_cluster(&lab, &format!("vm{i}")), "");
        assert!(
            lab.pids_in_vm(i, process).is_empty(),
            "{process} still runs on vm{i}"
        );
        assert!(!lab.state_dir(i).join(data).exists());
    }
}

#[test]
fn mariadb_node_operations() {
    node_operations("mariadb");
}

#[test]
fn redis_node_operations() {
    node_operations("redis");
}
