//! The node's transitions in one place: two tables that the steps consult
//! instead of deciding on their own.
//!
//! [`plan`]: what a step does to the node's data, given what the data is
//! (none, a primary's, a standby's) and what the coordinator asks
//! (be the primary, be a replica, be promoted). `configure.rs` and
//! `promote.rs` carry out the action it names; leaving a cluster
//! (`stop.rs` decommission) always erases, whatever the data.
//!
//! ```text
//!   none ──clone──▶ replica ──promote──▶ primary
//!   none ──initialise / restore──▶ primary
//!   primary ──rewind (or clone again)──▶ replica      (a rejoining old primary)
//!   replica ──erase and clone──▶ replica              (resync)
//! ```
//!
//! [`guard`]: what the firewall does in front of the engine, given the
//! node's role and lease: a primary that replicas must confirm is gated
//! (the kernel closes the port when the lease runs out) and fenced once
//! the lease is ending; everything else is open. `safety.rs` asks it, and
//! `fence.rs` turns the answer into nftables rules.
//!
//! Both are pure: each row has its unit test below.

/// What the node's data directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holds {
    /// No data directory (a new node, or one erased for a resync).
    Nothing,
    /// A primary's data (a primary, or a former one).
    PrimaryData,
    /// A standby's data, set up to follow another node.
    StandbyData,
}

/// What the coordinator asks of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// ConfigureEngine as primary. `initialize`: only a new cluster's first
    /// node may start from empty data; `restore`: from a backup.
    BePrimary { initialize: bool, restore: bool },
    /// ConfigureEngine as replica. `resync`: a resync not yet carried out.
    BeReplica { resync: bool },
    /// Promote. `running`: the engine runs (a stopped replica is not
    /// promoted).
    Promote { running: bool },
}

/// What the step does to the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Leave the data as it is (it already fits) and converge the rest.
    Keep,
    /// Create an empty data directory.
    Initialize,
    /// Fill the empty data directory from a backup.
    Restore,
    /// Copy the data from the upstream.
    Clone,
    /// Erase the data, then copy it from the upstream.
    EraseAndClone,
    /// Make a former primary's data follow the upstream (pg_rewind, or a
    /// fresh clone when that fails).
    Rewind,
    /// Promote the standby (under the lease rules of `safety.rs`).
    Promote,
    /// Change nothing; the text says why and what to do.
    Refuse(&'static str),
}

/// The node's data transitions: one arm per row.
pub(super) fn plan(holds: Holds, step: Step) -> Action {
    use Action::*;
    use Holds::*;
    match (holds, step) {
        (
            Nothing,
            Step::BePrimary {
                initialize: false, ..
            },
        ) => Refuse(
            "this node has no data directory, so it cannot be a primary; only a new \
             cluster's first node is initialised empty",
        ),
        (Nothing, Step::BePrimary { restore: true, .. }) => Restore,
        (Nothing, Step::BePrimary { .. }) => Initialize,
        (StandbyData, Step::BePrimary { .. }) => Refuse(
            "this node is a replica; promote it (corralctl node promote) to make it the primary",
        ),
        (PrimaryData, Step::BePrimary { .. }) => Keep,

        (Nothing, Step::BeReplica { .. }) => Clone,
        (PrimaryData | StandbyData, Step::BeReplica { resync: true }) => EraseAndClone,
        (StandbyData, Step::BeReplica { .. }) => Keep,
        (PrimaryData, Step::BeReplica { .. }) => Rewind,

        (StandbyData, Step::Promote { running: true }) => Promote,
        (StandbyData, Step::Promote { running: false }) => {
            Refuse("this replica's engine is not running; it cannot be promoted")
        }
        (PrimaryData, Step::Promote { .. }) => Keep,
        (Nothing, Step::Promote { .. }) => Refuse(
            "this node holds no data, so it cannot be promoted; resync it (corralctl node \
             resync) or promote another replica",
        ),
    }
}

impl Action {
    /// The error for an action the step at hand does not carry out (the
    /// table never gives one; a bug, reported rather than panicking).
    pub(super) fn unexpected(self, step: Step) -> anyhow::Error {
        anyhow::anyhow!("internal error: the transitions table gave {self:?} for {step:?}")
    }
}

/// What the firewall does in front of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Guard {
    /// The port is open to the allowlist.
    Open,
    /// Open, behind the kernel lease gate: closed when the lease runs out,
    /// agent or no agent.
    Gated,
    /// Closed to clients: the lease is ending or has ended.
    Fenced,
}

/// The node's fence: `primary` (its role as recorded), `confirmed` (it
/// serves replicas that must confirm its lease), `lease_ending` (the lease
/// is within the fence margin of its end, or has none).
pub(super) fn guard(primary: bool, confirmed: bool, lease_ending: bool) -> Guard {
    match (primary, confirmed, lease_ending) {
        (false, _, _) => Guard::Open,
        (true, false, _) => Guard::Open,
        (true, true, false) => Guard::Gated,
        (true, true, true) => Guard::Fenced,
    }
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::Holds::*;
    use super::*;

    fn primary(initialize: bool, restore: bool) -> Step {
        Step::BePrimary {
            initialize,
            restore,
        }
    }

    fn refused(a: Action) -> &'static str {
        match a {
            Refuse(why) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_node_is_made_primary_only_when_the_cluster_is_new() {
        let why = refused(plan(Nothing, primary(false, false)));
        assert!(why.contains("no data directory"), "{why}");
        let why = refused(plan(Nothing, primary(false, true)));
        assert!(why.contains("no data directory"), "{why}");
    }

    #[test]
    fn a_new_clusters_first_node_is_restored_from_a_backup_when_asked() {
        assert_eq!(plan(Nothing, primary(true, true)), Restore);
    }

    #[test]
    fn a_new_clusters_first_node_is_initialised_empty() {
        assert_eq!(plan(Nothing, primary(true, false)), Initialize);
    }

    #[test]
    fn a_replica_is_not_made_primary_by_configure() {
        for (i, r) in [(false, false), (true, false), (true, true)] {
            let why = refused(plan(StandbyData, primary(i, r)));
            assert!(why.contains("promote it"), "{why}");
        }
    }

    #[test]
    fn a_primary_keeps_its_data() {
        for (i, r) in [(false, false), (true, false), (true, true)] {
            assert_eq!(plan(PrimaryData, primary(i, r)), Keep);
        }
    }

    #[test]
    fn an_empty_replica_is_cloned() {
        for resync in [false, true] {
            assert_eq!(plan(Nothing, Step::BeReplica { resync }), Clone);
        }
    }

    #[test]
    fn a_resync_erases_whatever_data_is_there() {
        for holds in [PrimaryData, StandbyData] {
            assert_eq!(plan(holds, Step::BeReplica { resync: true }), EraseAndClone);
        }
    }

    #[test]
    fn a_replica_keeps_its_data() {
        assert_eq!(plan(StandbyData, Step::BeReplica { resync: false }), Keep);
    }

    #[test]
    fn a_former_primary_is_rewound_to_rejoin() {
        assert_eq!(plan(PrimaryData, Step::BeReplica { resync: false }), Rewind);
    }

    #[test]
    fn a_running_replica_is_promoted() {
        assert_eq!(plan(StandbyData, Step::Promote { running: true }), Promote);
    }

    #[test]
    fn a_stopped_replica_is_not_promoted() {
        let why = refused(plan(StandbyData, Step::Promote { running: false }));
        assert!(why.contains("not running"), "{why}");
    }

    #[test]
    fn promoting_a_primary_only_converges_it() {
        for running in [false, true] {
            assert_eq!(plan(PrimaryData, Step::Promote { running }), Keep);
        }
    }

    #[test]
    fn a_node_without_data_is_not_promoted() {
        for running in [false, true] {
            let why = refused(plan(Nothing, Step::Promote { running }));
            assert!(why.contains("holds no data"), "{why}");
        }
    }

    #[test]
    fn a_replica_is_never_fenced() {
        for (c, l) in [(false, false), (false, true), (true, false), (true, true)] {
            assert_eq!(guard(false, c, l), Guard::Open);
        }
    }

    #[test]
    fn a_primary_without_confirming_replicas_stays_open() {
        for l in [false, true] {
            assert_eq!(guard(true, false, l), Guard::Open);
        }
    }

    #[test]
    fn a_primary_holding_its_lease_is_gated() {
        assert_eq!(guard(true, true, false), Guard::Gated);
    }

    #[test]
    fn a_primary_whose_lease_ends_is_fenced() {
        assert_eq!(guard(true, true, true), Guard::Fenced);
    }

    #[test]
    fn the_unexpected_action_is_an_error_naming_it() {
        let e = Keep.unexpected(Step::Promote { running: true });
        assert!(e.to_string().contains("Keep"), "{e}");
    }
}
