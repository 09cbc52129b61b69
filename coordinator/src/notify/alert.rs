//! What is sent: an [`Alert`], its [`Severity`] and [`Status`], and how it
//! is to be delivered ([`Delivery`]).

use std::collections::BTreeMap;

/// How urgent an alert is. Ordered: `Info < Warning < Critical`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Whether the condition still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

/// One alert as the alert engine hands it over.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alert {
    /// Rule name, e.g. `disk_usage_critical`; becomes the label `alertname`.
    pub name: String,
    /// Stable identity of this alert instance (rule + cluster + node).
    pub fingerprint: String,
    pub status: Status,
    pub severity: Severity,
    /// `cluster`, `node`, `engine`, `role` ...; the notifier adds
    /// `alertname` and `severity` for Alertmanager.
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub description: String,
    /// Unix milliseconds.
    pub starts_at_ms: i64,
    /// Set when resolved; for one-shot notices ("failover completed") the
    /// moment it is over.
    pub ends_at_ms: Option<i64>,
    /// 0 for the first notification, n for the n-th reminder while it holds.
    pub repeat: u32,
}

/// Why an alert is sent; decides which channels take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A change people must hear about: first firing, a scheduled reminder,
    /// or the resolve. All channels.
    Notify,
    /// Keep-alive of a still-firing alert so Alertmanager does not
    /// auto-resolve it (sent every minute or so). Alertmanager channels
    /// only; webhook and email ignore it.
    Refresh,
}
