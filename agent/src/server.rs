//! The agent's gRPC API. Mutual TLS with a client certificate from the
//! coordinator's CA is required by the TLS layer, and each call further
//! checks that the certificate is the coordinator's: another node, or an
//! operator, cannot drive this agent.
//!
//! Each step runs in a task of its own: if the coordinator disconnects (or
//! restarts) mid-way, the step still completes, and the coordinator's retry
//! waits for it and then finds the work done instead of doing it twice.

use crate::engine::{Conflict, Engine, EngineSpec, Promotion};
use crate::logs::{self, read::Query, stamp::Family};
use corral_proto::identity::{peer_identity, Identity};
use corral_proto::pb;
use std::future::Future;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AgentApi {
    pub engine: Arc<Engine>,
    pub backups: Arc<crate::backup::Backups>,
    pub archiver: Arc<crate::backup::wal::Archiver>,
    /// The agent's own log file ([`crate::logs::writer::agent_log`]).
    pub agent_log: std::path::PathBuf,
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
    type StreamLogsStream = logs::LogStream;

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
        let term = req.get_ref().term;
        detached("stop engine", async move { engine.stop(term).await }).await
    }

    async fn restart_engine(
        &self,
        req: Request<pb::RestartEngineRequest>,
    ) -> Result<Response<pb::EngineStatus>, Status> {
        require_coordinator(&req)?;
        tracing::info!("restart engine");
        let engine = self.engine.clone();
        let term = req.get_ref().term;
        detached("restart engine", async move { engine.restart(term).await }).await
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
        tracing::info!(replicas = ?r.replicas, sync = r.sync, term = r.term, "promote");
        let engine = self.engine.clone();
        let p = Promotion {
            replicas: r.replicas,
            sync: r.sync,
            term: r.term,
            lease_ms: r.lease_duration_ms,
            heartbeat_ms: r.heartbeat_interval_ms,
            primary_stopped: r.primary_stopped,
        };
        detached("promote", async move { engine.promote(p).await }).await
    }

    async fn decommission(
        &self,
        req: Request<pb::DecommissionRequest>,
    ) -> Result<Response<pb::DecommissionResponse>, Status> {
        require_coordinator(&req)?;
        let r = req.into_inner();
        let cluster = r.cluster;
        tracing::info!(%cluster, "decommission");
        let engine = self.engine.clone();
        detached("decommission", async move {
            engine.decommission(&cluster, r.term).await?;
            Ok(pb::DecommissionResponse {})
        })
        .await
    }

    async fn stream_logs(
        &self,
        req: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        require_coordinator(&req)?;
        let r = req.into_inner();
        let (path, family) = match pb::LogSource::try_from(r.source) {
            Ok(pb::LogSource::Agent) => (self.agent_log.clone(), Family::Agent),
            Ok(pb::LogSource::Engine | pb::LogSource::Unspecified) => {
                let Some((engine, path)) = self.engine.log_file() else {
                    return Err(Status::failed_precondition(
                        "this node runs no engine yet, so it has no engine log; \
                         --agent shows the agent's own log",
                    ));
                };
                let family = Family::of_engine(&engine).ok_or_else(|| {
                    Status::internal(format!("no log format known for engine {engine:?}"))
                })?;
                (path, family)
            }
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown log source {}",
                    r.source
                )))
            }
        };
        if r.since_ms < 0 {
            return Err(Status::invalid_argument("since_ms must not be negative"));
        }
        tracing::debug!(log = %path.display(), since_ms = r.since_ms, tail = r.tail, follow = r.follow, "stream logs");
        let q = Query {
            since_ms: r.since_ms,
            tail: r.tail,
            follow: r.follow,
        };
        Ok(Response::new(logs::serve(path, family, q)))
    }

    type ReadBackupObjectStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn take_backup(
        &self,
        req: Request<pb::TakeBackupRequest>,
    ) -> Result<Response<pb::BackupResult>, Status> {
        require_coordinator(&req)?;
        let r = req.into_inner();
        tracing::info!(id = %r.id, cluster = %r.cluster, "take backup");
        let backups = self.backups.clone();
        detached("backup", async move { backups.take(r).await }).await
    }

    async fn verify_backup(
        &self,
        req: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        require_coordinator(&req)?;
        let r = req.into_inner();
        tracing::info!(object = %r.object, "verify backup");
        let backups = self.backups.clone();
        detached("verify backup", async move { backups.verify(r).await }).await
    }

    async fn read_backup_object(
        &self,
        req: Request<pb::ReadBackupObjectRequest>,
    ) -> Result<Response<Self::ReadBackupObjectStream>, Status> {
        require_coordinator(&req)?;
        let r = req.into_inner();
        let rx = self
            .backups
            .read(r)
            .await
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        use tokio_stream::StreamExt;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|c| match c {
            Ok(data) => Ok(pb::BackupChunk {
                data: data.to_vec(),
            }),
            Err(e) => Err(Status::data_loss(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn delete_backup_objects(
        &self,
        req: Request<pb::DeleteBackupObjectsRequest>,
    ) -> Result<Response<pb::DeleteBackupObjectsResponse>, Status> {
        require_coordinator(&req)?;
        let r = req.into_inner();
        tracing::info!(prefix = %r.prefix, "delete backup objects");
        let backups = self.backups.clone();
        detached("delete backup objects", async move {
            Ok(pb::DeleteBackupObjectsResponse {
                deleted: backups.delete(r).await?,
            })
        })
        .await
    }

    async fn flush_wal_archive(
        &self,
        req: Request<pb::FlushWalArchiveRequest>,
    ) -> Result<Response<pb::FlushWalArchiveResponse>, Status> {
        require_coordinator(&req)?;
        let term = req.get_ref().term;
        let (archiver, engine) = (self.archiver.clone(), self.engine.clone());
        detached("flush WAL archive", async move {
            Ok(pb::FlushWalArchiveResponse {
                segment: archiver.flush(&engine, term).await?,
            })
        })
        .await
    }
}

/// The API other agents call: a primary asking its replicas to confirm it.
/// Only node certificates are accepted, and the caller's node id is read
/// from its certificate, which must be one the coordinator named for that
/// member of the cluster ([`crate::members`]).
pub struct PeerApi {
    pub engine: Arc<Engine>,
    pub members: Arc<crate::members::Members>,
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerApi {
    async fn confirm_primary(
        &self,
        req: Request<pb::ConfirmPrimaryRequest>,
    ) -> Result<Response<pb::ConfirmPrimaryResponse>, Status> {
        let caller = match peer_identity(&req)? {
            Identity::Node(id) => id,
            other => {
                tracing::warn!(peer = %other, "refused a confirmation request from a peer that is not a node");
                return Err(Status::permission_denied(format!(
                    "only a node agent may ask for confirmations; certificate {other} is not a node's"
                )));
            }
        };
        let fp = req
            .peer_certs()
            .and_then(|c| {
                c.first()
                    .map(|leaf| corral_proto::pki::fingerprint_der(leaf.as_ref()))
            })
            .unwrap_or_default();
        self.members
            .check(&caller, &fp)
            .map_err(Status::permission_denied)?;
        let answer = self.engine.confirm_primary(&caller, req.get_ref());
        if !answer.confirmed {
            tracing::debug!(%caller, "confirmation refused: {}", answer.reason);
        }
        Ok(Response::new(answer))
    }
}
