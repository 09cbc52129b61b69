//! IP allowlists end to end: real nftables in namespace VMs, real TCP
//! connections from client namespaces with addresses of their own, IPv4
//! and IPv6.

use corral_tests::{wait_until, Lab, LabOptions};
use serde_json::Value;
use std::time::Duration;

fn lab(vms: usize) -> Lab {
    Lab::start_with(LabOptions {
        vms,
        extra_clients: 1,
        ..Default::default()
    })
    .unwrap()
}

/// Whether a client in namespace `ns` completes a PostgreSQL login to VM
/// `vm` over IPv4 or IPv6 (a refused or dropped connection: false).
fn connects(lab: &Lab, ns: &str, creds: &Value, vm: usize, v6: bool) -> bool {
    let host = if v6 {
        format!("[{}]", lab.ip6_of(&format!("vm{vm}")).unwrap())
    } else {
        lab.vm_ip(vm)
    };
    let uri = format!(
        "postgresql://{}:{}@{host}:5432/{}?connect_timeout=2",
        creds["user"].as_str().unwrap(),
        creds["password"].as_str().unwrap(),
        creds["database"].as_str().unwrap()
    );
    lab.in_ns(
        ns,
        "psql",
        &[
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            &uri,
            "-c",
            "SELECT 1",
        ],
    )
    .map(|o| o.status.success())
    .unwrap_or(false)
}

/// (cli, cl2) reachability of every VM over IPv4 and IPv6.
fn reach(lab: &Lab, creds: &Value, vms: usize) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for ns in ["cli", "cl2"] {
        for vm in 1..=vms {
            for v6 in [false, true] {
                out.push((
                    format!("{ns}->vm{vm}/{}", if v6 { "v6" } else { "v4" }),
                    connects(lab, ns, creds, vm, v6),
                ));
            }
        }
    }
    out
}

fn expect(got: &[(String, bool)], want: impl Fn(&str) -> bool) {
    let wrong: Vec<&(String, bool)> = got.iter().filter(|(k, ok)| *ok != want(k)).collect();
    assert!(
        wrong.is_empty(),
        "unexpected reachability: {wrong:?} (all: {got:?})"
    );
}

/// The agent's table on VM `i`, as nft lists it (counters left out).
fn table(lab: &Lab, i: usize) -> String {
    let out = lab
        .in_ns(
            &format!("vm{i}"),
            "nft",
            &["--stateless", "list", "table", "inet", "corral"],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn allowlist(lab: &Lab, cluster: &str) -> Value {
    lab.ctl_json(&["cluster", "allowlist", "show", cluster])
        .unwrap()
}

#[test]
fn only_listed_sources_reach_the_engine_and_the_cluster_keeps_working() {
    let lab = lab(3);
    let creds = lab.create_replicated("shop", "vm1,vm2,vm3", &[]).unwrap();
    let uri = creds["uri"].as_str().unwrap().to_string();
    lab.psql(&uri, "CREATE TABLE t (id int PRIMARY KEY)")
        .unwrap();
    // No list: open.
    expect(&reach(&lab, &creds, 3), |_| true);

    // Only cli's addresses (cl2's are its neighbours: fd31::K:100 and
    // fd31::K:101 share every range but /128).
    let cli4 = lab.ip4_of("cli").unwrap();
    let cli6 = lab.ip6_of("cli").unwrap();
    let out = lab
        .ctl_ok(&["cluster", "allowlist", "set", "shop", &cli4, &cli6])
        .unwrap();
    assert!(out.contains("applied"), "{out}");
    let a = allowlist(&lab, "shop");
    assert_eq!(a["entries"].as_array().unwrap().len(), 2, "{a}");
    assert!(
        a["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["current"] == true),
        "{a}"
    );
    expect(&reach(&lab, &creds, 3), |k| k.starts_with("cli->"));

    // Replication between the nodes keeps working whatever the list says:
    // rows reach both replicas, and a replica is cloned again from scratch.
    lab.psql(&uri, "INSERT INTO t SELECT generate_series(1, 100)")
        .unwrap();
    for vm in [2, 3] {
        wait_until(Duration::from_secs(10), &format!("rows on vm{vm}"), || {
            Ok(lab.column_on(&creds, vm, "SELECT count(*) FROM t")? == ["100"])
        })
        .unwrap();
    }
    lab.ctl_ok(&[
        "cluster",
        "resync",
        "shop",
        "--node",
        "vm3",
        "--confirm",
        "shop",
    ])
    .unwrap();
    lab.wait_streaming("shop", "vm3").unwrap();
    // ... and so does the coordinator's traffic: an engine restart.
    lab.ctl_ok(&["node", "reboot", "shop", "vm2"]).unwrap();
    lab.wait_streaming("shop", "vm2").unwrap();

    // add / remove: cl2's IPv4 address only.
    let cl2 = lab.ip4_of("cl2").unwrap();
    lab.ctl_ok(&["cluster", "allowlist", "add", "shop", &cl2])
        .unwrap();
    expect(&reach(&lab, &creds, 3), |k| {
        k.starts_with("cli->") || k.ends_with("/v4")
    });
    lab.ctl_ok(&["cluster", "allowlist", "remove", "shop", &cl2])
        .unwrap();
    expect(&reach(&lab, &creds, 3), |k| k.starts_with("cli->"));

    // Emptied: open again.
    lab.ctl_ok(&["cluster", "allowlist", "set", "shop"])
        .unwrap();
    expect(&reach(&lab, &creds, 3), |_| true);

    // The record: each change, who, old and new lists.
    let h = lab
        .ctl_json(&["cluster", "allowlist", "history", "shop"])
        .unwrap();
    let changes = h["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 4, "{h}");
    assert_eq!(
        changes[1]["old_entries"].as_array().unwrap().len(),
        2,
        "{h}"
    );
    assert_eq!(
        changes[1]["new_entries"].as_array().unwrap().len(),
        3,
        "{h}"
    );
    assert!(changes.iter().all(|c| c["who"] == "admin"), "{h}");
    let audit = lab.ctl_json(&["audit", "list"]).unwrap().to_string();
    assert!(audit.contains("cluster.allowlist.change"), "{audit}");
    assert!(audit.contains(&cl2), "{audit}");
}

#[test]
fn invalid_entries_and_lockouts_are_refused_and_nothing_changes() {
    let lab = lab(1);
    let creds = lab.create_replicated("solo", "vm1", &[]).unwrap();
    let cli4 = lab.ip4_of("cli").unwrap();
    lab.ctl_ok(&[
        "cluster",
        "allowlist",
        "set",
        "solo",
        &cli4,
        "203.0.113.0/24",
    ])
    .unwrap();
    let before = (allowlist(&lab, "solo"), table(&lab, 1));
    assert!(before.1.contains("203.0.113.0/24"), "{}", before.1);
    let refused = |args: &[&str], want: &[&str]| {
        let mut full = vec!["cluster", "allowlist"];
        full.extend_from_slice(args);
        let out = lab.ctl(&full).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{full:?} was accepted");
        for w in want {
            assert!(err.contains(w), "{full:?}: error lacks {w:?}: {err}");
        }
        // Nothing changed: not the stored list, not the rules on the node.
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            (allowlist(&lab, "solo"), table(&lab, 1)),
            before,
            "{full:?}"
        );
    };
    refused(
        &["add", "solo", "db.example.com"],
        &["\"db.example.com\" is not an IPv4 or IPv6 address"],
    );
    refused(
        &["add", "solo", "198.51.100.7/24"],
        &["\"198.51.100.7/24\" has host bits set", "198.51.100.0/24"],
    );
    refused(
        &["add", "solo", "198.51.100.0/33"],
        &["prefix length \"33\" is out of range for IPv4"],
    );
    refused(
        &["add", "solo", "2001:db8::/129"],
        &["out of range for IPv6"],
    );
    refused(&["add", "solo", ""], &["entry 1 of 1: an entry is empty"]);
    refused(
        &["add", "solo", "198.51.100.7", "198.51.100.7/32"],
        &["listed twice (entries 1 and 2, both 198.51.100.7)"],
    );
    refused(
        &["remove", "solo", "192.0.2.1"],
        &["192.0.2.1 is not in the allowlist"],
    );
    refused(
        &["add", "nosuch", "192.0.2.1"],
        &["no cluster named \"nosuch\""],
    );
    // The lockout guard names the address the request came from.
    refused(
        &["set", "solo", "203.0.113.0/24"],
        &[
            &format!("would lock out {cli4}, the address this request came from"),
            "--force",
        ],
    );
    refused(
        &["remove", "solo", &cli4],
        &[&format!("would lock out {cli4}")],
    );
    let audit = lab.ctl_json(&["audit", "list"]).unwrap().to_string();
    assert!(
        audit.contains("refused: this change would lock out"),
        "{audit}"
    );

    // --force applies it: the operator's own client is then shut out.
    lab.ctl_ok(&[
        "cluster",
        "allowlist",
        "set",
        "solo",
        "203.0.113.0/24",
        "--force",
    ])
    .unwrap();
    assert!(!connects(&lab, "cli", &creds, 1, false));
    // An empty list locks nobody out.
    lab.ctl_ok(&["cluster", "allowlist", "set", "solo"])
        .unwrap();
    assert!(connects(&lab, "cli", &creds, 1, false));
}

#[test]
fn the_agent_restores_its_table_and_deleting_the_cluster_removes_it() {
    let mut lab = lab(1);
    let creds = lab.create_replicated("keep", "vm1", &[]).unwrap();
    let cli4 = lab.ip4_of("cli").unwrap();
    lab.ctl_ok(&["cluster", "allowlist", "set", "keep", &cli4])
        .unwrap();
    assert!(!connects(&lab, "cl2", &creds, 1, false));
    let applied = table(&lab, 1);

    // Deleted by hand: restored within the drift check, and reported.
    let out = lab
        .in_ns("vm1", "nft", &["delete", "table", "inet", "corral"])
        .unwrap();
    assert!(out.status.success());
    wait_until(Duration::from_secs(15), "the table restored", || {
        Ok(table(&lab, 1) == applied)
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "a firewall_drift event", || {
        let ev = lab.ctl_json(&["event", "list", "--node", "vm1"])?;
        Ok(ev.to_string().contains("firewall_drift"))
    })
    .unwrap();
    assert!(!connects(&lab, "cl2", &creds, 1, false));

    // Applied at agent start too, before the coordinator is heard from.
    lab.stop_agent(1).unwrap();
    lab.in_ns("vm1", "nft", &["delete", "table", "inet", "corral"])
        .unwrap();
    lab.stop_coordinator().unwrap();
    lab.start_agent(1, None).unwrap();
    wait_until(Duration::from_secs(10), "the table at agent start", || {
        Ok(table(&lab, 1) == applied)
    })
    .unwrap();
    lab.start_coordinator().unwrap();
    lab.wait_node_state("vm1", "up", Duration::from_secs(10))
        .unwrap();

    // Deleting the cluster removes the table.
    lab.ctl_ok(&["cluster", "delete", "keep", "--confirm", "keep"])
        .unwrap();
    wait_until(Duration::from_secs(10), "the table removed", || {
        Ok(table(&lab, 1).is_empty())
    })
    .unwrap();
}
