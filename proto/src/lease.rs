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
//! The defaults were chosen from measurement on a 2-core machine under
//! `stress-ng --cpu 2` (docs/failover.md): a heartbeat every 500 ms and a
//! 2 s lease never lapsed under load, and give writes back in under 3 s.

use std::time::Duration;

/// Default lease length.
pub const DEFAULT_LEASE_MS: u32 = 2000;
/// Default heartbeat period of a cluster's agents.
pub const DEFAULT_HEARTBEAT_MS: u32 = 500;

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
        assert_eq!(margin(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(
            fence_ahead(Duration::from_secs(2)),
            Duration::from_millis(250)
        );
    }
}
