//! Rate limits for callers without a certificate (new agents enrolling).
//!
//! Each source address has a token bucket: a burst, then a steady rate.
//! Refusals are audited per source at a bounded rate too: the first few in
//! each minute get their own row, the rest are counted and written as one
//! summary row when the minute is over, so a flood adds a few rows a
//! minute, not one per attempt.

use crate::limits::LimitsConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Source addresses tracked at most; past that, the idle ones (full
/// buckets, nothing to report) are forgotten first.
const MAX_SOURCES: usize = 10_000;
const MINUTE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Source {
    tokens: f64,
    refilled: Instant,
    /// The minute of audit rows: when it began, rows written in it, and
    /// refusals counted but not written.
    window: Instant,
    audited: u32,
    suppressed: u64,
}

/// What to write to the audit log for one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum AuditNow {
    /// This refusal, in its own row.
    Row,
    /// Nothing now (counted for the summary).
    Suppressed,
}

pub struct Anonymous {
    config: LimitsConfig,
    sources: Mutex<HashMap<IpAddr, Source>>,
}

impl Anonymous {
    pub fn new(config: LimitsConfig) -> Anonymous {
        Anonymous {
            config,
            sources: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Source>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rate(&self) -> f64 {
        f64::from(self.config.anonymous_per_minute) / 60.0
    }

    /// Takes one attempt from `ip`'s bucket at `now`; Err: how long until
    /// the next one is allowed.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.config.anonymous_burst);
        let rate = self.rate();
        let mut all = self.lock();
        if all.len() >= MAX_SOURCES && !all.contains_key(&ip) {
            all.retain(|_, s| {
                let tokens =
                    s.tokens + now.saturating_duration_since(s.refilled).as_secs_f64() * rate;
                tokens < burst || s.suppressed > 0
            });
            if all.len() >= MAX_SOURCES {
                // Every tracked source is busy: a new one waits its turn.
                return Err(Duration::from_secs(1));
            }
        }
        let s = all.entry(ip).or_insert_with(|| Source {
            tokens: burst,
            refilled: now,
            window: now,
            audited: 0,
            suppressed: 0,
        });
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * rate).min(burst);
        s.refilled = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.tokens) / rate))
        }
    }

    /// A refusal of `ip` at `now`: whether to audit it in a row of its own.
    /// Also returns the summary of the minute that ended, if any refusals
    /// of it were counted and not written.
    pub fn refused(&self, ip: IpAddr, now: Instant) -> (AuditNow, Option<u64>) {
        let mut all = self.lock();
        let Some(s) = all.get_mut(&ip) else {
            return (AuditNow::Row, None);
        };
        let mut summary = None;
        if now.saturating_duration_since(s.window) >= MINUTE {
            summary = Some(std::mem::take(&mut s.suppressed)).filter(|&n| n > 0);
            s.window = now;
            s.audited = 0;
        }
        if s.audited < self.config.audited_refusals_per_minute {
            s.audited += 1;
            (AuditNow::Row, summary)
        } else {
            s.suppressed += 1;
            (AuditNow::Suppressed, summary)
        }
    }

    /// The counted refusals of every source whose minute is over (for the
    /// periodic flush, so a flood that stops is still summarised).
    pub fn due_summaries(&self, now: Instant) -> Vec<(IpAddr, u64)> {
        let mut out = Vec::new();
        for (ip, s) in self.lock().iter_mut() {
            if s.suppressed > 0 && now.saturating_duration_since(s.window) >= MINUTE {
                out.push((*ip, std::mem::take(&mut s.suppressed)));
                s.window = now;
                s.audited = 0;
            }
        }
        out
    }
}

/// The audit text of a summary row.
pub fn summary_text(count: u64) -> String {
    format!("refused: {count} more enrollment attempts from this address in the last minute (not recorded one by one)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Anonymous {
        Anonymous::new(LimitsConfig {
            anonymous_burst: 3,
            anonymous_per_minute: 60,
            audited_refusals_per_minute: 2,
        })
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_apart() {
        let l = limiter();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take(a, t0).is_ok());
        }
        let wait = l.take(a, t0).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(l.take(b, t0).is_ok(), "another source has its own bucket");
        // One a second refills.
        assert!(l.take(a, t0 + Duration::from_millis(1001)).is_ok());
        assert!(l.take(a, t0 + Duration::from_millis(1002)).is_err());
    }

    #[test]
    fn refusals_are_audited_a_few_a_minute_and_the_rest_summarised() {
        let l = limiter();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let _ = l.take(a, t0);
        let mut rows = 0;
        for _ in 0..1000 {
            if l.refused(a, t0).0 == AuditNow::Row {
                rows += 1;
            }
        }
        assert_eq!(rows, 2);
        assert!(l.due_summaries(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(l.due_summaries(t0 + MINUTE), vec![(a, 998)]);
        assert!(l.due_summaries(t0 + MINUTE * 3).is_empty());
        // Or summarised by the next refusal after the minute.
        for _ in 0..5 {
            l.refused(a, t0 + MINUTE);
        }
        assert_eq!(l.refused(a, t0 + MINUTE * 2), (AuditNow::Row, Some(3)));
    }
}
