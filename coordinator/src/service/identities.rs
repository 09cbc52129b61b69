//! Node and certificate lifecycle: forgetting a node, revoking
//! certificates, and renewing them (a node's over its upcalls, an
//! operator's over this service).
//!
//! Every change is written to the store first, then to the in-memory
//! [`crate::revocation::Trust`] that checks every call; every request is
//! audited, refusals included.

use super::rules::confirmed;
use super::{internal, Caller, Error, Service};
use crate::revocation::{self, short, Revocation, FORGOTTEN};
use crate::{store, Coordinator};
use corral_proto::identity::{Identity, Role};
use corral_proto::{names, now_ms, pb, pki};
use rusqlite::{params, Connection, OptionalExtension};
use std::time::Duration;

/// How long the certificates the coordinator signs are valid.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub node: Duration,
    pub operator: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            node: pki::NODE_VALIDITY,
            operator: pki::OPERATOR_VALIDITY,
        }
    }
}

fn info(fp: &str, r: &Revocation) -> pb::CertificateInfo {
    pb::CertificateInfo {
        fingerprint: fp.to_string(),
        subject: r.subject.clone(),
        state: "revoked".into(),
        not_after_ms: r.not_after_ms,
        revoked_at_ms: r.at_ms,
        revoked_by: r.by.clone(),
        reason: r.reason.clone(),
    }
}

impl Service {
    pub async fn forget_node(
        &self,
        caller: &Caller,
        req: pb::ForgetNodeRequest,
    ) -> Result<pb::ForgetNodeResponse, Error> {
        let r = req.clone();
        let (action, target) = ("node.forget", format!("node {}", r.node));
        let who = self.authorize_audited(caller, Role::Admin, action, &target)?;
        let revoked = self.audited(&who, action, &target, || {
            names::validate("node", &r.node).map_err(Error::invalid_argument)?;
            confirmed("node forget", &r.node, &r.confirm)?;
            self.refusable_tx(|tx| forget(tx, &r.node, &who))
        })?;
        tracing::info!(node = %r.node, by = %who, "node forgotten; its certificates are revoked");
        self.0.trust.forgot(&r.node, revoked.clone());
        self.0.fleet.forget(&r.node);
        Ok(pb::ForgetNodeResponse {
            revoked: revoked.iter().map(|(fp, r)| info(fp, r)).collect(),
        })
    }

    pub async fn revoke_certificate(
        &self,
        caller: &Caller,
        req: pb::RevokeCertificateRequest,
    ) -> Result<pb::RevokeCertificateResponse, Error> {
        let r = req.clone();
        let target = revoke_target(&r);
        let action = "certificate.revoke";
        let who = self.authorize_audited(caller, Role::Admin, action, &target)?;
        let own = caller.fingerprint()?;
        let revoked = self.audited(&who, action, &target, || {
            let wanted = wanted(&r)?;
            let reason = match r.reason.trim() {
                "" => "revoked by an administrator".to_string(),
                reason => reason.chars().take(500).collect(),
            };
            let guard = Guard {
                coordinator: &self.0.coordinator_fingerprint,
                caller: &own,
            };
            self.refusable_tx(|tx| revoke(tx, &wanted, &guard, &who, &reason))
        })?;
        for (fp, r) in &revoked {
            tracing::info!(fingerprint = short(fp), subject = %r.subject, by = %who, "certificate revoked: {}", r.reason);
        }
        self.0.trust.revoked(revoked.clone());
        Ok(pb::RevokeCertificateResponse {
            revoked: revoked.iter().map(|(fp, r)| info(fp, r)).collect(),
        })
    }

    pub async fn list_certificates(
        &self,
        caller: &Caller,
        _req: pb::ListCertificatesRequest,
    ) -> Result<pb::ListCertificatesResponse, Error> {
        caller.authorize(Role::Admin)?;
        let certificates = self.0.store.read(list).map_err(internal)?;
        Ok(pb::ListCertificatesResponse { certificates })
    }

    pub async fn renew_operator_certificate(
        &self,
        caller: &Caller,
        req: pb::RenewCertificateRequest,
    ) -> Result<pb::RenewCertificateResponse, Error> {
        let (action, target) = ("certificate.renew", "own certificate".to_string());
        let who = self.authorize_audited(caller, Role::Viewer, action, &target)?;
        let old = caller.fingerprint()?;
        let identity = caller.identity()?;
        let Identity::Operator { role, name } = &identity else {
            return Err(Error::permission_denied("not an operator certificate"));
        };
        let (cert, not_after) = self.audited(&who, action, &target, || {
            let (cert, not_after) =
                sign(&self.0, &req.csr_pem, &identity, self.0.lifetimes.operator)?;
            let fp = pki::fingerprint_pem(&cert).map_err(internal)?;
            self.0
                .store
                .read(|c| {
                    revocation::record_operator(
                        c,
                        &fp,
                        name,
                        &role.to_string(),
                        not_after,
                        "issued",
                        Some(&old),
                    )
                })
                .map_err(internal)?;
            self.0.trust.operator_recorded(&fp, Some(old.clone()));
            Ok((cert, not_after))
        })?;
        tracing::info!(operator = %name, "operator certificate renewed");
        Ok(pb::RenewCertificateResponse {
            certificate_pem: cert,
            ca_pem: self.0.ca.cert_pem().to_string(),
            not_after_ms: not_after,
        })
    }
}

/// Signs `csr_pem` as `identity`; returns the certificate and its expiry.
fn sign(
    coord: &Coordinator,
    csr_pem: &str,
    identity: &Identity,
    lifetime: Duration,
) -> Result<(String, i64), Error> {
    if csr_pem.len() > 16 << 10 {
        return Err(Error::invalid_argument(
            "certificate signing request larger than 16 KiB",
        ));
    }
    let cert = coord
        .ca
        .sign_csr(csr_pem, identity, lifetime)
        .map_err(|e| Error::invalid_argument(format!("{e:#}")))?;
    let not_after = pki::not_after_ms(&cert).map_err(internal)?;
    Ok((cert, not_after))
}

/// The upcall `RenewCertificate`: a fresh certificate for the calling
/// node. Its current certificate keeps working until the node first calls
/// with the new one ([`crate::revocation`]).
pub fn renew_node(
    coord: &Coordinator,
    caller: &Caller,
    req: pb::RenewCertificateRequest,
) -> Result<pb::RenewCertificateResponse, Error> {
    let node = match caller.identity()? {
        Identity::Node(id) => id,
        other => {
            return Err(Error::permission_denied(format!(
                "node certificates are renewed by their node's agent; certificate {other} is \
                 not a node certificate (operators use `corralctl pki renew`)"
            )))
        }
    };
    let identity = Identity::Node(node.clone());
    let (who, target) = (identity.common_name(), format!("node {node}"));
    let issued =
        sign(coord, &req.csr_pem, &identity, coord.lifetimes.node).and_then(|(cert, not_after)| {
            let fp = pki::fingerprint_pem(&cert).map_err(internal)?;
            let superseded = coord
                .store
                .tx(|c| match revocation::node_certificate(c, &node)? {
                    None => Ok(None),
                    Some(_) => Ok(Some(revocation::set_renewal(c, &node, &fp, not_after)?)),
                })
                .map_err(internal)?
                .ok_or_else(|| {
                    Error::permission_denied(format!(
                        "node {node} is not enrolled with this coordinator"
                    ))
                })?;
            coord.trust.renewed(&node, &fp, superseded);
            Ok((cert, fp, not_after))
        });
    let result = match &issued {
        Ok((_, fp, not_after)) => format!(
            "ok: certificate {}… valid until {}",
            short(fp),
            revocation::rfc3339(*not_after)
        ),
        Err(s) => format!("refused: {}", s.message()),
    };
    coord.store.audit(&who, "node.renew", &target, &result);
    let (cert, _, not_after) = issued?;
    tracing::info!(%node, "node certificate renewed");
    Ok(pb::RenewCertificateResponse {
        certificate_pem: cert,
        ca_pem: coord.ca.cert_pem().to_string(),
        not_after_ms: not_after,
    })
}

/// Deletes `node` (refused while it serves a cluster) and revokes its
/// certificates, in one transaction.
fn forget(
    tx: &Connection,
    node: &str,
    who: &str,
) -> anyhow::Result<Result<Vec<(String, Revocation)>, Error>> {
    let Some(row) = store::get_node(tx, node)? else {
        return Ok(Err(Error::not_found(format!(
            "unknown node {node:?}: see `corralctl node list` for enrolled nodes"
        ))));
    };
    if let Some(cluster) = &row.cluster {
        let first = if row.role == "primary" {
            format!(
                "promote another node first (`corralctl node promote {cluster} NODE --confirm \
                 NODE`), then remove it"
            )
        } else {
            "remove it first".to_string()
        };
        return Ok(Err(Error::failed_precondition(format!(
            "node {node} serves cluster {cluster} as its {}: {first} (`corralctl node remove \
             {cluster} {node} --confirm {node}`), or delete the cluster",
            row.role
        ))));
    }
    let mut certs = Vec::new();
    certs.extend(revocation::node_certificate(tx, node)?);
    certs.extend(revocation::node_renewal(tx, node)?);
    let mut revoked = Vec::new();
    for (fp, not_after_ms) in certs.into_iter().filter(|(fp, _)| !fp.is_empty()) {
        let r = Revocation {
            subject: format!("node/{node}"),
            not_after_ms,
            at_ms: now_ms(),
            by: who.to_string(),
            reason: FORGOTTEN.into(),
        };
        revocation::insert_revocation(tx, &fp, &r)?;
        revoked.push((
            fp.clone(),
            revocation::get_revocation(tx, &fp)?.unwrap_or(r),
        ));
    }
    tx.execute("DELETE FROM node_renewals WHERE node = ?1", [node])?;
    tx.execute("DELETE FROM nodes WHERE id = ?1", [node])?;
    Ok(Ok(revoked))
}

/// What a revocation request names, for the audit trail.
fn revoke_target(r: &pb::RevokeCertificateRequest) -> String {
    if !r.operator.is_empty() {
        format!("operator {}", r.operator)
    } else if !r.fingerprint.is_empty() {
        format!(
            "certificate {}",
            r.fingerprint.chars().take(100).collect::<String>()
        )
    } else {
        match pki::fingerprint_pem(&r.certificate_pem) {
            Ok(fp) => format!("certificate {fp}"),
            Err(_) => "certificate (unreadable PEM)".into(),
        }
    }
}

/// A certificate to revoke, as the request names it.
enum Wanted {
    /// A fingerprint, and what the PEM said of it when one was given.
    Certificate {
        fp: String,
        subject: String,
        not_after_ms: i64,
    },
    Operator(String),
}

fn wanted(r: &pb::RevokeCertificateRequest) -> Result<Wanted, Error> {
    let given = [
        !r.fingerprint.is_empty(),
        !r.certificate_pem.is_empty(),
        !r.operator.is_empty(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(Error::invalid_argument(
            "name exactly one of: a certificate file, a fingerprint, an operator",
        ));
    }
    if !r.operator.is_empty() {
        return Ok(Wanted::Operator(r.operator.clone()));
    }
    if !r.fingerprint.is_empty() {
        return Ok(Wanted::Certificate {
            fp: normalize_fingerprint(&r.fingerprint)?,
            subject: String::new(),
            not_after_ms: 0,
        });
    }
    let bad = |e: anyhow::Error| Error::invalid_argument(format!("the certificate: {e:#}"));
    let fp = pki::fingerprint_pem(&r.certificate_pem).map_err(bad)?;
    let (_, not_after_ms) = pki::validity_ms(&r.certificate_pem).map_err(bad)?;
    let subject = pki::identity_pem(&r.certificate_pem)
        .map(|i| i.common_name())
        .unwrap_or_default();
    Ok(Wanted::Certificate {
        fp,
        subject,
        not_after_ms,
    })
}

/// Accepts a SHA-256 fingerprint as hex, with or without colons, any case.
pub fn normalize_fingerprint(s: &str) -> Result<String, Error> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(Error::invalid_argument(format!(
            "{:?} is not a certificate fingerprint: expected the SHA-256 of the certificate, 64 \
             hex digits (as `corralctl pki list` shows them)",
            s.chars().take(100).collect::<String>()
        )))
    }
}

/// Certificates that must not be revoked by accident.
struct Guard<'a> {
    coordinator: &'a str,
    caller: &'a str,
}

impl Guard<'_> {
    fn check(&self, fp: &str) -> Result<(), Error> {
        if fp == self.coordinator {
            return Err(Error::failed_precondition(
                "that is the coordinator's own certificate; revoking it here protects nothing. \
                 Issue the coordinator a new certificate instead",
            ));
        }
        if fp == self.caller {
            return Err(Error::failed_precondition(
                "that is the certificate this request is made with: revoke it with another \
                 admin's certificate, so that someone can still administer this coordinator",
            ));
        }
        Ok(())
    }
}

/// Records the revocations (an already revoked certificate keeps its first
/// record) and drops a revoked node renewal. A renewal not used yet that was
/// issued over a revoked certificate goes with it: it was obtained with the
/// revoked key.
fn revoke(
    tx: &Connection,
    wanted: &Wanted,
    guard: &Guard,
    who: &str,
    reason: &str,
) -> anyhow::Result<Result<Vec<(String, Revocation)>, Error>> {
    let mut targets = match wanted {
        Wanted::Certificate {
            fp,
            subject,
            not_after_ms,
        } => {
            let (known_subject, known_not_after) = known(tx, fp)?;
            vec![(
                fp.clone(),
                if subject.is_empty() {
                    known_subject
                } else {
                    subject.clone()
                },
                (*not_after_ms).max(known_not_after),
            )]
        }
        Wanted::Operator(name) => {
            let mut q = tx.prepare(
                "SELECT fingerprint, role, not_after_ms FROM operator_certificates \
                 WHERE name = ?1 AND fingerprint NOT IN \
                 (SELECT fingerprint FROM revoked_certificates) ORDER BY recorded_at_ms",
            )?;
            let rows = q
                .query_map([name], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        format!("operator/{}/{name}", r.get::<_, String>(1)?),
                        r.get::<_, i64>(2)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if rows.is_empty() {
                return Ok(Err(Error::not_found(format!(
                    "no unrevoked certificate of operator {name:?} is known here: the coordinator \
                     knows those it issued (`pki renew`) and those used at least once. Revoke \
                     another one by its file (--cert) or fingerprint"
                ))));
            }
            rows
        }
    };
    let mut dependents = Vec::new();
    for (fp, _, _) in &targets {
        dependents.extend(renewed_over(tx, fp)?);
    }
    targets.extend(dependents);
    let mut out = Vec::new();
    for (fp, subject, not_after_ms) in targets {
        if let Err(status) = guard.check(&fp) {
            return Ok(Err(status));
        }
        let r = Revocation {
            subject,
            not_after_ms,
            at_ms: now_ms(),
            by: who.to_string(),
            reason: reason.to_string(),
        };
        revocation::insert_revocation(tx, &fp, &r)?;
        tx.execute("DELETE FROM node_renewals WHERE fingerprint = ?1", [&fp])?;
        out.push((
            fp.clone(),
            revocation::get_revocation(tx, &fp)?.unwrap_or(r),
        ));
    }
    Ok(Ok(out))
}

/// The renewals not used yet issued over certificate `fp`: (fingerprint,
/// subject, expiry).
fn renewed_over(c: &Connection, fp: &str) -> anyhow::Result<Vec<(String, String, i64)>> {
    let mut q = c.prepare(
        "SELECT fingerprint, 'node/' || node, not_after_ms FROM node_renewals \
         WHERE node IN (SELECT id FROM nodes WHERE cert_fingerprint = ?1) \
         UNION ALL SELECT fingerprint, 'operator/' || role || '/' || name, not_after_ms \
         FROM operator_certificates WHERE replaces = ?1",
    )?;
    let rows = q
        .query_map([fp], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// The subject and expiry the store knows of certificate `fp`.
fn known(c: &Connection, fp: &str) -> anyhow::Result<(String, i64)> {
    let found = c
        .query_row(
            "SELECT 'node/' || id, cert_not_after_ms FROM nodes WHERE cert_fingerprint = ?1 \
             UNION ALL SELECT 'node/' || node, not_after_ms FROM node_renewals \
             WHERE fingerprint = ?1 \
             UNION ALL SELECT 'operator/' || role || '/' || name, not_after_ms \
             FROM operator_certificates WHERE fingerprint = ?1 LIMIT 1",
            params![fp],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(found.unwrap_or_default())
}

/// Every certificate the store knows, nodes first.
fn list(c: &Connection) -> anyhow::Result<Vec<pb::CertificateInfo>> {
    let mut out = Vec::new();
    let mut q = c.prepare(
        "SELECT cert_fingerprint, 'node/' || id, 'current', cert_not_after_ms FROM nodes \
         WHERE cert_fingerprint NOT IN (SELECT fingerprint FROM revoked_certificates) \
         UNION ALL SELECT fingerprint, 'node/' || node, 'renewed', not_after_ms \
         FROM node_renewals \
         UNION ALL SELECT fingerprint, 'operator/' || role || '/' || name, 'active', \
         not_after_ms FROM operator_certificates \
         WHERE fingerprint NOT IN (SELECT fingerprint FROM revoked_certificates) \
         ORDER BY 2, 3",
    )?;
    for row in q.query_map([], |r| {
        Ok(pb::CertificateInfo {
            fingerprint: r.get(0)?,
            subject: r.get(1)?,
            state: r.get(2)?,
            not_after_ms: r.get(3)?,
            ..Default::default()
        })
    })? {
        out.push(row?);
    }
    let mut q = c.prepare(
        "SELECT fingerprint, subject, not_after_ms, revoked_at_ms, revoked_by, reason \
         FROM revoked_certificates ORDER BY revoked_at_ms",
    )?;
    for row in q.query_map([], |r| {
        Ok(pb::CertificateInfo {
            fingerprint: r.get(0)?,
            subject: r.get(1)?,
            state: "revoked".into(),
            not_after_ms: r.get(2)?,
            revoked_at_ms: r.get(3)?,
            revoked_by: r.get(4)?,
            reason: r.get(5)?,
        })
    })? {
        out.push(row?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_accepted_in_the_usual_spellings() {
        let fp = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&fp).unwrap(), fp);
        assert_eq!(normalize_fingerprint(&colons).unwrap(), fp);
        for bad in ["", "abc", &"zz".repeat(32), &"ab".repeat(33)] {
            let e = normalize_fingerprint(bad).unwrap_err();
            assert!(e.message().contains("64 hex digits"), "{}", e.message());
        }
    }

    #[test]
    fn forget_refuses_a_cluster_member_and_revocation_takes_unused_renewals_along() {
        let dir = corral_proto::unique_temp_dir("corral-forget").unwrap();
        let store = store::Store::open(&dir.join("corral.db")).unwrap();
        store
            .tx(|c| {
                store::insert_node(c, "vm1", "aaaa", 1)?;
                store::insert_node(c, "vm2", "bbbb", 2)?;
                revocation::set_renewal(c, "vm2", "cccc", 3)?;
                c.execute(
                    "INSERT INTO clusters (name, engine, mode, state, port, database, admin_user, \
                     admin_password_enc, created_at_ms) VALUES ('shop', 'postgres', 'single', \
                     'running', 5432, 'db', 'admin', x'00', 0)",
                    [],
                )?;
                store::assign_node(c, "vm1", "shop", "primary")?;
                let refused = forget(c, "vm1", "alice")?.unwrap_err();
                assert!(
                    refused
                        .message()
                        .contains("serves cluster shop as its primary"),
                    "{}",
                    refused.message()
                );
                let revoked = forget(c, "vm2", "alice")?.unwrap();
                let fps: Vec<_> = revoked.iter().map(|(fp, _)| fp.as_str()).collect();
                assert_eq!(fps, ["bbbb", "cccc"]);
                assert!(store::get_node(c, "vm2")?.is_none());
                assert!(forget(c, "vm2", "alice")?.is_err());

                // Revoking a certificate takes the unused renewals issued
                // over it along: a node's, an operator's.
                store::insert_node(c, "vm3", "dddd", 4)?;
                revocation::set_renewal(c, "vm3", "eeee", 5)?;
                revocation::record_operator(c, "ffff", "bob", "admin", 6, "seen", None)?;
                revocation::record_operator(c, "9999", "bob", "admin", 7, "issued", Some("ffff"))?;
                let guard = Guard {
                    coordinator: "cccc-coordinator",
                    caller: "cccc-caller",
                };
                for (fp, renewal) in [("dddd", "eeee"), ("ffff", "9999")] {
                    let wanted = Wanted::Certificate {
                        fp: fp.into(),
                        subject: String::new(),
                        not_after_ms: 0,
                    };
                    let revoked = revoke(c, &wanted, &guard, "alice", "stolen")?.unwrap();
                    let fps: Vec<_> = revoked.iter().map(|(fp, _)| fp.as_str()).collect();
                    assert_eq!(fps, [fp, renewal]);
                }
                assert!(revocation::node_renewal(c, "vm3")?.is_none());
                let refused = revoke(
                    c,
                    &Wanted::Certificate {
                        fp: "cccc-caller".into(),
                        subject: String::new(),
                        not_after_ms: 0,
                    },
                    &guard,
                    "alice",
                    "x",
                )?
                .unwrap_err();
                assert!(
                    refused.message().contains("made with"),
                    "{}",
                    refused.message()
                );
                Ok(())
            })
            .unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
