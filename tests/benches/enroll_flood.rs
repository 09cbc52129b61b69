//! Heartbeats during an enrollment flood: while a caller without a
//! certificate sends `CORRAL_FLOOD_COUNT` (default 10,000) bad
//! enrollments of 1 MiB (every other one 200 KiB) from 8 connections, an
//! enrolled probe node sends a heartbeat every 100 ms, and a
//! primary/replica PostgreSQL cluster runs. Prints the probe's heartbeat
//! round trip (p50 / p99 / max) before and during the flood beside the
//! lease's margin (what a heartbeat may be late by before a failover could
//! start), the store's growth and whether the cluster kept its term and
//! primary. Asserts nothing about speed. Run with `make bench`.

use corral_proto::pb;
use corral_proto::pki::{self, CertKey};
use corral_tests::Lab;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "../tests/support/flood.rs"]
mod flood;

/// Enrolls node `id` with a fresh token and returns its certificate.
fn enroll(lab: &Lab, id: &str) -> CertKey {
    let token = lab.token().unwrap();
    let (csr_pem, key_pem) = pki::new_csr(id).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt
        .block_on(async {
            pb::agent_upcalls_client::AgentUpcallsClient::new(flood::channel(lab, None))
                .enroll(pb::EnrollRequest {
                    token,
                    node_id: id.into(),
                    csr_pem,
                })
                .await
        })
        .unwrap()
        .into_inner();
    CertKey {
        cert_pem: r.certificate_pem,
        key_pem,
    }
}

/// Heartbeat round trips of `me` every 100 ms until `stop`, in ms.
fn probe(lab: &Lab, me: &CertKey, stop: &AtomicBool, at_least: usize) -> Vec<f64> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client =
            pb::agent_upcalls_client::AgentUpcallsClient::new(flood::channel(lab, Some(me)));
        let mut rtts = Vec::new();
        while !stop.load(Ordering::Relaxed) || rtts.len() < at_least {
            let began = Instant::now();
            let hb = pb::HeartbeatRequest {
                agent_address: "10.231.0.99:7401".into(),
                interval_ms: 100,
                ..Default::default()
            };
            match client.heartbeat(hb).await {
                Ok(_) => rtts.push(began.elapsed().as_secs_f64() * 1000.0),
                Err(s) => eprintln!("probe heartbeat failed: {s}"),
            }
            tokio::time::sleep(Duration::from_millis(100).saturating_sub(began.elapsed())).await;
        }
        rtts
    })
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

fn store_bytes(lab: &Lab) -> u64 {
    ["corral.db", "corral.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(lab.dir().join("coordinator").join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn main() {
    let count = flood::flood_count(10_000);
    let lab = Lab::start(2).unwrap();
    lab.create_replicated("bench", "vm1,vm2", &[]).unwrap();
    lab.wait_streaming("bench", "vm2").unwrap();
    let before = lab.ctl_json(&["cluster", "show", "bench"]).unwrap();
    let me = enroll(&lab, "probe");

    let quiet = AtomicBool::new(true);
    let idle = probe(&lab, &me, &quiet, 50);
    let bytes = store_bytes(&lab);
    let stop = AtomicBool::new(false);
    let (during, (refused, took)) = std::thread::scope(|s| {
        let p = s.spawn(|| probe(&lab, &me, &stop, 10));
        let began = Instant::now();
        let (refused, _) = flood::flood(&lab, count, 8);
        let took = began.elapsed();
        stop.store(true, Ordering::Relaxed);
        (p.join().unwrap(), (refused, took))
    });
    let after = lab.ctl_json(&["cluster", "show", "bench"]).unwrap();

    let lease = Duration::from_millis(u64::from(corral_proto::lease::DEFAULT_LEASE_MS));
    let margin = corral_proto::lease::margin(lease).as_secs_f64() * 1000.0;
    println!("enrollment flood: {count} bad enrollments ({refused} refused) in {took:.1?}");
    for (what, v) in [("idle", idle), ("during the flood", during)] {
        let n = v.len();
        let (p50, p99, max) = quantiles(v);
        println!(
            "  heartbeat round trip {what:<17} p50 {p50:>7.1} ms   p99 {p99:>7.1} ms   max {max:>7.1} ms   ({n} heartbeats; lease margin {margin:.0} ms)"
        );
    }
    println!(
        "  store growth {:.2} MiB; term {} -> {}; primary {} -> {}",
        store_bytes(&lab).saturating_sub(bytes) as f64 / (1 << 20) as f64,
        before["term"],
        after["term"],
        primary(&before),
        primary(&after)
    );
}

fn primary(c: &serde_json::Value) -> String {
    c["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["role"] == "primary"))
        .and_then(|n| n["id"].as_str())
        .unwrap_or("none")
        .to_string()
}
