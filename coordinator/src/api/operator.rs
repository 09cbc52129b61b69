//! The operator gRPC API (corralctl's): a thin adapter. Each RPC reads the
//! caller from the TLS connection, calls the [`Service`] method of the same
//! name and maps its [`crate::service::Error`] to a gRPC status. No rule lives here.

use super::status::caller_of;
use crate::service::Service;
use corral_proto::pb;
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// The `Operator` gRPC service.
pub struct OperatorApi(pub Service);

/// One unary RPC per line: `name(Request) -> Response;`, each forwarded to
/// `Service::name`. The operation kinds and RPCs in docs/ARCHITECTURE.md are
/// checked against this list.
macro_rules! operator_rpcs {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl pb::operator_server::Operator for OperatorApi {
            $(
                async fn $name(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    let caller = caller_of(&req);
                    Ok(Response::new(self.0.$name(&caller, req.into_inner()).await?))
                }
            )*

            type LogsStream = Pin<Box<dyn Stream<Item = Result<pb::LogLines, Status>> + Send>>;

            async fn logs(&self, req: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
                let caller = caller_of(&req);
                let stream = self.0.logs(&caller, req.into_inner()).await?;
                Ok(Response::new(Box::pin(stream.map(|r| r.map_err(Status::from)))))
            }

            type DownloadBackupStream =
                Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

            async fn download_backup(
                &self,
                req: Request<pb::DownloadBackupRequest>,
            ) -> Result<Response<Self::DownloadBackupStream>, Status> {
                let caller = caller_of(&req);
                let stream = self.0.download_backup(&caller, req.into_inner()).await?;
                Ok(Response::new(Box::pin(stream.map(|r| r.map_err(Status::from)))))
            }
        }
    };
}

operator_rpcs! {
    who_am_i(pb::WhoAmIRequest) -> pb::WhoAmIResponse;
    create_join_token(pb::CreateJoinTokenRequest) -> pb::CreateJoinTokenResponse;
    create_cluster(pb::CreateClusterRequest) -> pb::Operation;
    list_clusters(pb::ListClustersRequest) -> pb::ListClustersResponse;
    get_cluster(pb::GetClusterRequest) -> pb::Cluster;
    set_cluster(pb::SetClusterRequest) -> pb::SetClusterResponse;
    delete_cluster(pb::DeleteClusterRequest) -> pb::Operation;
    resync_cluster(pb::ResyncClusterRequest) -> pb::Operation;
    add_node(pb::AddNodeRequest) -> pb::Operation;
    remove_node(pb::RemoveNodeRequest) -> pb::Operation;
    promote_node(pb::PromoteNodeRequest) -> pb::Operation;
    reboot_node(pb::RebootNodeRequest) -> pb::Operation;
    get_credentials(pb::GetCredentialsRequest) -> pb::Credentials;
    list_nodes(pb::ListNodesRequest) -> pb::ListNodesResponse;
    get_operation(pb::GetOperationRequest) -> pb::Operation;
    list_operations(pb::ListOperationsRequest) -> pb::ListOperationsResponse;
    list_audit(pb::ListAuditRequest) -> pb::ListAuditResponse;
    list_events(pb::ListEventsRequest) -> pb::ListEventsResponse;
    get_node_metrics(pb::GetNodeMetricsRequest) -> pb::NodeMetrics;
    list_alerts(pb::ListAlertsRequest) -> pb::ListAlertsResponse;
    list_alert_history(pb::ListAlertHistoryRequest) -> pb::ListAlertsResponse;
    get_allowlist(pb::GetAllowlistRequest) -> pb::Allowlist;
    set_allowlist(pb::SetAllowlistRequest) -> pb::Allowlist;
    list_allowlist_changes(pb::ListAllowlistChangesRequest) -> pb::ListAllowlistChangesResponse;
    backup_now(pb::BackupNowRequest) -> pb::Operation;
    list_backups(pb::ListBackupsRequest) -> pb::ListBackupsResponse;
    get_backup(pb::GetBackupRequest) -> pb::Backup;
    delete_backup(pb::DeleteBackupRequest) -> pb::Backup;
    verify_backup(pb::VerifyBackupOperatorRequest) -> pb::Operation;
    restore_backup(pb::RestoreBackupRequest) -> pb::Operation;
    set_backup_schedule(pb::SetBackupScheduleRequest) -> pb::BackupSchedule;
    get_backup_schedule(pb::GetBackupScheduleRequest) -> pb::BackupSchedule;
}
