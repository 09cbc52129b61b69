//! Bounded inputs (issue 18): an enrollment flood from a caller without a
//! certificate, a store whose disk is full, lists longer than a page, and
//! a second coordinator on the same state directory.

use corral_coordinator::store::{self, Store};
use corral_proto::pb;
#[path = "support/flood.rs"]
mod flood;
use corral_proto::pki::{self, CertKey};
use corral_tests::{bin, mount_tmpfs, sh, wait_until, Lab};
use flood::{channel, flood, flood_count};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn admin(lab: &Lab) -> CertKey {
    CertKey {
        cert_pem: pki::read(&lab.pki_dir().join("admin.crt")).unwrap(),
        key_pem: pki::read(&lab.pki_dir().join("admin.key")).unwrap(),
    }
}

/// Bytes of the coordinator's store (database, WAL and shared memory).
fn store_bytes(lab: &Lab) -> u64 {
    ["corral.db", "corral.db-wal", "corral.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(lab.dir().join("coordinator").join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// (term, primary) of `cluster`.
fn term_and_primary(lab: &Lab, cluster: &str) -> (u64, String) {
    let primary = lab
        .wait_until_primary(cluster, Duration::from_secs(5))
        .unwrap();
    let c = lab.ctl_json(&["cluster", "show", cluster]).unwrap();
    (c["term"].as_u64().unwrap(), primary)
}

#[test]
fn an_enrollment_flood_neither_grows_the_store_nor_fails_the_primary_over() {
    let lab = Lab::start(2).unwrap();
    lab.create_replicated("flood", "vm1,vm2", &[]).unwrap();
    lab.wait_streaming("flood", "vm2").unwrap();
    let before = term_and_primary(&lab, "flood");
    let bytes = store_bytes(&lab);

    let count = flood_count(500);
    let began = Instant::now();
    let (refused, codes) = flood(&lab, count, 8);
    eprintln!("{count} bad enrollments in {:?}", began.elapsed());
    assert_eq!(refused, count, "every bad enrollment is refused");
    let grown = store_bytes(&lab).saturating_sub(bytes);
    assert!(
        grown < 4 << 20,
        "the store grew by {grown} bytes during {count} bad enrollments"
    );
    assert!(
        codes.contains(&tonic::Code::ResourceExhausted),
        "a caller without a certificate is rate-limited: {:?}",
        &codes[..codes.len().min(20)]
    );

    // No false failover, and the primary still takes writes.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(term_and_primary(&lab, "flood"), before);
    let creds = lab.ctl_json(&["cluster", "credentials", "flood"]).unwrap();
    let primary = before.1.trim_start_matches("vm").parse::<usize>().unwrap();
    lab.psql(
        &lab.node_uri(&creds, primary),
        "CREATE TABLE after_flood (x int)",
    )
    .unwrap();

    // The audit log has a few rows for it, none carrying the raw value.
    let audit = lab
        .ctl_json(&["audit", "list", "--limit", "10000"])
        .unwrap();
    let rows = audit["entries"].as_array().cloned().unwrap_or_default();
    let flood_rows: Vec<_> = rows
        .iter()
        .filter(|r| r["action"] == "node.enroll" && r["who"] == "anonymous")
        .collect();
    assert!(!flood_rows.is_empty(), "refusals are audited");
    assert!(flood_rows.len() <= 40, "{} audit rows", flood_rows.len());
    for r in &flood_rows {
        let len = r.to_string().len();
        assert!(
            len < 2048,
            "an audit row of {len} bytes: {}",
            &r.to_string()[..300]
        );
    }
}

/// A tmpfs of `mib` MiB mounted on the coordinator's state directory,
/// keeping what is in it (the lab's teardown unmounts it).
fn coordinator_dir_on_tmpfs(lab: &mut Lab, mib: u64) {
    lab.stop_coordinator().unwrap();
    let dir = lab.dir().join("coordinator");
    let keep = lab.dir().join("coordinator.keep");
    sh(
        "cp",
        &["-a", &dir.to_string_lossy(), &keep.to_string_lossy()],
    )
    .unwrap();
    mount_tmpfs(&dir, mib).unwrap();
    sh(
        "cp",
        &[
            "-a",
            &format!("{}/.", keep.display()),
            &dir.to_string_lossy(),
        ],
    )
    .unwrap();
    lab.start_coordinator().unwrap();
}

/// Fills the filesystem of `dir` (after the store's WAL is truncated, so
/// the next writes need new blocks).
fn fill(dir: &Path) {
    let s = Store::open(&dir.join("corral.db")).unwrap();
    s.read(|c| Ok(c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?))
        .unwrap();
    drop(s);
    let _ = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", dir.join("fill").display()),
            "bs=64k",
        ])
        .stderr(Stdio::null())
        .status();
}

#[test]
fn a_full_store_disk_does_not_cost_the_primary_its_lease() {
    // One node: no replica confirms it while the coordinator does not
    // answer, so its lease hangs on the coordinator's answers alone (with
    // replicas, their confirmations would keep it while the coordinator
    // fails every heartbeat of the primary and counts it down).
    let mut lab = Lab::start(1).unwrap();
    coordinator_dir_on_tmpfs(&mut lab, 64);
    lab.wait_node_state("vm1", "up", Duration::from_secs(20))
        .unwrap();
    lab.create_replicated("full", "vm1", &[]).unwrap();
    let before = term_and_primary(&lab, "full");
    let primary = before.1.trim_start_matches("vm").parse::<usize>().unwrap();

    let fenced_before = fence_events(&lab, &before.1);
    fill(&lab.dir().join("coordinator"));
    // The primary's engine crashes and its agent starts it again: its
    // events (exited, started, fenced, unfenced) ride on heartbeats that
    // the store cannot keep, and it needs a lease to take writes again.
    for pid in lab.pids_in_vm(primary, "postgres") {
        let _ = sh("kill", &["-9", &pid.to_string()]);
    }
    let creds = lab.ctl_json(&["cluster", "credentials", "full"]).unwrap();
    let uri = lab.node_uri(&creds, primary);
    wait_until(
        Duration::from_secs(20),
        "the primary to take writes again",
        || {
            Ok(lab
                .psql(&uri, "CREATE TABLE IF NOT EXISTS on_full_disk (x int)")
                .is_ok())
        },
    )
    .expect("the primary gets its lease back though its events cannot be stored");
    // Well past lease + margin and three missed heartbeats.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(term_and_primary(&lab, "full"), before);
    lab.psql(&uri, "INSERT INTO on_full_disk VALUES (1)")
        .expect("the primary still takes writes");
    let node = lab.node("vm1").unwrap().unwrap();
    assert_eq!(node["state"], "up", "the coordinator sees the node: {node}");
    assert_eq!(node["engine"]["lease"]["held"], true, "{node}");
    let metrics = lab.coordinator_metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("heartbeat_events") && !l.starts_with('#')),
        "the event writes failed (and were counted): {metrics}"
    );

    // Room again: the events are stored, late but not lost.
    std::fs::remove_file(lab.dir().join("coordinator/fill")).unwrap();
    wait_until(Duration::from_secs(20), "the fence events stored", || {
        Ok(fence_events(&lab, &before.1) > fenced_before)
    })
    .unwrap();
}

/// How many times `node` reported its engine exited.
fn fence_events(lab: &Lab, node: &str) -> usize {
    let ev = lab
        .ctl_json(&["event", "list", "--node", node, "--limit", "1000"])
        .unwrap();
    ev["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["kind"] == "engine_exited").count())
        .unwrap_or(0)
}

#[test]
fn a_list_longer_than_a_page_returns_the_cap_and_a_cursor_that_pages_on() {
    let lab = Lab::unenrolled(1).unwrap();
    // More audit rows than a page holds, written beside the running
    // coordinator (the store is SQLite in WAL mode).
    let s = Store::open(&lab.dir().join("coordinator/corral.db")).unwrap();
    s.tx(|c| {
        for i in 0..10_050 {
            store::insert_audit(c, "bulk", "test.row", &format!("row {i}"), "ok")?;
        }
        Ok(())
    })
    .unwrap();
    drop(s);
    let me = admin(&lab);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pages = rt.block_on(async {
        let mut api = pb::operator_client::OperatorClient::new(channel(&lab, Some(&me)));
        let mut pages = Vec::new();
        let mut before = 0;
        loop {
            let r = api
                .list_audit(pb::ListAuditRequest {
                    limit: 1_000_000,
                    before,
                })
                .await
                .unwrap()
                .into_inner();
            let ids: Vec<i64> = r.entries.iter().map(|e| e.id).collect();
            pages.push((ids, r.next_before));
            if r.next_before == 0 {
                break;
            }
            before = r.next_before;
        }
        pages
    });
    assert!(pages.len() >= 2, "{} pages", pages.len());
    let (first, next) = &pages[0];
    assert_eq!(first.len(), 10_000, "a page holds at most 10,000 rows");
    assert_eq!(*next, first[0], "the cursor is the oldest row of the page");
    let all: Vec<i64> = pages
        .iter()
        .rev()
        .flat_map(|(ids, _)| ids.clone())
        .collect();
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "pages follow each other"
    );
    assert!(all.len() >= 10_050);

    // The CLI pages the same way.
    let out = lab.ctl(&["audit", "list", "--limit", "5"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("older entries: add --before"), "{err}");
}

#[test]
fn a_second_coordinator_on_the_same_state_directory_exits_naming_it() {
    let lab = Lab::unenrolled(1).unwrap();
    let dir = lab.dir().join("coordinator");
    let mut second = Command::new(bin("corral-coordinator"))
        .args(["--state-dir", &dir.to_string_lossy()])
        .args(["--pki-dir", &lab.pki_dir().to_string_lossy()])
        .args(["--listen", "127.0.0.1:0", "--http-listen", "off"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break Some(s);
        }
        if began.elapsed() > Duration::from_secs(15) {
            let _ = second.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let status = status.unwrap_or_else(|| panic!("the second coordinator kept running: {err}"));
    assert!(!status.success());
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(err.contains("pid "), "{err}");
    // The first still serves.
    assert!(lab.ctl(&["whoami"]).unwrap().status.success());
}
