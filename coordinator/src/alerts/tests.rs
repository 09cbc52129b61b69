//! Tests of the rules, the book and the notices.

use super::notices::NOTICE_MS;
use super::*;
use crate::fleet::Liveness;
use crate::notify::{Severity, Status};
use corral_proto::pb;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

fn view(id: &str, liveness: Liveness) -> NodeView {
    NodeView {
        id: id.into(),
        cluster: "c1".into(),
        engine: "postgres".into(),
        role: "replica".into(),
        liveness,
        silent_s: Some(0.5),
        metrics: Some(pb::Metrics {
            cpu_percent: 10.0,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 8 << 30,
            disk_used_bytes: 10,
            disk_total_bytes: 100,
            ..Default::default()
        }),
        status: Some(pb::EngineStatus {
            cluster: "c1".into(),
            state: pb::EngineState::Running as i32,
            healthy: true,
            ..Default::default()
        }),
        cert_not_after_ms: 0,
        check_age_s: Some(0.4),
    }
}

fn snap(nodes: Vec<NodeView>) -> Snapshot {
    Snapshot {
        now_ms: 1_000_000_000,
        nodes,
        ..Default::default()
    }
}

fn names(s: &Snapshot, config: &AlertsConfig) -> Vec<&'static str> {
    let mut v: Vec<_> = conditions(s, config).0.iter().map(|c| c.name).collect();
    v.sort();
    v
}

#[test]
fn a_healthy_node_holds_nothing() {
    let c = AlertsConfig::default();
    assert!(names(&snap(vec![view("vm1", Liveness::Up)]), &c).is_empty());
}

#[test]
fn each_rule_and_its_threshold() {
    let c = AlertsConfig::default();
    let mut n = view("vm1", Liveness::Up);
    let m = n.metrics.as_mut().unwrap();
    m.cpu_percent = 95.0;
    m.memory_used_bytes = 15 << 29; // 7.5 of 8 GiB
    m.disk_used_bytes = 85;
    let st = n.status.as_mut().unwrap();
    st.stats.insert("lag_seconds".into(), 31.0);
    st.healthy = false;
    assert_eq!(
        names(&snap(vec![n.clone()]), &c),
        [
            "cpu_high",
            "disk_usage_warning",
            "engine_down",
            "memory_high",
            "replication_lag_high"
        ]
    );
    n.metrics.as_mut().unwrap().disk_used_bytes = 95;
    assert!(names(&snap(vec![n.clone()]), &c).contains(&"disk_usage_critical"));
    assert!(!names(&snap(vec![n.clone()]), &c).contains(&"disk_usage_warning"));
    n.metrics.as_mut().unwrap().disk_used_bytes = 84;
    assert!(!names(&snap(vec![n.clone()]), &c)
        .iter()
        .any(|x| x.starts_with("disk")));
    // Lag counts on replicas only.
    n.role = "primary".into();
    assert!(!names(&snap(vec![n]), &c).contains(&"replication_lag_high"));
}

#[test]
fn a_replica_that_stopped_streaming() {
    let c = AlertsConfig::default();
    let mut n = view("vm2", Liveness::Up);
    n.status.as_mut().unwrap().replication = Some(pb::Replication {
        in_recovery: true,
        streaming: false,
        ..Default::default()
    });
    let mut s = snap(vec![n.clone()]);
    assert_eq!(names(&s, &c), ["replication_stopped"]);
    s.busy.insert("c1/vm2".into());
    let (conds, keep) = conditions(&s, &c);
    assert!(conds.is_empty() && keep.contains("replication_stopped/c1/vm2"));
    n.status
        .as_mut()
        .unwrap()
        .replication
        .as_mut()
        .unwrap()
        .streaming = true;
    assert!(names(&snap(vec![n.clone()]), &c).is_empty());
    n.role = "primary".into();
    n.status
        .as_mut()
        .unwrap()
        .replication
        .as_mut()
        .unwrap()
        .streaming = false;
    assert!(
        names(&snap(vec![n]), &c).is_empty(),
        "a primary streams from no one"
    );
}

#[test]
fn per_cluster_overrides_and_rules_turned_off() {
    let mut c = AlertsConfig::default();
    c.cluster.insert(
        "c1".into(),
        crate::config::RulesOverride {
            disk_warning_percent: Some(5.0),
            cpu_percent: Some(0.0),
            ..Default::default()
        },
    );
    let mut n = view("vm1", Liveness::Up);
    n.metrics.as_mut().unwrap().cpu_percent = 100.0;
    assert_eq!(names(&snap(vec![n.clone()]), &c), ["disk_usage_warning"]);
    n.cluster = "c2".into();
    n.status.as_mut().unwrap().cluster = "c2".into();
    assert_eq!(names(&snap(vec![n]), &c), ["cpu_high"]);
}

#[test]
fn down_and_unknown_nodes() {
    let c = AlertsConfig::default();
    let mut n = view("vm1", Liveness::Down);
    n.metrics.as_mut().unwrap().cpu_percent = 100.0;
    let (conds, keep) = conditions(&snap(vec![n.clone()]), &c);
    assert_eq!(
        conds.iter().map(|c| c.name).collect::<Vec<_>>(),
        ["node_down"]
    );
    assert!(keep.contains("cpu_high/c1/vm1") && keep.contains("engine_down/c1/vm1"));
    n.liveness = Liveness::Unknown;
    let (conds, keep) = conditions(&snap(vec![n]), &c);
    assert!(conds.is_empty());
    assert!(keep.contains("node_down/c1/vm1"));
}

#[test]
fn an_engine_whose_health_check_hangs_is_down() {
    let c = AlertsConfig::default();
    let mut n = view("vm1", Liveness::Up);
    n.check_age_s = Some(4.9);
    assert!(names(&snap(vec![n.clone()]), &c).is_empty());
    n.check_age_s = Some(6.0);
    let (conds, _) = conditions(&snap(vec![n.clone()]), &c);
    assert_eq!(conds[0].name, "engine_down");
    assert!(
        conds[0]
            .description
            .contains("has not answered a health check for 6s"),
        "{}",
        conds[0].description
    );
    n.check_age_s = None; // never checked yet: judged by `healthy`
    assert!(names(&snap(vec![n]), &c).is_empty());
}

#[test]
fn an_engine_stopped_by_an_operation_is_not_down() {
    let c = AlertsConfig::default();
    let mut n = view("vm1", Liveness::Up);
    n.status.as_mut().unwrap().state = pb::EngineState::Stopped as i32;
    let mut s = snap(vec![n]);
    assert_eq!(names(&s, &c), ["engine_down"]);
    s.busy.insert("c1/vm2".into());
    assert_eq!(names(&s, &c), ["engine_down"], "another node's operation");
    for key in ["c1", "c1/vm1"] {
        s.busy = HashSet::from([key.to_string()]);
        let (conds, keep) = conditions(&s, &c);
        assert!(conds.is_empty() && keep.contains("engine_down/c1/vm1"));
    }
}

#[test]
fn operations_make_their_nodes_or_their_cluster_busy() {
    let op = |kind: &str, params: &str| store::OperationRow {
        id: "op".into(),
        cluster: "c1".into(),
        kind: kind.into(),
        state: "running".into(),
        params: params.into(),
        requested_by: "t".into(),
        created_at_ms: 0,
        updated_at_ms: 0,
        error: String::new(),
    };
    assert_eq!(
        busy_keys(&op("reboot", r#"{"node":"vm2","force":false}"#)),
        ["c1/vm2"]
    );
    assert_eq!(
        busy_keys(&op("resync", r#"{"nodes":["vm2","vm3"]}"#)),
        ["c1/vm2", "c1/vm3"]
    );
    assert_eq!(
        busy_keys(&op("failover", r#"{"old":"vm1","candidate":"vm2"}"#)),
        ["c1"]
    );
    assert_eq!(busy_keys(&op("promote", r#"{"node":"vm2"}"#)), ["c1"]);
    assert_eq!(
        busy_keys(&op("create_cluster", r#"{"nodes":["vm1"]}"#)),
        ["c1"]
    );
}

#[test]
fn certificates() {
    let c = AlertsConfig::default();
    let day = 86_400_000;
    let mut s = snap(vec![]);
    s.certificates = vec![
        ("the CA".into(), s.now_ms + 400 * day),
        (
            "the coordinator's certificate".into(),
            s.now_ms + 10 * day + 5,
        ),
        ("an old one".into(), s.now_ms - 1),
    ];
    let (conds, _) = conditions(&s, &c);
    assert_eq!(conds.len(), 2);
    assert_eq!(
        conds[0].summary,
        "the coordinator's certificate expires in 10 days"
    );
    assert_eq!(conds[0].severity, Severity::Warning);
    assert_eq!(conds[1].severity, Severity::Critical);
    let mut n = view("vm1", Liveness::Up);
    n.cert_not_after_ms = s.now_ms + 3 * day;
    assert_eq!(names(&snap(vec![n.clone()]), &c), ["certificate_expiring"]);
    // A 30-day node certificate with 9 days left is within the 30-day
    // rule but its agent renews it at 10 days left: not overdue yet.
    let mut fleet = snap(vec![n]);
    fleet.node_cert_lifetime_ms = 30 * day;
    fleet.nodes[0].cert_not_after_ms = fleet.now_ms + 9 * day;
    assert!(names(&fleet, &c).is_empty());
    fleet.nodes[0].cert_not_after_ms = fleet.now_ms + 7 * day;
    assert_eq!(names(&fleet, &c), ["certificate_expiring"]);
}

fn cond(name: &'static str, hold_s: u64) -> Condition {
    Condition {
        name,
        severity: Severity::Warning,
        labels: BTreeMap::from([
            ("cluster".to_string(), "c1".to_string()),
            ("node".to_string(), "vm1".to_string()),
        ]),
        summary: "s".into(),
        description: "d".into(),
        hold: Duration::from_secs(hold_s),
    }
}

fn kinds(o: &Outcome) -> Vec<(String, Status, Delivery, u32)> {
    o.send
        .iter()
        .map(|(a, d)| (a.name.clone(), a.status, *d, a.repeat))
        .collect()
}

#[test]
fn fires_after_its_hold_once_repeats_refreshes_and_resolves() {
    let config = AlertsConfig {
        repeat_interval: Duration::from_secs(3600),
        alertmanager_refresh: Duration::from_secs(60),
        ..Default::default()
    };
    let none = HashSet::new();
    let mut book = Book::default();
    let s = 1000;
    let t = |x: i64| x * s;
    // Holds, but not yet for its 120 s.
    assert!(book
        .step(vec![cond("cpu_high", 120)], &none, t(0), &config)
        .send
        .is_empty());
    assert!(book
        .step(vec![cond("cpu_high", 120)], &none, t(119), &config)
        .send
        .is_empty());
    let o = book.step(vec![cond("cpu_high", 120)], &none, t(120), &config);
    assert_eq!(
        kinds(&o),
        [("cpu_high".into(), Status::Firing, Delivery::Notify, 0)]
    );
    assert_eq!(
        o.fired[0].starts_at_ms,
        t(0),
        "starts when it began to hold"
    );
    // Fires once.
    assert!(book
        .step(vec![cond("cpu_high", 120)], &none, t(121), &config)
        .send
        .is_empty());
    // Refreshed for Alertmanager every minute.
    let o = book.step(vec![cond("cpu_high", 120)], &none, t(180), &config);
    assert_eq!(
        kinds(&o),
        [("cpu_high".into(), Status::Firing, Delivery::Refresh, 0)]
    );
    // Repeats on the schedule while it holds.
    let o = book.step(vec![cond("cpu_high", 120)], &none, t(120 + 3600), &config);
    assert_eq!(
        kinds(&o),
        [("cpu_high".into(), Status::Firing, Delivery::Notify, 1)]
    );
    // Cannot be judged: kept as it is.
    let keep = HashSet::from(["cpu_high/c1/vm1".to_string()]);
    assert!(book.step(vec![], &keep, t(4000), &config).send.is_empty());
    // Resolves when it stops holding.
    let o = book.step(vec![], &none, t(4001), &config);
    assert_eq!(
        kinds(&o),
        [("cpu_high".into(), Status::Resolved, Delivery::Notify, 1)]
    );
    assert_eq!(o.resolved[0].ends_at_ms, Some(t(4001)));
    assert!(book.active.is_empty());
}

#[test]
fn a_condition_that_stops_before_its_hold_never_fires() {
    let config = AlertsConfig::default();
    let none = HashSet::new();
    let mut book = Book::default();
    book.step(vec![cond("cpu_high", 60)], &none, 0, &config);
    assert!(book.step(vec![], &none, 30_000, &config).send.is_empty());
    // Starts counting again from scratch.
    assert!(book
        .step(vec![cond("cpu_high", 60)], &none, 40_000, &config)
        .send
        .is_empty());
    assert!(book
        .step(vec![cond("cpu_high", 60)], &none, 90_000, &config)
        .send
        .is_empty());
    assert_eq!(
        book.step(vec![cond("cpu_high", 60)], &none, 100_000, &config)
            .fired
            .len(),
        1
    );
}

#[test]
fn events_make_notices() {
    let ev = |kind: &str| store::EventRow {
        id: 7,
        at_ms: 5,
        node: "vm2".into(),
        cluster: "c1".into(),
        kind: kind.into(),
        message: "m".into(),
    };
    let a = notice_of(&ev("failover"), "postgres").unwrap();
    assert_eq!(a.name, "failover_completed");
    assert_eq!(a.severity, Severity::Info);
    assert_eq!(a.labels["engine"], "postgres");
    assert_eq!(a.ends_at_ms, Some(5 + NOTICE_MS));
    assert_eq!(
        notice_of(&ev("failover_blocked"), "").unwrap().severity,
        Severity::Critical
    );
    assert_eq!(
        notice_of(&ev("operation_failed"), "").unwrap().name,
        "operation_failed"
    );
    assert!(notice_of(&ev("node_up"), "").is_none());
}
