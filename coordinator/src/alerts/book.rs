//! The book of alerts: [`Book::step`] turns what holds now into what to
//! send (fire after `for`, repeat, refresh towards Alertmanager, resolve).

use super::rules::Condition;
use crate::config::AlertsConfig;
use crate::notify::{Alert, Delivery, Status};
use std::collections::{HashMap, HashSet};

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
