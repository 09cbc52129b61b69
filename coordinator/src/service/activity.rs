//! What happened and what is happening: operations, the audit trail, events, metrics history, alerts, logs.

use super::internal;
use super::rules::member;
use super::{Caller, Error, Service};
use crate::listing;
use crate::store::{self};
use corral_proto::identity::Role;
use corral_proto::pb;
use tokio_stream::StreamExt;
impl Service {
    pub async fn get_operation(
        &self,
        caller: &Caller,
        req: pb::GetOperationRequest,
    ) -> Result<pb::Operation, Error> {
        caller.authorize(Role::Viewer)?;
        let id = &req.id;
        let row = self
            .0
            .store
            .read(|c| store::get_operation(c, id))
            .map_err(internal)?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no operation {id:?}: see `corralctl operation list`"
                ))
            })?;
        self.operation_pb(row)
    }

    pub async fn list_operations(
        &self,
        caller: &Caller,
        req: pb::ListOperationsRequest,
    ) -> Result<pb::ListOperationsResponse, Error> {
        caller.authorize(Role::Viewer)?;
        let r = req;
        let cluster = Some(r.cluster.as_str()).filter(|c| !c.is_empty());
        let limit = listing::page_size(r.limit, listing::DEFAULT_OPERATIONS);
        let (rows, next) = self
            .0
            .store
            .read(|c| listing::operations(c, cluster, limit, &r.before))
            .map_err(|e| match e.downcast::<listing::UnknownCursor>() {
                Ok(u) => Error::invalid_argument(u.to_string()),
                Err(e) => internal(e),
            })?;
        let operations = rows
            .into_iter()
            .map(|r| self.operation_pb(r))
            .collect::<Result<_, _>>()?;
        Ok(pb::ListOperationsResponse {
            operations,
            next_before: next.unwrap_or_default(),
        })
    }

    pub async fn list_audit(
        &self,
        caller: &Caller,
        req: pb::ListAuditRequest,
    ) -> Result<pb::ListAuditResponse, Error> {
        caller.authorize(Role::Admin)?;
        let r = req;
        let limit = listing::page_size(r.limit, listing::DEFAULT_AUDIT);
        let (rows, next) = self
            .0
            .store
            .read(|c| listing::audit(c, limit, r.before))
            .map_err(internal)?;
        Ok(pb::ListAuditResponse {
            entries: rows.into_iter().map(listing::audit_pb).collect(),
            next_before: next.unwrap_or_default(),
        })
    }

    pub async fn list_events(
        &self,
        caller: &Caller,
        req: pb::ListEventsRequest,
    ) -> Result<pb::ListEventsResponse, Error> {
        caller.authorize(Role::Viewer)?;
        let r = req;
        let node = Some(r.node.as_str()).filter(|s| !s.is_empty());
        let cluster = Some(r.cluster.as_str()).filter(|s| !s.is_empty());
        let limit = listing::page_size(r.limit, listing::DEFAULT_EVENTS);
        let (rows, next) = self
            .0
            .store
            .read(|c| listing::events(c, node, cluster, limit, r.before))
            .map_err(internal)?;
        Ok(pb::ListEventsResponse {
            events: rows.into_iter().map(listing::event_pb).collect(),
            next_before: next.unwrap_or_default(),
        })
    }

    pub async fn get_node_metrics(
        &self,
        caller: &Caller,
        req: pb::GetNodeMetricsRequest,
    ) -> Result<pb::NodeMetrics, Error> {
        caller.authorize(Role::Viewer)?;
        let r = req;
        self.get_cluster_row(&r.cluster)?;
        let nodes = self
            .0
            .store
            .read(|c| store::nodes_of_cluster(c, &r.cluster))
            .map_err(internal)?;
        member(&nodes, &r.cluster, &r.node)?;
        let now = corral_proto::now_ms();
        let since = if r.since_ms == 0 {
            now - 3_600_000
        } else {
            r.since_ms
        };
        if since < now - crate::history::AGG_KEEP_MS {
            return Err(Error::invalid_argument(format!(
                "history goes back 7 days; ask for --since 7d or less (asked for {}h)",
                (now - since) / 3_600_000
            )));
        }
        let history = self.0.history.clone();
        let node = r.node.clone();
        let series = tokio::task::spawn_blocking(move || history.query(&node, since, now))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(internal)?;
        let points = series
            .points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let v = |k: usize| f64::from(p.v[k]);
                let max = series.max.get(i);
                pb::MetricsPoint {
                    at_ms: p.at_ms,
                    cpu_percent: v(0),
                    memory_used_bytes: v(1),
                    memory_total_bytes: v(2),
                    disk_used_bytes: v(3),
                    disk_total_bytes: v(4),
                    net_rx_bytes_per_sec: v(5),
                    net_tx_bytes_per_sec: v(6),
                    load1: v(7),
                    connections: v(8),
                    lag_seconds: v(9),
                    max_cpu_percent: max.map_or(v(0), |m| f64::from(m[0])),
                    max_lag_seconds: max.map_or(v(9), |m| f64::from(m[9])),
                }
            })
            .collect();
        Ok(pb::NodeMetrics {
            cluster: r.cluster,
            node: r.node,
            resolution_ms: series.resolution_ms,
            points,
        })
    }

    pub async fn list_alerts(
        &self,
        caller: &Caller,
        _req: pb::ListAlertsRequest,
    ) -> Result<pb::ListAlertsResponse, Error> {
        caller.authorize(Role::Viewer)?;
        Ok(pb::ListAlertsResponse {
            alerts: self
                .0
                .alerts
                .active()
                .into_iter()
                .map(|a| alert_pb(a, "firing"))
                .collect(),
            channels: self
                .0
                .alerts
                .notifier
                .stats()
                .into_iter()
                .map(|c| pb::ChannelInfo {
                    name: c.name,
                    kind: c.kind.to_string(),
                    queued: c.queued as u64,
                    delivered: c.delivered,
                    failed_attempts: c.failed_attempts,
                    dropped: c.dropped,
                    last_error: c.last_error.unwrap_or_default(),
                    last_success_ms: c.last_success_ms.unwrap_or_default(),
                })
                .collect(),
        })
    }

    pub async fn list_alert_history(
        &self,
        caller: &Caller,
        req: pb::ListAlertHistoryRequest,
    ) -> Result<pb::ListAlertsResponse, Error> {
        caller.authorize(Role::Viewer)?;
        let r = req;
        let cluster = Some(r.cluster.as_str()).filter(|s| !s.is_empty());
        if let Some(c) = cluster {
            self.get_cluster_row(c)?;
        }
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        };
        let rows = self
            .0
            .store
            .read(|c| store::alert_history(c, cluster, limit))
            .map_err(internal)?;
        Ok(pb::ListAlertsResponse {
            alerts: rows
                .into_iter()
                .map(|r| alert_pb(r.alert, &r.state))
                .collect(),
            channels: Vec::new(),
        })
    }

    pub async fn logs(
        &self,
        caller: &Caller,
        req: pb::LogsRequest,
    ) -> Result<super::Chunks<pb::LogLines>, Error> {
        let r = req.clone();
        let source = match pb::LogSource::try_from(r.source) {
            Ok(pb::LogSource::Agent) => "agent",
            _ => "engine",
        };
        let target = format!("cluster {} node {} {source} log", r.cluster, r.node);
        let who = self.authorize_audited(caller, Role::Operator, "node.logs", &target)?;
        let outcome = crate::logs::relay(&self.0, r)
            .await
            .map(|lines| -> super::Chunks<pb::LogLines> {
                Box::pin(lines.map(|l| l.map_err(Error::from)))
            })
            .map_err(Error::from);
        // One row per request, when the stream opens (or is refused), not
        // when it ends: a follow may last hours.
        self.audited(&who, "node.logs", &target, || outcome)
    }
}

pub(crate) fn alert_pb(a: crate::notify::Alert, state: &str) -> pb::AlertInfo {
    pb::AlertInfo {
        name: a.name,
        fingerprint: a.fingerprint,
        state: state.to_string(),
        severity: a.severity.as_str().to_string(),
        labels: a.labels.into_iter().collect(),
        summary: a.summary,
        description: a.description,
        started_at_ms: a.starts_at_ms,
        ended_at_ms: a.ends_at_ms.unwrap_or_default(),
        repeats: a.repeat,
    }
}
