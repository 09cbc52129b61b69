//! Payloads: pure functions of the alert (Alertmanager's API v2 body, the
//! signed webhook body, the email's subject and text).

use super::{Alert, Status};
use corral_proto::now_ms;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;

/// Unix milliseconds as RFC 3339 in UTC, e.g. `2024-05-01T12:00:00.25Z`.
pub(super) fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// Alertmanager API v2 `postableAlerts`.
pub(super) fn alertmanager_body(alerts: &[Arc<Alert>]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = alerts
        .iter()
        .map(|a| {
            let mut labels = a.labels.clone();
            labels.insert("alertname".into(), a.name.clone());
            labels.insert("severity".into(), a.severity.as_str().into());
            let mut v = serde_json::json!({
                "labels": labels,
                "annotations": {"summary": a.summary, "description": a.description},
                "startsAt": rfc3339(a.starts_at_ms),
            });
            // Without endsAt Alertmanager keeps a firing alert for its
            // resolve_timeout; refreshes keep it alive. A resolved alert (or
            // a one-shot notice) carries its end, and shows resolved.
            let ends = match a.status {
                Status::Resolved => Some(a.ends_at_ms.unwrap_or_else(now_ms)),
                Status::Firing => a.ends_at_ms,
            };
            if let Some(ends) = ends {
                v["endsAt"] = rfc3339(ends).into();
            }
            v
        })
        .collect();
    serde_json::Value::Array(list)
}

/// The webhook's JSON body (see docs/monitoring.md, "Notification channels").
pub(super) fn webhook_body(alert: &Alert, sent_at_ms: i64) -> Vec<u8> {
    let body = serde_json::json!({
        "version": "1",
        "status": alert.status.as_str(),
        "alert": {
            "name": alert.name,
            "fingerprint": alert.fingerprint,
            "severity": alert.severity.as_str(),
            "labels": alert.labels,
            "summary": alert.summary,
            "description": alert.description,
            "starts_at": rfc3339(alert.starts_at_ms),
            "ends_at": alert.ends_at_ms.map(rfc3339),
            "repeat": alert.repeat,
        },
        "sent_at": rfc3339(sent_at_ms),
    });
    // Serializing a json! value cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub(super) fn webhook_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `[FIRING critical] disk_usage_critical: cluster c1 node vm2 — <summary>`.
/// Reminders keep the subject, so mail clients thread them.
pub(super) fn email_subject(alert: &Alert) -> String {
    let tag = match (alert.status, alert.ends_at_ms) {
        (Status::Resolved, _) => "RESOLVED".to_string(),
        // A one-shot notice: over as soon as it is sent.
        (Status::Firing, Some(_)) => format!("NOTICE {}", alert.severity.as_str()),
        (Status::Firing, None) => format!("FIRING {}", alert.severity.as_str()),
    };
    let mut s = format!("[{tag}] {}:", alert.name);
    for key in ["cluster", "node"] {
        if let Some(v) = alert.labels.get(key) {
            s.push_str(&format!(" {key} {v}"));
        }
    }
    if !alert.summary.is_empty() {
        s.push_str(" — ");
        s.push_str(&alert.summary);
    }
    s
}

pub(super) fn email_body(alert: &Alert, channel: &str) -> String {
    let mut b = String::new();
    let state = match alert.status {
        Status::Firing if alert.ends_at_ms.is_some() => "NOTICE",
        Status::Firing => "FIRING",
        Status::Resolved => "RESOLVED",
    };
    b.push_str(&format!(
        "{state} ({}): {}\n\n",
        alert.severity.as_str(),
        alert.name
    ));
    if !alert.summary.is_empty() {
        b.push_str(&format!("{}\n\n", alert.summary));
    }
    if !alert.description.is_empty() {
        b.push_str(&format!("{}\n\n", alert.description));
    }
    b.push_str(&format!("Started:  {}\n", rfc3339(alert.starts_at_ms)));
    if let Some(end) = alert.ends_at_ms {
        b.push_str(&format!("Ended:    {}\n", rfc3339(end)));
    }
    if alert.repeat > 0 && alert.status == Status::Firing {
        b.push_str(&format!("Reminder: {} (still firing)\n", alert.repeat));
    }
    b.push_str("\nLabels:\n");
    for (k, v) in &alert.labels {
        b.push_str(&format!("  {k} = {v}\n"));
    }
    b.push_str(&format!("\nFingerprint: {}\n", alert.fingerprint));
    b.push_str(&format!(
        "\n-- \nSent by the Corral coordinator, notification channel {channel:?}.\n"
    ));
    b
}
