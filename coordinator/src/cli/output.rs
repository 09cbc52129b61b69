//! What the command groups share: tables and JSON on stdout, ages and
//! times as corralctl prints them, the hint to page back, and the parser
//! of duration flags.

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use std::time::Duration;

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

/// A page of a list: `page` as JSON, or `rows` as a table under `header`
/// and how to see the older entries.
pub(super) fn print_page<T: serde::Serialize>(
    json: bool,
    page: &T,
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
    next_before: &dyn std::fmt::Display,
) -> Result<()> {
    if json {
        return print_json(page);
    }
    println!("{}", table_of(header, rows));
    more_before(next_before);
    Ok(())
}

/// A table of `rows` under `header`.
pub(super) fn table_of(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> Table {
    let mut t = table(header);
    for row in rows {
        t.add_row(row);
    }
    t
}

/// After a page of a list: how to see the older entries, if any remain.
pub(super) fn more_before(next: &dyn std::fmt::Display) {
    let next = next.to_string();
    if !next.is_empty() && next != "0" {
        eprintln!("older entries: add --before {next}");
    }
}

pub(super) fn ago(ms: i64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let s = (corral_proto::now_ms() - ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

pub(super) fn fmt_time(ms: i64) -> String {
    // Seconds resolution in UTC is enough to read a log; JSON has the raw value.
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}Z")
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172800));
        for bad in ["", "h", "10", "5w", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
