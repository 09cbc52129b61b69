//! No false failover when the machine is merely busy: both cores loaded by
//! `stress-ng --cpu 2` for five minutes (`CORRAL_BUSY_SECONDS` changes it)
//! under a writer, with the default lease and heartbeat. In a test binary
//! of its own, so the load disturbs no other test (cargo runs test binaries
//! one after another).

use corral_tests::ha::{self, events, operations, wait_acks};
use corral_tests::stress::Stress;
use corral_tests::Lab;
use std::time::{Duration, Instant};

#[test]
fn both_cores_loaded_for_five_minutes_cause_no_failover() {
    let secs: u64 = corral_tests::env_num("CORRAL_BUSY_SECONDS", 300);
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "busy", &[]).unwrap();
    let c = lab.ctl_json(&["cluster", "show", "busy"]).unwrap();
    assert_eq!(
        (c["lease_ms"].as_u64(), c["heartbeat_interval_ms"].as_u64()),
        (
            Some(corral_proto::lease::DEFAULT_LEASE_MS.into()),
            Some(corral_proto::lease::DEFAULT_HEARTBEAT_MS.into())
        ),
        "not the default settings: {c}"
    );
    let writer = ha::writer(&lab, &creds);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    let started = corral_proto::now_ms();
    let stress = Stress::cpu(2).unwrap();
    let began = Instant::now();
    writer.take_longest_gap();
    while began.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(10));
        let c = lab.ctl_json(&["cluster", "show", "busy"]).unwrap();
        assert_eq!(
            c["term"],
            1,
            "a failover under load after {:?}: {c}",
            began.elapsed()
        );
    }
    drop(stress);
    let gap = writer.take_longest_gap();
    let report = writer.finish();
    let fences: Vec<_> = events(&lab, "busy")
        .unwrap()
        .into_iter()
        .filter(|e| e.2 > started && matches!(e.0.as_str(), "fenced" | "lease_revoked"))
        .collect();
    eprintln!(
        "{secs} s of stress-ng --cpu 2: {} writes acknowledged, longest pause {gap:?}, {} fences",
        report.acked.len(),
        fences.len()
    );
    assert!(operations(&lab, "busy", "failover").unwrap().is_empty());
    assert!(
        fences.is_empty(),
        "the primary lost its lease under load: {fences:?}"
    );
    assert_eq!(
        ha::wait_settled(&lab, "busy", 3, Duration::from_secs(60)).unwrap(),
        "vm1"
    );
}
