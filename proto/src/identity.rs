//! Who is on the other end of a mutual-TLS connection.
//!
//! The CA writes the identity into the certificate's common name; nothing a
//! peer says in a message can change it. Formats:
//!
//! | CN                          | identity                    |
//! |-----------------------------|-----------------------------|
//! | `coordinator`               | the coordinator             |
//! | `node/<id>`                 | the agent of node `<id>`    |
//! | `operator/<role>/<name>`    | an operator with a role     |

use std::fmt;
use std::str::FromStr;

/// What an operator may do. Ordered: each role can do what the ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads state: clusters, nodes, operations, events.
    Viewer,
    /// Also changes clusters and reads their credentials.
    Operator,
    /// Also manages the fleet: join tokens, audit trail.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role {s:?}: use viewer, operator or admin")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Coordinator,
    Node(String),
    Operator { role: Role, name: String },
}

impl Identity {
    pub fn common_name(&self) -> String {
        match self {
            Identity::Coordinator => "coordinator".into(),
            Identity::Node(id) => format!("node/{id}"),
            Identity::Operator { role, name } => format!("operator/{role}/{name}"),
        }
    }

    pub fn parse_common_name(cn: &str) -> Result<Identity, String> {
        let parts: Vec<&str> = cn.split('/').collect();
        match parts.as_slice() {
            ["coordinator"] => Ok(Identity::Coordinator),
            ["node", id] if crate::names::validate("node", id).is_ok() => {
                Ok(Identity::Node(id.to_string()))
            }
            ["operator", role, name] if !name.is_empty() => Ok(Identity::Operator {
                role: role.parse()?,
                name: name.to_string(),
            }),
            _ => Err(format!(
                "certificate common name {cn:?} is not a Corral identity"
            )),
        }
    }

    /// Reads the identity from a DER certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable peer certificate: {e}"))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("peer certificate has no common name")?;
        Identity::parse_common_name(cn)
    }

    /// The name written to the audit trail.
    pub fn who(&self) -> String {
        match self {
            Identity::Operator { name, .. } => name.clone(),
            other => other.common_name(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.common_name())
    }
}

/// The identity of the peer of a gRPC request, or `Unauthenticated`.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        tonic::Status::unauthenticated(
            "no client certificate: this API needs mutual TLS with a certificate from the \
             coordinator's CA",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("empty client certificate chain"))?;
    Identity::from_cert_der(leaf.as_ref()).map_err(tonic::Status::unauthenticated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_round_trip() {
        for id in [
            Identity::Coordinator,
            Identity::Node("vm1".into()),
            Identity::Operator {
                role: Role::Admin,
                name: "alice".into(),
            },
        ] {
            assert_eq!(Identity::parse_common_name(&id.common_name()).unwrap(), id);
        }
    }

    #[test]
    fn refuses_foreign_names() {
        for cn in [
            "",
            "node",
            "node/",
            "node/UPPER",
            "operator/root/x",
            "operator/admin/",
            "x/y",
        ] {
            assert!(Identity::parse_common_name(cn).is_err(), "{cn}");
        }
    }
}
