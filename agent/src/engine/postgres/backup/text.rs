//! The text backups read and write: pg_basebackup's output, recovery
//! times, the archive_command and configuration stripped of recovery settings.

use super::RECOVERY_SETTINGS;
use anyhow::{anyhow, Result};
use std::path::Path;

/// "pg_basebackup: write-ahead log end point: 0/2000100" -> "0/2000100".
pub(crate) fn parse_end_point(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        let (_, rest) = l.split_once("write-ahead log end point:")?;
        let lsn = rest.split_whitespace().next()?;
        super::super::parse_lsn(lsn).map(|_| lsn.to_string())
    })
}

/// "pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1"
/// -> the segment file it lies in, "000000010000000000000002" (16 MiB
/// segments, PostgreSQL's default and the only size Corral creates).
pub(crate) fn parse_start_segment(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        let (_, rest) = l.split_once("write-ahead log start point:")?;
        let mut words = rest.split_whitespace();
        let lsn = super::super::parse_lsn(words.next()?)?;
        let timeline: u32 = match (words.next(), words.next()) {
            (Some("on"), Some("timeline")) => words.next()?.parse().ok()?,
            _ => return None,
        };
        let segno = lsn / (16 << 20);
        Some(format!(
            "{timeline:08X}{:08X}{:08X}",
            segno / 256,
            segno % 256
        ))
    })
}

/// `to_time_ms` as PostgreSQL's timestamptz in UTC, to the millisecond.
pub(crate) fn recovery_time(ms: i64) -> Result<String> {
    let t = chrono::DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| anyhow!("recovery time {ms} ms is out of range"))?;
    Ok(t.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string())
}

/// `s` single-quoted for /bin/sh.
pub(super) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A libpq keyword value, quoted.
pub(super) fn conn_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The archive_command copying each finished segment into `spool`:
/// atomically (a `.part` copy renamed), and succeeding when the segment is
/// already there (a retried archive of the same segment).
pub(crate) fn archive_command(spool: &Path) -> String {
    let dir = sh_quote(&spool.to_string_lossy());
    format!(
        "test -f {dir}/%f || (cp %p {dir}/%f.part && mv -f {dir}/%f.part {dir}/%f)",
        dir = dir
    )
}

/// `text` without active lines setting one of [`RECOVERY_SETTINGS`] (or a
/// `recovery_target*`); None when there are none.
pub(super) fn strip_recovery_settings(text: &str) -> Option<String> {
    let mut removed = false;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let key = l
                .trim_start()
                .split(|c: char| c == '=' || c.is_whitespace())
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            let recovery =
                RECOVERY_SETTINGS.contains(&key.as_str()) || key.starts_with("recovery_target");
            removed |= recovery;
            !recovery
        })
        .collect();
    removed.then(|| {
        let mut s = kept.join("\n");
        s.push('\n');
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_points_and_times() {
        let text = "pg_basebackup: initiating base backup, waiting for checkpoint to complete\n\
                    pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1\n\
                    pg_basebackup: write-ahead log end point: 0/2000100\n";
        assert_eq!(parse_end_point(text).as_deref(), Some("0/2000100"));
        assert_eq!(parse_end_point("nothing"), None);
        assert_eq!(
            parse_start_segment(text).as_deref(),
            Some("000000010000000000000002")
        );
        assert_eq!(
            parse_start_segment("write-ahead log start point: 1/A3000028 on timeline 12")
                .as_deref(),
            Some("0000000C00000001000000A3")
        );
        assert_eq!(parse_start_segment("nothing"), None);
        assert_eq!(
            recovery_time(1_700_000_000_123).unwrap(),
            "2023-11-14 22:13:20.123+00"
        );
    }

    #[test]
    fn recovery_settings_are_stripped() {
        let text = "# comment\nprimary_conninfo = 'host=x'\n#restore_command = ''\n\
                    work_mem = '4MB'\n  recovery_target_time='2020-01-01'\nprimary_slot_name='s'\n";
        assert_eq!(
            strip_recovery_settings(text).unwrap(),
            "# comment\n#restore_command = ''\nwork_mem = '4MB'\n"
        );
        assert_eq!(strip_recovery_settings("work_mem = 1\n"), None);
    }

    #[test]
    fn archive_commands_quote_the_spool() {
        assert_eq!(
            archive_command(Path::new("/s/it's")),
            "test -f '/s/it'\\''s'/%f || (cp %p '/s/it'\\''s'/%f.part && mv -f '/s/it'\\''s'/%f.part '/s/it'\\''s'/%f)"
        );
    }
}
