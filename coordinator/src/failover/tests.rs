//! Table tests of [`super::decide`]: one case per rule of the module header.

use super::*;

const LEASE: Duration = Duration::from_millis(2000);
const MARGIN: Duration = Duration::from_millis(500);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// A replica of vm1 that reported a position checked at t0 + `checked`
/// ms, and whose own leases (if it ever had any) ended at t0.
fn node(t0: Instant, id: &str, received: u64, checked: u64) -> NodeView {
    NodeView {
        id: id.into(),
        up: true,
        healthy: true,
        in_recovery: true,
        streaming: true,
        upstream: "vm1".into(),
        upstream_lsn: 0,
        checked_at: Some(t0 + ms(checked)),
        received,
        replayed: received,
        lease_until: t0,
        confirms: None,
    }
}

/// Primary vm1 last granted a lease at t0 + `granted`, replicas vm2 and vm3.
fn view(t0: Instant, granted: u64) -> ClusterView {
    let mut p = node(t0, "vm1", 1000, granted);
    p.in_recovery = false;
    p.upstream.clear();
    p.lease_until = t0 + ms(granted) + LEASE;
    ClusterView {
        cluster: "orders".into(),
        auto_failover: true,
        sync: false,
        lease: LEASE,
        margin: MARGIN,
        max_lag: 1 << 20,
        unit: "bytes",
        primary: p,
        replicas: vec![node(t0, "vm2", 1000, 0), node(t0, "vm3", 1000, 0)],
        ackers: None,
        operation: None,
    }
}

/// The primary (granted at t0 + 1000, lease to t0 + 3000) died: down,
/// replicas reported fresh positions at t0 + 3100.
fn dead_primary(t0: Instant) -> ClusterView {
    let mut v = view(t0, 1000);
    v.primary.up = false;
    for r in &mut v.replicas {
        r.checked_at = Some(t0 + ms(3100));
        r.streaming = false;
    }
    v
}

fn failover_to(d: &Decision) -> Option<&str> {
    match d {
        Decision::Failover { candidate, .. } => Some(candidate),
        _ => None,
    }
}

#[test]
fn decision_table() {
    let t0 = Instant::now();
    type Edit = Box<dyn Fn(&mut ClusterView)>;
    let confirm = move |until: u64| Some(("vm1".to_string(), t0 + ms(until)));
    // (name, edit of the dead-primary view, now (ms after t0), expected kind)
    let cases: Vec<(&str, Edit, u64, &str)> = vec![
        (
            "healthy primary",
            Box::new(move |v| *v = view(t0, 3000)),
            3600,
            "healthy",
        ),
        (
            "primary dead, lease still running",
            Box::new(|_| {}),
            2900,
            "wait-lease",
        ),
        (
            "primary dead, inside the margin",
            Box::new(|_| {}),
            3400,
            "wait-lease",
        ),
        (
            "primary dead, lease and margin over: promote",
            Box::new(|_| {}),
            3600,
            "failover-vm2",
        ),
        (
            "two replicas with different positions: the furthest",
            Box::new(|v| v.replicas[1].received = 1500),
            3600,
            "failover-vm3",
        ),
        (
            "equal received, more replayed wins",
            Box::new(|v| v.replicas[0].replayed = 900),
            3600,
            "failover-vm3",
        ),
        (
            "primary partitioned from the coordinator only: every replica confirms it",
            Box::new(move |v| {
                v.replicas[0].confirms = confirm(5000);
                v.replicas[1].confirms = confirm(4800);
            }),
            3600,
            "wait-confirmed",
        ),
        (
            "one replica still confirms, the other does not: no lease through them",
            Box::new(move |v| v.replicas[0].confirms = confirm(5000)),
            5600,
            "failover-vm2",
        ),
        (
            "expired confirmations prove nothing",
            Box::new(move |v| {
                v.replicas[0].confirms = confirm(3500);
                v.replicas[1].confirms = confirm(3500);
            }),
            3600,
            "failover-vm2",
        ),
        (
            "confirmations of another primary prove nothing",
            Box::new(move |v| {
                for r in &mut v.replicas {
                    r.confirms = Some(("vm9".into(), t0 + ms(5000)));
                }
            }),
            3600,
            "failover-vm2",
        ),
        (
            "positions measured before the last lease the replicas gave ended are not final",
            Box::new(move |v| {
                // Confirmed until 4500: that lease ended at 4000.
                v.replicas[0].confirms = confirm(4500);
                v.replicas[1].confirms = confirm(4500);
            }),
            4600,
            "wait-positions",
        ),
        (
            "... and are once measured after it",
            Box::new(move |v| {
                for r in &mut v.replicas {
                    r.confirms = confirm(4500);
                    r.checked_at = Some(t0 + ms(4100));
                }
            }),
            4600,
            "failover-vm2",
        ),
        (
            "replica dead, primary fine",
            Box::new(move |v| {
                *v = view(t0, 3000);
                v.replicas[1].up = false;
            }),
            3600,
            "healthy",
        ),
        (
            "dead replica is skipped",
            Box::new(|v| {
                v.replicas[1].received = 1500;
                v.replicas[1].up = false;
            }),
            3600,
            "failover-vm2",
        ),
        (
            "a replica following another node is not a candidate",
            Box::new(|v| {
                v.replicas[0].upstream = "vm9".into();
                v.replicas[0].received = 1500;
            }),
            3600,
            "failover-vm3",
        ),
        (
            "positions measured before the lease ended are not final",
            Box::new(move |v| v.replicas[0].checked_at = Some(t0 + ms(2900))),
            3600,
            "wait-positions",
        ),
        (
            "all replicas lagging past the limit",
            Box::new(|v| {
                v.primary.received = 10 << 20;
            }),
            3600,
            "blocked-every replica lags past the limit",
        ),
        (
            "the primary's position as a replica last heard it counts too",
            Box::new(|v| v.replicas[1].upstream_lsn = 10 << 20),
            3600,
            "blocked-every replica lags past the limit",
        ),
        (
            "no replica fit",
            Box::new(|v| {
                v.replicas[0].up = false;
                v.replicas[1].healthy = false;
            }),
            3600,
            "blocked-vm2 down; vm3 its engine is not healthy",
        ),
        (
            "auto-failover off: only the alarm",
            Box::new(|v| v.auto_failover = false),
            3600,
            "off",
        ),
        (
            "an operation holds the cluster",
            Box::new(|v| v.operation = Some("add_node".into())),
            3600,
            "wait-operation-add_node",
        ),
        (
            "a former primary's lease still running",
            Box::new(move |v| v.replicas[1].lease_until = t0 + ms(4000)),
            3600,
            "wait-lease",
        ),
        (
            "a longer lease granted before the lease was shortened still runs",
            Box::new(move |v| v.primary.lease_until = t0 + ms(11_000)),
            3600,
            "wait-lease",
        ),
        (
            "a standby of record (promotion failed) is not a healthy primary",
            Box::new(move |v| {
                *v = view(t0, 3000);
                v.primary.in_recovery = true;
            }),
            3600,
            "wait-lease",
        ),
        (
            "... and once no lease may run, it is promoted again",
            Box::new(move |v| {
                *v = view(t0, 3000);
                v.primary.in_recovery = true;
            }),
            5600,
            "repromote",
        ),
        (
            "... but not while a former primary's lease may run",
            Box::new(move |v| {
                *v = view(t0, 3000);
                v.primary.in_recovery = true;
                v.replicas[0].lease_until = t0 + ms(6000);
            }),
            5600,
            "wait-lease",
        ),
        (
            "... nor with auto-failover off (the alarm names it)",
            Box::new(move |v| {
                *v = view(t0, 3000);
                v.primary.in_recovery = true;
                v.auto_failover = false;
            }),
            5600,
            "off",
        ),
        (
            "a standby of record that is down is a lost primary",
            Box::new(move |v| {
                v.primary.in_recovery = true;
            }),
            3600,
            "failover-vm2",
        ),
    ];
    for (name, edit, now, want) in cases {
        let mut v = dead_primary(t0);
        edit(&mut v);
        let d = decide(&v, t0 + ms(now));
        assert!(
            d.kind().starts_with(want),
            "{name}: got {:?} ({d}), want {want}",
            d.kind()
        );
        // Every outcome reads as a sentence naming the primary.
        assert!(d.to_string().contains("vm1"), "{name}: {d}");
    }
}

#[test]
fn sync_mode_promotes_only_a_replica_holding_every_acknowledged_commit() {
    let t0 = Instant::now();
    let at = t0 + ms(3600);
    // Both replicas reported: the furthest holds every acknowledged commit.
    let mut v = dead_primary(t0);
    v.sync = true;
    v.replicas[1].received = 1200;
    assert_eq!(failover_to(&decide(&v, at)), Some("vm3"));
    // vm3 may have acknowledged commits and is down: vm2 may lack them.
    v.replicas[1].up = false;
    let d = decide(&v, at);
    assert!(
        matches!(&d, Decision::Blocked { reason, .. } if reason.contains("vm3 may hold acknowledged commits")),
        "{d}"
    );
    assert!(d.is_alarm());
    // ... unless vm3 was never a synchronous standby in this term.
    v.ackers = Some(vec!["vm2".into()]);
    assert_eq!(failover_to(&decide(&v, at)), Some("vm2"));
    // ... as far as the coordinator knows: if the primary served on
    // through its replicas' confirmations, any replica may have.
    let mut late = v.clone();
    for r in &mut late.replicas {
        r.confirms = Some(("vm1".into(), t0 + ms(4000)));
        r.checked_at = Some(t0 + ms(3600));
    }
    assert!(
        matches!(decide(&late, t0 + ms(4100)), Decision::Blocked { .. }),
        "{}",
        decide(&late, t0 + ms(4100))
    );
    // Sync mode ignores the lag limit: the furthest replica holds
    // every acknowledged commit whatever the primary wrote after.
    v.primary.received = 100 << 20;
    assert_eq!(failover_to(&decide(&v, at)), Some("vm2"));
    // A potential acker whose position is not yet final: wait for it.
    let mut v = dead_primary(t0);
    v.sync = true;
    v.replicas[1].checked_at = Some(t0 + ms(2000));
    assert!(matches!(
        decide(&v, at),
        Decision::Wait {
            why: Wait::FreshPositions(_),
            ..
        }
    ));
}

#[test]
fn flapping_heartbeats_never_fail_over() {
    let t0 = Instant::now();
    let mut v = view(t0, 0);
    // Heartbeats answered with gaps of up to 2.4 s (under lease +
    // margin), the primary seen down in between.
    let mut granted = 0u64;
    for gap in [300u64, 2400, 100, 1900, 2400, 500, 2300] {
        for step in (0..gap).step_by(50) {
            v.primary.up = step < 1000;
            let d = decide(&v, t0 + ms(granted + step));
            assert!(
                failover_to(&d).is_none() && !d.is_alarm(),
                "gap {gap} at +{step}: {d}"
            );
        }
        granted += gap;
        v.primary.lease_until = t0 + ms(granted) + LEASE;
    }
}

#[test]
fn sentences_say_what_happens() {
    let t0 = Instant::now();
    let d = decide(&dead_primary(t0), t0 + ms(3600));
    assert_eq!(d.to_string(), "primary vm1 is lost: promoting vm2");
    let mut v = dead_primary(t0);
    for r in &mut v.replicas {
        r.confirms = Some(("vm1".into(), t0 + ms(5000)));
    }
    assert!(decide(&v, t0 + ms(3600))
        .to_string()
        .contains("its replicas (vm2, vm3) confirm it"));
}

#[test]
fn the_next_change_is_the_earliest_lease_or_confirmation_end_still_ahead() {
    let t0 = Instant::now();
    // The primary's lease ends at t0 + 1000 + LEASE; the replicas' own
    // (former) leases at t0, so with the margin at t0 + MARGIN.
    let mut v = view(t0, 1000);
    let primary_end = t0 + ms(1000) + LEASE + MARGIN;
    assert_eq!(next_change(&v, t0 + ms(100)), Some(t0 + MARGIN));
    let now = t0 + MARGIN + ms(100);
    assert_eq!(next_change(&v, now), Some(primary_end));
    v.replicas[0].confirms = Some(("vm1".into(), t0 + ms(2000)));
    assert_eq!(next_change(&v, now), Some(t0 + ms(2000)));
    // A confirmation of another primary is not one of this primary.
    v.replicas[0].confirms = Some(("vm9".into(), t0 + ms(2000)));
    assert_eq!(next_change(&v, now), Some(primary_end));
    // Everything over: nothing to wait for.
    assert_eq!(next_change(&v, primary_end), None);
}
