//! Turns missing heartbeats into events on the record.
//!
//! Every 200 ms, each enrolled node's liveness is computed by the pure rule in
//! [`crate::fleet::liveness`]; a change is written as a `node_down` or
//! `node_up` event. The first pass after a start writes nothing for nodes
//! still in their grace period.

use crate::fleet::Liveness;
use crate::store;
use crate::Coordinator;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub async fn run(coord: Arc<Coordinator>) {
    let mut last: HashMap<String, Liveness> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let nodes = match coord.store.read(store::list_nodes) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "monitor: listing nodes");
                continue;
            }
        };
        let now = Instant::now();
        for node in nodes {
            let state = coord.fleet.liveness_of(&node.id, now);
            let before = last.insert(node.id.clone(), state);
            let (kind, message) = match (before, state) {
                (Some(Liveness::Up), Liveness::Down)
                | (Some(Liveness::Unknown), Liveness::Down) => {
                    let silent = coord
                        .fleet
                        .get(&node.id)
                        .map(|l| {
                            format!(
                                "no heartbeat for {:.1}s",
                                now.duration_since(l.last_seen).as_secs_f64()
                            )
                        })
                        .unwrap_or_else(|| "no heartbeat since the coordinator started".into());
                    ("node_down", format!("node {} is down: {silent}", node.id))
                }
                (Some(Liveness::Down), Liveness::Up) => {
                    ("node_up", format!("node {} is up again", node.id))
                }
                _ => continue,
            };
            tracing::warn!(node = %node.id, "{message}");
            let cluster = node.cluster.clone().unwrap_or_default();
            if let Err(e) = coord.store.read(|c| {
                store::insert_event(
                    c,
                    corral_proto::now_ms(),
                    &node.id,
                    &cluster,
                    kind,
                    &message,
                    None,
                )
            }) {
                tracing::error!(error = %e, "monitor: recording {kind}");
            }
        }
    }
}
