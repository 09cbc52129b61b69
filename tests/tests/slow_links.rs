//! No false failover on slow, lossy links between the database VMs:
//! 100 ms ± 50 ms of delay and 1 % packet loss on every link of the three
//! VMs (what `tc qdisc ... netem delay 100ms 50ms loss 1%` in each VM's
//! namespace would do; see `corral_tests::slowlinks`): replication, the
//! primary's confirmation rounds, the clients' traffic. The coordinator's
//! own sends are not slowed (a VM's packets to it are). Under a writer,
//! with the default timing, for 90 s in `make test` and five minutes in
//! `make bench` (`CORRAL_SLOW_SECONDS`). In a test binary of its own, like
//! busy.rs.
//!
//! With the coordinator's sends slowed too, the `lan` profile's 1 s lease
//! lapses now and then: one lost packet stalls a TCP connection for a
//! retransmission timeout (200 ms plus the round trip), and a heartbeat
//! and a confirmation round stalled at once leave the lease to run out
//! (1 fence in 90 s, measured). Such links need `profile=wan`
//! (docs/failover.md).

use corral_tests::ha;
use corral_tests::slowlinks::Link;
use corral_tests::Lab;
use std::time::Duration;

#[test]
fn delay_jitter_and_loss_on_every_link_cause_no_failover_and_no_fence() {
    let secs: u64 = corral_tests::env_num("CORRAL_SLOW_SECONDS", 90);
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "slow", &[]).unwrap();
    let link = Link {
        delay: Duration::from_millis(100),
        jitter: Duration::from_millis(50),
        loss: 0.01,
    };
    let slow = lab.slow_links(&["vm1", "vm2", "vm3"], link).unwrap();
    // The links are slow: a round trip vm1 -> vm2 -> vm1 is delayed twice,
    // at least 50 ms each way.
    let ping = lab
        .in_ns("vm1", "ping", &["-c", "5", "-i", "0.2", &lab.vm_ip(2)])
        .unwrap();
    let text = String::from_utf8_lossy(&ping.stdout).to_string();
    let min_rtt: f64 = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no round-trip figures from ping: {text}"));
    assert!(min_rtt >= 100.0, "links are not slowed: {text}");
    ha::hold_steady(
        &lab,
        &creds,
        "slow",
        secs,
        "100 ms ± 50 ms delay and 1 % loss on every VM's link",
    );
    drop(slow);
}
