//! `corralctl logs`: a node's engine or agent log, relayed from its agent.
//!
//! The coordinator checks the request against its topology (the node must
//! serve the named cluster), opens the agent's `StreamLogs` and hands its
//! chunks on as they come: nothing is buffered here beyond the chunk in
//! hand. When the operator goes away the relayed stream is dropped, which
//! cancels the agent's call, and the agent stops reading.

use crate::{store, Coordinator};
use corral_proto::{names, pb};
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

pub type LogsStream = Pin<Box<dyn Stream<Item = Result<pb::LogLines, Status>> + Send>>;

/// Where `node`'s agent listens, once the request is checked against the
/// topology.
fn agent_address(coord: &Coordinator, r: &pb::LogsRequest) -> Result<String, Status> {
    names::validate("cluster", &r.cluster).map_err(Status::invalid_argument)?;
    names::validate("node", &r.node).map_err(Status::invalid_argument)?;
    let internal = |e: anyhow::Error| Status::internal(format!("{e:#}"));
    let (cluster, node) = coord
        .store
        .read(|c| {
            Ok((
                store::get_cluster(c, &r.cluster)?,
                store::get_node(c, &r.node)?,
            ))
        })
        .map_err(internal)?;
    if cluster.is_none() {
        return Err(Status::not_found(format!(
            "no cluster named {:?}: see `corralctl cluster list`",
            r.cluster
        )));
    }
    let node = node
        .filter(|n| n.cluster.as_deref() == Some(r.cluster.as_str()))
        .ok_or_else(|| {
            Status::not_found(format!(
                "node {} is not a member of cluster {}; `corralctl node list` shows members",
                r.node, r.cluster
            ))
        })?;
    coord
        .fleet
        .get(&node.id)
        .map(|l| l.address)
        .filter(|a| !a.is_empty())
        .or(Some(node.address).filter(|a| !a.is_empty()))
        .ok_or_else(|| {
            Status::unavailable(format!(
                "node {} has not reported its agent's address yet; is corral-agent running there?",
                r.node
            ))
        })
}

/// Opens the agent's stream for `r` and relays it.
pub async fn relay(coord: &Coordinator, r: pb::LogsRequest) -> Result<LogsStream, Status> {
    let address = agent_address(coord, &r)?;
    let node = r.node.clone();
    let unreachable = |detail: String| {
        Status::unavailable(format!(
            "cannot reach the agent of node {node} at {address}: {detail}; is corral-agent \
             running there? (`corralctl node list` shows whether the node is up)"
        ))
    };
    let mut client = coord
        .agents
        .client(&node, &address)
        .map_err(|e| unreachable(format!("{e:#}")))?;
    let req = pb::StreamLogsRequest {
        source: r.source,
        since_ms: r.since_ms,
        tail: r.tail,
        follow: r.follow,
    };
    let stream = match client.stream_logs(req).await {
        Ok(resp) => resp.into_inner(),
        Err(s) => {
            return Err(match s.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    unreachable(transport_detail(&s))
                }
                tonic::Code::Unimplemented => Status::failed_precondition(format!(
                    "the agent of node {node} is too old to stream logs: upgrade corral-agent there"
                )),
                code => Status::new(code, format!("node {node}: {}", s.message())),
            })
        }
    };
    let node = r.node;
    Ok(Box::pin(stream.map(move |chunk| {
        chunk.map_err(|s| Status::new(s.code(), format!("node {node}: {}", s.message())))
    })))
}

/// A transport error's message and causes, on one line.
fn transport_detail(s: &Status) -> String {
    let mut parts = vec![s.message().to_string()];
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    parts.dedup();
    parts.retain(|p| !p.is_empty());
    parts.join(": ")
}
