//! The primary's agent dies while its engine keeps running: stopped
//! (SIGTERM), killed (SIGKILL) or frozen (SIGSTOP). Nothing of the agent is
//! left to fence the engine, so the kernel's lease gate must: once the
//! lease the agent last renewed runs out, no client reaches the old engine
//! and no replica acknowledges its commits, before the coordinator may
//! promote a replica. Each case runs a writer in sync mode and the
//! split-brain checker, and ends with the old primary back as a replica.

use corral_tests::client::with_client;
use corral_tests::ha::{self, operations, vm_index, wait_acks, PROBES};
use corral_tests::Lab;
use serde_json::Value;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(90);

/// Whether a client reaching VM `i` directly commits a write there. It
/// asks not to wait for replicas (`synchronous_commit = local`, which any
/// session may set): in sync mode an old primary whose replicas moved on
/// would otherwise only hang, and look safe while it is not.
fn commits_locally(lab: &Lab, creds: &Value, i: usize) -> bool {
    let insert = format!(
        "SET synchronous_commit = local; INSERT INTO {PROBES} VALUES ('local-vm{i}', now())"
    );
    with_client(&lab.node_uri(creds, i), async |c| {
        tokio::time::timeout(Duration::from_secs(3), c.execute(&insert))
            .await
            .map_err(|_| anyhow::anyhow!("no answer in 3 s"))?
    })
    .is_ok()
}

fn the_primary_survives_its_agent(signal: &str) {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "death", &["--sync"]).unwrap();
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    let postmaster = || {
        let pidfile = lab.state_dir(1).join("postgres/data/postmaster.pid");
        let text = std::fs::read_to_string(pidfile).unwrap_or_default();
        text.lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
    };
    let engine = postmaster().expect("vm1 runs postgres");
    assert!(commits_locally(&lab, &creds, 1), "the check itself works");

    lab.signal_agent(1, signal).unwrap();
    let new = ha::wait_new_primary(&lab, "death", "vm1", Duration::from_secs(60)).unwrap();
    wait_acks(&writer, 50, Duration::from_secs(30)).unwrap();
    // The old engine ran on the whole time: only the kernel fenced it.
    assert!(
        lab.pids_in_vm(1, "postgres").contains(&engine),
        "vm1's postgres (pid {engine}) did not keep running"
    );
    assert!(
        !commits_locally(&lab, &creds, 1),
        "the old primary still commits writes beside the new one, {new}"
    );
    let failover = operations(&lab, "death", "failover").unwrap();
    assert_eq!(failover.len(), 1, "{failover:?}");
    assert_eq!(failover[0]["state"], "succeeded", "{}", failover[0]);

    // The agent comes back (systemd restarts it; a frozen one thaws): the
    // old primary rejoins as a replica, never writable.
    if signal == "STOP" {
        lab.signal_agent(1, "CONT").unwrap();
    } else {
        lab.restart_vm(1).unwrap();
    }
    assert_eq!(ha::wait_settled(&lab, "death", 3, SETTLE).unwrap(), new);
    wait_acks(&writer, 50, Duration::from_secs(10)).unwrap();
    let report = writer.finish();
    let v = check.finish().violations();
    assert!(v.is_empty(), "two nodes took writes at once: {v:?}");
    ha::wait_every_node_holds(&lab, &creds, 3, &report.acked, Duration::from_secs(20)).unwrap();
    let rejoin = operations(&lab, "death", "rejoin").unwrap();
    assert!(
        rejoin.iter().any(|o| o["state"] == "succeeded"),
        "vm1 did not rejoin: {rejoin:?}"
    );
    assert_eq!(lab.health(1, "/replica").unwrap(), 200);
    assert_eq!(lab.health(vm_index(&new), "/primary").unwrap(), 200);
    eprintln!(
        "SIG{signal} of the primary's agent: {new} took over, {} writes acknowledged, none lost",
        report.acked.len()
    );
}

#[test]
fn a_stopped_agent_leaves_no_writable_engine_behind() {
    the_primary_survives_its_agent("TERM");
}

#[test]
fn a_killed_agent_leaves_no_writable_engine_behind() {
    the_primary_survives_its_agent("KILL");
}

#[test]
fn a_frozen_agent_leaves_no_writable_engine_behind() {
    the_primary_survives_its_agent("STOP");
}

/// Under systemd the unit is `Type=notify` with `WatchdogSec=`: the agent
/// says when it is ready, and its guardian pings the watchdog only while it
/// runs, so a frozen agent is restarted (the lease gate has fenced its
/// engine long before). systemd's side is its socket: a datagram socket
/// named by NOTIFY_SOCKET, which the test plays.
#[test]
fn the_agent_tells_systemd_it_is_ready_and_stops_pinging_when_frozen() {
    use std::os::unix::net::UnixDatagram;
    let mut lab = Lab::start(1).unwrap();
    lab.signal_agent(1, "TERM").unwrap();
    let path = lab.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let receive = |for_how_long: Duration| {
        let mut got = Vec::new();
        let began = std::time::Instant::now();
        let mut buf = [0u8; 512];
        while began.elapsed() < for_how_long {
            if let Ok(n) = socket.recv(&mut buf) {
                got.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_string),
                );
            }
        }
        got
    };
    lab.start_agent_env(
        1,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    )
    .unwrap();
    let first = receive(Duration::from_secs(10));
    assert!(first.iter().any(|l| l == "READY=1"), "{first:?}");
    let pings = |got: &[String]| got.iter().filter(|l| *l == "WATCHDOG=1").count();
    // A quarter of the interval apart: several in 10 s.
    assert!(pings(&first) >= 5, "{first:?}");

    lab.signal_agent(1, "STOP").unwrap();
    receive(Duration::from_millis(300)); // a ping already on its way
    let frozen = receive(Duration::from_secs(3));
    assert_eq!(pings(&frozen), 0, "a frozen agent pinged: {frozen:?}");
    lab.signal_agent(1, "CONT").unwrap();
    let thawed = receive(Duration::from_secs(3));
    assert!(pings(&thawed) >= 1, "{thawed:?}");

    lab.signal_agent(1, "TERM").unwrap();
    let last = receive(Duration::from_millis(500));
    assert!(last.iter().any(|l| l == "STOPPING=1"), "{last:?}");
}

/// A primary whose firewall cannot be written cannot be fenced, so its
/// engine must not run: the agent stops it and keeps it stopped until the
/// firewall applies (here `nft` fails, as when nftables is broken or
/// missing), the coordinator fails over as for a lost primary, and once
/// the firewall works again the old primary comes back as a replica.
#[test]
fn a_primary_whose_firewall_cannot_be_applied_stops_its_engine() {
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "nofw", &[]).unwrap();
    let writer = ha::writer(&lab, &creds);
    let check = ha::checker(&lab, &creds, 3);
    wait_acks(&writer, 20, Duration::from_secs(10)).unwrap();
    assert!(!lab.pids_in_vm(1, "postgres").is_empty());

    let broken = lab.dir().join("broken-nft");
    std::fs::create_dir_all(&broken).unwrap();
    let nft = broken.join("nft");
    std::fs::write(
        &nft,
        "#!/bin/sh\necho 'nft: broken for the test' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        broken.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    lab.signal_agent(1, "TERM").unwrap();
    lab.start_agent_env(1, &[("PATH", &path)]).unwrap();
    // A fast shutdown waits for each walsender to send what remains; one
    // whose replica's packets the closing lease gate now drops waits up to
    // wal_sender_timeout (60 s). No write gets in meanwhile (a shutting
    // down server refuses sessions, and the gate closes).
    corral_tests::wait_until(Duration::from_secs(90), "vm1's postgres to stop", || {
        Ok(lab.pids_in_vm(1, "postgres").is_empty())
    })
    .unwrap();
    let new = ha::wait_new_primary(&lab, "nofw", "vm1", Duration::from_secs(60)).unwrap();
    wait_acks(&writer, 20, Duration::from_secs(30)).unwrap();
    let failed = ha::events(&lab, "nofw").unwrap();
    assert!(
        failed
            .iter()
            .any(|(kind, node, _, m)| kind == "firewall_failed"
                && node == "vm1"
                && m.contains("broken for the test")),
        "{failed:?}"
    );
    // Still stopped a while later: the supervisor does not start it again.
    std::thread::sleep(Duration::from_secs(2));
    assert!(lab.pids_in_vm(1, "postgres").is_empty());

    lab.signal_agent(1, "TERM").unwrap();
    lab.restart_vm(1).unwrap();
    assert_eq!(ha::wait_settled(&lab, "nofw", 3, SETTLE).unwrap(), new);
    let report = writer.finish();
    let v = check.finish().violations();
    assert!(v.is_empty(), "two nodes took writes at once: {v:?}");
    // The rejoin refused while the firewall failed said why.
    let rejoins = operations(&lab, "nofw", "rejoin").unwrap();
    assert!(
        rejoins
            .iter()
            .any(|o| o["state"] == "failed" && o.to_string().contains("fix nftables")),
        "{rejoins:?}"
    );
    assert!(
        rejoins.iter().any(|o| o["state"] == "succeeded"),
        "{rejoins:?}"
    );
    assert_eq!(lab.health(1, "/replica").unwrap(), 200);
    assert!(!report.acked.is_empty());
}
