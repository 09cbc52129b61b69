//! The periodic report to the coordinator.
//!
//! Every interval: a metrics sample, the engine's status, and every event
//! not yet acknowledged. A coordinator that is away (restarting, network
//! cut) is retried at the same pace; the first failure and the recovery are
//! logged, not every miss.

use crate::engine::Engine;
use crate::events::Events;
use crate::metrics::Sampler;
use corral_proto::pb;
use corral_proto::pb::agent_upcalls_client::AgentUpcallsClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

pub struct Heartbeat {
    pub client: AgentUpcallsClient<Channel>,
    pub interval: Duration,
    /// host:port advertised for the agent's API.
    pub address: String,
    pub sampler: Sampler,
    pub engine: Arc<Engine>,
    pub events: Arc<Events>,
}

impl Heartbeat {
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            let request = pb::HeartbeatRequest {
                agent_address: self.address.clone(),
                interval_ms: self.interval.as_millis() as u32,
                metrics: Some(self.sampler.sample()),
                engine: Some(self.engine.status()),
                events: self.events.pending(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
            };
            match self.client.heartbeat(request).await {
                Ok(resp) => {
                    self.events.ack(resp.into_inner().acked_event_seq);
                    if let Some(since) = failing_since.take() {
                        tracing::info!(
                            "coordinator reachable again after {:.1}s",
                            since.elapsed().as_secs_f64()
                        );
                    }
                }
                Err(status) => {
                    if failing_since.is_none() {
                        failing_since = Some(std::time::Instant::now());
                        tracing::warn!(code = ?status.code(), "heartbeat failed: {}", status.message());
                    }
                }
            }
        }
    }
}
