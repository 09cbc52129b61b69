//! The identities gRPC API (node forget, certificate revoke, list, renew):
//! a thin adapter over [`crate::service::identities`].

use super::status::caller_of;
use crate::service::Service;
use corral_proto::pb;
use tonic::{Request, Response, Status};

pub struct IdentitiesApi(pub Service);

macro_rules! identities_rpcs {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl pb::identities_server::Identities for IdentitiesApi {
            $(
                async fn $name(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    let caller = caller_of(&req);
                    Ok(Response::new(self.0.$name(&caller, req.into_inner()).await?))
                }
            )*
        }
    };
}

identities_rpcs! {
    forget_node(pb::ForgetNodeRequest) -> pb::ForgetNodeResponse;
    revoke_certificate(pb::RevokeCertificateRequest) -> pb::RevokeCertificateResponse;
    list_certificates(pb::ListCertificatesRequest) -> pb::ListCertificatesResponse;
    renew_operator_certificate(pb::RenewCertificateRequest) -> pb::RenewCertificateResponse;
}
