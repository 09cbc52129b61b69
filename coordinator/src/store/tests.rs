#[test]
fn backups_do_not_hold_failover_decisions() {
    let c = Connection::open_in_memory().unwrap();
    c.execute_batch(SCHEMA).unwrap();
    let op = |id: &str, kind: &str, at: i64| OperationRow {
        id: id.into(),
        cluster: "c".into(),
        kind: kind.into(),
        state: op_state::RUNNING.into(),
        params: "{}".into(),
        requested_by: "t".into(),
        created_at_ms: at,
        updated_at_ms: at,
        error: String::new(),
    };
    insert_operation(&c, &op("o1", crate::model::BACKUP, 1)).unwrap();
    insert_operation(&c, &op("o2", crate::model::VERIFY_BACKUP, 2)).unwrap();
    assert!(holding_operation_of(&c, "c").unwrap().is_none());
    // Other operations still wait for them.
    assert_eq!(unfinished_operation_of(&c, "c").unwrap().unwrap().id, "o1");
    insert_operation(&c, &op("o3", crate::model::RESYNC, 3)).unwrap();
    assert_eq!(holding_operation_of(&c, "c").unwrap().unwrap().id, "o3");
}

use super::*;

fn store() -> (Store, std::path::PathBuf) {
    let dir = corral_proto::unique_temp_dir("corral-store").unwrap();
    (Store::open(&dir.join("corral.db")).unwrap(), dir)
}

#[test]
fn a_failed_transaction_leaves_nothing() {
    let (s, dir) = store();
    let r: Result<()> = s.tx(|tx| {
        insert_node(tx, "vm1", "fp", 0)?;
        anyhow::bail!("refused halfway")
    });
    assert!(r.is_err());
    assert!(s.read(|c| get_node(c, "vm1")).unwrap().is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn alerts_fire_repeat_resolve_and_are_pruned() {
    use crate::notify::{Alert, Severity, Status};
    let (s, dir) = store();
    let alert = |name: &str, cluster: &str, at: i64| Alert {
        name: name.into(),
        fingerprint: format!("{name}/{cluster}/vm1"),
        status: Status::Firing,
        severity: Severity::Critical,
        labels: [("cluster".to_string(), cluster.to_string())].into(),
        summary: "s".into(),
        description: "d".into(),
        starts_at_ms: at,
        ends_at_ms: None,
        repeat: 0,
    };
    s.tx(|tx| {
        insert_alert(tx, &alert("engine_down", "c1", 10), "firing")?;
        insert_alert(tx, &alert("disk_usage_warning", "c2", 20), "firing")?;
        insert_alert(tx, &alert("operation_completed", "c1", 30), "notice")?;
        alert_repeated(tx, "engine_down/c1/vm1", 2)?;
        alert_resolved(tx, "disk_usage_warning/c2/vm1", 40)
    })
    .unwrap();
    let firing = s.read(firing_alerts).unwrap();
    assert_eq!(firing.len(), 1);
    assert_eq!(firing[0].repeat, 2);
    assert_eq!(firing[0].labels["cluster"], "c1");
    assert_eq!(firing[0].severity, Severity::Critical);
    let c1 = s.read(|c| alert_history(c, Some("c1"), 10)).unwrap();
    let names: Vec<_> = c1
        .iter()
        .map(|r| (r.alert.name.as_str(), r.state.as_str()))
        .collect();
    assert_eq!(
        names,
        [("engine_down", "firing"), ("operation_completed", "notice")]
    );
    let all = s.read(|c| alert_history(c, None, 10)).unwrap();
    assert_eq!(all[1].alert.ends_at_ms, Some(40));
    // Pruning keeps what fires, whatever its age.
    assert_eq!(s.read(|c| prune_alert_history(c, 1_000)).unwrap(), 2);
    assert_eq!(s.read(|c| alert_history(c, None, 10)).unwrap().len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn duplicate_agent_events_are_stored_once() {
    let (s, dir) = store();
    s.read(|c| {
        insert_event(c, 1, "vm1", "", "engine_exited", "x", Some(7))?;
        insert_event(c, 1, "vm1", "", "engine_exited", "x", Some(7))?;
        insert_event(c, 1, "vm2", "", "engine_exited", "x", Some(7))?;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        s.read(|c| crate::listing::events(c, None, None, 10, 0))
            .unwrap()
            .0
            .len(),
        2
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_store_from_before_replication_is_upgraded() {
    let dir = corral_proto::unique_temp_dir("corral-store-old").unwrap();
    let path = dir.join("corral.db");
    {
        // The clusters table as the first release wrote it.
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE clusters (name TEXT PRIMARY KEY, engine TEXT NOT NULL, \
             mode TEXT NOT NULL, state TEXT NOT NULL, port INTEGER NOT NULL, \
             database TEXT NOT NULL, admin_user TEXT NOT NULL, \
             admin_password_enc BLOB NOT NULL, created_at_ms INTEGER NOT NULL);
             INSERT INTO clusters VALUES ('old', 'postgres', 'single', 'running', 5432, \
             'defaultdb', 'admin', x'00', 1);",
        )
        .unwrap();
    }
    let s = Store::open(&path).unwrap();
    let row = s.read(|c| get_cluster(c, "old")).unwrap().unwrap();
    assert!(!row.sync && !row.termination_protection);
    assert!(row.replication_password_enc.is_none());
    drop(s);
    // Opening again changes nothing.
    let s = Store::open(&path).unwrap();
    assert!(s.read(|c| get_cluster(c, "old")).unwrap().is_some());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn reopening_keeps_everything() {
    let (s, dir) = store();
    s.tx(|tx| {
        insert_node(tx, "vm1", "fp", 0)?;
        insert_audit(tx, "alice", "node.enroll", "vm1", "ok")
    })
    .unwrap();
    drop(s);
    let s = Store::open(&dir.join("corral.db")).unwrap();
    assert!(s.read(|c| get_node(c, "vm1")).unwrap().is_some());
    assert_eq!(
        s.read(|c| crate::listing::audit(c, 10, 0)).unwrap().0.len(),
        1
    );
    std::fs::remove_dir_all(dir).unwrap();
}
