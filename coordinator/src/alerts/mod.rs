//! Alerts for the people on call: rules evaluated over the live fleet, and
//! events (failovers, failed operations, finished long operations) turned
//! into notices; both delivered through [`crate::notify`].
//!
//! Each evaluation is two steps, as in the failover monitor:
//! [`conditions`] is a pure function of a [`Snapshot`] (what holds now,
//! and which alerts cannot be judged, e.g. of a node nobody has heard from
//! since this coordinator started); [`Book::step`] turns that into what to
//! send: an alert fires once its condition held for the rule's `for`,
//! repeats every `repeat_interval` while it holds, is refreshed towards
//! Alertmanager every `alertmanager_refresh`, and resolves when it stops
//! holding. Firing alerts are kept in the store, so a restart neither
//! fires them again nor forgets to resolve them.
//!
//! Where each part lives: [`rules`] (the conditions), [`book`] (firing,
//! repeating, resolving), [`notices`] (one-shot notices from events).
//!
//! One-shot notices come from the events table, read past the last id seen
//! (starting at its end when the coordinator starts).

mod book;
mod notices;
mod rules;

pub use book::{Active, Book, Outcome};
pub use notices::notice_of;
pub use rules::{conditions, Condition, NodeView, Snapshot};

use crate::config::AlertsConfig;
use crate::notify::{Alert, Delivery, Notifier};
use crate::{store, Coordinator};
use anyhow::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long `corralctl alerts history` remembers alerts that ended.
pub const HISTORY_KEEP_MS: i64 = 90 * 24 * 3600 * 1000;

/// The running alert engine: its book, the channels and its figures.
pub struct Alerts {
    pub config: AlertsConfig,
    pub notifier: Notifier,
    book: Mutex<Book>,
    last_event: Mutex<Option<i64>>,
    /// Figures for /metrics.
    pub evaluations: std::sync::atomic::AtomicU64,
    pub last_evaluation_us: std::sync::atomic::AtomicU64,
    pub total_evaluation_us: std::sync::atomic::AtomicU64,
}

impl Alerts {
    pub fn new(config: AlertsConfig, notifier: Notifier) -> Alerts {
        Alerts {
            config,
            notifier,
            book: Mutex::new(Book::default()),
            last_event: Mutex::new(None),
            evaluations: Default::default(),
            last_evaluation_us: Default::default(),
            total_evaluation_us: Default::default(),
        }
    }

    /// The alerts firing now.
    pub fn active(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = lock(&self.book)
            .active
            .values()
            .map(|a| a.alert.clone())
            .collect();
        v.sort_by(|a, b| {
            (b.severity, a.starts_at_ms, &a.fingerprint).cmp(&(
                a.severity,
                b.starts_at_ms,
                &b.fingerprint,
            ))
        });
        v
    }

    /// Loads the alerts that were firing when the coordinator stopped.
    pub fn restore(&self, coord: &Coordinator) -> Result<()> {
        let firing = coord.store.read(store::firing_alerts)?;
        let mut book = lock(&self.book);
        let now = corral_proto::now_ms();
        for alert in firing {
            book.active.insert(
                alert.fingerprint.clone(),
                Active {
                    alert,
                    last_notified_ms: now,
                    // Alertmanager may have lost it meanwhile: refresh soon.
                    last_refresh_ms: 0,
                },
            );
        }
        Ok(())
    }

    /// One evaluation: rules over a snapshot, then the events since the
    /// last one.
    pub fn evaluate(&self, coord: &Coordinator) -> Result<()> {
        let started = Instant::now();
        // Everything that can fail comes before the book changes: an alert
        // the book records as fired is always sent.
        let snapshot = snapshot(coord)?;
        let notices = self.new_events(coord, &snapshot.engines)?;
        let (conds, keep) = conditions(&snapshot, &self.config);
        let outcome = lock(&self.book).step(conds, &keep, snapshot.now_ms, &self.config);
        let elapsed = started.elapsed().as_micros() as u64;
        use std::sync::atomic::Ordering::Relaxed;
        self.evaluations.fetch_add(1, Relaxed);
        self.last_evaluation_us.store(elapsed, Relaxed);
        self.total_evaluation_us.fetch_add(elapsed, Relaxed);
        let changed = !outcome.fired.is_empty()
            || !outcome.resolved.is_empty()
            || !outcome.repeated.is_empty()
            || !notices.is_empty();
        // Recorded for `alerts history` and restarts; a store that fails
        // here does not hold the notifications back.
        if changed {
            let recorded = coord.store.tx(|tx| {
                for a in &outcome.fired {
                    store::insert_alert(tx, a, "firing")?;
                }
                for a in &outcome.repeated {
                    store::alert_repeated(tx, &a.fingerprint, a.repeat)?;
                }
                for a in &outcome.resolved {
                    store::alert_resolved(tx, &a.fingerprint, a.ends_at_ms.unwrap_or_default())?;
                }
                for a in &notices {
                    store::insert_alert(tx, a, "notice")?;
                }
                Ok(())
            });
            if let Err(e) = recorded {
                coord.counters.error("alerts");
                tracing::error!(error = %format!("{e:#}"), "alerts: recording in the store");
            }
        }
        for a in &outcome.fired {
            tracing::warn!(alert = %a.name, severity = a.severity.as_str(), "alert firing: {}", a.summary);
        }
        for a in &outcome.resolved {
            tracing::info!(alert = %a.name, "alert resolved: {}", a.summary);
        }
        for (a, d) in &outcome.send {
            self.notifier.send(a, *d);
        }
        for a in &notices {
            tracing::info!(alert = %a.name, "notice: {} ({})", a.summary, a.description);
            self.notifier.send(a, Delivery::Notify);
        }
        Ok(())
    }

    fn new_events(
        &self,
        coord: &Coordinator,
        engines: &HashMap<String, String>,
    ) -> Result<Vec<Alert>> {
        let mut last = lock(&self.last_event);
        let Some(after) = *last else {
            *last = Some(coord.store.read(store::last_event_id)?);
            return Ok(Vec::new());
        };
        let events = coord.store.read(|c| store::events_after(c, after, 1000))?;
        let Some(newest) = events.last().map(|e| e.id) else {
            return Ok(Vec::new());
        };
        *last = Some(newest);
        Ok(events
            .iter()
            .filter_map(|e| notice_of(e, engines.get(&e.cluster).map(String::as_str).unwrap_or("")))
            .collect())
    }
}

/// What the rules look at: every member of a cluster, with its live view.
pub fn snapshot(coord: &Coordinator) -> Result<Snapshot> {
    let (clusters, nodes, unfinished) = coord.store.read(|c| {
        Ok((
            store::list_clusters(c)?,
            store::list_nodes(c)?,
            store::unfinished_operations(c)?,
        ))
    })?;
    let engines: HashMap<String, String> =
        clusters.into_iter().map(|c| (c.name, c.engine)).collect();
    let now = Instant::now();
    let views = nodes
        .into_iter()
        .filter_map(|n| {
            let cluster = n.cluster?;
            let engine = engines.get(&cluster)?.clone();
            let liveness = coord.fleet.liveness_of(&n.id, now);
            let live = coord.fleet.get(&n.id);
            let check_age_s = live
                .as_ref()
                .and_then(crate::fleet::Live::checked_at)
                .map(|t| now.saturating_duration_since(t).as_secs_f64());
            Some(NodeView {
                check_age_s,
                silent_s: live
                    .as_ref()
                    .map(|l| now.saturating_duration_since(l.last_seen).as_secs_f64()),
                metrics: live.as_ref().map(|l| l.metrics),
                status: live.map(|l| l.engine),
                id: n.id,
                cluster,
                engine,
                role: n.role,
                liveness,
                cert_not_after_ms: n.cert_not_after_ms,
            })
        })
        .collect();
    Ok(Snapshot {
        now_ms: corral_proto::now_ms(),
        nodes: views,
        busy: unfinished.iter().flat_map(busy_keys).collect(),
        certificates: coord.certificates.clone(),
        engines,
        node_cert_lifetime_ms: coord.lifetimes.node.as_millis() as i64,
    })
}

/// What an unfinished operation may stop: its nodes for the operations on
/// nodes, else the whole cluster (a failover, a switchover, a deletion).
fn busy_keys(op: &store::OperationRow) -> Vec<String> {
    use crate::model::{ADD_NODE, REBOOT, REJOIN, REMOVE_NODE, RESYNC};
    if crate::model::BACKGROUND.contains(&op.kind.as_str()) {
        return Vec::new(); // a backup or a verification stops nothing
    }
    let params: serde_json::Value = serde_json::from_str(&op.params).unwrap_or_default();
    let mut nodes: Vec<&str> = params["nodes"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
        .unwrap_or_default();
    nodes.extend(params["node"].as_str());
    let on_nodes = [ADD_NODE, REMOVE_NODE, REBOOT, RESYNC, REJOIN].contains(&op.kind.as_str());
    if on_nodes && !nodes.is_empty() {
        nodes
            .into_iter()
            .map(|n| format!("{}/{n}", op.cluster))
            .collect()
    } else {
        vec![op.cluster.clone()]
    }
}

/// Evaluates the rules every `evaluation_interval`, until dropped.
pub async fn run(coord: Arc<Coordinator>) {
    if let Err(e) = coord.alerts.restore(&coord) {
        tracing::error!(error = %format!("{e:#}"), "alerts: loading the firing alerts");
    }
    let mut tick = tokio::time::interval(coord.alerts.config.evaluation_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned = Instant::now() - Duration::from_secs(3600);
    loop {
        tick.tick().await;
        let prune = pruned.elapsed() >= Duration::from_secs(3600);
        if prune {
            pruned = Instant::now();
        }
        let c = coord.clone();
        let result = tokio::task::spawn_blocking(move || {
            if prune {
                let before = corral_proto::now_ms() - HISTORY_KEEP_MS;
                c.store.read(|s| store::prune_alert_history(s, before))?;
            }
            c.alerts.evaluate(&c)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                coord.counters.error("alerts");
                tracing::error!(error = %format!("{e:#}"), "alerts: evaluation");
            }
            Err(e) => tracing::error!(error = %e, "alerts: evaluation task"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
