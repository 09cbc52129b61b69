//! The live view of the fleet, rebuilt from heartbeats.
//!
//! Nothing here is persisted: after a restart every node is `unknown` until
//! its agent's next heartbeat, and the coordinator gives every node a grace
//! period of three heartbeat intervals before it may call any node `down`
//! (DESIGN.md: no failover storm after a restart).

use corral_proto::pb;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many missed heartbeat intervals make a node down.
pub const MISSED_HEARTBEATS: u32 = 3;

/// The interval assumed for a node that has not yet reported its own.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Live {
    /// When the last heartbeat arrived, by this process's monotonic clock.
    pub last_seen: Instant,
    /// The same moment in wall-clock time, for display.
    pub last_seen_ms: i64,
    /// The agent's own heartbeat period.
    pub interval: Duration,
    pub address: String,
    /// The address the heartbeat came from, as this coordinator sees it.
    pub source: Option<std::net::IpAddr>,
    pub metrics: pb::Metrics,
    pub engine: pb::EngineStatus,
    /// When `engine` was received (a heartbeat, or a command's answer): its
    /// relative figures (check age, confirmation time left) count from here.
    pub engine_at: Instant,
}

impl Live {
    /// When the engine last answered its agent's health check, by this
    /// process's clock (its agent's "check age" counted from receipt);
    /// None if it never did.
    pub fn checked_at(&self) -> Option<Instant> {
        if self.engine.checked_age_ms == u32::MAX {
            return None;
        }
        self.engine_at
            .checked_sub(Duration::from_millis(u64::from(self.engine.checked_age_ms)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Up,
    Down,
    /// No heartbeat since this coordinator started, still within grace.
    Unknown,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Up => "up",
            Liveness::Down => "down",
            Liveness::Unknown => "unknown",
        }
    }
}

/// Pure liveness rule, kept apart from the clock so it can be table-tested.
pub fn liveness(started: Instant, live: Option<(Instant, Duration)>, now: Instant) -> Liveness {
    match live {
        Some((seen, interval)) => {
            if now.saturating_duration_since(seen) > interval * MISSED_HEARTBEATS {
                Liveness::Down
            } else {
                Liveness::Up
            }
        }
        None if now.saturating_duration_since(started) > DEFAULT_INTERVAL * MISSED_HEARTBEATS => {
            Liveness::Down
        }
        None => Liveness::Unknown,
    }
}

pub struct Fleet {
    started: Instant,
    nodes: Mutex<HashMap<String, Live>>,
    /// Until when the leases the coordinator granted each node may run
    /// (receipt of the heartbeat it answered plus the length granted; never
    /// moves backwards, whatever order answers finish in).
    grants: Mutex<HashMap<String, Instant>>,
    /// Per cluster, in sync mode: the term this process watched from its
    /// start, and the replicas seen as synchronous standbys of its primary
    /// in that term (the only ones that may hold acknowledged commits).
    ackers: Mutex<HashMap<String, Ackers>>,
}

/// Replicas that may have acknowledged commits in a term.
#[derive(Debug, Clone, Default)]
pub struct Ackers {
    pub term: u64,
    pub nodes: std::collections::BTreeSet<String>,
    /// The primary reported a standby whose part it could not tell (a
    /// MariaDB primary with semi-sync and plain replicas at once counts
    /// semi-sync clients, not which replicas they are): any replica may
    /// hold acknowledged commits.
    pub unknown: bool,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Fleet {
        Fleet {
            started: Instant::now(),
            nodes: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
            ackers: Mutex::new(HashMap::new()),
        }
    }

    /// When this coordinator started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A lease granted to `node` that may run until `until` (by this
    /// process's clock: receipt of the heartbeat plus the length granted).
    pub fn record_grant(&self, node: &str, until: Instant) {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let end = grants.entry(node.to_string()).or_insert(until);
        *end = (*end).max(until);
    }

    /// Until when a lease of `node` may run: the end of the last one this
    /// process granted, and no earlier than `floor` (what a previous
    /// process may have granted just before it stopped; see
    /// [`crate::failover::monitor`]).
    pub fn lease_until(&self, node: &str, floor: Instant) -> Instant {
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
            .unwrap_or(floor)
            .max(floor)
    }

    /// Until when a lease of `node`, a member of cluster `c`, may run: see
    /// [`Fleet::lease_until`]. The floor is what a previous coordinator
    /// process may have granted just before this one started: the
    /// cluster's lease from this process's start, or the previous lease
    /// length if the lease was ever changed (a lease is never shortened
    /// once granted). Both count from this process's start by the
    /// monotonic clock: when the change was made is written in wall-clock
    /// time, and a clock stepped forward would make it look old enough to
    /// ignore while a grant of the old length still runs. Grants made by
    /// this process are in [`Fleet::record_grant`] with their own length.
    pub fn lease_until_of(&self, node: &str, c: &crate::store::ClusterRow) -> Instant {
        let mut floor = self.started + c.lease();
        if c.prev_lease_ms > 0 {
            floor = floor.max(self.started + Duration::from_millis(u64::from(c.prev_lease_ms)));
        }
        self.lease_until(node, floor)
    }

    /// The term of `cluster` starts now, watched by this process from its
    /// start: from here on, only replicas seen as synchronous standbys may
    /// hold acknowledged commits.
    pub fn term_started(&self, cluster: &str, term: u64) {
        self.ackers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                cluster.to_string(),
                Ackers {
                    term,
                    nodes: Default::default(),
                    unknown: false,
                },
            );
    }

    /// The primary of `cluster` in `term` reports its standbys as (name,
    /// sync state): `sync` and `quorum` ones may acknowledge commits; a
    /// `potential` one means it cannot tell which do (see [`Ackers`]).
    pub fn saw_sync_standbys<'a>(
        &self,
        cluster: &str,
        term: u64,
        standbys: impl Iterator<Item = (&'a str, &'a str)>,
    ) {
        let mut all = self.ackers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = all.get_mut(cluster).filter(|a| a.term == term) {
            for (name, state) in standbys {
                match state {
                    "sync" | "quorum" => {
                        a.nodes.insert(name.to_string());
                    }
                    "potential" => a.unknown = true,
                    _ => {}
                }
            }
        }
    }

    /// The replicas that may hold acknowledged commits of `term`, when this
    /// process watched the whole term and the primary always said which;
    /// None when it cannot tell (it started during the term, or a primary
    /// reported a `potential` standby), which means "any replica may".
    pub fn ackers(&self, cluster: &str, term: u64) -> Option<std::collections::BTreeSet<String>> {
        self.ackers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cluster)
            .filter(|a| a.term == term && !a.unknown)
            .map(|a| a.nodes.clone())
    }

    /// Records a heartbeat; returns the previous entry, if any.
    pub fn record(&self, node: &str, live: Live) -> Option<Live> {
        self.lock().insert(node.to_string(), live)
    }

    /// Drops everything known of a node that was forgotten.
    pub fn forget(&self, node: &str) {
        self.lock().remove(node);
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    pub fn get(&self, node: &str) -> Option<Live> {
        self.lock().get(node).cloned()
    }

    /// A node's last metrics sample, without copying the rest.
    pub fn metrics_of(&self, node: &str) -> Option<pb::Metrics> {
        self.lock().get(node).map(|l| l.metrics)
    }

    /// A node's agent address and the address its heartbeats come from,
    /// without copying the rest of what it reported (every heartbeat asks
    /// this of every member of its cluster).
    pub fn contact(&self, node: &str) -> Option<(String, Option<std::net::IpAddr>)> {
        self.lock().get(node).map(|l| (l.address.clone(), l.source))
    }

    /// Replaces a node's engine status with a fresher one (an agent's answer
    /// to a command), so views do not lag until the next heartbeat.
    pub fn set_engine(&self, node: &str, engine: pb::EngineStatus) {
        if let Some(live) = self.lock().get_mut(node) {
            live.engine = engine;
            live.engine_at = Instant::now();
        }
    }

    pub fn liveness_of(&self, node: &str, now: Instant) -> Liveness {
        let live = self.lock().get(node).map(|l| (l.last_seen, l.interval));
        liveness(self.started, live, now)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// "10.0.0.1:7401" -> "10.0.0.1"; "[fd31::1]:7401" -> "fd31::1".
pub fn host_of(address: &str) -> &str {
    match address.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_step_does_not_shorten_the_lease_floor_after_a_lease_change() {
        let f = Fleet::new();
        let mut c = crate::store::ClusterRow {
            name: "c1".into(),
            engine: "postgres".into(),
            mode: "replicated".into(),
            state: "ready".into(),
            port: 5432,
            database: "postgres".into(),
            admin_user: "admin".into(),
            admin_password_enc: Vec::new(),
            created_at_ms: 0,
            sync: false,
            termination_protection: false,
            replication_password_enc: None,
            term: 1,
            auto_failover: true,
            lease_ms: 10_000,
            heartbeat_ms: 500,
            prev_lease_ms: 0,
            lease_changed_at_ms: 0,
            allowlist_version: 0,
        };
        // Shortened to 2 s by a previous process just now, and then the
        // wall clock is stepped an hour forward: by the wall clock the
        // change is an hour old, yet a 10 s grant may still run.
        c.set_lease(2_000, corral_proto::now_ms() - 3_600_000);
        let until = f.lease_until_of("n1", &c);
        assert!(
            until >= f.started() + Duration::from_millis(10_000),
            "the floor must be the previous 10 s lease from this start, got {:?}",
            until - f.started()
        );
        // A grant of this process counts from its own receipt.
        let later = f.started() + Duration::from_secs(30);
        f.record_grant("n1", later);
        assert_eq!(f.lease_until_of("n1", &c), later);
    }

    #[test]
    fn liveness_table() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let ms = Duration::from_millis;
        // (heartbeat seen at, interval, now, expected)
        let cases = [
            (None, s, t0 + ms(100), Liveness::Unknown),
            (None, s, t0 + ms(2900), Liveness::Unknown),
            (None, s, t0 + ms(3100), Liveness::Down),
            (Some(t0), s, t0 + ms(2999), Liveness::Up),
            (Some(t0), s, t0 + ms(3000), Liveness::Up),
            (Some(t0), s, t0 + ms(3001), Liveness::Down),
            (Some(t0), ms(200), t0 + ms(601), Liveness::Down),
            (Some(t0 + ms(5000)), s, t0 + ms(5500), Liveness::Up),
        ];
        for (seen, interval, now, want) in cases {
            assert_eq!(
                liveness(t0, seen.map(|s| (s, interval)), now),
                want,
                "{seen:?} {now:?}"
            );
        }
    }

    #[test]
    fn ackers_are_known_only_while_the_primary_says_which_standbys_acknowledge() {
        let f = Fleet::new();
        assert_eq!(f.ackers("c", 2), None, "a term not watched from its start");
        f.term_started("c", 2);
        f.saw_sync_standbys("c", 2, [("vm2", "quorum"), ("vm3", "async")].into_iter());
        assert_eq!(f.ackers("c", 2), Some(["vm2".to_string()].into()));
        f.saw_sync_standbys("c", 1, [("vm3", "sync")].into_iter());
        assert_eq!(
            f.ackers("c", 2),
            Some(["vm2".to_string()].into()),
            "old term"
        );
        // A MariaDB primary with a semi-sync and a plain replica labels
        // both "potential": any replica may hold acknowledged commits.
        f.saw_sync_standbys(
            "c",
            2,
            [("vm2", "potential"), ("vm3", "potential")].into_iter(),
        );
        assert_eq!(f.ackers("c", 2), None);
        f.term_started("c", 3);
        assert_eq!(f.ackers("c", 3), Some(Default::default()));
    }
}
