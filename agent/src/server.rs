//! The agent's gRPC API. Mutual TLS with a client certificate from the
//! coordinator's CA is required by the TLS layer, and each call further
//! checks that the certificate is the coordinator's: another node, or an
//! operator, cannot drive this agent.

use crate::engine::{Conflict, Engine, EngineSpec};
use corral_proto::identity::{peer_identity, Identity};
use corral_proto::pb;
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

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentApi {
    async fn configure_engine(
        &self,
        req: Request<pb::ConfigureEngineRequest>,
    ) -> Result<Response<pb::ConfigureEngineResponse>, Status> {
        require_coordinator(&req)?;
        let req = req.into_inner();
        let spec = EngineSpec::from_request(&req).map_err(Status::invalid_argument)?;
        tracing::info!(cluster = %spec.cluster, engine = %spec.engine, role = %spec.role, "configure engine");
        match self.engine.configure(spec, &req.admin_password).await {
            Ok(status) => Ok(Response::new(pb::ConfigureEngineResponse {
                status: Some(status),
            })),
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!("configure engine failed: {msg}");
                Err(match e.downcast_ref::<Conflict>() {
                    Some(_) => Status::failed_precondition(msg),
                    None => Status::internal(msg),
                })
            }
        }
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        require_coordinator(&req)?;
        Ok(Response::new(self.engine.status()))
    }
}
