//! `revoked_certificates`, `node_certificates` and `operator_certificates`:
//! what was revoked and why, and each node's and operator's current and
//! renewed certificate (the rules that read them: [`crate::revocation`]).

use super::row::in_order;
use anyhow::Result;
use corral_proto::now_ms;
use rusqlite::{params, Connection, OptionalExtension};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS revoked_certificates (
    fingerprint TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    -- 0: unknown (revoked by fingerprint alone): kept for ever.
    not_after_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER NOT NULL,
    revoked_by TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS node_renewals (
    node TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    not_after_ms INTEGER NOT NULL,
    issued_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_certificates (
    fingerprint TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    not_after_ms INTEGER NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    -- 'issued' (by a renewal here) or 'seen' (on a call)
    origin TEXT NOT NULL,
    -- The certificate a renewal replaces: revoked at this one's first use.
    replaces TEXT
);
CREATE INDEX IF NOT EXISTS operator_certificates_by_name ON operator_certificates(name);
";

/// Why a certificate no longer opens anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Revocation {
    pub subject: String,
    pub not_after_ms: i64,
    pub at_ms: i64,
    pub by: String,
    pub reason: String,
}

/// Reasons written by the coordinator itself (an operator may give any).
pub const REPLACED: &str = "replaced by a renewed certificate";
pub const SUPERSEDED: &str = "a later renewal replaced it before it was used";
pub const FORGOTTEN: &str = "node forgotten";

pub fn insert_revocation(c: &Connection, fp: &str, r: &Revocation) -> Result<()> {
    c.execute(
        "INSERT OR IGNORE INTO revoked_certificates \
         (fingerprint, subject, not_after_ms, revoked_at_ms, revoked_by, reason) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![fp, r.subject, r.not_after_ms, r.at_ms, r.by, r.reason],
    )?;
    Ok(())
}

/// The revocation already recorded for `fp`, if any.
pub fn get_revocation(c: &Connection, fp: &str) -> Result<Option<Revocation>> {
    Ok(c.query_row(
        "SELECT subject, not_after_ms, revoked_at_ms, revoked_by, reason \
             FROM revoked_certificates WHERE fingerprint = ?1",
        [fp],
        |r| in_order!(r => Revocation { subject, not_after_ms, at_ms, by, reason }),
    )
    .optional()?)
}

/// Node `node`'s current certificate and its expiry.
pub fn node_certificate(c: &Connection, node: &str) -> Result<Option<(String, i64)>> {
    Ok(c.query_row(
        "SELECT cert_fingerprint, cert_not_after_ms FROM nodes WHERE id = ?1",
        [node],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?)
}

/// Node `node`'s renewed certificate not used yet, and its expiry.
pub fn node_renewal(c: &Connection, node: &str) -> Result<Option<(String, i64)>> {
    Ok(c.query_row(
        "SELECT fingerprint, not_after_ms FROM node_renewals WHERE node = ?1",
        [node],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()?)
}

/// Records `fp` as `node`'s renewed certificate; a previous renewed one
/// that differs is revoked and returned.
pub fn set_renewal(
    c: &Connection,
    node: &str,
    fp: &str,
    not_after_ms: i64,
) -> Result<Option<(String, Revocation)>> {
    let superseded = match node_renewal(c, node)? {
        Some((old, old_not_after)) if old != fp => {
            let r = Revocation {
                subject: format!("node/{node}"),
                not_after_ms: old_not_after,
                at_ms: now_ms(),
                by: format!("node/{node}"),
                reason: SUPERSEDED.into(),
            };
            insert_revocation(c, &old, &r)?;
            Some((old, r))
        }
        _ => None,
    };
    c.execute(
        "INSERT INTO node_renewals (node, fingerprint, not_after_ms, issued_at_ms) \
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT(node) DO UPDATE SET \
         fingerprint = excluded.fingerprint, not_after_ms = excluded.not_after_ms, \
         issued_at_ms = excluded.issued_at_ms",
        params![node, fp, not_after_ms, now_ms()],
    )?;
    Ok(superseded)
}

/// Makes `new` (the renewed certificate) node `node`'s current one and
/// revokes `old`. Idempotent: a second call for the same switch changes
/// nothing and returns the same revocation.
pub(crate) fn activate(c: &Connection, node: &str, old: &str, new: &str) -> Result<Revocation> {
    if let Some(r) = get_revocation(c, old)? {
        return Ok(r);
    }
    let old_not_after = node_certificate(c, node)?.map(|(_, t)| t).unwrap_or(0);
    let new_not_after = node_renewal(c, node)?
        .filter(|(fp, _)| fp == new)
        .map(|(_, t)| t)
        .unwrap_or(0);
    c.execute(
        "UPDATE nodes SET cert_fingerprint = ?2, cert_not_after_ms = ?3 \
         WHERE id = ?1 AND cert_fingerprint = ?4",
        params![node, new, new_not_after, old],
    )?;
    c.execute(
        "DELETE FROM node_renewals WHERE node = ?1 AND fingerprint = ?2",
        params![node, new],
    )?;
    let r = Revocation {
        subject: format!("node/{node}"),
        not_after_ms: old_not_after,
        at_ms: now_ms(),
        by: format!("node/{node}"),
        reason: REPLACED.into(),
    };
    insert_revocation(c, old, &r)?;
    Ok(r)
}

pub fn record_operator(
    c: &Connection,
    fp: &str,
    name: &str,
    role: &str,
    not_after_ms: i64,
    origin: &str,
    replaces: Option<&str>,
) -> Result<()> {
    c.execute(
        "INSERT OR IGNORE INTO operator_certificates \
         (fingerprint, name, role, not_after_ms, recorded_at_ms, origin, replaces) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![fp, name, role, not_after_ms, now_ms(), origin, replaces],
    )?;
    Ok(())
}

/// A renewed operator certificate `new` was used: `old` is revoked.
pub(crate) fn replace_operator(
    c: &Connection,
    new: &str,
    old: &str,
    name: &str,
) -> Result<Revocation> {
    let not_after: i64 = c
        .query_row(
            "SELECT not_after_ms FROM operator_certificates WHERE fingerprint = ?1",
            [old],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let subject = c
        .query_row(
            "SELECT role FROM operator_certificates WHERE fingerprint = ?1",
            [new],
            |r| r.get::<_, String>(0),
        )
        .map(|role| format!("operator/{role}/{name}"))
        .unwrap_or_default();
    let r = Revocation {
        subject,
        not_after_ms: not_after,
        at_ms: now_ms(),
        by: name.to_string(),
        reason: REPLACED.into(),
    };
    insert_revocation(c, old, &r)?;
    c.execute(
        "UPDATE operator_certificates SET replaces = NULL WHERE fingerprint = ?1",
        [new],
    )?;
    Ok(get_revocation(c, old)?.unwrap_or(r))
}
