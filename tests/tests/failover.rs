//! Auto-failover end to end, in namespaces: real PostgreSQL, real HAProxy in
//! front of the cluster routing by the agents' health endpoints, real
//! process kills and network cuts.

use corral_tests::checker::WriteChecker;
use corral_tests::writer::Writer;
use corral_tests::{wait_until, Lab};
use serde_json::Value;
use std::time::{Duration, Instant};

/// A three-node cluster with the writer's and the checker's tables, HAProxy
/// routing to its primary, and its credentials.
fn cluster(lab: &mut Lab, name: &str, extra: &[&str]) -> Value {
    let creds = lab.create_replicated(name, "vm1,vm2,vm3", extra).unwrap();
    let uri = creds["uri"].as_str().unwrap().to_string();
    lab.psql(
        &uri,
        "CREATE TABLE w (id bigint PRIMARY KEY, at timestamptz NOT NULL); \
         CREATE TABLE probe (node text NOT NULL, at timestamptz NOT NULL)",
    )
    .unwrap();
    for vm in ["vm2", "vm3"] {
        lab.wait_streaming(name, vm).unwrap();
    }
    lab.start_haproxy(&[1, 2, 3]).unwrap();
    let through = lab.haproxy_uri(&creds);
    wait_until(
        Duration::from_secs(15),
        "HAProxy to route to the primary",
        || Ok(lab.psql(&through, "SELECT 1").is_ok()),
    )
    .unwrap();
    creds
}

/// A checker probing every node directly.
fn checker(lab: &Lab, creds: &Value) -> WriteChecker {
    WriteChecker::start(
        (1..=3)
            .map(|i| (format!("vm{i}"), lab.node_uri(creds, i)))
            .collect(),
        "probe",
    )
}

/// Ids in table `w` on node `i`.
fn ids_on(lab: &Lab, creds: &Value, i: usize) -> Vec<i64> {
    lab.column_on(creds, i, "SELECT id FROM w ORDER BY id")
        .unwrap()
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn vm_index(id: &str) -> usize {
    id.trim_start_matches("vm").parse().unwrap()
}

/// Waits until the writer has had `n` more acknowledgements than now.
fn wait_acks(w: &Writer, n: usize, timeout: Duration) {
    let start = w.report().acked.len();
    wait_until(timeout, &format!("{n} more acknowledged writes"), || {
        Ok(w.report().acked.len() >= start + n)
    })
    .unwrap_or_else(|e| panic!("{e:#}; writer: {:?}", w.report().last_error));
}

/// Kinds of the events recorded for `cluster`, oldest first.
fn event_kinds(lab: &Lab, cluster: &str) -> Vec<(String, String)> {
    let v = lab
        .ctl_json(&["event", "list", "--cluster", cluster, "--limit", "500"])
        .unwrap();
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn killing_the_primary_vm_fails_over_with_every_acknowledged_write() {
    let mut lab = Lab::start(3).unwrap();
    let creds = cluster(&mut lab, "ha", &["--sync"]);
    let writer = Writer::start(&lab.haproxy_uri(&creds), "w", Duration::from_millis(20));
    let check = checker(&lab, &creds);
    wait_acks(&writer, 50, Duration::from_secs(10));
    assert_eq!(lab.health(1, "/primary").unwrap(), 200);
    assert_eq!(lab.health(2, "/primary").unwrap(), 503);
    assert_eq!(lab.health(2, "/replica").unwrap(), 200);

    writer.take_longest_gap();
    let killed = Instant::now();
    lab.kill_vm(1);
    let new = {
        let mut new = String::new();
        wait_until(Duration::from_secs(30), "a new primary", || {
            new = lab.wait_until_primary("ha", Duration::from_secs(1))?;
            Ok(new != "vm1")
        })
        .unwrap();
        new
    };
    wait_acks(&writer, 100, Duration::from_secs(30));
    let pause = writer.take_longest_gap();
    eprintln!(
        "failover to {new}: writes paused {} ms (through HAProxy), new primary seen after {} ms",
        pause.as_millis(),
        killed.elapsed().as_millis()
    );

    // The old primary comes back: it rejoins as a replica, never writable.
    lab.restart_vm(1).unwrap();
    lab.wait_streaming("ha", "vm1").unwrap();
    wait_acks(&writer, 50, Duration::from_secs(10));
    let report = writer.finish();
    let seen = check.finish();
    assert!(
        seen.violations().is_empty(),
        "two writable primaries: {:?}",
        seen.violations()
    );

    // Sync mode: every acknowledged write is on the new primary, and (once
    // replayed) on every node.
    let n = vm_index(&new);
    let on_new = ids_on(&lab, &creds, n);
    let missing: Vec<i64> = report
        .acked
        .iter()
        .filter(|id| on_new.binary_search(id).is_err())
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing on {new}: {missing:?}",
        missing.len()
    );
    for i in 1..=3 {
        wait_until(
            Duration::from_secs(10),
            &format!("vm{i} to have every row"),
            || Ok(ids_on(&lab, &creds, i).len() >= on_new.len()),
        )
        .unwrap();
    }
    assert_eq!(lab.health(1, "/primary").unwrap(), 503);
    assert_eq!(lab.health(n, "/primary").unwrap(), 200);

    // The record: the operation's steps, the timeline event, the audit row.
    let op = lab.operation("ha", "failover").unwrap();
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["requested_by"], "coordinator (auto-failover)", "{op}");
    let log = Lab::operation_log(&op).join("\n");
    for step in [
        "detected: primary vm1 lost",
        "term raised to 2",
        "promoting",
        "holds its lease",
    ] {
        assert!(
            log.contains(step),
            "the failover log lacks {step:?}:\n{log}"
        );
    }
    let events = event_kinds(&lab, "ha");
    let timeline = events
        .iter()
        .find(|(k, _)| k == "failover")
        .map(|(_, m)| m.clone())
        .unwrap_or_else(|| panic!("no failover event: {events:?}"));
    for part in [
        "detected at",
        "lease ended at",
        "chosen",
        "promoted at",
        "repointed at",
    ] {
        assert!(
            timeline.contains(part),
            "timeline lacks {part:?}: {timeline}"
        );
    }
    assert!(events.iter().any(|(k, _)| k == "rejoined"), "{events:?}");
    let audit = lab.ctl_json(&["audit", "list"]).unwrap().to_string();
    assert!(audit.contains("cluster.failover"), "{audit}");
    let c = lab.ctl_json(&["cluster", "show", "ha"]).unwrap();
    assert_eq!(c["term"], 2, "{c}");
}
