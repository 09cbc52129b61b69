//! When a log line was written, read from the line's own timestamp.
//!
//! Each engine stamps its lines its own way:
//!
//! | family   | a line starts with                        | zone              |
//! |----------|-------------------------------------------|-------------------|
//! | postgres | `2026-11-26 01:32:42.123 UTC [123] LOG:`  | as printed (`%m`) |
//! | mariadb  | `2026-11-26  1:32:42 0 [Note] ...`        | the VM's local    |
//! | redis    | `1234:M 26 Nov 2026 01:32:42.123 * ...`   | the VM's local    |
//! | agent    | `2026-11-26T01:32:42.123456Z  INFO ...`   | as printed (UTC)  |
//!
//! Corral writes PostgreSQL's configuration with `log_timezone = 'UTC'`, so
//! its zone is always printed as `UTC`. MariaDB and Redis print local time
//! without a zone; the engines run with no `TZ` in their environment, so
//! local means the VM's `/etc/localtime`, which is what [`chrono::Local`]
//! reads too (unless the agent itself runs with `TZ` set).
//!
//! A line without a timestamp (a continuation: a statement's DETAIL, a
//! stack trace, Redis's start-up banner) has no time of its own; the reader
//! gives it the previous line's.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime, TimeZone};

/// How a log's lines are stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Postgres,
    Mariadb,
    Redis,
    Agent,
}

impl Family {
    /// The family of an engine's server log, by engine name.
    pub fn of_engine(engine: &str) -> Option<Family> {
        match engine {
            "postgres" => Some(Family::Postgres),
            "mariadb" | "mysql" => Some(Family::Mariadb),
            "redis" | "valkey" | "keydb" => Some(Family::Redis),
            _ => None,
        }
    }
}

/// The zone of a printed time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zone {
    Utc,
    /// East of UTC, in seconds.
    Offset(i32),
    /// No zone printed, or one only the tz database could resolve (`CET`):
    /// the VM's local time.
    Local,
}

/// Milliseconds since the Unix epoch at which `line` says it was written,
/// or None for a line without a timestamp. Times without a zone are read in
/// the VM's local zone.
pub fn line_time(family: Family, line: &[u8]) -> Option<i64> {
    line_time_in(family, line, &chrono::Local)
}

/// [`line_time`] with times that carry no zone read in `local`: pure, for
/// tests.
pub fn line_time_in<Tz: TimeZone>(family: Family, line: &[u8], local: &Tz) -> Option<i64> {
    // Every stamp sits in the first few dozen bytes; a cut-off or binary
    // line fails the parse below rather than panicking.
    let head = &line[..line.len().min(64)];
    let head = match std::str::from_utf8(head) {
        Ok(s) => s,
        // A multi-byte character cut at byte 64: what comes before it.
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).ok()?,
    };
    let (naive, zone) = match family {
        Family::Postgres => postgres(head)?,
        Family::Mariadb => (mariadb(head)?, Zone::Local),
        Family::Redis => (redis(head)?, Zone::Local),
        Family::Agent => agent(head)?,
    };
    let utc = match zone {
        Zone::Utc => naive.and_utc(),
        Zone::Offset(east) => naive.and_utc() - chrono::Duration::seconds(east.into()),
        // A time in a DST gap does not exist; one in the repeated hour
        // exists twice: take the earlier, and for the gap, read it as UTC
        // rather than lose the line's time.
        Zone::Local => local
            .from_local_datetime(&naive)
            .earliest()
            .map(|t| t.to_utc())
            .unwrap_or_else(|| naive.and_utc()),
    };
    Some(utc.timestamp_millis())
}

/// Parses exactly `n` ASCII digits at the start of `s`.
fn digits(s: &str, n: usize) -> Option<(u32, &str)> {
    let d = s.get(..n)?;
    if !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((d.parse().ok()?, &s[n..]))
}

fn expect(s: &str, c: char) -> Option<&str> {
    s.strip_prefix(c)
}

/// `YYYY-MM-DD`.
fn date(s: &str) -> Option<(NaiveDate, &str)> {
    let (y, s) = digits(s, 4)?;
    let (m, s) = digits(expect(s, '-')?, 2)?;
    let (d, s) = digits(expect(s, '-')?, 2)?;
    Some((NaiveDate::from_ymd_opt(y as i32, m, d)?, s))
}

/// `HH:MM:SS` with an optional `.fraction` (any number of digits, kept to
/// milliseconds); the hour may be one digit (MariaDB pads it with a space,
/// which the caller skips).
fn time(s: &str) -> Option<(NaiveTime, &str)> {
    let hour_len = s.bytes().take_while(u8::is_ascii_digit).count();
    if !(1..=2).contains(&hour_len) {
        return None;
    }
    let (h, s) = digits(s, hour_len)?;
    let (mi, s) = digits(expect(s, ':')?, 2)?;
    let (sec, mut s) = digits(expect(s, ':')?, 2)?;
    let mut ms = 0;
    if let Some(frac) = s.strip_prefix('.') {
        let len = frac.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &frac[..len.min(3)]);
        ms = padded.parse().ok()?;
        s = &frac[len..];
    }
    Some((NaiveTime::from_hms_milli_opt(h, mi, sec, ms)?, s))
}

/// `2026-11-26 01:32:42.123 UTC [123] ...` (`log_line_prefix = '%m ...'`;
/// `%t` without milliseconds reads too).
fn postgres(s: &str) -> Option<(NaiveDateTime, Zone)> {
    let (d, s) = date(s)?;
    let (t, s) = time(expect(s, ' ')?)?;
    let s = expect(s, ' ')?;
    let zone = s.split(' ').next()?;
    Some((d.and_time(t), zone_of(zone)?))
}

/// PostgreSQL's zone abbreviation: `UTC`, `GMT`, a numeric one (`+02`,
/// `-0530`, `+05:30`), or a name (`CET`): local.
fn zone_of(z: &str) -> Option<Zone> {
    if z.is_empty() {
        return None;
    }
    if matches!(z, "UTC" | "GMT" | "Z" | "UCT") {
        return Some(Zone::Utc);
    }
    if let Some(sign) = z.chars().next().filter(|c| *c == '+' || *c == '-') {
        let rest: String = z[1..].chars().filter(|c| *c != ':').collect();
        let (h, m) = match rest.len() {
            2 => (digits(&rest, 2)?.0, 0),
            4 => (digits(&rest, 2)?.0, digits(&rest[2..], 2)?.0),
            _ => return None,
        };
        let east = (h * 3600 + m * 60) as i32;
        return Some(Zone::Offset(if sign == '-' { -east } else { east }));
    }
    if z.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Some(Zone::Local);
    }
    None
}

/// `2026-11-26  1:32:42 0 [Note] ...`: the hour is space-padded to two
/// characters.
fn mariadb(s: &str) -> Option<NaiveDateTime> {
    let (d, s) = date(s)?;
    let s = expect(s, ' ')?;
    let s = s.strip_prefix(' ').unwrap_or(s);
    let (t, s) = time(s)?;
    expect(s, ' ')?;
    Some(d.and_time(t))
}

/// `1234:M 26 Nov 2026 01:32:42.123 * ...` (`pid:role`; KeyDB puts a
/// thread id in between: `1234:12:M`).
fn redis(s: &str) -> Option<NaiveDateTime> {
    let (who, s) = s.split_once(' ')?;
    let (pid, role) = who.split_once(':')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || role.is_empty() {
        return None;
    }
    let (day, s) = s.split_once(' ')?;
    let (month, s) = s.split_once(' ')?;
    let (year, s) = s.split_once(' ')?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == month)? as u32
        + 1;
    if day.len() > 2 || year.len() != 4 {
        return None;
    }
    let d = NaiveDate::from_ymd_opt(year.parse().ok()?, month, day.parse().ok()?)?;
    let (t, s) = time(s)?;
    expect(s, ' ')?;
    Some(d.and_time(t))
}

/// tracing-subscriber's RFC 3339 time, `2026-11-26T01:32:42.123456Z`, up to
/// the first space.
fn agent(s: &str) -> Option<(NaiveDateTime, Zone)> {
    let (d, s) = date(s)?;
    let (t, s) = time(expect(s, 'T')?)?;
    let zone = s.split(' ').next()?;
    Some((d.and_time(t), zone_of(zone)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Utc};

    /// 2026-11-26 01:32:42.123 UTC.
    const T: i64 = 1_795_656_762_123;

    fn at(family: Family, line: &str) -> Option<i64> {
        line_time_in(family, line.as_bytes(), &Utc)
    }

    #[test]
    fn postgres_lines() {
        let f = Family::Postgres;
        assert_eq!(
            at(f, "2026-11-26 01:32:42.123 UTC [123] LOG:  database system is ready to accept connections"),
            Some(T)
        );
        assert_eq!(at(f, "2026-11-26 01:32:42.123 GMT [1] LOG: x"), Some(T));
        // Numeric zones: 03:32 at +02 is 01:32 UTC.
        assert_eq!(at(f, "2026-11-26 03:32:42.123 +02 [1] LOG: x"), Some(T));
        assert_eq!(at(f, "2026-11-25 20:02:42.123 -0530 [1] LOG: x"), Some(T));
        // %t: no milliseconds.
        assert_eq!(at(f, "2026-11-26 01:32:42 UTC [1] LOG: x"), Some(T - 123));
        // A named zone is the VM's local one.
        let cet = FixedOffset::east_opt(3600).unwrap();
        assert_eq!(
            line_time_in(f, b"2026-11-26 02:32:42.123 CET [1] LOG: x", &cet),
            Some(T)
        );
        // Continuations and what the tools print around the server.
        for line in [
            "\tDETAIL:  Key (id)=(1) already exists.",
            "waiting for server to start.... done",
            "",
            "2026-11-26",
            "2026-13-26 01:32:42.123 UTC [1] LOG: bad month",
            "2026-11-26 25:32:42.123 UTC [1] LOG: bad hour",
            "2026-11-26 01:32:42.123 [1] LOG: no zone",
        ] {
            assert_eq!(at(f, line), None, "{line:?}");
        }
    }

    #[test]
    fn mariadb_lines() {
        let f = Family::Mariadb;
        // The hour is space-padded.
        assert_eq!(
            at(
                f,
                "2026-11-26  1:32:42 0 [Note] mariadbd: ready for connections."
            ),
            Some(T - 123)
        );
        assert_eq!(
            at(f, "2026-11-26 13:32:42 5 [Warning] Aborted connection"),
            Some(T - 123 + 12 * 3_600_000)
        );
        // Local time: 02:32:42 at +01 is 01:32:42 UTC.
        let cet = FixedOffset::east_opt(3600).unwrap();
        assert_eq!(
            line_time_in(f, b"2026-11-26  2:32:42 0 [Note] x", &cet),
            Some(T - 123)
        );
        for line in [
            "Version: '10.11.6-MariaDB-0+deb12u1'  socket: '/x'  port: 3306  Debian 12",
            "---- corral-agent: temporary server on /var/lib (rejoin) ----",
            "2026-11-26 1:32:42",
            "2026-11-26   1:32:42 0 [Note] three spaces",
        ] {
            assert_eq!(at(f, line), None, "{line:?}");
        }
    }

    #[test]
    fn redis_lines() {
        let f = Family::Redis;
        assert_eq!(
            at(
                f,
                "1234:M 26 Nov 2026 01:32:42.123 * Ready to accept connections tcp"
            ),
            Some(T)
        );
        assert_eq!(
            at(
                f,
                "7:C 26 Nov 2026 01:32:42.123 # oO0OoO0OoO0Oo Redis is starting"
            ),
            Some(T)
        );
        // KeyDB's pid:thread:role, and a one-digit day.
        assert_eq!(
            at(f, "99:12:S 6 Nov 2026 01:32:42.123 * x"),
            Some(T - 20 * 86_400_000)
        );
        let cet = FixedOffset::east_opt(3600).unwrap();
        assert_eq!(
            line_time_in(f, b"1:M 26 Nov 2026 02:32:42.123 * x", &cet),
            Some(T)
        );
        for line in [
            "                _._                                                  ",
            "1234:M 26 Foo 2026 01:32:42.123 * bad month",
            "x:M 26 Nov 2026 01:32:42.123 * bad pid",
            "1234:M 26 Nov 2026 01:32:42.123",
        ] {
            assert_eq!(at(f, line), None, "{line:?}");
        }
    }

    #[test]
    fn agent_lines() {
        let f = Family::Agent;
        assert_eq!(
            at(
                f,
                "2026-11-26T01:32:42.123456Z  INFO corral_agent: agent starting"
            ),
            Some(T)
        );
        assert_eq!(at(f, "2026-11-26T02:32:42.123+01:00 WARN x"), Some(T));
        for line in [
            "error: --listen 0.0.0.0:7401 is advertised to the coordinator",
            "2026-11-26 01:32:42.123 UTC [1] LOG: a PostgreSQL line",
            "2026-11-26T01:32:42.123456  INFO no zone",
        ] {
            assert_eq!(at(f, line), None, "{line:?}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let lines: [&[u8]; 6] = [
            b"\xff\xfe\x00binary",
            b"2026-11-26 01:32:4\xc3",
            "2026-11-26 01:32:42.123 UTC [1] LOG: é".as_bytes(),
            b"::::::",
            b"1:",
            &[b'9'; 200],
        ];
        for family in [
            Family::Postgres,
            Family::Mariadb,
            Family::Redis,
            Family::Agent,
        ] {
            for line in lines {
                let _ = line_time_in(family, line, &Utc);
            }
        }
        // A multi-byte character cut at the 64-byte mark still leaves the
        // stamp readable.
        let mut long = b"2026-11-26 01:32:42.123 UTC [1] LOG: ".to_vec();
        while long.len() < 63 {
            long.push(b'x');
        }
        long.extend_from_slice("é".as_bytes());
        assert_eq!(line_time_in(Family::Postgres, &long, &Utc), Some(T));
    }

    #[test]
    fn families_of_engines() {
        assert_eq!(Family::of_engine("postgres"), Some(Family::Postgres));
        assert_eq!(Family::of_engine("mysql"), Some(Family::Mariadb));
        assert_eq!(Family::of_engine("valkey"), Some(Family::Redis));
        assert_eq!(Family::of_engine("oracle"), None);
    }
}
