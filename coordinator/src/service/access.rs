//! Who the caller is, and join tokens for new nodes.

use super::internal;
use super::{Caller, Error, Service};
use crate::store::{self};
use corral_proto::identity::Role;
use corral_proto::now_ms;
use corral_proto::pb;
/// Token lifetime bounds: long enough to provision a VM, short enough that a
/// leaked token soon stops mattering.
const DEFAULT_TOKEN_TTL_S: u32 = 3600;
const MAX_TOKEN_TTL_S: u32 = 7 * 24 * 3600;

impl Service {
    pub async fn who_am_i(
        &self,
        caller: &Caller,
        _req: pb::WhoAmIRequest,
    ) -> Result<pb::WhoAmIResponse, Error> {
        let (name, role) = caller.authorize(Role::Viewer)?;
        Ok(pb::WhoAmIResponse {
            name,
            role: role.to_string(),
        })
    }

    pub async fn create_join_token(
        &self,
        caller: &Caller,
        req: pb::CreateJoinTokenRequest,
    ) -> Result<pb::CreateJoinTokenResponse, Error> {
        let ttl = req.ttl_seconds;
        let (action, target) = ("token.create", format!("ttl {ttl}s"));
        let who = self.authorize_audited(caller, Role::Admin, action, &target)?;
        self.audited(&who, action, &target, || {
            let ttl = if ttl == 0 { DEFAULT_TOKEN_TTL_S } else { ttl };
            if ttl > MAX_TOKEN_TTL_S {
                return Err(Error::invalid_argument(format!(
                    "token lifetime {ttl}s is too long: at most {MAX_TOKEN_TTL_S}s (7 days)"
                )));
            }
            let token = corral_proto::token::JoinToken::generate(&self.0.ca_fingerprint)
                .map_err(internal)?;
            let expires = now_ms() + i64::from(ttl) * 1000;
            self.0
                .store
                .read(|c| store::insert_token(c, &token.secret_hash(), &who, expires))
                .map_err(internal)?;
            Ok(pb::CreateJoinTokenResponse {
                token: token.to_string(),
                expires_at_ms: expires,
            })
        })
    }
}
