//! The harness itself: labs come up, carry IPv4 and IPv6, and leave nothing
//! behind, even when the test that owns them panics or its process dies.

use corral_tests::{sh, sweep_stale, Lab};

fn lab_exists(k: u32) -> bool {
    let netns = sh("ip", &["netns", "list"]).unwrap();
    let links = sh("ip", &["-o", "link", "show"]).unwrap();
    netns.lines().any(|l| l.starts_with(&format!("crl{k}-")))
        || links.contains(&format!("crlb{k}:"))
}

#[test]
fn lab_carries_ipv4_and_ipv6_and_is_removed_on_drop() {
    let lab = Lab::unenrolled(2).unwrap();
    let k = lab.k;
    assert!(lab_exists(k));
    let ping4 = lab
        .in_ns("cli", "ping", &["-c", "1", "-W", "2", &lab.vm_ip(1)])
        .unwrap();
    assert!(
        ping4.status.success(),
        "IPv4 ping from cli to vm1: {ping4:?}"
    );
    let ping6 = lab
        .in_ns(
            "cli",
            "ping",
            &["-6", "-c", "1", "-W", "2", &format!("fd31::{k:x}:11")],
        )
        .unwrap();
    assert!(
        ping6.status.success(),
        "IPv6 ping from cli to vm1: {ping6:?}"
    );
    // The coordinator answers from its namespace.
    assert!(lab.ctl_ok(&["whoami"]).unwrap().contains("admin"));
    drop(lab);
    assert!(
        !lab_exists(k),
        "lab {k} left namespaces or its bridge behind"
    );
}

#[test]
fn lab_is_removed_when_its_test_panics() {
    let k = std::sync::Arc::new(std::sync::Mutex::new(0));
    let k2 = k.clone();
    let result = std::panic::catch_unwind(move || {
        let lab = Lab::unenrolled(1).unwrap();
        *k2.lock().unwrap() = lab.k;
        panic!("deliberate failure inside a lab");
    });
    assert!(result.is_err());
    let k = *k.lock().unwrap();
    assert!(k > 0);
    assert!(!lab_exists(k), "lab {k} survived a panicking test");
}

#[test]
fn labs_of_dead_processes_are_swept() {
    // A lab whose owner died: bridge, namespace and a pid file naming a
    // process that no longer exists.
    let k = (200..=250u32)
        .find(|k| {
            sh(
                "ip",
                &["link", "add", &format!("crlb{k}"), "type", "bridge"],
            )
            .is_ok()
        })
        .expect("a free lab number");
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    std::fs::create_dir_all("/tmp/corral-tests/labs").unwrap();
    std::fs::write(
        format!("/tmp/corral-tests/labs/{k}.pid"),
        dead_pid.to_string(),
    )
    .unwrap();
    sh("ip", &["netns", "add", &format!("crl{k}-vm1")]).unwrap();
    assert!(lab_exists(k));
    sweep_stale();
    assert!(!lab_exists(k), "stale lab {k} was not swept");
}
