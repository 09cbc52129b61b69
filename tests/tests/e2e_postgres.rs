//! A single-node PostgreSQL cluster end to end, in namespaces: enrollment,
//! creation, a client writing and reading rows, engine supervision, node
//! liveness and a coordinator restart.

use corral_tests::{wait_until, Lab};
use serde_json::Value;
use std::time::{Duration, Instant};

fn create_cluster(lab: &Lab, name: &str, node: &str) -> String {
    lab.ctl_ok(&[
        "cluster", "create", "--name", name, "--engine", "postgres", "--node", node,
    ])
    .unwrap();
    lab.uri(name).unwrap()
}

fn events(lab: &Lab, node: &str) -> Vec<Value> {
    lab.ctl_json(&["event", "list", "--node", node]).unwrap()["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn has_event(events: &[Value], kind: &str) -> bool {
    events.iter().any(|e| e["kind"] == kind)
}

#[test]
fn three_agents_enroll_and_a_client_writes_and_reads_rows() {
    let lab = Lab::start(3).unwrap();

    // Every node reports metrics from its VM.
    let nodes = lab.ctl_json(&["node", "list"]).unwrap();
    let nodes = nodes["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["state"], "up", "{n}");
        let m = &n["metrics"];
        assert!(m["memory_total_bytes"].as_u64().unwrap() > 0, "{n}");
        assert!(m["disk_total_bytes"].as_u64().unwrap() > 0, "{n}");
        assert!(m["cpu_percent"].as_f64().unwrap() >= 0.0, "{n}");
        assert!(m["load1"].as_f64().is_some(), "{n}");
        assert!(m["net_rx_bytes_per_sec"].as_f64().is_some(), "{n}");
    }
    // The node's key and certificate are private to root.
    for f in ["node.key", "node.crt"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(lab.state_dir(1).join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    let uri = create_cluster(&lab, "orders", "vm2");
    assert!(uri.starts_with("postgresql://admin:"), "{uri}");
    assert!(
        uri.contains(&format!("@{}:5432/defaultdb", lab.vm_ip(2))),
        "{uri}"
    );

    let cluster = lab.ctl_json(&["cluster", "show", "orders"]).unwrap();
    assert_eq!(cluster["state"], "running");
    assert_eq!(cluster["engine"], "postgres");
    assert_eq!(cluster["nodes"][0]["id"], "vm2");
    assert_eq!(cluster["nodes"][0]["role"], "primary");

    // A client in its own namespace writes and reads back over TCP, with the
    // printed credentials.
    lab.psql(&uri, "CREATE TABLE orders (id int PRIMARY KEY, item text)")
        .unwrap();
    lab.psql(
        &uri,
        "INSERT INTO orders VALUES (1, 'apples'), (2, 'pears'), (3, 'figs')",
    )
    .unwrap();
    assert_eq!(
        lab.psql(&uri, "SELECT string_agg(item, ',' ORDER BY id) FROM orders")
            .unwrap(),
        "apples,pears,figs"
    );
    // A wrong password is refused.
    let bad = uri.replacen("admin:", "admin:x", 1);
    assert!(lab.psql(&bad, "SELECT 1").is_err());

    // The server runs as the postgres user, never root.
    let pid =
        std::fs::read_to_string(lab.state_dir(2).join("postgres/data/postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid.split_whitespace().skip(1).any(|u| u == "0"),
        "postgres runs as root: {uid}"
    );

    // The operation and the audit trail record what happened.
    let ops = lab
        .ctl_json(&["operation", "list", "--cluster", "orders"])
        .unwrap();
    let op = &ops["operations"][0];
    assert_eq!(op["kind"], "create_cluster");
    assert_eq!(op["state"], "succeeded");
    assert!(op["log"].as_array().unwrap().len() >= 3, "{op}");
    let audit = lab.ctl_json(&["audit", "list"]).unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["action"] == "cluster.create" && e["result"] == "ok" && e["who"] == "admin"));
    assert!(entries
        .iter()
        .any(|e| e["action"] == "cluster.credentials" && e["result"] == "ok"));
    assert_eq!(
        entries
            .iter()
            .filter(|e| e["action"] == "node.enroll" && e["result"] == "ok")
            .count(),
        3
    );
}

#[test]
fn killed_postgres_is_restarted_by_the_agent_and_reported() {
    let lab = Lab::start(1).unwrap();
    let uri = create_cluster(&lab, "crashy", "vm1");
    lab.psql(&uri, "CREATE TABLE t AS SELECT 42 AS answer")
        .unwrap();

    let pidfile = lab.state_dir(1).join("postgres/data/postmaster.pid");
    let old_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    corral_tests::sh("kill", &["-9", &old_pid.to_string()]).unwrap();

    wait_until(
        Duration::from_secs(30),
        "engine_exited and engine_restarted events",
        || {
            let ev = events(&lab, "vm1");
            Ok(has_event(&ev, "engine_exited") && has_event(&ev, "engine_restarted"))
        },
    )
    .unwrap();
    let ev = events(&lab, "vm1");
    let exited = ev.iter().find(|e| e["kind"] == "engine_exited").unwrap();
    assert!(
        exited["message"].as_str().unwrap().contains("SIGKILL"),
        "{exited}"
    );
    assert_eq!(exited["cluster"], "crashy");

    wait_until(
        Duration::from_secs(10),
        "node list to show the restarted engine",
        || {
            let n = lab.node("vm1")?.unwrap();
            Ok(n["engine"]["state"] == "running" && n["engine"]["restarts"].as_u64() == Some(1))
        },
    )
    .unwrap();
    let n = lab.node("vm1").unwrap().unwrap();
    assert_ne!(n["engine"]["pid"].as_i64().unwrap(), old_pid as i64);
    // Same data, served by the new process.
    assert_eq!(lab.psql(&uri, "SELECT answer FROM t").unwrap(), "42");
}

#[test]
fn a_killed_vm_is_down_within_three_heartbeat_intervals() {
    let mut lab = Lab::start(2).unwrap();
    let interval = Duration::from_millis(lab.opts.heartbeat_interval_ms);
    lab.kill_vm(2);
    let killed = Instant::now();
    lab.wait_node_state("vm2", "down", interval * 6).unwrap();
    let seen_down = killed.elapsed();
    // Observed from outside, through the CLI, with one CLI round trip of slack.
    assert!(
        seen_down <= interval * 3 + Duration::from_millis(800),
        "down after {seen_down:?}"
    );
    // The coordinator's own record: the silence it measured when it decided
    // (its monitor writes the event on its next 200 ms tick).
    wait_until(Duration::from_secs(5), "a node_down event for vm2", || {
        Ok(has_event(&events(&lab, "vm2"), "node_down"))
    })
    .unwrap();
    let ev = events(&lab, "vm2");
    let down = ev.iter().find(|e| e["kind"] == "node_down").unwrap();
    let msg = down["message"].as_str().unwrap();
    let secs: f64 = msg
        .rsplit("no heartbeat for ")
        .next()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(secs <= 3.0 * interval.as_secs_f64() + 0.3, "{msg}");
    // The other VM is unaffected.
    assert_eq!(lab.node("vm1").unwrap().unwrap()["state"], "up");
}

fn snapshot(lab: &Lab) -> (Value, Vec<String>, Value, Vec<Value>) {
    let clusters = lab.ctl_json(&["cluster", "list"]).unwrap();
    let clusters: Value = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| serde_json::json!([c["name"], c["engine"], c["state"], c["port"]]))
        .collect();
    let mut nodes: Vec<String> = lab.ctl_json(&["node", "list"]).unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            format!(
                "{} {} {} {}",
                n["id"], n["address"], n["cluster"], n["role"]
            )
        })
        .collect();
    nodes.sort();
    let ops = lab.ctl_json(&["operation", "list"]).unwrap()["operations"].clone();
    let audit = lab.ctl_json(&["audit", "list"]).unwrap()["entries"]
        .as_array()
        .unwrap()
        .clone();
    (clusters, nodes, ops, audit)
}

#[test]
fn coordinator_restart_keeps_everything_and_agents_reconnect() {
    let mut lab = Lab::start(2).unwrap();
    let uri = create_cluster(&lab, "durable", "vm1");
    lab.psql(
        &uri,
        "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')",
    )
    .unwrap();
    let (clusters, nodes, ops, audit) = snapshot(&lab);
    assert_eq!(clusters.as_array().unwrap().len(), 1);

    lab.stop_coordinator().unwrap();
    // While the coordinator is away the engine crashes; the agent restarts it
    // and holds the events until the coordinator is back.
    let pidfile = lab.state_dir(1).join("postgres/data/postmaster.pid");
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    corral_tests::sh("kill", &["-9", &pid]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let restarted_at = corral_proto_now_ms();
    lab.start_coordinator().unwrap();

    let (clusters2, nodes2, ops2, audit2) = snapshot(&lab);
    assert_eq!(clusters, clusters2);
    assert_eq!(nodes, nodes2);
    assert_eq!(ops, ops2);
    // Every audit row survives (reads after the restart may add new ones).
    for row in &audit {
        assert!(audit2.contains(row), "audit row lost across restart: {row}");
    }

    // The agents reconnect on their own.
    for id in ["vm1", "vm2"] {
        wait_until(
            Duration::from_secs(15),
            &format!("{id} heartbeating to the new coordinator"),
            || {
                let n = lab.node(id)?.unwrap();
                Ok(n["state"] == "up"
                    && n["last_heartbeat_ms"].as_i64().unwrap_or(0) > restarted_at)
            },
        )
        .unwrap();
    }
    // Events from while it was away are delivered, not lost.
    wait_until(Duration::from_secs(15), "events held by the agent", || {
        let ev = events(&lab, "vm1");
        Ok(has_event(&ev, "engine_exited") && has_event(&ev, "engine_restarted"))
    })
    .unwrap();
    assert_eq!(lab.psql(&uri, "SELECT v FROM kept").unwrap(), "still here");
}

fn corral_proto_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
