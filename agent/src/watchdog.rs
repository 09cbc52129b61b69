//! systemd's readiness and watchdog protocol (`Type=notify`,
//! `WatchdogSec=`): the unit knows when the agent has fenced and listens,
//! and restarts an agent whose guardian stops making progress (hung, or
//! frozen by SIGSTOP). The engine's writability never waits for that
//! restart: the kernel lease gate (firewall::gate) closes at lease end on
//! its own. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Pings systemd's watchdog, at most every quarter of its interval.
pub struct Watchdog {
    every: Option<Duration>,
    last: Mutex<Option<Instant>>,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC` (and `WATCHDOG_PID`, which must be this process
    /// when set), as sd_watchdog_enabled(3) does.
    pub fn from_env() -> Self {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Self::new(interval(
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        ))
    }

    fn new(interval: Option<Duration>) -> Self {
        Watchdog {
            every: interval.map(|i| i / 4),
            last: Mutex::new(None),
        }
    }

    /// Called on every pass of the guardian: proof that the fence is kept.
    pub fn ping(&self) {
        let Some(every) = self.every else { return };
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]) {
            tracing::warn!("telling systemd the agent is alive: {e}");
        }
    }
}

/// The watchdog interval systemd asks for, if it asks this process.
fn interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match pid {
        Some(p) if p.trim().parse::<u32>().ok() != Some(me) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// Tells systemd the agent is up: the fence pass has run and the API listens.
pub fn ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!("telling systemd the agent is ready: {e}");
    }
}

/// Tells systemd the agent is stopping (so a slow stop is not a hang).
pub fn stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_read_as_systemd_sets_it() {
        let s = Some(Duration::from_secs(10));
        assert_eq!(interval(Some("10000000"), None, 7), s);
        assert_eq!(interval(Some("10000000"), Some("7"), 7), s);
        // Meant for another process (a parent that did not unset it).
        assert_eq!(interval(Some("10000000"), Some("8"), 7), None);
        assert_eq!(interval(None, Some("7"), 7), None);
        assert_eq!(interval(Some("0"), None, 7), None);
        assert_eq!(interval(Some("ten"), None, 7), None);
    }

    #[test]
    fn pings_are_spaced_by_a_quarter_of_the_interval() {
        let w = Watchdog::new(Some(Duration::from_secs(40)));
        assert_eq!(w.every, Some(Duration::from_secs(10)));
        w.ping();
        let first = *w.last.lock().unwrap();
        w.ping();
        assert_eq!(*w.last.lock().unwrap(), first, "pinged again at once");
        assert!(Watchdog::new(None).every.is_none());
    }
}
