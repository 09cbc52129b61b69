//! Who may still call: revoked certificates, each node's current
//! certificate, and the operator certificates the coordinator knows.
//!
//! The CA signs every certificate, but a signature cannot be taken back, so
//! the coordinator keeps the answer itself and checks it on EVERY call
//! ([`Gate`], a tonic interceptor in front of all its services): a
//! certificate revoked while its connection is open is refused on the next
//! call over that same connection.
//!
//! What is stored (tables below, in the coordinator's store) and held in
//! memory, loaded at start and updated on every change:
//! - `revoked_certificates`: fingerprint, subject, why, by whom. Kept until
//!   the certificate expires (after that TLS refuses it anyway).
//! - each node's current certificate (`nodes.cert_fingerprint`), and the one
//!   a renewal issued that the node has not used yet (`node_renewals`). A
//!   node calling with any other certificate (an older one after renewal, or
//!   one from an earlier enrollment of the same id) is refused. Its first
//!   call with the renewed one makes that current and revokes the old.
//! - `operator_certificates`: operator certificates the coordinator issued
//!   (`corralctl pki renew`) or has seen on a call (those issued offline by
//!   `pki init` / `pki issue-operator`), so an operator can be revoked by
//!   name. A renewed one revokes the one it replaces at its first use.
//!
//! Lock order: the store is never locked while [`Trust`]'s lock is held
//! (changes are written to the store first, then applied here), so code
//! inside a store transaction may read this state.

use crate::{store, Coordinator};
use anyhow::Result;
use corral_proto::identity::Identity;
use corral_proto::now_ms;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tonic::{Request, Status};

pub use crate::store::certificates::*;
use crate::store::certificates::{activate, replace_operator};

#[derive(Debug, Clone, Default, PartialEq)]
struct NodeCerts {
    current: String,
    /// Issued by a renewal, not used yet.
    renewed: Option<String>,
}

/// The in-memory state; [`State::judge`] is the pure rule.
#[derive(Debug, Default)]
pub struct State {
    revoked: HashMap<String, Revocation>,
    nodes: HashMap<String, NodeCerts>,
    /// Known operator certificates: fingerprint -> the one it replaces, if
    /// that is still to be revoked at its first use.
    operators: HashMap<String, Option<String>>,
}

/// What to do with a call made with a certificate.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Allow,
    Refuse(String),
    /// A node's first call with its renewed certificate: make it current,
    /// revoke `old`.
    Activate {
        node: String,
        old: String,
    },
    /// An operator certificate never seen before: record it (so it can be
    /// revoked by name).
    Record,
    /// A renewed operator certificate's first use: revoke `old`.
    Replace {
        old: String,
    },
}

/// The first 16 hex digits, enough to tell certificates apart in a message.
pub fn short(fp: &str) -> &str {
    &fp[..fp.len().min(16)]
}

impl State {
    /// The rule, for a call made with certificate `fp` naming `who`.
    pub fn judge(&self, who: &Identity, fp: &str) -> Verdict {
        if let Some(r) = self.revoked.get(fp) {
            return Verdict::Refuse(refusal(fp, r));
        }
        match who {
            Identity::Coordinator => Verdict::Allow,
            Identity::Node(id) => match self.nodes.get(id) {
                None => Verdict::Refuse(format!(
                    "node {id} is not enrolled with this coordinator (it was forgotten, or \
                     enrolled elsewhere): enroll it again with a new join token"
                )),
                Some(n) if n.current == fp => Verdict::Allow,
                Some(n) if n.renewed.as_deref() == Some(fp) => Verdict::Activate {
                    node: id.clone(),
                    old: n.current.clone(),
                },
                Some(n) => Verdict::Refuse(format!(
                    "certificate {}… is not node {id}'s current certificate ({}…): it was \
                     replaced by a renewal or belongs to an earlier enrollment of this id",
                    short(fp),
                    short(&n.current)
                )),
            },
            Identity::Operator { .. } => match self.operators.get(fp) {
                None => Verdict::Record,
                Some(Some(old)) if !self.revoked.contains_key(old) => {
                    Verdict::Replace { old: old.clone() }
                }
                Some(_) => Verdict::Allow,
            },
        }
    }

    /// The certificates node `id` may present to its peers: its current one
    /// and a renewed one, never a revoked one.
    pub fn fingerprints_of(&self, id: &str) -> Vec<String> {
        let Some(n) = self.nodes.get(id) else {
            return Vec::new();
        };
        std::iter::once(&n.current)
            .chain(n.renewed.iter())
            .filter(|fp| !fp.is_empty() && !self.revoked.contains_key(*fp))
            .cloned()
            .collect()
    }

    pub fn revocation(&self, fp: &str) -> Option<&Revocation> {
        self.revoked.get(fp)
    }
}

fn refusal(fp: &str, r: &Revocation) -> String {
    let subject = if r.subject.is_empty() {
        "this certificate".to_string()
    } else {
        r.subject.clone()
    };
    format!(
        "certificate {}… ({subject}) was revoked at {} by {}: {}",
        short(fp),
        rfc3339(r.at_ms),
        r.by,
        r.reason
    )
}

/// Unix milliseconds as RFC 3339 UTC, to the second.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// The shared state, with the changes applied after the store has them.
#[derive(Debug, Default)]
pub struct Trust {
    state: RwLock<State>,
    /// When each refused certificate was last logged: a revoked agent
    /// heartbeats every second, and one line a minute says enough.
    logged: Mutex<HashMap<String, Instant>>,
}

impl Trust {
    /// Loads everything from the store, dropping revocations and operator
    /// records of certificates that have expired (a day past, for skew).
    pub fn load(store: &store::Store) -> Result<Trust> {
        let state = store.tx(|c| {
            let expired = now_ms() - 86_400_000;
            c.execute(
                "DELETE FROM revoked_certificates WHERE not_after_ms > 0 AND not_after_ms < ?1",
                [expired],
            )?;
            c.execute(
                "DELETE FROM operator_certificates WHERE not_after_ms < ?1",
                [expired],
            )?;
            let mut s = State::default();
            let mut q = c.prepare("SELECT id, cert_fingerprint FROM nodes")?;
            for row in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))? {
                let (id, current) = row?;
                s.nodes.insert(
                    id,
                    NodeCerts {
                        current,
                        renewed: None,
                    },
                );
            }
            let mut q = c.prepare("SELECT node, fingerprint FROM node_renewals")?;
            for row in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))? {
                let (id, fp) = row?;
                if let Some(n) = s.nodes.get_mut(&id) {
                    n.renewed = Some(fp);
                }
            }
            let mut q = c.prepare("SELECT fingerprint, replaces FROM operator_certificates")?;
            for row in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))? {
                let (fp, replaces) = row?;
                s.operators.insert(fp, replaces);
            }
            let mut q = c.prepare(
                "SELECT fingerprint, subject, not_after_ms, revoked_at_ms, revoked_by, reason \
                 FROM revoked_certificates",
            )?;
            for row in q.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Revocation {
                        subject: r.get(1)?,
                        not_after_ms: r.get(2)?,
                        at_ms: r.get(3)?,
                        by: r.get(4)?,
                        reason: r.get(5)?,
                    },
                ))
            })? {
                let (fp, r) = row?;
                s.revoked.insert(fp, r);
            }
            Ok(s)
        })?;
        Ok(Trust {
            state: RwLock::new(state),
            logged: Mutex::default(),
        })
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A node enrolled (again) with certificate `fp`.
    pub fn enrolled(&self, node: &str, fp: &str) {
        self.write().nodes.insert(
            node.to_string(),
            NodeCerts {
                current: fp.to_string(),
                renewed: None,
            },
        );
    }

    /// A renewal issued `fp` to `node`; the renewed one it replaces, if any,
    /// was revoked.
    pub fn renewed(&self, node: &str, fp: &str, superseded: Option<(String, Revocation)>) {
        let mut s = self.write();
        if let Some(n) = s.nodes.get_mut(node) {
            n.renewed = Some(fp.to_string());
        }
        if let Some((old, r)) = superseded {
            s.revoked.insert(old, r);
        }
    }

    /// `revoked` no longer opens anything; a node's renewed certificate
    /// among them is dropped.
    pub fn revoked(&self, revoked: Vec<(String, Revocation)>) {
        let mut s = self.write();
        for (fp, r) in revoked {
            for n in s.nodes.values_mut() {
                if n.renewed.as_deref() == Some(fp.as_str()) {
                    n.renewed = None;
                }
            }
            s.revoked.insert(fp, r);
        }
    }

    /// `node` was forgotten; its certificates are in `revoked`.
    pub fn forgot(&self, node: &str, revoked: Vec<(String, Revocation)>) {
        self.write().nodes.remove(node);
        self.revoked(revoked);
    }

    /// An operator certificate recorded (seen, or issued replacing another).
    pub fn operator_recorded(&self, fp: &str, replaces: Option<String>) {
        self.write().operators.insert(fp.to_string(), replaces);
    }

    /// Logs a refusal, at most once a minute per certificate.
    fn log_refusal(&self, fp: &str, who: &Identity, why: &str) {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if logged
            .get(fp)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
        {
            return;
        }
        if logged.len() > 10_000 {
            logged.clear();
        }
        logged.insert(fp.to_string(), now);
        tracing::warn!(peer = %who, "call refused: {why}");
    }
}

/// The check on every call to the coordinator, in front of all its
/// services. A caller without a certificate passes (only `Enroll` accepts
/// one; every other handler refuses it), as does a certificate that names
/// no Corral identity (the handler refuses it, saying why).
#[derive(Clone)]
pub struct Gate(pub Arc<Coordinator>);

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        check(&self.0, &req)?;
        Ok(req)
    }
}

/// The caller's leaf certificate: its fingerprint and identity.
pub fn caller<T>(req: &Request<T>) -> Option<(String, Identity)> {
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    let who = Identity::from_cert_der(leaf.as_ref()).ok()?;
    Some((corral_proto::pki::fingerprint_der(leaf.as_ref()), who))
}

pub fn check<T>(coord: &Coordinator, req: &Request<T>) -> Result<(), Status> {
    let Some((fp, who)) = caller(req) else {
        return Ok(());
    };
    let verdict = coord.trust.read().judge(&who, &fp);
    match verdict {
        Verdict::Allow => Ok(()),
        Verdict::Refuse(why) => {
            coord.trust.log_refusal(&fp, &who, &why);
            Err(Status::permission_denied(why))
        }
        Verdict::Activate { node, old } => {
            // The call goes through even if the store cannot record the
            // switch now: the renewed certificate is valid, and its next
            // call tries again.
            match coord.store.tx(|c| activate(c, &node, &old, &fp)) {
                Ok(revocation) => {
                    tracing::info!(%node, new = short(&fp), old = short(&old), "node uses its renewed certificate; the old one is revoked");
                    let mut s = coord.trust.write();
                    if let Some(n) = s.nodes.get_mut(&node) {
                        n.current = fp.clone();
                        n.renewed = None;
                    }
                    s.revoked.insert(old, revocation);
                }
                Err(e) => {
                    tracing::error!(%node, "recording the switch to a renewed certificate: {e:#}")
                }
            }
            Ok(())
        }
        Verdict::Record => {
            let certs = req.peer_certs();
            let not_after = certs
                .as_ref()
                .and_then(|c| c.first())
                .and_then(|leaf| corral_proto::pki::validity_der(leaf.as_ref()).ok())
                .map_or(0, |(_, to)| to);
            if let Identity::Operator { role, name } = &who {
                let r = coord.store.read(|c| {
                    record_operator(c, &fp, name, &role.to_string(), not_after, "seen", None)
                });
                match r {
                    Ok(()) => coord.trust.operator_recorded(&fp, None),
                    Err(e) => tracing::error!(operator = %name, "recording a certificate: {e:#}"),
                }
            }
            Ok(())
        }
        Verdict::Replace { old } => {
            let name = who.who();
            match coord.store.tx(|c| replace_operator(c, &fp, &old, &name)) {
                Ok(r) => {
                    tracing::info!(operator = %name, new = short(&fp), old = short(&old), "operator uses a renewed certificate; the old one is revoked");
                    coord.trust.operator_recorded(&fp, None);
                    coord.trust.revoked(vec![(old, r)]);
                }
                Err(e) => {
                    tracing::error!(operator = %name, "revoking a replaced certificate: {e:#}")
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::identity::Role;

    fn rev(reason: &str) -> Revocation {
        Revocation {
            subject: "node/vm1".into(),
            not_after_ms: 0,
            at_ms: 1_800_000_000_000,
            by: "alice".into(),
            reason: reason.into(),
        }
    }

    fn state() -> State {
        let mut s = State::default();
        s.nodes.insert(
            "vm1".into(),
            NodeCerts {
                current: "aaaa".into(),
                renewed: Some("bbbb".into()),
            },
        );
        s.nodes.insert(
            "vm2".into(),
            NodeCerts {
                current: "cccc".into(),
                renewed: None,
            },
        );
        s.revoked.insert("dddd".into(), rev("key leaked"));
        s.operators.insert("op-old".into(), None);
        s.operators.insert("op-new".into(), Some("op-old".into()));
        s
    }

    fn node(id: &str) -> Identity {
        Identity::Node(id.into())
    }

    fn refused(v: Verdict) -> String {
        match v {
            Verdict::Refuse(why) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_node_may_use_only_its_current_or_renewed_certificate() {
        let s = state();
        assert_eq!(s.judge(&node("vm1"), "aaaa"), Verdict::Allow);
        assert_eq!(
            s.judge(&node("vm1"), "bbbb"),
            Verdict::Activate {
                node: "vm1".into(),
                old: "aaaa".into()
            }
        );
        // Another node's certificate fingerprint, or an old one.
        let why = refused(s.judge(&node("vm1"), "cccc"));
        assert!(why.contains("not node vm1's current certificate"), "{why}");
        let why = refused(s.judge(&node("vm9"), "eeee"));
        assert!(why.contains("not enrolled"), "{why}");
    }

    #[test]
    fn a_revoked_certificate_is_refused_whoever_it_names_and_says_why() {
        let mut s = state();
        s.revoked.insert("aaaa".into(), rev(FORGOTTEN));
        for who in [
            node("vm1"),
            Identity::Coordinator,
            Identity::Operator {
                role: Role::Admin,
                name: "x".into(),
            },
        ] {
            let why = refused(s.judge(&who, "aaaa"));
            assert!(
                why.contains("revoked at 2027-01-15T08:00:00Z by alice: node forgotten"),
                "{why}"
            );
        }
        assert_eq!(s.fingerprints_of("vm1"), ["bbbb"]);
        assert_eq!(s.fingerprints_of("vm2"), ["cccc"]);
        assert!(s.fingerprints_of("vm9").is_empty());
    }

    #[test]
    fn operator_certificates_are_recorded_and_renewals_replace_the_old_one() {
        let mut s = state();
        let op = Identity::Operator {
            role: Role::Operator,
            name: "bob".into(),
        };
        assert_eq!(s.judge(&op, "op-unknown"), Verdict::Record);
        assert_eq!(s.judge(&op, "op-old"), Verdict::Allow);
        assert_eq!(
            s.judge(&op, "op-new"),
            Verdict::Replace {
                old: "op-old".into()
            }
        );
        s.revoked.insert("op-old".into(), rev(REPLACED));
        assert_eq!(s.judge(&op, "op-new"), Verdict::Allow);
        assert!(refused(s.judge(&op, "op-old")).contains(REPLACED));
    }

    #[test]
    fn switching_to_a_renewed_certificate_is_stored_once() {
        let store = store::Store::open(&tempdir().join("corral.db")).unwrap();
        let day = 86_400_000;
        let t = now_ms() + day;
        store
            .tx(|c| {
                store::insert_node(c, "vm1", "aaaa", t)?;
                assert!(set_renewal(c, "vm1", "bbbb", t + 1)?.is_none());
                // A second renewal before the first was used revokes it.
                let (old, r) = set_renewal(c, "vm1", "cccc", t + 2)?.unwrap();
                assert_eq!((old.as_str(), r.reason.as_str()), ("bbbb", SUPERSEDED));
                let r = activate(c, "vm1", "aaaa", "cccc")?;
                assert_eq!(r.reason, REPLACED);
                assert_eq!(r.not_after_ms, t);
                assert_eq!(activate(c, "vm1", "aaaa", "cccc")?, r);
                assert_eq!(
                    node_certificate(c, "vm1")?,
                    Some(("cccc".to_string(), t + 2))
                );
                // Long expired: dropped at the next load.
                let old = Revocation {
                    not_after_ms: t - 3 * day,
                    ..r.clone()
                };
                insert_revocation(c, "ffff", &old)?;
                assert_eq!(node_renewal(c, "vm1")?, None);
                Ok(())
            })
            .unwrap();
        let trust = Trust::load(&store).unwrap();
        let s = trust.read();
        assert_eq!(s.judge(&node("vm1"), "cccc"), Verdict::Allow);
        assert!(refused(s.judge(&node("vm1"), "aaaa")).contains(REPLACED));
        assert!(refused(s.judge(&node("vm1"), "bbbb")).contains(SUPERSEDED));
        assert!(s.revocation("ffff").is_none());
    }

    fn tempdir() -> std::path::PathBuf {
        corral_proto::unique_temp_dir("corral-revocation").unwrap()
    }
}
