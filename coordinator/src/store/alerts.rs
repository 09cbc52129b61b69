//! `alerts`: alerts that fired, repeated and resolved, and one-shot notices.

use anyhow::Result;
use rusqlite::{params, Connection};

// -------------------------------------------------------------------- alerts

/// Records an alert that fired (`firing`) or a one-shot notice (`notice`).
pub fn insert_alert(c: &Connection, a: &crate::notify::Alert, state: &str) -> Result<()> {
    c.execute(
        "INSERT INTO alerts (fingerprint, name, severity, state, labels, summary, description, \
         started_at_ms, ended_at_ms, repeats) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            a.fingerprint,
            a.name,
            a.severity.as_str(),
            state,
            serde_json::to_string(&a.labels)?,
            a.summary,
            a.description,
            a.starts_at_ms,
            a.ends_at_ms,
            a.repeat
        ],
    )?;
    Ok(())
}

pub fn alert_repeated(c: &Connection, fingerprint: &str, repeats: u32) -> Result<()> {
    c.execute(
        "UPDATE alerts SET repeats = ?2 WHERE state = 'firing' AND fingerprint = ?1",
        params![fingerprint, repeats],
    )?;
    Ok(())
}

pub fn alert_resolved(c: &Connection, fingerprint: &str, at_ms: i64) -> Result<()> {
    c.execute(
        "UPDATE alerts SET state = 'resolved', ended_at_ms = ?2 \
         WHERE state = 'firing' AND fingerprint = ?1",
        params![fingerprint, at_ms],
    )?;
    Ok(())
}

/// A row of the alert history.
#[derive(Debug, Clone)]
pub struct AlertRow {
    pub alert: crate::notify::Alert,
    pub state: String,
}

fn alert_from_row(r: &rusqlite::Row) -> rusqlite::Result<AlertRow> {
    use crate::notify::{Severity, Status};
    let state: String = r.get(3)?;
    let labels: String = r.get(4)?;
    let severity = match r.get::<_, String>(2)?.as_str() {
        "critical" => Severity::Critical,
        "warning" => Severity::Warning,
        _ => Severity::Info,
    };
    Ok(AlertRow {
        alert: crate::notify::Alert {
            fingerprint: r.get(0)?,
            name: r.get(1)?,
            severity,
            status: if state == "firing" {
                Status::Firing
            } else {
                Status::Resolved
            },
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            summary: r.get(5)?,
            description: r.get(6)?,
            starts_at_ms: r.get(7)?,
            ends_at_ms: r.get(8)?,
            repeat: r.get(9)?,
        },
        state,
    })
}

const ALERT_COLS: &str = "fingerprint, name, severity, state, labels, summary, description, \
                          started_at_ms, ended_at_ms, repeats";

/// The alerts firing when the coordinator last stopped.
pub fn firing_alerts(c: &Connection) -> Result<Vec<crate::notify::Alert>> {
    let mut st = c.prepare(&format!(
        "SELECT {ALERT_COLS} FROM alerts WHERE state = 'firing' ORDER BY id"
    ))?;
    let rows = st
        .query_map([], alert_from_row)?
        .map(|r| r.map(|a| a.alert))
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// The newest `limit` alerts and notices (of `cluster`), oldest first.
pub fn alert_history(c: &Connection, cluster: Option<&str>, limit: u32) -> Result<Vec<AlertRow>> {
    let mut st = c.prepare(&format!(
        "SELECT {ALERT_COLS} FROM (SELECT * FROM alerts \
         WHERE ?1 IS NULL OR json_extract(labels, '$.cluster') = ?1 \
         ORDER BY id DESC LIMIT ?2) ORDER BY id"
    ))?;
    let rows = st
        .query_map(params![cluster, limit], alert_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Forgets alerts that ended, and notices, before `before_ms`; firing
/// alerts stay whatever their age.
pub fn prune_alert_history(c: &Connection, before_ms: i64) -> Result<usize> {
    Ok(c.execute(
        "DELETE FROM alerts WHERE state != 'firing' AND coalesce(ended_at_ms, started_at_ms) < ?1",
        [before_ms],
    )?)
}
