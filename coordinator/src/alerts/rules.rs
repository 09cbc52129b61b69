//! The alert rules: [`conditions`], a pure function of a [`Snapshot`] of
//! the fleet, says which alerts hold now and which cannot be judged.

use crate::config::{AlertsConfig, Rules};
use crate::fleet::Liveness;
use crate::notify::Severity;
use corral_proto::pb;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

/// An engine whose last answered health check is older than this does not
/// answer (its agent checks every second; a hung check gives up after 5 s).
const STALE_CHECK_S: f64 = 5.0;

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

pub(super) fn fingerprint(name: &str, labels: &BTreeMap<String, String>) -> String {
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
        let mut found = Findings {
            labels: node_labels(n),
            out: &mut out,
            keep: &mut keep,
        };
        node_conditions(s, n, rules, &mut found);
    }
    coordinator_certificates(s, config, &mut out);
    (out, keep)
}

/// What the rules found about one node: the conditions that hold and the
/// fingerprints to keep as they are.
struct Findings<'a> {
    labels: BTreeMap<String, String>,
    out: &'a mut Vec<Condition>,
    keep: &'a mut HashSet<String>,
}

impl Findings<'_> {
    fn push(
        &mut self,
        name: &'static str,
        severity: Severity,
        summary: String,
        description: String,
        hold: Duration,
    ) {
        self.out.push(Condition {
            name,
            severity,
            labels: self.labels.clone(),
            summary,
            description,
            hold,
        });
    }

    /// Neither fire nor resolve rule `name` on this evaluation.
    fn keep(&mut self, name: &str) {
        self.keep.insert(fingerprint(name, &self.labels));
    }
}

/// Every rule about node `n`, in order: its certificate, its liveness (a
/// node down or unknown is judged no further), its engine, its metrics.
fn node_conditions(s: &Snapshot, n: &NodeView, rules: &Rules, f: &mut Findings) {
    node_certificate(s, n, rules, f);
    if !judge_liveness(n, rules, f) {
        return;
    }
    if let Some(st) = &n.status {
        engine_conditions(s, n, st, rules, f);
    }
    if let Some(m) = &n.metrics {
        metric_conditions(n, m, rules, f);
    }
}

fn node_certificate(s: &Snapshot, n: &NodeView, rules: &Rules, f: &mut Findings) {
    if let Some(days) = renewal_overdue(
        n.cert_not_after_ms,
        s.now_ms,
        rules.certificate_expiry_days,
        s.node_cert_lifetime_ms,
    ) {
        f.push(
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
        );
    }
}

/// `node_down` for a node that is; false when the node is not up (its
/// other rules are then kept as they are).
fn judge_liveness(n: &NodeView, rules: &Rules, f: &mut Findings) -> bool {
    match n.liveness {
        Liveness::Unknown => {
            for r in NODE_RULES {
                f.keep(r);
            }
            false
        }
        Liveness::Down => {
            f.push(
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
            );
            // Its last figures are stale: neither fire nor resolve on them.
            for r in NODE_RULES.iter().filter(|r| **r != "node_down") {
                f.keep(r);
            }
            false
        }
        Liveness::Up => true,
    }
}

/// `engine_down`, `replication_stopped` and `replication_lag_high`, from
/// the engine's last status (an engine stopped by an operation is kept).
fn engine_conditions(
    s: &Snapshot,
    n: &NodeView,
    st: &pb::EngineStatus,
    rules: &Rules,
    f: &mut Findings,
) {
    let running = st.state == pb::EngineState::Running as i32;
    let answers = st.healthy && n.check_age_s.is_none_or(|a| a <= STALE_CHECK_S);
    let busy = s.busy.contains(&n.cluster) || s.busy.contains(&format!("{}/{}", n.cluster, n.id));
    if st.cluster == n.cluster && !(running && answers) {
        if busy {
            f.keep("engine_down");
        } else {
            engine_down(n, st, running, rules, f);
        }
    }
    let stopped = n.role == "replica"
        && st.cluster == n.cluster
        && running
        && answers
        && st.replication.as_ref().is_some_and(|r| !r.streaming);
    if stopped && busy {
        f.keep("replication_stopped");
    } else if stopped && rules.replication_lag_seconds > 0.0 {
        // Its lag figure stops growing once it has replayed what it
        // received: this is what shows it falling behind.
        f.push(
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
        );
    }
    if n.role == "replica" && rules.replication_lag_seconds > 0.0 {
        if let Some(lag) = st.stats.get("lag_seconds").copied() {
            if lag > rules.replication_lag_seconds {
                f.push(
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
                );
            }
        }
    }
}

fn engine_down(
    n: &NodeView,
    st: &pb::EngineStatus,
    running: bool,
    rules: &Rules,
    f: &mut Findings,
) {
    let state = pb::EngineState::try_from(st.state).map_or("unknown", pb::EngineState::label);
    f.push(
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
    );
}

/// `cpu_high`, `memory_high` and the disk usage rules.
fn metric_conditions(n: &NodeView, m: &pb::Metrics, rules: &Rules, f: &mut Findings) {
    if rules.cpu_percent > 0.0 && m.cpu_percent >= rules.cpu_percent {
        f.push(
            "cpu_high",
            Severity::Warning,
            format!("CPU of node {} is at {:.0}%", n.id, m.cpu_percent),
            format!(
                "CPU at or above {}% for {}.",
                rules.cpu_percent,
                human(rules.cpu_for)
            ),
            rules.cpu_for,
        );
    }
    if let Some(pct) = percent(m.memory_used_bytes, m.memory_total_bytes) {
        if rules.memory_percent > 0.0 && pct >= rules.memory_percent {
            f.push(
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
            );
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
            f.push(
                "disk_usage_critical",
                Severity::Critical,
                summary,
                detail,
                Duration::ZERO,
            );
        } else if rules.disk_warning_percent > 0.0 && pct >= rules.disk_warning_percent {
            f.push(
                "disk_usage_warning",
                Severity::Warning,
                summary,
                detail,
                Duration::ZERO,
            );
        }
    }
}

/// `certificate_expiring` for the coordinator's own certificates.
fn coordinator_certificates(s: &Snapshot, config: &AlertsConfig, out: &mut Vec<Condition>) {
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
