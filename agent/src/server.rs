//! The agent's gRPC API. Mutual TLS with a client certificate from the
//! coordinator's CA is required by the TLS layer, and each call further
//! checks that the certificate is the coordinator's: another node, or an
//! operator, cannot drive this agent.
//!
//! Each step runs in a task of its own: if the coordinator disconnects (or
//! restarts) mid-way, the step still completes, and the coordinator's retry
//! waits for it and then finds the work done instead of doing it twice.

use crate::engine::{Conflict, Engine, EngineSpec};
use corral_proto::identity::{peer_identity, Identity};
use corral_proto::pb;
use std::future::Future;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AgentApi {
    pub engine: Arc<Engine>,
}

fn require_coordinator<T>(req: &Request<T>) -> Result<(), Status> {
    match peer_identity(req)? {
        Identity::Coordinator => Ok(()),
        other => {
            tracing::warn!(peer = %other, "refused a call from a peer that is not the coordinator");
            Err(Status::permission_denied(format!(
                "only the coordinator may call a node agent; certificate {other} is not the coordinator's"
            )))
        }
    }
}

/// Runs `step` detached from the caller and maps its error to a status.
async fn detached<T: Send + 'static>(
    what: &'static str,
    step: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> Result<Response<T>, Status> {
    let outcome = tokio::spawn(step).await.map_err(|e| {
        Status::internal(format!("{what}: the step panicked or was cancelled: {e}"))
    })?;
    match outcome {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::warn!("{what} failed: {msg}");
            Err(match e.downcast_ref::<Conflict>() {
                Some(_) => Status::failed_precondition(msg),
                None => Status::internal(msg),
            })
        }
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentApi {
    async fn configure_engine(
        &self,
        req: Request<pb::ConfigureEngineRequest>,
    ) -> Result<Response<pb::ConfigureEngineResponse>, Status> {
        require_coordinator(&req)?;
        let r = EngineSpec::from_request(req.get_ref()).map_err(Status::invalid_argument)?;
        tracing::info!(cluster = %r.spec.cluster, engine = %r.spec.engine, role = %r.spec.role, "configure engine");
        let engine = self.engine.clone();
        detached("configure engine", async move { engine.configure(r).await }).await
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        require_coordinator(&req)?;
        self.engine.refresh().await;
        Ok(Response::new(self.engine.status()))
    }

    async fn stop_engine(
        &self,
        req: Request<pb::StopEngineRequest>,
    ) -> Result<Response<pb::StopEngineResponse>, Status> {
        require_coordinator(&req)?;
        tracing::info!("stop engine");
        let engine = self.engine.clone();
        detached("stop engine", async move { engine.stop().await }).await
    }

    async fn restart_engine(
        &self,
        req: Request<pb::RestartEngineRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        require_coordinator(&req)?;
        tracing::info!("restart engine");
        let engine = self.engine.clone();
        detached("restart engine", async move { engine.restart().await }).await
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        require_coordinator(&req)?;
        let r = req.into_inner();
        for n in &r.replicas {
            corral_proto::names::validate("replica node", n).map_err(Status::invalid_argument)?;
        }
        tracing::info!(replicas = ?r.replicas, sync = r.sync, "promote");
        let engine = self.engine.clone();
        detached("promote", async move {
            engine.promote(r.replicas, r.sync).await
        })
        .await
    }

    async fn decommission(
        &self,
        req: Request<pb::DecommissionRequest>,
    ) -> Result<Response<pb::DecommissionResponse>, Status> {
        require_coordinator(&req)?;
        let cluster = req.into_inner().cluster;
        tracing::info!(%cluster, "decommission");
        let engine = self.engine.clone();
        detached("decommission", async move {
            engine.decommission(&cluster).await?;
            Ok(pb::DecommissionResponse {})
        })
        .await
    }
}
