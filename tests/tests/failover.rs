//! Auto-failover end to end, in namespaces: real PostgreSQL, real HAProxy in
//! front of the cluster routing by the agents' health endpoints, real
//! process kills and network cuts. Every scenario runs a writer through
//! HAProxy and a checker that tries to write to every node directly, and
//! ends with one writable primary and every other node streaming from it.

use corral_tests::checker::CheckReport;
use corral_tests::ha::{self, events, missing_on, operations, vm_index, wait_acks};
use corral_tests::{wait_until, Lab};
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(60);

/// The last time `old` fenced itself was before `new`'s promotion (the
/// event times come from one machine's clock): returns the gap in ms.
fn fenced_before_promotion(lab: &Lab, cluster: &str, old: &str, new: &str) -> i64 {
    let ev = events(lab, cluster).unwrap();
    let last = |kind: &str, node: &str| {
        ev.iter()
            .filter(|e| e.0 == kind && e.1 == node)
            .map(|e| e.2)
            .max()
            .unwrap_or_else(|| panic!("no {kind} event of {node}: {ev:?}"))
    };
    let (fenced, promoted) = (last("fenced", old), last("promoted", new));
    assert!(
        fenced < promoted,
        "{old} fenced itself at {fenced}, after {new} was promoted at {promoted}"
    );
    promoted - fenced
}

fn no_two_writable(report: &CheckReport) {
    let v = report.violations();
    assert!(v.is_empty(), "two nodes took writes at once: {v:?}");
}

#[test]
fn killing_the_primary_vm_fails_over_with_every_acknowledged_write() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "ha", &["--sync"]).unwrap();
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    assert_eq!(lab.health(1, "/primary").unwrap(), 200);
    assert_eq!(lab.health(2, "/primary").unwrap(), 503);
    assert_eq!(lab.health(2, "/replica").unwrap(), 200);

    writer.take_longest_gap();
    let killed = Instant::now();
    lab.kill_vm(1);
    let new = ha::wait_new_primary(&lab, "ha", "vm1", Duration::from_secs(30)).unwrap();
    wait_acks(&writer, 100, Duration::from_secs(30)).unwrap();
    eprintln!(
        "failover to {new}: writes paused {} ms (through HAProxy); seen by the CLI after {} ms",
        writer.take_longest_gap().as_millis(),
        killed.elapsed().as_millis()
    );

    // The old primary's VM comes back: it rejoins as a replica, never
    // writable.
    lab.restart_vm(1).unwrap();
    assert_eq!(ha::wait_settled(&lab, "ha", 3, SETTLE).unwrap(), new);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    let report = writer.finish();
    no_two_writable(&check.finish());

    // Sync mode: every acknowledged write is on the new primary, and once
    // replayed on every node.
    let n = vm_index(&new);
    let missing = missing_on(&lab, &creds, n, &report.acked).unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    ha::wait_every_node_holds(&lab, &creds, 3, &report.acked, Duration::from_secs(10)).unwrap();
    assert_eq!(lab.health(1, "/primary").unwrap(), 503);
    assert_eq!(lab.health(1, "/replica").unwrap(), 200);
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
    let ev = events(&lab, "ha").unwrap();
    let timeline = ev
        .iter()
        .find(|e| e.0 == "failover")
        .map(|e| e.3.clone())
        .unwrap_or_else(|| panic!("no failover event: {ev:?}"));
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
    assert!(
        ev.iter().any(|e| e.0 == "rejoined" && e.1 == "vm1"),
        "vm1 did not rejoin by pg_rewind: {ev:?}"
    );
    // The new primary held its lease from the moment it was promoted: it
    // was never fenced (which would have ended its first sessions).
    assert!(
        !ev.iter().any(|e| e.0 == "fenced" && e.1 == new),
        "{new} was fenced after its promotion: {ev:?}"
    );
    let rejoin = lab.operation("ha", "rejoin").unwrap();
    assert_eq!(rejoin["state"], "succeeded", "{rejoin}");
    let audit = lab.ctl_json(&["audit", "list"]).unwrap().to_string();
    assert!(audit.contains("cluster.failover"), "{audit}");
    let c = lab.ctl_json(&["cluster", "show", "ha"]).unwrap();
    assert_eq!(c["term"], 2, "{c}");
    assert!(
        c["failover_status"]
            .as_str()
            .unwrap()
            .contains(&format!("primary {new} holds its lease")),
        "{c}"
    );
}

#[test]
fn partitions_the_primary_survives_from_the_coordinator_only_and_fences_itself_from_everyone() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "part", &["--sync"]).unwrap();
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    // vm1 probed from inside itself too: no cut hides it from this one.
    let local = ha::local_checker(&lab, &creds, 1);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();

    // 1. Cut between the coordinator and the primary only: the replicas
    // still confirm it, so it keeps its lease and serves; nothing is
    // promoted.
    let cut_at = corral_proto::now_ms();
    lab.cut("vm1", "ctl").unwrap();
    lab.wait_node_state("vm1", "down", Duration::from_secs(10))
        .unwrap();
    writer.take_longest_gap();
    let acks = writer.report().acked.len();
    std::thread::sleep(Duration::from_secs(8));
    let during = writer.report().acked.len() - acks;
    let gap = writer.take_longest_gap();
    let c = lab.ctl_json(&["cluster", "show", "part"]).unwrap();
    let status = c["failover_status"].as_str().unwrap().to_string();
    lab.heal("vm1", "ctl").unwrap();
    lab.wait_node_state("vm1", "up", Duration::from_secs(10))
        .unwrap();
    assert!(
        status.contains("unreachable from the coordinator but its replicas"),
        "{status}"
    );
    assert!(
        during > 100 && gap < Duration::from_secs(2),
        "the primary stopped serving while cut from the coordinator: {during} writes in 8 s, \
         longest pause {gap:?}"
    );
    assert_eq!(c["term"], 1, "something was promoted: {c}");
    assert!(operations(&lab, "part", "failover").unwrap().is_empty());
    let ev = events(&lab, "part").unwrap();
    assert!(
        !ev.iter()
            .any(|e| e.0 == "fenced" && e.1 == "vm1" && e.2 > cut_at),
        "vm1 fenced itself though its replicas confirmed it: {ev:?}"
    );
    assert!(ev.iter().any(|e| e.0 == "primary_unreachable"), "{ev:?}");

    // 2. Cut off from everyone: it fences itself, before another node is
    // promoted.
    lab.isolate(1).unwrap();
    let new = ha::wait_new_primary(&lab, "part", "vm1", Duration::from_secs(30)).unwrap();
    wait_acks(&writer, 50, Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    lab.reconnect(1).unwrap();
    assert_eq!(ha::wait_settled(&lab, "part", 3, SETTLE).unwrap(), new);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    let report = writer.finish();
    no_two_writable(&CheckReport::merged(&[check.finish(), local.finish()]));

    let ms = fenced_before_promotion(&lab, "part", "vm1", &new);
    eprintln!("vm1 fenced itself {ms} ms before {new} was promoted");
    let missing = missing_on(&lab, &creds, vm_index(&new), &report.acked).unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

#[test]
fn a_coordinator_outage_does_not_take_writes_down() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "calm", &[]).unwrap();
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    let stopped_at = corral_proto::now_ms();
    lab.stop_coordinator().unwrap();
    writer.take_longest_gap();
    let acks = writer.report().acked.len();
    std::thread::sleep(Duration::from_secs(60));
    let during = writer.report().acked.len() - acks;
    let gap = writer.take_longest_gap();
    lab.start_coordinator().unwrap();
    // Past the restart grace period and a few leases.
    std::thread::sleep(Duration::from_secs(10));
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    writer.finish();
    no_two_writable(&check.finish());
    eprintln!("coordinator away 60 s: {during} writes, longest pause {gap:?}");
    assert!(
        during > 1000 && gap < Duration::from_secs(2),
        "writes stopped while the coordinator was away: {during} in 60 s, longest pause {gap:?}"
    );
    let c = lab.ctl_json(&["cluster", "show", "calm"]).unwrap();
    assert_eq!(c["term"], 1, "a failover happened: {c}");
    assert!(operations(&lab, "calm", "failover").unwrap().is_empty());
    let ev = events(&lab, "calm").unwrap();
    assert!(
        !ev.iter().any(|e| e.0 == "fenced" && e.2 > stopped_at),
        "a node fenced itself: {ev:?}"
    );
    assert_eq!(ha::wait_settled(&lab, "calm", 3, SETTLE).unwrap(), "vm1");
}

#[test]
fn a_cut_replica_catches_up_and_nothing_is_promoted() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "rep", &["--sync"]).unwrap();
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    lab.isolate(3).unwrap();
    lab.wait_node_state("vm3", "down", Duration::from_secs(10))
        .unwrap();
    // Sync mode: the other replica acknowledges commits meanwhile.
    wait_acks(&writer, 200, Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    lab.reconnect(3).unwrap();
    assert_eq!(ha::wait_settled(&lab, "rep", 3, SETTLE).unwrap(), "vm1");
    let report = writer.finish();
    no_two_writable(&check.finish());
    assert!(operations(&lab, "rep", "failover").unwrap().is_empty());
    wait_until(Duration::from_secs(10), "vm3 to catch up", || {
        Ok(missing_on(&lab, &creds, 3, &report.acked)?.is_empty())
    })
    .unwrap();
}

#[test]
fn a_coordinator_killed_during_a_failover_resumes_it() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "crash", &["--sync"]).unwrap();
    // From now on the coordinator stops every failover after raising the
    // term, before promoting: there it is killed.
    lab.stop_coordinator().unwrap();
    lab.start_coordinator_env(&[("CORRAL_FAILPOINTS", "failover-before-promote")])
        .unwrap();
    for vm in ["vm1", "vm2", "vm3"] {
        lab.wait_node_state(vm, "up", Duration::from_secs(10))
            .unwrap();
    }
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    lab.kill_vm(1);
    wait_until(Duration::from_secs(30), "the failover to start", || {
        Ok(operations(&lab, "crash", "failover")?.iter().any(|o| {
            Lab::operation_log(o)
                .iter()
                .any(|l| l.contains("term raised"))
        }))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.kill_coordinator();
    lab.start_coordinator().unwrap();
    let new = ha::wait_new_primary(&lab, "crash", "vm1", Duration::from_secs(30)).unwrap();
    wait_acks(&writer, 50, Duration::from_secs(30)).unwrap();
    lab.restart_vm(1).unwrap();
    assert_eq!(ha::wait_settled(&lab, "crash", 3, SETTLE).unwrap(), new);
    let report = writer.finish();
    no_two_writable(&check.finish());
    let ops = operations(&lab, "crash", "failover").unwrap();
    assert_eq!(ops.len(), 1, "the failover ran twice: {ops:?}");
    assert_eq!(ops[0]["state"], "succeeded", "{}", ops[0]);
    let log = Lab::operation_log(&ops[0]).join("\n");
    assert!(log.contains("coordinator restarted; resuming"), "{log}");
    let c = lab.ctl_json(&["cluster", "show", "crash"]).unwrap();
    assert_eq!(c["term"], 2, "{c}");
    let missing = missing_on(&lab, &creds, vm_index(&new), &report.acked).unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

#[test]
fn with_auto_failover_off_the_coordinator_only_raises_the_alarm() {
    let mut lab = Lab::start(3).unwrap();
    ha::cluster(&mut lab, "manual", &[]).unwrap();
    lab.ctl_ok(&["cluster", "set", "manual", "auto-failover=off"])
        .unwrap();
    lab.kill_vm(1);
    wait_until(Duration::from_secs(30), "the alarm", || {
        Ok(events(&lab, "manual")?
            .iter()
            .any(|e| e.0 == "failover_needed"))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let c = lab.ctl_json(&["cluster", "show", "manual"]).unwrap();
    assert_eq!(c["term"], 1, "{c}");
    let status = c["failover_status"].as_str().unwrap();
    assert!(
        status.contains("auto-failover is off") && status.contains("could take over"),
        "{status}"
    );
    assert!(operations(&lab, "manual", "failover").unwrap().is_empty());
    // The operator decides: a forced promotion.
    lab.ctl_ok(&[
        "node",
        "promote",
        "manual",
        "vm2",
        "--confirm",
        "vm2",
        "--force",
    ])
    .unwrap();
    lab.restart_vm(1).unwrap();
    assert_eq!(ha::wait_settled(&lab, "manual", 3, SETTLE).unwrap(), "vm2");
}

#[test]
fn a_former_primary_that_cannot_be_rewound_is_cloned_again() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "reclone", &[]).unwrap();
    let uri = creds["uri"].as_str().unwrap().to_string();
    lab.psql(
        &uri,
        "INSERT INTO w SELECT g, now() FROM generate_series(1, 1000) g",
    )
    .unwrap();
    lab.wait_streaming("reclone", "vm2").unwrap();
    lab.wait_streaming("reclone", "vm3").unwrap();
    let killed_at = corral_proto::now_ms();
    lab.kill_vm(1);
    let new = ha::wait_new_primary(&lab, "reclone", "vm1", Duration::from_secs(30)).unwrap();
    // The store names the candidate before its promotion completes: wait
    // until it takes writes (a refused insert committed nothing).
    wait_until(
        Duration::from_secs(10),
        "the new primary to take writes",
        || {
            Ok(lab
                .psql(
                    &uri,
                    "INSERT INTO w SELECT g, now() FROM generate_series(1001, 1500) g",
                )
                .is_ok())
        },
    )
    .unwrap();
    // vm1's control file is gone: pg_rewind cannot work on it.
    std::fs::remove_file(lab.state_dir(1).join("postgres/data/global/pg_control")).unwrap();
    lab.restart_vm(1).unwrap();
    assert_eq!(ha::wait_settled(&lab, "reclone", 3, SETTLE).unwrap(), new);
    // The agent's events ride on its next heartbeats.
    wait_until(
        Duration::from_secs(10),
        "vm1 cloned again after a failed rewind",
        || {
            let ev = events(&lab, "reclone")?;
            let vm1: Vec<&str> = ev
                .iter()
                .filter(|e| e.1 == "vm1" && e.2 > killed_at)
                .map(|e| e.0.as_str())
                .collect();
            Ok(vm1.contains(&"rewind_failed") && vm1.contains(&"clone_finished"))
        },
    )
    .unwrap();
    let all: Vec<i64> = (1..=1500).collect();
    wait_until(Duration::from_secs(10), "vm1 to hold every row", || {
        Ok(missing_on(&lab, &creds, 1, &all)?.is_empty())
    })
    .unwrap();
    assert_eq!(lab.health(1, "/replica").unwrap(), 200);
}

#[test]
fn a_lease_shortened_just_before_a_partition_is_waited_out_in_full() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "short", &[]).unwrap();
    lab.ctl_ok(&["cluster", "set", "short", "lease=10s", "heartbeat=1s"])
        .unwrap();
    // vm1 now holds 10 s leases.
    wait_until(Duration::from_secs(10), "a 10 s lease on vm1", || {
        let c = lab.cluster_node("short", "vm1")?;
        Ok(c["engine"]["lease"]["remaining_ms"].as_u64().unwrap_or(0) > 5000)
    })
    .unwrap();
    let local = ha::local_checker(&lab, &creds, 1);
    let check = ha::checker(&lab, &creds, 3);
    lab.ctl_ok(&["cluster", "set", "short", "lease=2s", "heartbeat=500ms"])
        .unwrap();
    let cut = Instant::now();
    lab.isolate(1).unwrap();
    let new = ha::wait_new_primary(&lab, "short", "vm1", Duration::from_secs(40)).unwrap();
    let took = cut.elapsed();
    lab.reconnect(1).unwrap();
    assert_eq!(ha::wait_settled(&lab, "short", 3, SETTLE).unwrap(), new);
    no_two_writable(&CheckReport::merged(&[check.finish(), local.finish()]));
    // The 10 s lease vm1 held when the lease was shortened ran its course.
    assert!(
        took > Duration::from_secs(8),
        "{new} was promoted {took:?} after vm1 was cut off, inside vm1's 10 s lease"
    );
    fenced_before_promotion(&lab, "short", "vm1", &new);
}

#[test]
fn a_promotion_that_fails_is_tried_again_or_done_by_hand() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "retry", &["--sync"]).unwrap();
    // The first promotion of each coordinator process fails once the term
    // is raised: the primary of record is then a standby.
    let failing_coordinator = |lab: &mut Lab| {
        lab.stop_coordinator().unwrap();
        lab.start_coordinator_env(&[("CORRAL_FAILPOINTS", "promote-fails-once")])
            .unwrap();
        for vm in ["vm1", "vm2", "vm3"] {
            lab.wait_node_state(vm, "up", Duration::from_secs(10))
                .unwrap();
        }
    };
    failing_coordinator(&mut lab);
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();

    // Automatic: the failover's promotion fails; the monitor promotes the
    // primary of record again and writes resume.
    lab.kill_vm(1);
    wait_until(
        Duration::from_secs(60),
        "the promotion to be retried",
        || {
            Ok(operations(&lab, "retry", "promote")?
                .iter()
                .any(|o| o["state"] == "succeeded"))
        },
    )
    .unwrap();
    wait_acks(&writer, 50, Duration::from_secs(30)).unwrap();
    let failover = operations(&lab, "retry", "failover").unwrap();
    assert_eq!(failover.len(), 1, "{failover:?}");
    assert_eq!(failover[0]["state"], "failed", "{}", failover[0]);
    let retried = operations(&lab, "retry", "promote").unwrap();
    assert_eq!(retried[0]["requested_by"], "coordinator (auto-failover)");
    let log = Lab::operation_log(&retried[0]).join("\n");
    assert!(log.contains("runs as a standby"), "{log}");
    let new = lab.wait_until_primary("retry", SETTLE).unwrap();
    lab.restart_vm(1).unwrap();
    assert_eq!(ha::wait_settled(&lab, "retry", 3, SETTLE).unwrap(), new);

    // By hand, with auto-failover off: a switchover whose promotion fails
    // leaves its target a standby of record, and promoting it again (no
    // longer refused as "already the primary") completes it.
    failing_coordinator(&mut lab);
    lab.ctl_ok(&["cluster", "set", "retry", "auto-failover=off"])
        .unwrap();
    let target = if new == "vm2" { "vm3" } else { "vm2" };
    let out = lab
        .ctl(&["node", "promote", "retry", target, "--confirm", target])
        .unwrap();
    assert!(!out.status.success(), "the failpoint did not fire");
    wait_until(Duration::from_secs(30), "the alarm naming the fix", || {
        let c = lab.ctl_json(&["cluster", "show", "retry"])?;
        Ok(c["failover_status"]
            .as_str()
            .is_some_and(|s| s.contains("auto-failover is off") && s.contains(target)))
    })
    .unwrap();
    lab.ctl_ok(&["node", "promote", "retry", target, "--confirm", target])
        .unwrap();
    assert_eq!(ha::wait_settled(&lab, "retry", 3, SETTLE).unwrap(), target);
    wait_acks(&writer, 50, Duration::from_secs(30)).unwrap();
    let report = writer.finish();
    no_two_writable(&check.finish());
    ha::wait_every_node_holds(&lab, &creds, 3, &report.acked, Duration::from_secs(20)).unwrap();
}
