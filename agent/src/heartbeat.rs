//! The periodic report to the coordinator, and its answer.
//!
//! Every interval: the engine's status from a fresh health check (so a
//! replica's position is current when the coordinator weighs a failover),
//! every event not yet acknowledged, and once a second a metrics sample
//! (the history's resolution: heartbeats come faster than the figures are
//! worth reading, and sampling costs more than the rest of a heartbeat).
//! The answer carries the node's assignment: the cluster's term and
//! timing, the primary's lease and the addresses of its replicas
//! ([`crate::engine::Engine::on_assignment`]).
//!
//! Each heartbeat is sent in a task of its own, so one stuck on an
//! unreachable coordinator never delays the next (the lease is renewed only
//! by answers, counted from when each heartbeat was sent). A new primary
//! wakes the loop to ask for its lease at once. The interval follows the
//! cluster's setting once the coordinator has sent it. A coordinator that
//! is away is retried at the same pace; the first failure and the recovery
//! are logged, not every miss.

use crate::engine::Engine;
use crate::events::Events;
use crate::lease::BootTime;
use crate::metrics::Sampler;
use corral_proto::pb;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Heartbeat {
    /// The node certificate in use (renewed in place).
    pub creds: Arc<crate::credentials::Credentials>,
    /// Learns the cluster's members from each answer, for the Peer API.
    pub members: Arc<crate::members::Members>,
    /// The agent's own interval, used until the node serves a cluster.
    pub interval: Duration,
    /// host:port advertised for the agent's API.
    pub address: String,
    pub sampler: Sampler,
    pub telemetry: Arc<crate::metrics::Telemetry>,
    pub engine: Arc<Engine>,
    pub events: Arc<Events>,
}

/// Longest wait for the health check that precedes a heartbeat.
const REFRESH_TIMEOUT: Duration = Duration::from_millis(200);
/// How often a heartbeat carries a metrics sample (a slower heartbeat
/// carries one each time).
const METRICS_EVERY: Duration = Duration::from_secs(1);

impl Heartbeat {
    fn interval(&self) -> Duration {
        self.engine
            .cluster_state()
            .filter(|c| c.heartbeat_ms > 0)
            .map(|c| Duration::from_millis(u64::from(c.heartbeat_ms)))
            .unwrap_or(self.interval)
    }

    pub async fn run(mut self) {
        let failing_since: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let mut next = tokio::time::Instant::now();
        let mut sampled: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.engine.heartbeat_wake.notified() => {}
            }
            let interval = self.interval();
            next = tokio::time::Instant::now() + interval;
            let asked_at = BootTime::now();
            let _ = tokio::time::timeout(REFRESH_TIMEOUT, self.engine.refresh()).await;
            // Due a little early, so a 250 ms heartbeat samples every 4th
            // time and not every 5th.
            let due = sampled.is_none_or(|t| t.elapsed() + interval / 2 >= METRICS_EVERY);
            let sample = due.then(|| {
                sampled = Some(Instant::now());
                let sample = self.sampler.sample();
                self.telemetry.sampled(sample);
                sample
            });
            let request = pb::HeartbeatRequest {
                agent_address: self.address.clone(),
                interval_ms: interval.as_millis() as u32,
                metrics: sample,
                engine: Some(self.engine.status()),
                events: self.events.pending(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
            };
            let mut client = self.creds.upcalls();
            let (engine, events, failing, telemetry, members) = (
                self.engine.clone(),
                self.events.clone(),
                failing_since.clone(),
                self.telemetry.clone(),
                self.members.clone(),
            );
            // An answer later than the lease is of no use; a stuck call
            // must not pile up.
            let give_up = interval * 4;
            tokio::spawn(async move {
                let answer = tokio::time::timeout(give_up, client.heartbeat(request)).await;
                if let Ok(Ok(resp)) = &answer {
                    let resp = resp.get_ref();
                    events.ack(resp.acked_event_seq);
                    members.learn(resp.assignment.as_ref());
                    if let Some(a) = &resp.assignment {
                        engine.on_assignment(a, asked_at);
                    }
                }
                let counter = match &answer {
                    Ok(Ok(_)) => &telemetry.heartbeats_ok,
                    _ => &telemetry.heartbeats_failed,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut failing = failing.lock().unwrap_or_else(|p| p.into_inner());
                match answer {
                    Ok(Ok(_)) => {
                        if let Some(since) = failing.take() {
                            tracing::info!(
                                "coordinator reachable again after {:.1}s",
                                since.elapsed().as_secs_f64()
                            );
                        }
                    }
                    Ok(Err(status)) => {
                        if failing.is_none() {
                            *failing = Some(Instant::now());
                            report_refusal(&status);
                        }
                    }
                    Err(_) => {
                        if failing.is_none() {
                            *failing = Some(Instant::now());
                            tracing::warn!(
                                "heartbeat failed: no answer within {} ms",
                                give_up.as_millis()
                            );
                        }
                    }
                }
            });
        }
    }
}

/// Logs a failed heartbeat once. A refusal of this node's certificate
/// (revoked, or the node forgotten) is said plainly: the agent keeps
/// running and leaves its engine as it is (a primary without a lease fences
/// itself as always), and does not fight the decision.
fn report_refusal(status: &tonic::Status) {
    if status.code() == tonic::Code::PermissionDenied {
        tracing::error!(
            "the coordinator refuses this node: {}. This agent keeps running and leaves its \
             engine as it is, but takes no orders and holds no lease. To use this VM again, \
             enroll it anew: `corralctl node forget NODE --confirm NODE` if not done yet, then \
             remove node.json from the state directory and start the agent with --join-file \
             holding a new join token",
            status.message()
        );
    } else {
        tracing::warn!(code = ?status.code(), "heartbeat failed: {}", status.message());
    }
}
