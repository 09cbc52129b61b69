//! The cluster IP allowlist: read, change, history.

use super::internal;
use super::rules::refuse;
use super::{Caller, Error, Service};
use crate::allowlist;
use crate::store::{self, ClusterRow};
use corral_proto::identity::Role;
use corral_proto::names;
use corral_proto::pb;
use std::time::Instant;
impl Service {
    pub async fn get_allowlist(
        &self,
        caller: &Caller,
        req: pb::GetAllowlistRequest,
    ) -> Result<pb::Allowlist, Error> {
        caller.authorize(Role::Viewer)?;
        let row = self.get_cluster_row(&req.cluster)?;
        self.allowlist_pb(&row, String::new())
    }

    pub async fn set_allowlist(
        &self,
        caller: &Caller,
        req: pb::SetAllowlistRequest,
    ) -> Result<pb::Allowlist, Error> {
        let r = req.clone();
        let target = format!(
            "cluster {} {} {} entr{}{}",
            r.cluster,
            r.change,
            r.entries.len(),
            if r.entries.len() == 1 { "y" } else { "ies" },
            if r.force { " (force)" } else { "" }
        );
        let action = "cluster.allowlist";
        let who = self.authorize_audited(caller, Role::Operator, action, &target)?;
        // Where the request came from, for the lockout guard.
        let from = caller.remote_ip();
        let mut summary = String::new();
        let row = self.audited(&who, action, &target, || {
            let how = allowlist::Change::parse(&r.change).map_err(Error::invalid_argument)?;
            let entries = allowlist::parse_entries(&r.entries)
                .map_err(|e| Error::invalid_argument(format!("{e}; nothing was changed")))?;
            names::validate("cluster", &r.cluster).map_err(Error::invalid_argument)?;
            self.refusable_tx(|tx| {
                let Some(row) = store::get_cluster(tx, &r.cluster)? else {
                    return refuse(Error::not_found(format!(
                        "no cluster named {:?}: see `corralctl cluster list`",
                        r.cluster
                    )));
                };
                let current = allowlist::from_stored(&store::allowlist_of(tx, &r.cluster)?);
                let next = or_refuse!(
                    allowlist::change(&current, how, &entries).map_err(Error::invalid_argument)
                );
                if next == current {
                    summary = "unchanged: the list already says that".into();
                    return Ok(Ok(row));
                }
                if !r.force {
                    match from {
                        // corralctl on the coordinator's own host: the
                        // coordinator is always allowed on the nodes.
                        Some(ip) if ip.is_loopback() => {}
                        Some(ip) if allowlist::locks_out(&next, ip) => {
                            return refuse(Error::failed_precondition(format!(
                                "this change would lock out {ip}, the address this request came \
                                 from: add it (e.g. `corralctl cluster allowlist add {} {ip}`) \
                                 or pass --force; nothing was changed",
                                r.cluster
                            )))
                        }
                        None if !next.is_empty() => {
                            return refuse(Error::failed_precondition(
                                "cannot tell which address this request came from, so cannot \
                                 check it is not locked out: pass --force to apply anyway",
                            ))
                        }
                        _ => {}
                    }
                }
                let old: Vec<String> = current.iter().map(allowlist::canonical).collect();
                let new: Vec<String> = next.iter().map(allowlist::canonical).collect();
                let version = store::set_allowlist(tx, &r.cluster, &who, &old, &new)?;
                summary = format!(
                    "version {version}: {} -> {}",
                    allowlist::summary(&current, 20),
                    allowlist::summary(&next, 20)
                );
                store::insert_audit(
                    tx,
                    &who,
                    "cluster.allowlist.change",
                    &format!("cluster {} {summary}", r.cluster),
                    "ok",
                )?;
                Ok(Ok(store::get_cluster(tx, &r.cluster)?.unwrap_or(row)))
            })
        })?;
        tracing::info!(cluster = %row.name, "allowlist: {summary}");
        self.allowlist_pb(&row, summary)
    }

    pub async fn list_allowlist_changes(
        &self,
        caller: &Caller,
        req: pb::ListAllowlistChangesRequest,
    ) -> Result<pb::ListAllowlistChangesResponse, Error> {
        caller.authorize(Role::Viewer)?;
        let row = self.get_cluster_row(&req.cluster)?;
        let rows = self
            .0
            .store
            .read(|c| store::allowlist_changes(c, &row.name))
            .map_err(internal)?;
        Ok(pb::ListAllowlistChangesResponse {
            changes: rows
                .into_iter()
                .map(|c| pb::AllowlistChange {
                    at_ms: c.at_ms,
                    who: c.who,
                    version: c.version,
                    old_entries: c.old,
                    new_entries: c.new,
                })
                .collect(),
        })
    }

    /// `row`'s allowlist and where each of its nodes stands.
    pub(crate) fn allowlist_pb(
        &self,
        row: &ClusterRow,
        message: String,
    ) -> Result<pb::Allowlist, Error> {
        let (nodes, entries) = self
            .0
            .store
            .read(|c| {
                Ok((
                    store::nodes_of_cluster(c, &row.name)?,
                    store::allowlist_of(c, &row.name)?,
                ))
            })
            .map_err(internal)?;
        let now = Instant::now();
        Ok(pb::Allowlist {
            cluster: row.name.clone(),
            entries,
            version: row.allowlist_version,
            nodes: nodes
                .iter()
                .map(|n| {
                    let applied = self
                        .0
                        .fleet
                        .get(&n.id)
                        .map(|l| l.engine.allowlist_version)
                        .unwrap_or(0);
                    pb::AllowlistNode {
                        node: n.id.clone(),
                        applied_version: applied,
                        current: applied == row.allowlist_version,
                        state: self.0.fleet.liveness_of(&n.id, now).as_str().to_string(),
                    }
                })
                .collect(),
            message,
        })
    }
}
