//! Notification channels (placeholder API; the channels themselves land
//! with the notify branch).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub name: String,
    pub fingerprint: String,
    pub status: Status,
    pub severity: Severity,
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub description: String,
    pub starts_at_ms: i64,
    pub ends_at_ms: Option<i64>,
    pub repeat: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Notify,
    Refresh,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {}

#[derive(Clone, Default)]
pub struct Notifier {}

#[derive(Debug, Clone, Serialize)]
pub struct ChannelStats {
    pub name: String,
    pub kind: &'static str,
    pub queued: usize,
    pub delivered: u64,
    pub failed_attempts: u64,
    pub dropped: u64,
    pub last_error: Option<String>,
    pub last_success_ms: Option<i64>,
}

impl Notifier {
    pub fn start(_config: &NotifyConfig) -> anyhow::Result<Notifier> {
        Ok(Notifier {})
    }
    pub fn none() -> Notifier {
        Notifier {}
    }
    pub fn send(&self, _alert: &Alert, _delivery: Delivery) {}
    pub fn stats(&self) -> Vec<ChannelStats> {
        Vec::new()
    }
}
