//! The fence and the kernel lease gate: blocking and restoring the engine
//! port, a fenced node still reaching others, the gate closing by itself,
//! drift detection, idempotent removal, repeated replacement, errors.

use super::support::{
    fence, fence_packets, gated, has_table, roundtrip, unfenced, EchoServer, Netns, PREFIX,
};
use corral_agent::firewall::{Firewall, Rules, TABLE};
use std::time::{Duration, Instant};

#[tokio::test]
async fn fence_blocks_the_engine_port_and_lifting_it_restores_traffic() {
    let ns = Netns::new();
    let engine = EchoServer::start(&ns, "127.0.0.1", 0);
    let port = engine.addr.port();
    let fw = ns.firewall();

    ns.echo(engine.addr)
        .expect("the engine answers before the fence");
    let established = ns.connect(engine.addr);
    roundtrip(&established).unwrap();

    fw.apply(&fence(port)).await.unwrap();
    let err = ns.echo(engine.addr).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "a fenced port drops the SYN (no reset): {err}"
    );
    assert!(
        roundtrip(&established).is_err(),
        "a connection opened before the fence cannot write through it either"
    );
    assert!(
        fence_packets(&ns, "input") > 0,
        "the input counter saw the SYNs"
    );
    // Applying again is harmless and still fences.
    fw.apply(&fence(port)).await.unwrap();
    assert!(ns.echo(engine.addr).is_err());
    assert!(fw.matches(&fence(port)).await.unwrap());

    fw.apply(&unfenced(port)).await.unwrap();
    ns.echo(engine.addr)
        .expect("the engine answers once the fence is lifted");
    assert!(fw.matches(&unfenced(port)).await.unwrap());
    let listed = ns.nft(&["list", "table", "inet", TABLE]);
    assert!(!listed.contains("drop"), "{listed}");
}

#[tokio::test]
async fn fenced_node_still_reaches_other_nodes_engines() {
    // Two "VMs" joined by a veth pair: `old` is the fenced former primary,
    // `new` runs the engine it must clone from (pg_rewind, pg_basebackup).
    let old = Netns::new();
    let new = Netns::new();
    old.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &new.name,
    ]);
    old.ip(&["addr", "add", "192.0.2.1/24", "dev", "veth0"]);
    new.ip(&["addr", "add", "192.0.2.2/24", "dev", "veth1"]);
    old.ip(&["link", "set", "veth0", "up"]);
    new.ip(&["link", "set", "veth1", "up"]);

    let old_engine = EchoServer::start(&old, "192.0.2.1", 0);
    let port = old_engine.addr.port();
    // The same port on both nodes, as in a real cluster.
    let new_engine = EchoServer::start(&new, "192.0.2.2", port);
    new.echo(old_engine.addr)
        .expect("reachable before the fence");

    old.firewall().apply(&fence(port)).await.unwrap();
    assert!(
        new.echo(old_engine.addr).is_err(),
        "other nodes cannot reach the fenced engine"
    );
    old.echo(new_engine.addr)
        .expect("the fenced node still reaches the new primary's engine on the same port");
}

#[tokio::test]
async fn the_lease_gate_closes_by_itself_when_nobody_renews_it() {
    use corral_agent::lease::BootTime;
    let ns = Netns::new();
    let engine = EchoServer::start(&ns, "127.0.0.1", 0);
    let port = engine.addr.port();
    let fw = ns.firewall();

    // Written with the gate open for 1.5 s: traffic flows, in the table's
    // own transaction (no moment with the port closed).
    fw.apply_gated(&gated(port), BootTime::now() + Duration::from_millis(1500))
        .await
        .unwrap();
    ns.echo(engine.addr).expect("open while the lease lives");
    let established = ns.connect(engine.addr);
    roundtrip(&established).unwrap();
    assert!(
        fw.matches(&gated(port)).await.unwrap(),
        "the element is not drift"
    );
    // Renewed every 300 ms for 3 s, well past the first end: still open.
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(3) {
        fw.renew_gate(port, BootTime::now() + Duration::from_millis(1500))
            .unwrap();
        ns.echo(engine.addr).expect("open while renewed");
        roundtrip(&established).expect("an established session keeps working");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Nobody renews it (the agent died): the kernel closes it by itself,
    // for new and established connections alike.
    std::thread::sleep(Duration::from_millis(1600));
    let err = ns.echo(engine.addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(
        roundtrip(&established).is_err(),
        "established traffic is dropped too"
    );
    assert!(
        fence_packets(&ns, "input") > 0,
        "the gate's counter saw them"
    );
    assert!(
        fw.matches(&gated(port)).await.unwrap(),
        "still the same table"
    );
    // A closed gate is reopened by writing the table afresh.
    fw.apply_gated(&gated(port), BootTime::now() + Duration::from_millis(900))
        .await
        .unwrap();
    ns.echo(engine.addr).expect("reopened");
    // Under a second nft cannot write the element (whole seconds): the
    // renewal right after it opens the gate.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(ns.echo(engine.addr).is_err(), "closed at its end again");
    // Without a table there is no set to renew.
    fw.remove().await.unwrap();
    let e = fw
        .renew_gate(port, BootTime::now() + Duration::from_secs(1))
        .unwrap_err();
    assert!(format!("{e:#}").contains("is the table applied"), "{e:#}");
}

#[tokio::test]
async fn matches_detects_drift() {
    let ns = Netns::new();
    let fw = ns.firewall();
    let rules = fence(5432);

    assert!(!fw.matches(&rules).await.unwrap(), "no table yet");
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap());
    assert!(!fw.matches(&unfenced(5432)).await.unwrap());
    assert!(!fw.matches(&fence(5433)).await.unwrap());

    ns.nft(&["delete", "table", "inet", TABLE]);
    assert!(!fw.matches(&rules).await.unwrap(), "deleted by hand");

    fw.apply(&rules).await.unwrap();
    ns.nft(&["flush", "ruleset"]);
    assert!(!fw.matches(&rules).await.unwrap(), "nft flush ruleset");

    fw.apply(&rules).await.unwrap();
    ns.nft(&[
        "insert", "rule", "inet", TABLE, "input", "tcp", "dport", "5432", "accept",
    ]);
    assert!(!fw.matches(&rules).await.unwrap(), "a rule added by hand");
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap(), "apply repairs it");

    ns.nft(&["add", "table", "inet", TABLE, "{ flags dormant; }"]);
    assert!(!fw.matches(&rules).await.unwrap(), "table switched off");
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap());
}

#[tokio::test]
async fn remove_is_idempotent_and_leaves_other_tables_alone() {
    let ns = Netns::new();
    let fw = ns.firewall();
    // The VM's own firewall, with a rule of its own.
    ns.nft(&["add", "table", "inet", "vmfirewall"]);
    ns.nft(&[
        "add",
        "chain",
        "inet",
        "vmfirewall",
        "input",
        "{ type filter hook input priority -10; policy accept; }",
    ]);
    ns.nft(&[
        "add",
        "rule",
        "inet",
        "vmfirewall",
        "input",
        "tcp",
        "dport",
        "22",
        "accept",
    ]);
    let before = ns.nft(&["list", "table", "inet", "vmfirewall"]);

    fw.remove().await.expect("removing an absent table is fine");
    fw.apply(&fence(5432)).await.unwrap();
    assert!(has_table(&ns, "inet", TABLE));
    assert_eq!(ns.nft(&["list", "table", "inet", "vmfirewall"]), before);
    fw.remove().await.unwrap();
    assert!(!has_table(&ns, "inet", TABLE));
    assert!(!fw.matches(&Rules::default()).await.unwrap());
    fw.remove().await.expect("removing twice is fine");
    assert_eq!(ns.nft(&["list", "table", "inet", "vmfirewall"]), before);
}

#[tokio::test]
async fn apply_replaces_the_table_repeatedly() {
    let ns = Netns::new();
    let fw = ns.firewall();
    let direct = Firewall::new();
    let mut times = Vec::new();
    for i in 0..20u16 {
        let rules = if i % 2 == 0 {
            fence(5432)
        } else {
            unfenced(5432)
        };
        let started = Instant::now();
        fw.apply(&rules).await.unwrap();
        times.push(started.elapsed());
    }
    // The same through `nft` directly, without `ip netns exec`, in the
    // namespace we entered: what the agent pays on a VM.
    let direct_times = {
        let path = format!("/run/netns/{}", ns.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                (0..20u16)
                    .map(|i| {
                        let rules = if i % 2 == 0 {
                            fence(5432)
                        } else {
                            unfenced(5432)
                        };
                        let started = Instant::now();
                        rt.block_on(direct.apply(&rules)).unwrap();
                        started.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap()
        })
    };
    let report = |label: &str, times: &mut Vec<Duration>| {
        times.sort();
        eprintln!(
            "apply via {label}: min {:?}, median {:?}, max {:?} over {} runs",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1],
            times.len()
        );
        times[times.len() / 2]
    };
    report("ip netns exec nft", &mut times);
    let mut direct_times = direct_times;
    report("nft", &mut direct_times);
    // 20 replacements each way left the last one in place (an unfenced
    // table) and no other table behind.
    assert!(fw.matches(&unfenced(5432)).await.unwrap());
    assert!(!fw.matches(&fence(5432)).await.unwrap());
    assert_eq!(
        ns.nft(&["list", "tables"]).trim(),
        format!("table inet {TABLE}")
    );
}

#[tokio::test]
async fn errors_carry_the_command_and_its_stderr() {
    // A namespace that does not exist: `ip` fails before reading the batch.
    let name = format!("{PREFIX}{}-absent", std::process::id());
    let fw = Firewall::with_command("ip", &["netns", "exec", &name, "nft"]);
    let message = format!("{:#}", fw.apply(&fence(5432)).await.unwrap_err());
    assert!(
        message.contains("replacing table inet corral failed"),
        "{message}"
    );
    assert!(
        message.contains(&format!("ip netns exec {name} nft -j -f -")),
        "{message}"
    );
    assert!(
        message.contains("Cannot open network namespace"),
        "{message}"
    );
    assert!(message.contains("the table is unchanged"), "{message}");
    let message = format!("{:#}", fw.matches(&fence(5432)).await.unwrap_err());
    assert!(
        message.contains("Cannot open network namespace"),
        "{message}"
    );
    eprintln!("{message}");
}
