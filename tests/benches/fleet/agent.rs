//! The simulated agents: one task per node heartbeating over mutual TLS with
//! pseudo-random but plausible reports.

use super::*;

/// One node's agent: a mutual-TLS channel with the node's certificate and
/// a heartbeat every second from `first`, each sent in a task of its own
/// as the real agent does (a slow answer never delays the next).
pub(super) async fn agent(
    node: Arc<Node>,
    ca_pem: Arc<String>,
    grpc: String,
    first: tokio::time::Instant,
    recorder: Arc<Recorder>,
) {
    let tls = tls::client_config(&ca_pem, Some(&node.cert), pki::COORDINATOR_DNS);
    let channel = tls::channel(&grpc, tls, Duration::from_secs(5)).expect("a channel");
    let client = AgentUpcallsClient::new(channel);
    let mut tick = tokio::time::interval_at(first, HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (node.index as u64 + 1);
    loop {
        tick.tick().await;
        seq += 1;
        let request = report(&node, seq, &mut rng);
        let phase = recorder.phase.load(Relaxed);
        if phase == DONE {
            continue;
        }
        let (mut client, node, recorder) = (client.clone(), node.clone(), recorder.clone());
        tokio::spawn(async move {
            let tally = &recorder.tallies[phase as usize];
            tally.sent.fetch_add(1, Relaxed);
            let began = Instant::now();
            let answer = tokio::time::timeout(GIVE_UP, client.heartbeat(request)).await;
            let took = began.elapsed();
            match answer {
                Ok(Ok(resp)) => {
                    tally.ok.fetch_add(1, Relaxed);
                    let at = recorder.start.elapsed().as_millis() as u64 + 1;
                    let _ =
                        recorder.first_ok_ms[node.index].compare_exchange(0, at, Relaxed, Relaxed);
                    tally
                        .latencies_us
                        .lock()
                        .unwrap()
                        .push(took.as_micros().min(u32::MAX as u128) as u32);
                    let a = resp.into_inner().assignment;
                    match a {
                        Some(a) if a.role == node.role && a.cluster == node.cluster => {
                            if node.role == "primary" && a.lease_ms == 0 {
                                tally.primary_without_lease.fetch_add(1, Relaxed);
                            }
                        }
                        _ => {
                            tally.wrong_assignment.fetch_add(1, Relaxed);
                        }
                    }
                }
                Ok(Err(status)) => {
                    let key = format!("{:?}: {}", status.code(), status.message());
                    *tally.errors.lock().unwrap().entry(key).or_default() += 1;
                }
                Err(_) => {
                    let key = format!("no answer within {} ms", GIVE_UP.as_millis());
                    *tally.errors.lock().unwrap().entry(key).or_default() += 1;
                }
            }
        });
    }
}

/// A pseudo-random number in [0, 1) (xorshift64).
pub(super) fn rand(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// Heartbeat number `seq` of `node`: what an agent of a healthy PostgreSQL
/// member sends (the fields the coordinator reads: metrics, the engine's
/// state, role and replication, the lease, engine stats).
pub(super) fn report(node: &Node, seq: u64, rng: &mut u64) -> pb::HeartbeatRequest {
    let mut r = || rand(rng);
    let (cpu, disk_used) = match node.hot {
        None => (5.0 + 25.0 * r(), 40 * GIB + (r() * GIB as f64) as u64),
        Some(Hot::Critical) => (95.0 + 3.0 * r(), 97 * GIB),
        Some(Hot::Warning) => (95.0 + 3.0 * r(), 90 * GIB),
    };
    let metrics = pb::Metrics {
        cpu_percent: cpu,
        memory_used_bytes: 2 * GIB + (r() * 2.0 * GIB as f64) as u64,
        memory_total_bytes: 8 * GIB,
        disk_used_bytes: disk_used,
        disk_total_bytes: 100 * GIB,
        net_rx_bytes_per_sec: 50_000.0 + 450_000.0 * r(),
        net_tx_bytes_per_sec: 50_000.0 + 450_000.0 * r(),
        load1: 0.2 + 1.3 * r(),
        load5: 0.5,
        load15: 0.5,
    };
    // WAL advances 64 KiB a second; replicas trail by a few KiB.
    let lsn = 0x0300_0000 + seq * 65_536;
    let primary = node.role == "primary";
    let mut stats = HashMap::from([("connections".to_string(), (10.0 + 40.0 * r()).round())]);
    let replication = if primary {
        pb::Replication {
            in_recovery: false,
            lsn,
            timeline: 1,
            system_identifier: format!("74{:015}", node.index / 3),
            standbys: node
                .others
                .iter()
                .map(|s| pb::Standby {
                    name: s.clone(),
                    state: "streaming".into(),
                    sent_lsn: lsn,
                    flush_lsn: lsn - 512,
                    replay_lsn: lsn - 1024,
                    replay_lag_ms: 1,
                    sync_state: "async".into(),
                })
                .collect(),
            ..Default::default()
        }
    } else {
        stats.insert("lag_seconds".into(), (r() * 0.5 * 1000.0).round() / 1000.0);
        pb::Replication {
            in_recovery: true,
            lsn: lsn - 1024,
            receive_lsn: lsn - 512,
            timeline: 1,
            system_identifier: format!("74{:015}", node.index / 3),
            streaming: true,
            upstream_host: format!("{}.node.corral", node.primary),
            upstream_lsn: lsn,
            ..Default::default()
        }
    };
    let lease = if primary {
        pb::LeaseStatus {
            held: true,
            remaining_ms: LEASE_MS - 1000,
            source: "coordinator".into(),
            ..Default::default()
        }
    } else {
        pb::LeaseStatus {
            confirmed_primary: node.primary.clone(),
            confirmation_remaining_ms: LEASE_MS,
            ..Default::default()
        }
    };
    pb::HeartbeatRequest {
        agent_address: node.address.clone(),
        interval_ms: HEARTBEAT.as_millis() as u32,
        metrics: Some(metrics),
        engine: Some(pb::EngineStatus {
            engine: "postgres".into(),
            cluster: node.cluster.clone(),
            state: pb::EngineState::Running as i32,
            role: node.role.into(),
            pid: 10_000 + node.index as u32,
            port: 5432,
            version: "15.14".into(),
            healthy: true,
            replication: Some(replication),
            term: 1,
            upstream: if primary {
                String::new()
            } else {
                node.primary.clone()
            },
            lease: Some(lease),
            checked_age_ms: 3,
            stats,
            ..Default::default()
        }),
        events: Vec::new(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}
