//! Redis primary/replica clusters end to end, in namespaces: creation with
//! replicas fully synchronised from the primary, keys reaching every
//! replica, read-only replicas, a planned switchover, and a failover after
//! killing the primary's VM under a writer through HAProxy, with the
//! split-brain checker probing every node.

use corral_tests::ha::{self, vm_index, wait_acks};
use corral_tests::writer::Writer;
use corral_tests::{wait_until, Lab};
use serde_json::Value;
use std::time::Duration;

/// `redis-cli ARGS` on VM `vm` as the cluster's admin user.
fn cli(lab: &Lab, creds: &Value, vm: usize, args: &[&str]) -> anyhow::Result<String> {
    lab.redis_cli(creds, vm, args)
}

fn create(lab: &Lab, name: &str, extra: &[&str]) -> Value {
    lab.create_engine_cluster(name, "redis", "vm1,vm2,vm3", extra)
        .unwrap()
}

#[test]
fn three_node_redis_cluster_replicates_and_switches_over() {
    let lab = Lab::start(3).unwrap();
    let creds = create(&lab, "cache", &[]);
    let uri = creds["uri"].as_str().unwrap();
    assert!(uri.starts_with("redis://admin:"), "{uri}");
    assert!(uri.ends_with(":6379/0"), "{uri}");
    let c = lab.ctl_json(&["cluster", "show", "cache"]).unwrap();
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["engine"], "redis", "{c}");

    for i in 0..200 {
        cli(
            &lab,
            &creds,
            1,
            &["SET", &format!("k{i}"), &format!("v{i}")],
        )
        .unwrap();
    }
    for vm in [2, 3] {
        lab.wait_streaming("cache", &format!("vm{vm}")).unwrap();
        wait_until(Duration::from_secs(10), &format!("keys on vm{vm}"), || {
            Ok(cli(&lab, &creds, vm, &["DBSIZE"])? == "200")
        })
        .unwrap();
        assert_eq!(cli(&lab, &creds, vm, &["GET", "k199"]).unwrap(), "v199");
        let err = cli(&lab, &creds, vm, &["SET", "x", "1"]).unwrap_err();
        assert!(format!("{err}").contains("READONLY"), "{err}");
    }
    // The engine's figures reach `node list`: clients, memory, keys,
    // offsets, a replica's lag.
    wait_until(Duration::from_secs(5), "engine stats", || {
        let n = lab.node("vm2")?.unwrap_or_default();
        let st = &n["engine"]["stats"];
        Ok(st["keys"] == 200.0
            && st["connections"].as_f64().unwrap_or(0.0) >= 1.0
            && st["used_memory_bytes"].as_f64().unwrap_or(0.0) > 0.0
            && st["repl_offset_bytes"].as_f64().unwrap_or(0.0) > 0.0
            && st["lag_seconds"].is_number())
    })
    .unwrap();

    // Planned switchover to vm2: vm1 follows it.
    lab.ctl_ok(&["node", "promote", "cache", "vm2", "--confirm", "vm2"])
        .unwrap();
    assert_eq!(
        lab.wait_until_primary("cache", Duration::from_secs(10))
            .unwrap(),
        "vm2"
    );
    cli(&lab, &creds, 2, &["SET", "after", "switchover"]).unwrap();
    for vm in [1, 3] {
        wait_until(
            Duration::from_secs(10),
            &format!("the new key on vm{vm}"),
            || Ok(cli(&lab, &creds, vm, &["GET", "after"])? == "switchover"),
        )
        .unwrap();
    }
    lab.wait_streaming("cache", "vm1").unwrap();
    let err = cli(&lab, &creds, 1, &["SET", "x", "1"]).unwrap_err();
    assert!(format!("{err}").contains("READONLY"), "{err}");
}

#[test]
fn failover_after_killing_the_primary_vm_under_a_writer() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster_of(&mut lab, "ha", "redis", &["--sync"]).unwrap();
    // Zero-loss mode as docs/redis.md describes it: each write is counted
    // only once a replica has it (WAIT 1).
    let through = format!("{}?wait=1", lab.haproxy_uri(&creds));
    let writer = Writer::start(&through, ha::WRITES, Duration::from_millis(10));
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(15)).unwrap();
    assert_eq!(lab.health(1, "/primary").unwrap(), 200);
    assert_eq!(lab.health(2, "/primary").unwrap(), 503);

    writer.take_longest_gap();
    lab.kill_vm(1);
    let new = ha::wait_new_primary(&lab, "ha", "vm1", Duration::from_secs(30)).unwrap();
    wait_acks(&writer, 50, Duration::from_secs(30)).unwrap();
    eprintln!(
        "failover to {new}: writes paused {} ms",
        writer.take_longest_gap().as_millis()
    );
    lab.restart_vm(1).unwrap();
    assert_eq!(
        ha::wait_settled(&lab, "ha", 3, Duration::from_secs(60)).unwrap(),
        new
    );
    wait_acks(&writer, 20, Duration::from_secs(10)).unwrap();
    let report = writer.finish();
    let checked = check.finish();
    let v = checked.violations();
    assert!(v.is_empty(), "two nodes took writes at once: {v:?}");
    assert!(report.acked.len() > 100, "{report:?}");

    // Every write a replica had acknowledged (WAIT 1) survived.
    let missing = ha::missing_on(&lab, &creds, vm_index(&new), &report.acked).unwrap();
    eprintln!(
        "{} writes acknowledged, {} lost",
        report.acked.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    ha::wait_every_node_holds(&lab, &creds, 3, &report.acked, Duration::from_secs(15)).unwrap();
}

#[test]
fn valkey_and_keydb_are_the_same_protocol_on_the_configured_server() {
    // The agents run their configured server (`--redis-server`, here
    // Debian's redis-server) for every name of the protocol.
    let lab = Lab::start(2).unwrap();
    for (i, engine) in [(1, "valkey"), (2, "keydb")] {
        let name = format!("c{engine}");
        let creds = lab
            .create_engine_cluster(&name, engine, &format!("vm{i}"), &[])
            .unwrap();
        let uri = creds["uri"].as_str().unwrap();
        assert!(uri.starts_with("redis://admin:"), "{uri}");
        cli(&lab, &creds, i, &["SET", "k", engine]).unwrap();
        assert_eq!(cli(&lab, &creds, i, &["GET", "k"]).unwrap(), engine);
        let c = lab.ctl_json(&["cluster", "show", &name]).unwrap();
        assert_eq!(c["engine"], engine, "{c}");
    }
}
