//! The rules of every operator request, as plain functions on typed
//! requests with typed errors ([`Error`]), and no protocol types: the gRPC
//! operator API ([`crate::api::operator`]) and the HTTP API are thin
//! adapters over [`Service`].
//!
//! Every request is authorised by the caller's role (viewer < operator <
//! admin). Every mutating request, and every read of a secret, leaves an
//! audit row with its result, refusals included. Reading a node's logs
//! counts as a read of a secret: a failed statement is logged with its
//! text, values (and passwords) included. A request that changes a
//! cluster records a durable operation (see [`crate::ops`]) in the same
//! store transaction as its checks, and starts it.
//!
//! - [`access`]: who am I, join tokens.
//! - [`clusters`]: create, list, show, set, delete, resync.
//! - [`nodes`]: add, remove, promote, reboot, credentials, list.
//! - [`activity`]: operations, audit, events, metrics, alerts, logs.
//! - [`allowlist`]: the IP allowlist.
//! - [`backups`]: backups, restores, schedules.
//! - [`identities`]: node forget, certificate revoke, list and renew.
//! - [`rules`]: what the requests share (lookups, refusals, operations).
//! - [`views`]: rows and live state as API messages.

/// Inside a [`Service::refusable_tx`] check: the value, or return the
/// refusal.
macro_rules! or_refuse {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(refusal) => return Ok(Err(refusal)),
        }
    };
}

pub mod access;
pub mod activity;
pub mod allowlist;
pub mod backups;
pub mod clusters;
mod error;
pub mod identities;
pub mod nodes;
pub mod rules;
pub mod views;

pub use error::{internal, Code, Error};
pub use views::{replica_view, ReplicaView};

use crate::Coordinator;
use corral_proto::identity::{Identity, Role};
use std::net::IpAddr;
use std::sync::Arc;

/// A stream of results (log lines, backup chunks) as the service passes it
/// on.
pub type Chunks<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Error>> + Send>>;

/// The coordinator's operator-facing rules.
#[derive(Clone)]
pub struct Service(pub Arc<Coordinator>);

/// Who is asking: the identity the adapter read from the caller's
/// certificate (or why there is none), and the certificate's fingerprint.
pub struct Caller {
    identity: Result<Identity, Error>,
    fingerprint: Option<String>,
    remote: Option<IpAddr>,
}

impl Caller {
    pub fn new(
        identity: Result<Identity, Error>,
        fingerprint: Option<String>,
        remote: Option<IpAddr>,
    ) -> Caller {
        Caller {
            identity,
            fingerprint,
            remote,
        }
    }

    /// The address the request came from, when the transport knows it.
    pub fn remote_ip(&self) -> Option<IpAddr> {
        self.remote
    }

    /// An operator with `role`, as a test or an in-process caller.
    pub fn operator(name: &str, role: Role) -> Caller {
        Caller::new(
            Ok(Identity::Operator {
                role,
                name: name.to_string(),
            }),
            None,
            None,
        )
    }

    /// Checks that the caller is an operator with at least role `min`; a
    /// refusal is logged.
    pub fn authorize(&self, min: Role) -> Result<(String, Role), Error> {
        let refused = |who: String, e: Error| {
            tracing::warn!(peer = %who, "operator API refused: {}", e.message());
            Err(e)
        };
        match &self.identity {
            Ok(Identity::Operator { role, name }) if *role >= min => Ok((name.clone(), *role)),
            Ok(Identity::Operator { role, name }) => refused(
                name.clone(),
                Error::permission_denied(format!(
                    "operator {name} has role {role}; this needs role {min} or higher"
                )),
            ),
            Ok(other) => refused(
                other.who(),
                Error::permission_denied(format!(
                    "the operator API needs an operator certificate; certificate {other} is not one"
                )),
            ),
            Err(e) => refused("anonymous".into(), e.clone()),
        }
    }

    /// Who the caller claims to be, for the audit trail of a refusal.
    pub fn name(&self) -> String {
        match &self.identity {
            Ok(Identity::Operator { name, .. }) => name.clone(),
            Ok(other) => other.who(),
            Err(_) => "anonymous".into(),
        }
    }

    /// The caller's identity, as its certificate says.
    pub fn identity(&self) -> Result<Identity, Error> {
        self.identity.clone()
    }

    /// The caller's certificate fingerprint.
    pub fn fingerprint(&self) -> Result<String, Error> {
        self.fingerprint
            .clone()
            .ok_or_else(|| Error::unauthenticated("no client certificate"))
    }
}

impl Service {
    /// [`Caller::authorize`], with a refusal also written to the audit
    /// trail: for mutating requests and reads of secrets.
    pub fn authorize_audited(
        &self,
        caller: &Caller,
        min: Role,
        action: &str,
        target: &str,
    ) -> Result<String, Error> {
        caller.authorize(min).map(|(who, _)| who).inspect_err(|e| {
            let result = format!("refused: {}", e.message());
            self.0.store.audit(&caller.name(), action, target, &result);
        })
    }

    /// Runs `f` and writes its outcome to the audit trail.
    pub fn audited<T>(
        &self,
        who: &str,
        action: &str,
        target: &str,
        f: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let r = f();
        let result = match &r {
            Ok(_) => "ok".to_string(),
            Err(e) if e.code() == Code::Internal => format!("failed: {}", e.message()),
            Err(e) => format!("refused: {}", e.message()),
        };
        self.0.store.audit(who, action, target, &result);
        r
    }
}
