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
//! One-shot notices come from the events table, read past the last id seen
//! (starting at its end when the coordinator starts).

use crate::config::{AlertsConfig, Rules};
use crate::fleet::Liveness;
use crate::notify::{Alert, Delivery, Notifier, Severity, Status};
use crate::{store, Coordinator};
use anyhow::Result;
use corral_proto::pb;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An engine whose last answered health check is older than this does not
/// answer (its agent checks every second; a hung check gives up after 5 s).
const STALE_CHECK_S: f64 = 5.0;

/// How long Alertmanager should show a one-shot notice (a failover that
/// completed, an operation that failed) before it counts as resolved.
const NOTICE_MS: i64 = 5 * 60 * 1000;

/// How long `corralctl alerts history` remembers alerts that ended.
pub const HISTORY_KEEP_MS: i64 = 90 * 24 * 3600 * 1000;

pub use crate::model::ANNOUNCED_OPERATIONS;

/// What one node looked like at an evaluation.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: String,
    pub cluster: String,
    pub engine: String,
    /// The role of record (primary, replica).
    pub role: String,
    pub liveness: Liveness,
    /// Seconds since the last heartbeat, when there was one.
    pub silent_s: Option<f64>,
    pub metrics: Option<pb::Metrics>,
    pub status: Option<pb::EngineStatus>,
    /// Seconds since the engine last answered a health check (its agent's
    /// figure, aged by the time since it was received).
    pub check_age_s: Option<f64>,
    /// 0: unknown (enrolled by an older coordinator).
    pub cert_not_after_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now_ms: i64,
    pub nodes: Vec<NodeView>,
    /// Where an operation runs, so engines may be stopped on purpose:
    /// `cluster` for the whole cluster, `cluster/node` for one node.
    pub busy: HashSet<String>,
    /// The coordinator's own certificates: (what, expiry).
    pub certificates: Vec<(String, i64)>,
    /// Each cluster's engine, for the notices' labels.
    pub engines: HashMap<String, String>,
    /// The lifetime of node certificates (0: unknown). Agents renew theirs
    /// when a third is left, so a node's alert fires only once its renewal
    /// is overdue.
    pub node_cert_lifetime_ms: i64,
}

/// A rule's finding: an alert that holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub name: &'static str,
    pub severity: Severity,
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub description: String,
    /// How long it must hold before it fires.
    pub hold: Duration,
}

impl Condition {
    pub fn fingerprint(&self) -> String {
        fingerprint(self.name, &self.labels)
    }
}

fn fingerprint(name: &str, labels: &BTreeMap<String, String>) -> String {
    let part = |k: &str| labels.get(k).map(String::as_str).unwrap_or("");
    format!("{name}/{}/{}", part("cluster"), part("node"))
}

fn node_labels(n: &NodeView) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("cluster".to_string(), n.cluster.clone()),
        ("node".to_string(), n.id.clone()),
        ("engine".to_string(), n.engine.clone()),
    ])
}

/// Names of the node rules, for the fingerprints kept while a node cannot
/// be judged.
const NODE_RULES: &[&str] = &[
    "node_down",
    "engine_down",
    "cpu_high",
    "memory_high",
    "disk_usage_warning",
    "disk_usage_critical",
    "replication_lag_high",
    "replication_stopped",
];

/// What holds now, and the fingerprints that cannot be judged (kept as
/// they are).
pub fn conditions(s: &Snapshot, config: &AlertsConfig) -> (Vec<Condition>, HashSet<String>) {
    let mut out = Vec::new();
    let mut keep = HashSet::new();
    let mut rules_of: HashMap<&str, Rules> = HashMap::new();
    for n in &s.nodes {
        let rules = rules_of
            .entry(n.cluster.as_str())
            .or_insert_with(|| config.rules_for(&n.cluster));
        let labels = node_labels(n);
        let cond = |name, severity, summary: String, description: String, hold| Condition {
            name,
            severity,
            labels: labels.clone(),
            summary,
            description,
            hold,
        };
        if let Some(days) = renewal_overdue(
            n.cert_not_after_ms,
            s.now_ms,
            rules.certificate_expiry_days,
            s.node_cert_lifetime_ms,
        ) {
            out.push(cond(
                "certificate_expiring",
                if days < 0 {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                cert_summary(&format!("node {}'s agent certificate", n.id), days),
                "The agent renews its certificate by itself when a third of its lifetime is \
                 left, and has not: see its log (`corralctl logs CLUSTER NODE --agent`). Once \
                 expired, the node must be forgotten and enrolled again with a new join token."
                    .into(),
                Duration::ZERO,
            ));
        }
        match n.liveness {
            Liveness::Unknown => {
                for r in NODE_RULES {
                    keep.insert(fingerprint(r, &labels));
                }
                continue;
            }
            Liveness::Down => {
                out.push(cond(
                    "node_down",
                    Severity::Critical,
                    format!("node {} of cluster {} is down", n.id, n.cluster),
                    match n.silent_s {
                        Some(s) => {
                            format!("No heartbeat from its agent for {s:.0}s (role {}).", n.role)
                        }
                        None => format!(
                            "No heartbeat from its agent since the coordinator started (role {}).",
                            n.role
                        ),
                    },
                    rules.node_down_for,
                ));
                // Its last figures are stale: neither fire nor resolve on them.
                for r in NODE_RULES.iter().filter(|r| **r != "node_down") {
                    keep.insert(fingerprint(r, &labels));
                }
                continue;
            }
            Liveness::Up => {}
        }
        if let Some(st) = &n.status {
            let running = st.state == pb::EngineState::Running as i32;
            let answers = st.healthy && n.check_age_s.is_none_or(|a| a <= STALE_CHECK_S);
            let busy =
                s.busy.contains(&n.cluster) || s.busy.contains(&format!("{}/{}", n.cluster, n.id));
            if st.cluster == n.cluster && !(running && answers) {
                if s.busy.contains(&n.cluster)
                    || s.busy.contains(&format!("{}/{}", n.cluster, n.id))
                {
                    keep.insert(fingerprint("engine_down", &labels));
                } else {
                    let state = pb::EngineState::try_from(st.state)
                        .map_or("unknown", pb::EngineState::label);
                    out.push(cond(
                        "engine_down",
                        Severity::Critical,
                        format!(
                            "{} on node {} of cluster {} is down",
                            n.engine, n.id, n.cluster
                        ),
                        format!(
                            "The engine is {state}{}{} (role {}).",
                            match (running, n.check_age_s) {
                                (false, _) => String::new(),
                                (true, Some(a)) if a > STALE_CHECK_S =>
                                    format!(" but has not answered a health check for {a:.0}s"),
                                (true, _) => " but does not answer".to_string(),
                            },
                            if st.message.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", st.message)
                            },
                            n.role
                        ),
                        rules.engine_down_for,
                    ));
                }
            }
            let stopped = n.role == "replica"
                && st.cluster == n.cluster
                && running
                && answers
                && st.replication.as_ref().is_some_and(|r| !r.streaming);
            if stopped && busy {
                keep.insert(fingerprint("replication_stopped", &labels));
            } else if stopped && rules.replication_lag_seconds > 0.0 {
                // Its lag figure stops growing once it has replayed what it
                // received: this is what shows it falling behind.
                out.push(cond(
                    "replication_stopped",
                    Severity::Warning,
                    format!(
                        "replica {} of cluster {} does not stream from its primary",
                        n.id, n.cluster
                    ),
                    "The replica is up but receives nothing: it falls behind and cannot take \
                     over without losing writes. `corralctl cluster show` shows its state; \
                     `corralctl cluster resync` rebuilds it."
                        .into(),
                    rules.replication_lag_for,
                ));
            }
            if n.role == "replica" && rules.replication_lag_seconds > 0.0 {
                if let Some(lag) = st.stats.get("lag_seconds").copied() {
                    if lag > rules.replication_lag_seconds {
                        out.push(cond(
                            "replication_lag_high",
                            Severity::Warning,
                            format!(
                                "replica {} of cluster {} is {lag:.0}s behind",
                                n.id, n.cluster
                            ),
                            format!(
                                "Replication lag above {}s: a failover to it could lose recent \
                                 writes (async) or it serves stale reads.",
                                rules.replication_lag_seconds
                            ),
                            rules.replication_lag_for,
                        ));
                    }
                }
            }
        }
        let Some(m) = &n.metrics else { continue };
        if rules.cpu_percent > 0.0 && m.cpu_percent >= rules.cpu_percent {
            out.push(cond(
                "cpu_high",
                Severity::Warning,
                format!("CPU of node {} is at {:.0}%", n.id, m.cpu_percent),
                format!(
                    "CPU at or above {}% for {}.",
                    rules.cpu_percent,
                    human(rules.cpu_for)
                ),
                rules.cpu_for,
            ));
        }
        if let Some(pct) = percent(m.memory_used_bytes, m.memory_total_bytes) {
            if rules.memory_percent > 0.0 && pct >= rules.memory_percent {
                out.push(cond(
                    "memory_high",
                    Severity::Warning,
                    format!("memory of node {} is {pct:.0}% used", n.id),
                    format!(
                        "{} of {} used, at or above {}% for {}.",
                        bytes(m.memory_used_bytes),
                        bytes(m.memory_total_bytes),
                        rules.memory_percent,
                        human(rules.memory_for)
                    ),
                    rules.memory_for,
                ));
            }
        }
        if let Some(pct) = percent(m.disk_used_bytes, m.disk_total_bytes) {
            let detail = format!(
                "The filesystem of the engine's data holds {} of {}: a full disk stops the \
                 engine. Grow the disk or free space.",
                bytes(m.disk_used_bytes),
                bytes(m.disk_total_bytes)
            );
            let summary = format!("disk of node {} is {pct:.0}% full", n.id);
            if rules.disk_critical_percent > 0.0 && pct >= rules.disk_critical_percent {
                out.push(cond(
                    "disk_usage_critical",
                    Severity::Critical,
                    summary,
                    detail,
                    Duration::ZERO,
                ));
            } else if rules.disk_warning_percent > 0.0 && pct >= rules.disk_warning_percent {
                out.push(cond(
                    "disk_usage_warning",
                    Severity::Warning,
                    summary,
                    detail,
                    Duration::ZERO,
                ));
            }
        }
    }
    for (what, not_after) in &s.certificates {
        if let Some(days) = expiring(*not_after, s.now_ms, config.rules.certificate_expiry_days) {
            out.push(Condition {
                name: "certificate_expiring",
                severity: if days < 0 {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                labels: BTreeMap::from([("certificate".to_string(), what.clone())]),
                summary: cert_summary(what, days),
                description: "Renew it with `corralctl pki` before it expires: agents and \
                              operators refuse an expired certificate."
                    .into(),
                hold: Duration::ZERO,
            });
        }
    }
    (out, keep)
}

/// Days left when a certificate expires within `within` days (negative:
/// already expired).
fn expiring(not_after_ms: i64, now_ms: i64, within: u32) -> Option<i64> {
    if not_after_ms <= 0 || within == 0 {
        return None;
    }
    let left = not_after_ms - now_ms;
    (left < i64::from(within) * 86_400_000).then(|| left.div_euclid(86_400_000))
}

/// [`expiring`] for a node certificate, which its agent renews when a third
/// of `lifetime_ms` is left: only once a quarter is left (the renewal is
/// overdue), and never earlier than `within` days.
fn renewal_overdue(not_after_ms: i64, now_ms: i64, within: u32, lifetime_ms: i64) -> Option<i64> {
    if lifetime_ms > 0 && not_after_ms - now_ms >= lifetime_ms / 4 {
        return None;
    }
    expiring(not_after_ms, now_ms, within)
}

fn cert_summary(what: &str, days: i64) -> String {
    if days < 0 {
        format!("{what} has expired")
    } else {
        format!("{what} expires in {days} days")
    }
}

fn percent(used: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| used as f64 * 100.0 / total as f64)
}

fn bytes(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "any time".into(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The alerts that fired and have not resolved, and those on their way.
#[derive(Debug, Default)]
pub struct Book {
    pub active: HashMap<String, Active>,
    /// When each condition not yet firing started to hold.
    pending: HashMap<String, i64>,
}

#[derive(Debug, Clone)]
pub struct Active {
    pub alert: Alert,
    pub last_notified_ms: i64,
    pub last_refresh_ms: i64,
}

/// What [`Book::step`] decided.
#[derive(Debug, Default)]
pub struct Outcome {
    pub send: Vec<(Alert, Delivery)>,
    pub fired: Vec<Alert>,
    pub repeated: Vec<Alert>,
    pub resolved: Vec<Alert>,
}

impl Book {
    pub fn step(
        &mut self,
        conds: Vec<Condition>,
        keep: &HashSet<String>,
        now_ms: i64,
        config: &AlertsConfig,
    ) -> Outcome {
        let mut out = Outcome::default();
        let mut holding = HashSet::new();
        for c in conds {
            let fp = c.fingerprint();
            holding.insert(fp.clone());
            if let Some(a) = self.active.get_mut(&fp) {
                // Figures in the text move; the notifications carry the
                // latest.
                a.alert.summary = c.summary;
                a.alert.description = c.description;
                let repeat = config.repeat_interval.as_millis() as i64;
                if repeat > 0 && now_ms - a.last_notified_ms >= repeat {
                    a.alert.repeat += 1;
                    a.last_notified_ms = now_ms;
                    a.last_refresh_ms = now_ms;
                    out.send.push((a.alert.clone(), Delivery::Notify));
                    out.repeated.push(a.alert.clone());
                } else {
                    let refresh = config.alertmanager_refresh.as_millis() as i64;
                    if refresh > 0 && now_ms - a.last_refresh_ms >= refresh {
                        a.last_refresh_ms = now_ms;
                        out.send.push((a.alert.clone(), Delivery::Refresh));
                    }
                }
                continue;
            }
            let since = *self.pending.entry(fp.clone()).or_insert(now_ms);
            if now_ms - since < c.hold.as_millis() as i64 {
                continue;
            }
            self.pending.remove(&fp);
            let alert = Alert {
                name: c.name.to_string(),
                fingerprint: fp.clone(),
                status: Status::Firing,
                severity: c.severity,
                labels: c.labels,
                summary: c.summary,
                description: c.description,
                starts_at_ms: since,
                ends_at_ms: None,
                repeat: 0,
            };
            out.send.push((alert.clone(), Delivery::Notify));
            out.fired.push(alert.clone());
            self.active.insert(
                fp,
                Active {
                    alert,
                    last_notified_ms: now_ms,
                    last_refresh_ms: now_ms,
                },
            );
        }
        self.pending
            .retain(|fp, _| holding.contains(fp) || keep.contains(fp));
        let over: Vec<String> = self
            .active
            .keys()
            .filter(|fp| !holding.contains(*fp) && !keep.contains(*fp))
            .cloned()
            .collect();
        for fp in over {
            if let Some(a) = self.active.remove(&fp) {
                let mut alert = a.alert;
                alert.status = Status::Resolved;
                alert.ends_at_ms = Some(now_ms);
                out.send.push((alert.clone(), Delivery::Notify));
                out.resolved.push(alert);
            }
        }
        out
    }
}

/// The notice an event makes, if any.
pub fn notice_of(ev: &store::EventRow, engine: &str) -> Option<Alert> {
    let (name, severity, summary) = match ev.kind.as_str() {
        "failover_started" => (
            "failover_started",
            Severity::Warning,
            format!("failover of cluster {} started", ev.cluster),
        ),
        "failover" => (
            "failover_completed",
            Severity::Info,
            format!("failover of cluster {} completed", ev.cluster),
        ),
        "failover_blocked" => (
            "failover_refused",
            Severity::Critical,
            format!(
                "cluster {} lost its primary and no failover is safe",
                ev.cluster
            ),
        ),
        "failover_needed" => (
            "failover_needed",
            Severity::Critical,
            format!(
                "cluster {} lost its primary and auto-failover is off",
                ev.cluster
            ),
        ),
        "operation_failed" => (
            "operation_failed",
            Severity::Warning,
            format!("{} of cluster {} failed", operation_kind(ev), ev.cluster),
        ),
        "operation_completed" => (
            "operation_completed",
            Severity::Info,
            format!("{} of cluster {} completed", operation_kind(ev), ev.cluster),
        ),
        "backup_failed" => (
            "backup_failed",
            Severity::Critical,
            format!("a backup of cluster {} failed", ev.cluster),
        ),
        "backup_missed" => (
            "backup_missed",
            Severity::Critical,
            format!("a scheduled backup of cluster {} did not run", ev.cluster),
        ),
        _ => return None,
    };
    let mut labels = BTreeMap::from([("cluster".to_string(), ev.cluster.clone())]);
    if !ev.node.is_empty() {
        labels.insert("node".into(), ev.node.clone());
    }
    if !engine.is_empty() {
        labels.insert("engine".into(), engine.to_string());
    }
    Some(Alert {
        name: name.to_string(),
        fingerprint: format!("{name}/{}/event-{}", ev.cluster, ev.id),
        status: Status::Firing,
        severity,
        labels,
        summary,
        description: ev.message.clone(),
        starts_at_ms: ev.at_ms,
        ends_at_ms: Some(ev.at_ms + NOTICE_MS),
        repeat: 0,
    })
}

/// The operation an `operation_*` event is about: the first word of its
/// message (see `ops::run`), e.g. `resync`.
fn operation_kind(ev: &store::EventRow) -> &str {
    ev.message
        .split_whitespace()
        .next()
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .unwrap_or("an operation")
}

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
mod tests {
    use super::*;

    fn view(id: &str, liveness: Liveness) -> NodeView {
        NodeView {
            id: id.into(),
            cluster: "c1".into(),
            engine: "postgres".into(),
            role: "replica".into(),
            liveness,
            silent_s: Some(0.5),
            metrics: Some(pb::Metrics {
                cpu_percent: 10.0,
                memory_used_bytes: 1 << 30,
                memory_total_bytes: 8 << 30,
                disk_used_bytes: 10,
                disk_total_bytes: 100,
                ..Default::default()
            }),
            status: Some(pb::EngineStatus {
                cluster: "c1".into(),
                state: pb::EngineState::Running as i32,
                healthy: true,
                ..Default::default()
            }),
            cert_not_after_ms: 0,
            check_age_s: Some(0.4),
        }
    }

    fn snap(nodes: Vec<NodeView>) -> Snapshot {
        Snapshot {
            now_ms: 1_000_000_000,
            nodes,
            ..Default::default()
        }
    }

    fn names(s: &Snapshot, config: &AlertsConfig) -> Vec<&'static str> {
        let mut v: Vec<_> = conditions(s, config).0.iter().map(|c| c.name).collect();
        v.sort();
        v
    }

    #[test]
    fn a_healthy_node_holds_nothing() {
        let c = AlertsConfig::default();
        assert!(names(&snap(vec![view("vm1", Liveness::Up)]), &c).is_empty());
    }

    #[test]
    fn each_rule_and_its_threshold() {
        let c = AlertsConfig::default();
        let mut n = view("vm1", Liveness::Up);
        let m = n.metrics.as_mut().unwrap();
        m.cpu_percent = 95.0;
        m.memory_used_bytes = 15 << 29; // 7.5 of 8 GiB
        m.disk_used_bytes = 85;
        let st = n.status.as_mut().unwrap();
        st.stats.insert("lag_seconds".into(), 31.0);
        st.healthy = false;
        assert_eq!(
            names(&snap(vec![n.clone()]), &c),
            [
                "cpu_high",
                "disk_usage_warning",
                "engine_down",
                "memory_high",
                "replication_lag_high"
            ]
        );
        n.metrics.as_mut().unwrap().disk_used_bytes = 95;
        assert!(names(&snap(vec![n.clone()]), &c).contains(&"disk_usage_critical"));
        assert!(!names(&snap(vec![n.clone()]), &c).contains(&"disk_usage_warning"));
        n.metrics.as_mut().unwrap().disk_used_bytes = 84;
        assert!(!names(&snap(vec![n.clone()]), &c)
            .iter()
            .any(|x| x.starts_with("disk")));
        // Lag counts on replicas only.
        n.role = "primary".into();
        assert!(!names(&snap(vec![n]), &c).contains(&"replication_lag_high"));
    }

    #[test]
    fn a_replica_that_stopped_streaming() {
        let c = AlertsConfig::default();
        let mut n = view("vm2", Liveness::Up);
        n.status.as_mut().unwrap().replication = Some(pb::Replication {
            in_recovery: true,
            streaming: false,
            ..Default::default()
        });
        let mut s = snap(vec![n.clone()]);
        assert_eq!(names(&s, &c), ["replication_stopped"]);
        s.busy.insert("c1/vm2".into());
        let (conds, keep) = conditions(&s, &c);
        assert!(conds.is_empty() && keep.contains("replication_stopped/c1/vm2"));
        n.status
            .as_mut()
            .unwrap()
            .replication
            .as_mut()
            .unwrap()
            .streaming = true;
        assert!(names(&snap(vec![n.clone()]), &c).is_empty());
        n.role = "primary".into();
        n.status
            .as_mut()
            .unwrap()
            .replication
            .as_mut()
            .unwrap()
            .streaming = false;
        assert!(
            names(&snap(vec![n]), &c).is_empty(),
            "a primary streams from no one"
        );
    }

    #[test]
    fn per_cluster_overrides_and_rules_turned_off() {
        let mut c = AlertsConfig::default();
        c.cluster.insert(
            "c1".into(),
            crate::config::RulesOverride {
                disk_warning_percent: Some(5.0),
                cpu_percent: Some(0.0),
                ..Default::default()
            },
        );
        let mut n = view("vm1", Liveness::Up);
        n.metrics.as_mut().unwrap().cpu_percent = 100.0;
        assert_eq!(names(&snap(vec![n.clone()]), &c), ["disk_usage_warning"]);
        n.cluster = "c2".into();
        n.status.as_mut().unwrap().cluster = "c2".into();
        assert_eq!(names(&snap(vec![n]), &c), ["cpu_high"]);
    }

    #[test]
    fn down_and_unknown_nodes() {
        let c = AlertsConfig::default();
        let mut n = view("vm1", Liveness::Down);
        n.metrics.as_mut().unwrap().cpu_percent = 100.0;
        let (conds, keep) = conditions(&snap(vec![n.clone()]), &c);
        assert_eq!(
            conds.iter().map(|c| c.name).collect::<Vec<_>>(),
            ["node_down"]
        );
        assert!(keep.contains("cpu_high/c1/vm1") && keep.contains("engine_down/c1/vm1"));
        n.liveness = Liveness::Unknown;
        let (conds, keep) = conditions(&snap(vec![n]), &c);
        assert!(conds.is_empty());
        assert!(keep.contains("node_down/c1/vm1"));
    }

    #[test]
    fn an_engine_whose_health_check_hangs_is_down() {
        let c = AlertsConfig::default();
        let mut n = view("vm1", Liveness::Up);
        n.check_age_s = Some(4.9);
        assert!(names(&snap(vec![n.clone()]), &c).is_empty());
        n.check_age_s = Some(6.0);
        let (conds, _) = conditions(&snap(vec![n.clone()]), &c);
        assert_eq!(conds[0].name, "engine_down");
        assert!(
            conds[0]
                .description
                .contains("has not answered a health check for 6s"),
            "{}",
            conds[0].description
        );
        n.check_age_s = None; // never checked yet: judged by `healthy`
        assert!(names(&snap(vec![n]), &c).is_empty());
    }

    #[test]
    fn an_engine_stopped_by_an_operation_is_not_down() {
        let c = AlertsConfig::default();
        let mut n = view("vm1", Liveness::Up);
        n.status.as_mut().unwrap().state = pb::EngineState::Stopped as i32;
        let mut s = snap(vec![n]);
        assert_eq!(names(&s, &c), ["engine_down"]);
        s.busy.insert("c1/vm2".into());
        assert_eq!(names(&s, &c), ["engine_down"], "another node's operation");
        for key in ["c1", "c1/vm1"] {
            s.busy = HashSet::from([key.to_string()]);
            let (conds, keep) = conditions(&s, &c);
            assert!(conds.is_empty() && keep.contains("engine_down/c1/vm1"));
        }
    }

    #[test]
    fn operations_make_their_nodes_or_their_cluster_busy() {
        let op = |kind: &str, params: &str| store::OperationRow {
            id: "op".into(),
            cluster: "c1".into(),
            kind: kind.into(),
            state: "running".into(),
            params: params.into(),
            requested_by: "t".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
            error: String::new(),
        };
        assert_eq!(
            busy_keys(&op("reboot", r#"{"node":"vm2","force":false}"#)),
            ["c1/vm2"]
        );
        assert_eq!(
            busy_keys(&op("resync", r#"{"nodes":["vm2","vm3"]}"#)),
            ["c1/vm2", "c1/vm3"]
        );
        assert_eq!(
            busy_keys(&op("failover", r#"{"old":"vm1","candidate":"vm2"}"#)),
            ["c1"]
        );
        assert_eq!(busy_keys(&op("promote", r#"{"node":"vm2"}"#)), ["c1"]);
        assert_eq!(
            busy_keys(&op("create_cluster", r#"{"nodes":["vm1"]}"#)),
            ["c1"]
        );
    }

    #[test]
    fn certificates() {
        let c = AlertsConfig::default();
        let day = 86_400_000;
        let mut s = snap(vec![]);
        s.certificates = vec![
            ("the CA".into(), s.now_ms + 400 * day),
            (
                "the coordinator's certificate".into(),
                s.now_ms + 10 * day + 5,
            ),
            ("an old one".into(), s.now_ms - 1),
        ];
        let (conds, _) = conditions(&s, &c);
        assert_eq!(conds.len(), 2);
        assert_eq!(
            conds[0].summary,
            "the coordinator's certificate expires in 10 days"
        );
        assert_eq!(conds[0].severity, Severity::Warning);
        assert_eq!(conds[1].severity, Severity::Critical);
        let mut n = view("vm1", Liveness::Up);
        n.cert_not_after_ms = s.now_ms + 3 * day;
        assert_eq!(names(&snap(vec![n.clone()]), &c), ["certificate_expiring"]);
        // A 30-day node certificate with 9 days left is within the 30-day
        // rule but its agent renews it at 10 days left: not overdue yet.
        let mut fleet = snap(vec![n]);
        fleet.node_cert_lifetime_ms = 30 * day;
        fleet.nodes[0].cert_not_after_ms = fleet.now_ms + 9 * day;
        assert!(names(&fleet, &c).is_empty());
        fleet.nodes[0].cert_not_after_ms = fleet.now_ms + 7 * day;
        assert_eq!(names(&fleet, &c), ["certificate_expiring"]);
    }

    fn cond(name: &'static str, hold_s: u64) -> Condition {
        Condition {
            name,
            severity: Severity::Warning,
            labels: BTreeMap::from([
                ("cluster".to_string(), "c1".to_string()),
                ("node".to_string(), "vm1".to_string()),
            ]),
            summary: "s".into(),
            description: "d".into(),
            hold: Duration::from_secs(hold_s),
        }
    }

    fn kinds(o: &Outcome) -> Vec<(String, Status, Delivery, u32)> {
        o.send
            .iter()
            .map(|(a, d)| (a.name.clone(), a.status, *d, a.repeat))
            .collect()
    }

    #[test]
    fn fires_after_its_hold_once_repeats_refreshes_and_resolves() {
        let config = AlertsConfig {
            repeat_interval: Duration::from_secs(3600),
            alertmanager_refresh: Duration::from_secs(60),
            ..Default::default()
        };
        let none = HashSet::new();
        let mut book = Book::default();
        let s = 1000;
        let t = |x: i64| x * s;
        // Holds, but not yet for its 120 s.
        assert!(book
            .step(vec![cond("cpu_high", 120)], &none, t(0), &config)
            .send
            .is_empty());
        assert!(book
            .step(vec![cond("cpu_high", 120)], &none, t(119), &config)
            .send
            .is_empty());
        let o = book.step(vec![cond("cpu_high", 120)], &none, t(120), &config);
        assert_eq!(
            kinds(&o),
            [("cpu_high".into(), Status::Firing, Delivery::Notify, 0)]
        );
        assert_eq!(
            o.fired[0].starts_at_ms,
            t(0),
            "starts when it began to hold"
        );
        // Fires once.
        assert!(book
            .step(vec![cond("cpu_high", 120)], &none, t(121), &config)
            .send
            .is_empty());
        // Refreshed for Alertmanager every minute.
        let o = book.step(vec![cond("cpu_high", 120)], &none, t(180), &config);
        assert_eq!(
            kinds(&o),
            [("cpu_high".into(), Status::Firing, Delivery::Refresh, 0)]
        );
        // Repeats on the schedule while it holds.
        let o = book.step(vec![cond("cpu_high", 120)], &none, t(120 + 3600), &config);
        assert_eq!(
            kinds(&o),
            [("cpu_high".into(), Status::Firing, Delivery::Notify, 1)]
        );
        // Cannot be judged: kept as it is.
        let keep = HashSet::from(["cpu_high/c1/vm1".to_string()]);
        assert!(book.step(vec![], &keep, t(4000), &config).send.is_empty());
        // Resolves when it stops holding.
        let o = book.step(vec![], &none, t(4001), &config);
        assert_eq!(
            kinds(&o),
            [("cpu_high".into(), Status::Resolved, Delivery::Notify, 1)]
        );
        assert_eq!(o.resolved[0].ends_at_ms, Some(t(4001)));
        assert!(book.active.is_empty());
    }

    #[test]
    fn a_condition_that_stops_before_its_hold_never_fires() {
        let config = AlertsConfig::default();
        let none = HashSet::new();
        let mut book = Book::default();
        book.step(vec![cond("cpu_high", 60)], &none, 0, &config);
        assert!(book.step(vec![], &none, 30_000, &config).send.is_empty());
        // Starts counting again from scratch.
        assert!(book
            .step(vec![cond("cpu_high", 60)], &none, 40_000, &config)
            .send
            .is_empty());
        assert!(book
            .step(vec![cond("cpu_high", 60)], &none, 90_000, &config)
            .send
            .is_empty());
        assert_eq!(
            book.step(vec![cond("cpu_high", 60)], &none, 100_000, &config)
                .fired
                .len(),
            1
        );
    }

    #[test]
    fn events_make_notices() {
        let ev = |kind: &str| store::EventRow {
            id: 7,
            at_ms: 5,
            node: "vm2".into(),
            cluster: "c1".into(),
            kind: kind.into(),
            message: "m".into(),
        };
        let a = notice_of(&ev("failover"), "postgres").unwrap();
        assert_eq!(a.name, "failover_completed");
        assert_eq!(a.severity, Severity::Info);
        assert_eq!(a.labels["engine"], "postgres");
        assert_eq!(a.ends_at_ms, Some(5 + NOTICE_MS));
        assert_eq!(
            notice_of(&ev("failover_blocked"), "").unwrap().severity,
            Severity::Critical
        );
        assert_eq!(
            notice_of(&ev("operation_failed"), "").unwrap().name,
            "operation_failed"
        );
        assert!(notice_of(&ev("node_up"), "").is_none());
    }
}
