//! Failover timing shared by the agent and the coordinator.
//!
//! A primary may accept writes only while it holds a lease. The lease is
//! renewed by the coordinator's answer to each heartbeat (or, while the
//! coordinator is unreachable, by every replica confirming the primary) and
//! runs for the cluster's lease length from the moment the renewal was
//! *asked for*. Three durations keep two writable primaries from ever
//! overlapping:
//!
//! - the agent fences its engine [`fence_ahead`] before its lease ends, so
//!   the fence is in place before anyone else could act on the expiry;
//! - the coordinator promotes a replica only [`margin`] after its own,
//!   later, idea of the lease end (it counts from when it *received* the
//!   heartbeat);
//! - a replica that confirmed the primary refuses promotion for the lease
//!   length plus the same margin after it confirmed.
//!
//! The defaults (the `lan` profile) were chosen from measurement on a
//! 2-core machine (docs/failover.md): a heartbeat every 250 ms and a 1 s
//! lease never lapsed under `stress-ng --cpu 2`, nor with 100 ms ± 50 ms of
//! delay and 1 % packet loss on the links between the nodes, and give
//! writes back in about 1.3 s. The `wan` profile is for a coordinator far
//! from its nodes, or links slower or lossier than that.

use std::time::Duration;

/// Default lease length (the `lan` profile).
pub const DEFAULT_LEASE_MS: u32 = 1000;
/// Default heartbeat period of a cluster's agents (the `lan` profile).
pub const DEFAULT_HEARTBEAT_MS: u32 = 250;

/// Named timings: `lan` (the defaults) and `wan`, for nodes far apart or
/// on slow, lossy links: a lease that survives a few seconds of a stalled
/// link, at the price of a failover about four times slower.
pub const PROFILES: &[(&str, u32, u32)] = &[
    ("lan", DEFAULT_LEASE_MS, DEFAULT_HEARTBEAT_MS),
    ("wan", 4000, 1000),
];

/// The lease and heartbeat (ms) of profile `name`; the error names the
/// profiles there are.
pub fn profile(name: &str) -> Result<(u32, u32), String> {
    PROFILES
        .iter()
        .find(|p| p.0 == name)
        .map(|p| (p.1, p.2))
        .ok_or_else(|| {
            let names: Vec<&str> = PROFILES.iter().map(|p| p.0).collect();
            format!(
                "unknown profile {name:?}: use {} (or set lease=DURATION heartbeat=DURATION)",
                names.join(" or ")
            )
        })
}

/// The profile a cluster's timing is, or "custom".
pub fn profile_of(lease_ms: u32, heartbeat_ms: u32) -> &'static str {
    PROFILES
        .iter()
        .find(|p| (p.1, p.2) == (lease_ms, heartbeat_ms))
        .map_or("custom", |p| p.0)
}

/// Bounds an operator may set.
pub const MIN_LEASE_MS: u32 = 1000;
pub const MAX_LEASE_MS: u32 = 60_000;
pub const MIN_HEARTBEAT_MS: u32 = 100;
pub const MAX_HEARTBEAT_MS: u32 = 10_000;
/// A lease must span at least this many heartbeats, so one or two lost
/// heartbeats never cost the primary its lease.
pub const HEARTBEATS_PER_LEASE: u32 = 3;

/// How long before its lease ends an agent fences its engine.
pub fn fence_ahead(lease: Duration) -> Duration {
    lease / 8
}

/// How long after the lease ends (by the coordinator's clock) the
/// coordinator waits before promoting, and how much longer than the lease a
/// replica's confirmation holds.
pub fn margin(lease: Duration) -> Duration {
    lease / 4
}

/// Checks a cluster's timing; the message names the rule broken.
pub fn validate(lease_ms: u32, heartbeat_ms: u32) -> Result<(), String> {
    if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&lease_ms) {
        return Err(format!(
            "lease {lease_ms} ms is outside {MIN_LEASE_MS}..={MAX_LEASE_MS} ms"
        ));
    }
    if !(MIN_HEARTBEAT_MS..=MAX_HEARTBEAT_MS).contains(&heartbeat_ms) {
        return Err(format!(
            "heartbeat interval {heartbeat_ms} ms is outside {MIN_HEARTBEAT_MS}..={MAX_HEARTBEAT_MS} ms"
        ));
    }
    if heartbeat_ms * HEARTBEATS_PER_LEASE > lease_ms {
        return Err(format!(
            "a lease of {lease_ms} ms must span at least {HEARTBEATS_PER_LEASE} heartbeats of \
             {heartbeat_ms} ms: lengthen the lease to {} ms or shorten the heartbeat to {} ms",
            heartbeat_ms * HEARTBEATS_PER_LEASE,
            lease_ms / HEARTBEATS_PER_LEASE
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_timings_are_named() {
        validate(DEFAULT_LEASE_MS, DEFAULT_HEARTBEAT_MS).unwrap();
        assert!(validate(500, 100).unwrap_err().contains("lease 500 ms"));
        assert!(validate(2000, 50)
            .unwrap_err()
            .contains("heartbeat interval 50"));
        assert!(validate(2000, 1000)
            .unwrap_err()
            .contains("at least 3 heartbeats"));
        for (name, lease, heartbeat) in PROFILES {
            validate(*lease, *heartbeat).unwrap();
            assert_eq!(profile(name), Ok((*lease, *heartbeat)));
            assert_eq!(profile_of(*lease, *heartbeat), *name);
        }
        assert_eq!(profile("lan"), Ok((DEFAULT_LEASE_MS, DEFAULT_HEARTBEAT_MS)));
        assert!(profile("fast").unwrap_err().contains("use lan or wan"));
        assert_eq!(profile_of(3000, 500), "custom");
        assert_eq!(margin(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(
            fence_ahead(Duration::from_secs(2)),
            Duration::from_millis(250)
        );
    }
}
