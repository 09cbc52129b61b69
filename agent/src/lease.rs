//! The primary's lease and a replica's confirmation of its primary, as a
//! plain state machine over the boot clock, so the rules are table-tested
//! without time passing (DESIGN.md, "Safety model for failover").
//!
//! - A primary holds a lease until a moment on its own clock. The
//!   coordinator renews it with its answer to a heartbeat, or, while the
//!   coordinator is away, a round in which *every* replica confirmed the
//!   primary renews it. Either way the lease counts from when the renewal
//!   was asked for, never from when the answer arrived.
//! - A primary serving replicas whose lease is about to end is fenced (see
//!   [`crate::engine`]): the fence goes up [`corral_proto::lease::fence_ahead`]
//!   before the end, so it is in place before anyone may act on the expiry.
//! - A replica that confirmed its primary refuses to be promoted until the
//!   confirmation has expired.
//!
//! Times are on CLOCK_BOOTTIME: monotonic (NTP or `date` never move it) and,
//! unlike CLOCK_MONOTONIC, counting the time a VM spent suspended: a VM
//! paused for a minute wakes up with its lease expired, as the rest of the
//! cluster sees it.

use serde::{Deserialize, Serialize};
use std::ops::{Add, Sub};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A moment on CLOCK_BOOTTIME.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BootTime(pub Duration);

impl BootTime {
    pub fn now() -> BootTime {
        // CLOCK_BOOTTIME cannot fail on Linux; fall back to zero (which
        // reads as "every lease expired") rather than panic.
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| BootTime(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)))
            .unwrap_or(BootTime(Duration::ZERO))
    }

    /// How long until `later`; zero when it has passed.
    pub fn until(self, later: BootTime) -> Duration {
        later.0.saturating_sub(self.0)
    }
}

impl Add<Duration> for BootTime {
    type Output = BootTime;
    fn add(self, d: Duration) -> BootTime {
        BootTime(self.0 + d)
    }
}

impl Sub<Duration> for BootTime {
    type Output = BootTime;
    fn sub(self, d: Duration) -> BootTime {
        BootTime(self.0.saturating_sub(d))
    }
}

/// What renewed a lease last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Coordinator,
    Replicas,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Coordinator => "coordinator",
            Source::Replicas => "replicas",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Primary: when the lease ends, and what renewed it last.
    pub until: Option<BootTime>,
    pub source: Option<Source>,
    /// Replica: the primary it confirmed last, and until when that keeps it
    /// from being promoted.
    pub confirmed: Option<(String, BootTime)>,
}

impl Lease {
    /// A renewal asked for at `asked_at`, for `len`. Never shortens the lease.
    pub fn grant(&mut self, asked_at: BootTime, len: Duration, source: Source) {
        let end = asked_at + len;
        if self.until.is_none_or(|u| end >= u) {
            self.until = Some(end);
            self.source = Some(source);
        }
    }

    /// The coordinator said this node is not (or no longer) the primary.
    pub fn revoke(&mut self) {
        self.until = None;
        self.source = None;
    }

    pub fn held(&self, now: BootTime) -> bool {
        self.until.is_some_and(|u| u > now)
    }

    pub fn remaining(&self, now: BootTime) -> Duration {
        self.until.map(|u| now.until(u)).unwrap_or_default()
    }

    /// Whether a primary serving replicas must be fenced at `now`: its lease
    /// ends within `ahead` (or it has none).
    pub fn must_fence(&self, now: BootTime, ahead: Duration) -> bool {
        self.until.is_none_or(|u| u <= now + ahead)
    }

    /// A replica confirms `primary` at `now`; it refuses promotion for
    /// `hold`. Never shortens a confirmation already given (the lease
    /// length may have been shortened since, while the longer lease runs).
    pub fn confirm(&mut self, primary: &str, now: BootTime, hold: Duration) {
        let until = self
            .confirmed
            .as_ref()
            .map(|(_, u)| *u)
            .filter(|u| *u > now + hold)
            .unwrap_or(now + hold);
        self.confirmed = Some((primary.to_string(), until));
    }

    /// The confirmation still in force at `now`, and for how long.
    pub fn confirmation(&self, now: BootTime) -> Option<(&str, Duration)> {
        self.confirmed
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(p, until)| (p.as_str(), now.until(*until)))
    }
}

/// What `lease.json` holds, so that restarting (or upgrading) the agent of a
/// primary neither fences it nor forgets a lease it holds: valid only within
/// the same boot, since the boot clock starts again at zero.
#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    boot_id: String,
    lease: Lease,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("lease.json")
}

/// This boot's id (a new one at every boot of the machine), read once.
pub fn boot_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// The size `lease.json` is written in: a record padded with spaces to it
/// (JSON ignores them), so a shorter record always covers a longer one.
const RECORD: usize = 1024;

/// Saves `lease` for an agent restarted within this boot. It happens at
/// every renewal (several times a second), so it costs one system call:
/// the record is written in place over the previous one with a single
/// `pwrite` of a fixed size, into a file kept open. No temporary file and
/// no rename (which ext4 follows with a flush of the file's data), and no
/// fsync: the file only matters within this boot (after a crash of the
/// machine it is ignored), and a write that waited for the disk could
/// delay the fence. A process cannot die halfway through one write, and
/// the next agent reads the file only once this one is gone, so it never
/// sees half a record; saves are serialised, so two never mix.
pub fn save(state_dir: &Path, lease: &Lease) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    static OPEN: std::sync::Mutex<Vec<(PathBuf, std::fs::File)>> =
        std::sync::Mutex::new(Vec::new());
    let p = Persisted {
        boot_id: boot_id(),
        lease: lease.clone(),
    };
    let mut record = serde_json::to_string(&p)?.into_bytes();
    record.resize(record.len().next_multiple_of(RECORD), b' ');
    let path = path(state_dir);
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    // A file deleted under us (its directory erased) is opened anew.
    open.retain(|(p, f)| {
        use std::os::unix::fs::MetadataExt;
        *p != path || f.metadata().is_ok_and(|m| m.nlink() > 0)
    });
    let fresh = !open.iter().any(|(p, _)| *p == path);
    if fresh {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        open.push((path.clone(), file));
    }
    let file = open
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, f)| f)
        .ok_or_else(|| anyhow::anyhow!("{} is not open", path.display()))?;
    file.write_all_at(&record, 0)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    if fresh {
        // Whatever an earlier agent left beyond this record goes.
        file.set_len(record.len() as u64)
            .map_err(|e| anyhow::anyhow!("sizing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The lease saved by an earlier agent of this boot, if any.
pub fn load(state_dir: &Path) -> Lease {
    let Ok(text) = std::fs::read_to_string(path(state_dir)) else {
        return Lease::default();
    };
    match serde_json::from_str::<Persisted>(&text) {
        Ok(p) if !p.boot_id.is_empty() && p.boot_id == boot_id() => p.lease,
        Ok(_) => Lease::default(),
        Err(e) => {
            tracing::warn!("ignoring an unreadable lease.json: {e}");
            Lease::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> BootTime {
        BootTime(Duration::from_millis(ms))
    }
    const S2: Duration = Duration::from_secs(2);
    const AHEAD: Duration = Duration::from_millis(250);

    #[test]
    fn lease_table() {
        // (steps, now, held, must_fence)
        type Step = fn(&mut Lease);
        let cases: &[(&str, &[Step], u64, bool, bool)] = &[
            ("never granted", &[], 0, false, true),
            (
                "granted at 1000",
                &[|l| l.grant(at(1000), S2, Source::Coordinator)],
                2000,
                true,
                false,
            ),
            (
                "inside fence-ahead",
                &[|l| l.grant(at(1000), S2, Source::Coordinator)],
                2800,
                true,
                true,
            ),
            (
                "expired",
                &[|l| l.grant(at(1000), S2, Source::Coordinator)],
                3000,
                false,
                true,
            ),
            (
                "an older renewal arriving late does not shorten it",
                &[
                    |l| l.grant(at(1500), S2, Source::Replicas),
                    |l| l.grant(at(1000), S2, Source::Coordinator),
                ],
                3200,
                true,
                false,
            ),
            (
                "revoked",
                &[
                    |l| l.grant(at(1000), S2, Source::Coordinator),
                    |l| l.revoke(),
                ],
                1100,
                false,
                true,
            ),
        ];
        for (name, steps, now, held, fence) in cases {
            let mut l = Lease::default();
            for s in *steps {
                s(&mut l);
            }
            assert_eq!(l.held(at(*now)), *held, "{name}: held");
            assert_eq!(l.must_fence(at(*now), AHEAD), *fence, "{name}: fence");
        }
    }

    #[test]
    fn the_latest_renewal_names_its_source() {
        let mut l = Lease::default();
        l.grant(at(1000), S2, Source::Coordinator);
        l.grant(at(1500), S2, Source::Replicas);
        assert_eq!(l.source, Some(Source::Replicas));
        assert_eq!(l.remaining(at(3000)), Duration::from_millis(500));
    }

    #[test]
    fn a_confirmation_is_never_shortened() {
        let mut l = Lease::default();
        l.confirm("vm1", at(1000), Duration::from_millis(12_500));
        l.confirm("vm1", at(1500), Duration::from_millis(2500));
        assert_eq!(
            l.confirmation(at(5000)),
            Some(("vm1", Duration::from_millis(8500)))
        );
    }

    #[test]
    fn confirmations_expire() {
        let mut l = Lease::default();
        assert!(l.confirmation(at(0)).is_none());
        l.confirm("vm1", at(1000), Duration::from_millis(2500));
        assert_eq!(
            l.confirmation(at(2000)),
            Some(("vm1", Duration::from_millis(1500)))
        );
        assert!(l.confirmation(at(3500)).is_none());
    }

    #[test]
    fn a_saved_lease_survives_an_agent_restart_in_the_same_boot() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Lease::default());
        let mut l = Lease::default();
        l.grant(BootTime::now(), S2, Source::Coordinator);
        save(dir.path(), &l).unwrap();
        assert_eq!(load(dir.path()), l);
        // A later, shorter record replaces it whole.
        let shorter = Lease::default();
        save(dir.path(), &shorter).unwrap();
        assert_eq!(load(dir.path()), shorter);
        save(dir.path(), &l).unwrap();
        assert_eq!(load(dir.path()), l);
        // From another boot: ignored.
        let other = serde_json::json!({"boot_id": "another-boot", "lease": l});
        std::fs::write(path(dir.path()), other.to_string()).unwrap();
        assert_eq!(load(dir.path()), Lease::default());
    }
}
