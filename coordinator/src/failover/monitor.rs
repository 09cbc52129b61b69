//! Watches the fleet: turns missing heartbeats into events on the record,
//! and judges every replicated cluster for failover ([`run_failover`]).
//!
//! Every 200 ms, each enrolled node's liveness is computed by the pure rule in
//! [`crate::fleet::liveness`]; a change is written as a `node_down` or
//! `node_up` event. The first pass after a start writes nothing for nodes
//! still in their grace period.

use crate::failover::{self, ClusterView, Decision, NodeView, Wait};
use crate::fleet::Liveness;
use crate::Coordinator;
use crate::{ops, store};
use corral_proto::{now_ms, pb};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub async fn run(coord: Arc<Coordinator>) {
    let mut last: HashMap<String, Liveness> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let nodes = match coord.store.read(store::list_nodes) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "monitor: listing nodes");
                continue;
            }
        };
        let now = Instant::now();
        for node in nodes {
            let state = coord.fleet.liveness_of(&node.id, now);
            let before = last.insert(node.id.clone(), state);
            let (kind, message) = match (before, state) {
                (Some(Liveness::Up), Liveness::Down)
                | (Some(Liveness::Unknown), Liveness::Down) => {
                    let silent = coord
                        .fleet
                        .get(&node.id)
                        .map(|l| {
                            format!(
                                "no heartbeat for {:.1}s",
                                now.duration_since(l.last_seen).as_secs_f64()
                            )
                        })
                        .unwrap_or_else(|| "no heartbeat since the coordinator started".into());
                    ("node_down", format!("node {} is down: {silent}", node.id))
                }
                (Some(Liveness::Down), Liveness::Up) => {
                    ("node_up", format!("node {} is up again", node.id))
                }
                _ => continue,
            };
            tracing::warn!(node = %node.id, "{message}");
            let cluster = node.cluster.clone().unwrap_or_default();
            if let Err(e) = coord.store.read(|c| {
                store::insert_event(
                    c,
                    corral_proto::now_ms(),
                    &node.id,
                    &cluster,
                    kind,
                    &message,
                    None,
                )
            }) {
                tracing::error!(error = %e, "monitor: recording {kind}");
            }
        }
    }
}

/// The failover monitor's last judgement of each cluster, as a sentence
/// (shown by `corralctl cluster show`). In memory: rebuilt within one pass.
#[derive(Default)]
pub struct Judgements(Mutex<HashMap<String, String>>);

impl Judgements {
    pub fn get(&self, cluster: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cluster)
            .cloned()
    }

    fn set(&self, cluster: &str, text: String) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cluster.to_string(), text);
    }
}

/// How often each cluster is judged.
const FAILOVER_EVERY: Duration = Duration::from_millis(100);
/// A node whose rejoin failed is not retried before this.
const REJOIN_RETRY: Duration = Duration::from_secs(30);
/// A primary of record whose promotion failed is promoted again at most
/// this often (writes are down meanwhile: retry soon, but not in a loop).
const REPROMOTE_RETRY: Duration = Duration::from_secs(5);

/// The failover monitor: every 100 ms, and at the moment a lease (plus the
/// margin) or a confirmation ends, judges each replicated cluster with
/// [`failover::decide`] and acts on the outcome: a failover operation, an
/// alarm event when the primary is lost and nothing may (or, with
/// auto-failover off, will) be promoted, and a rejoin operation for a
/// replica of record that runs as a primary or follows the wrong node.
/// Each change of judgement is logged once.
pub async fn run_failover(coord: Arc<Coordinator>) {
    let mut memory = Memory::default();
    loop {
        let mut next = tokio::time::Instant::now() + FAILOVER_EVERY;
        let clusters = match coord.store.read(store::list_clusters) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "failover monitor: listing clusters");
                tokio::time::sleep_until(next).await;
                continue;
            }
        };
        for c in clusters
            .iter()
            .filter(|c| c.mode == "primary-replica" && c.state == "running")
        {
            match judge(&coord, c, &mut memory) {
                // Just after the moment, so the lease has ended by then.
                Ok(Some(due)) => next = next.min((due + Duration::from_millis(1)).into()),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(cluster = %c.name, error = %format!("{e:#}"), "failover monitor")
                }
            }
        }
        tokio::time::sleep_until(next).await;
    }
}

/// What the monitor remembers between passes, per cluster (and per node
/// for rejoins).
#[derive(Default)]
struct Memory {
    /// The kind of the last judgement, to log changes once.
    last: HashMap<String, String>,
    /// Since when the primary is judged confirmed by its replicas only,
    /// and whether that was recorded as an event.
    unreachable: HashMap<String, (Instant, bool)>,
    /// When a rejoin was last started for a node.
    rejoins: HashMap<String, Instant>,
    /// When a promotion was last started again for a cluster.
    repromotions: HashMap<String, Instant>,
}

/// Judges `c` and acts; answers when the judgement may next change by
/// itself ([`failover::next_change`]).
fn judge(
    coord: &Arc<Coordinator>,
    c: &store::ClusterRow,
    memory: &mut Memory,
) -> anyhow::Result<Option<Instant>> {
    let Memory {
        last,
        unreachable,
        rejoins,
        repromotions,
    } = memory;
    let nodes = coord.store.read(|s| store::nodes_of_cluster(s, &c.name))?;
    let op = coord
        .store
        .read(|s| store::holding_operation_of(s, &c.name))?;
    let now = Instant::now();
    // A rejoin (the monitor's own) does not hold failover decisions back:
    // a failover preempts it.
    let holding = op
        .as_ref()
        .filter(|o| o.kind != ops::REJOIN)
        .map(|o| o.kind.clone());
    let Some(view) = view_of(coord, c, &nodes, holding, now) else {
        return Ok(None);
    };
    let decision = failover::decide(&view, now);
    let due = failover::next_change(&view, now);
    coord.judgements.set(&c.name, decision.to_string());
    let kind = decision.kind();
    if last.get(&c.name) != Some(&kind) {
        last.insert(c.name.clone(), kind);
        match &decision {
            Decision::Healthy { .. } | Decision::Wait { .. } => {
                tracing::info!(cluster = %c.name, "{decision}")
            }
            _ => tracing::warn!(cluster = %c.name, "{decision}"),
        }
        if decision.is_alarm() {
            let kind = match decision {
                Decision::Off { .. } => "failover_needed",
                _ => "failover_blocked",
            };
            let text = decision.to_string();
            coord.store.read(|s| {
                store::insert_event(s, now_ms(), &view.primary.id, &c.name, kind, &text, None)
            })?;
        }
    }
    // A primary that lost the coordinator but keeps its lease through its
    // replicas is worth an event once it has done so for a whole lease
    // (right after a primary dies, its replicas' last confirmations also
    // linger for a moment: no event for that).
    let confirmed = matches!(
        &decision,
        Decision::Wait {
            why: Wait::ConfirmedBy { .. },
            ..
        }
    );
    let since = unreachable.entry(c.name.clone()).or_insert((now, false));
    if !confirmed {
        *since = (now, false);
    } else if !since.1 && now.duration_since(since.0) > c.lease() {
        since.1 = true;
        let text = decision.to_string();
        coord.store.read(|s| {
            store::insert_event(
                s,
                now_ms(),
                &view.primary.id,
                &c.name,
                "primary_unreachable",
                &text,
                None,
            )
        })?;
    }
    let acted = match decision {
        Decision::Failover {
            old,
            candidate,
            behind,
            unit,
            lease_ended,
        } => start_failover(coord, c, &old, &candidate, (behind, unit), lease_ended, now),
        Decision::Healthy { primary } if op.is_none() => {
            rejoin_strays(coord, c, &nodes, &primary, rejoins)
        }
        Decision::Repromote { primary } if op.is_none() => {
            if repromotions
                .get(&c.name)
                .is_some_and(|t| t.elapsed() < REPROMOTE_RETRY)
            {
                return Ok(due);
            }
            repromotions.insert(c.name.clone(), now);
            start_repromotion(coord, c, &primary)
        }
        _ => Ok(()),
    };
    acted.map(|()| due)
}

/// Starts promoting `primary`, the primary of record running as a standby,
/// again: a promote operation, which finds it the primary of record, lets
/// every other lease run out, promotes it and points the replicas at it.
fn start_repromotion(
    coord: &Arc<Coordinator>,
    c: &store::ClusterRow,
    primary: &str,
) -> anyhow::Result<()> {
    let why = format!(
        "detected: primary {primary} of record runs as a standby (its promotion did not \
         complete); promoting it again"
    );
    let params = serde_json::json!({ "node": primary, "force": false });
    let started = start_unless_busy(coord, &c.name, ops::PROMOTE, params, &why, |tx, t| {
        store::insert_event(tx, t, primary, &c.name, "promotion_retried", &why, None)?;
        store::insert_audit(
            tx,
            ops::AUTO_FAILOVER,
            "cluster.failover",
            &format!("cluster {} promote {primary} again", c.name),
            "started",
        )
    })?;
    if let Some(id) = started {
        tracing::warn!(cluster = %c.name, op = %id, "{why}");
    }
    Ok(())
}

/// Records a `kind` operation the monitor starts on `cluster` (`why` its
/// first log line, `also` what else the same transaction writes) and runs
/// it, unless an operation already holds the cluster. Its id when started.
fn start_unless_busy(
    coord: &Arc<Coordinator>,
    cluster: &str,
    kind: &str,
    params: serde_json::Value,
    why: &str,
    also: impl FnOnce(&rusqlite::Transaction, i64) -> anyhow::Result<()>,
) -> anyhow::Result<Option<String>> {
    let id = ops::new_id();
    let started = coord.store.tx(|tx| {
        if store::holding_operation_of(tx, cluster)?.is_some() {
            return Ok(false);
        }
        let t = now_ms();
        store::insert_operation(
            tx,
            &store::OperationRow {
                id: id.clone(),
                cluster: cluster.into(),
                kind: kind.into(),
                state: store::op_state::PENDING.into(),
                params: params.to_string(),
                requested_by: ops::AUTO_FAILOVER.into(),
                created_at_ms: t,
                updated_at_ms: t,
                error: String::new(),
            },
        )?;
        store::log_operation(tx, &id, why)?;
        also(tx, t)?;
        Ok(true)
    })?;
    if !started {
        return Ok(None);
    }
    ops::spawn(coord.clone(), id.clone());
    Ok(Some(id))
}

/// What the coordinator knows of `c` at `now`; None without a primary of
/// record.
fn view_of(
    coord: &Coordinator,
    c: &store::ClusterRow,
    nodes: &[store::NodeRow],
    operation: Option<String>,
    now: Instant,
) -> Option<ClusterView> {
    let node_view = |n: &store::NodeRow| -> NodeView {
        let live = coord.fleet.get(&n.id);
        let engine = live.as_ref().map(|l| l.engine.clone()).unwrap_or_default();
        let rep = engine.replication.clone().unwrap_or_default();
        let lease = engine.lease.clone().unwrap_or_default();
        // When the engine's figures were received: relative ones (check
        // age, confirmation left) count from there.
        let at = live.as_ref().map(|l| l.engine_at);
        NodeView {
            id: n.id.clone(),
            up: coord.fleet.liveness_of(&n.id, now) == Liveness::Up,
            healthy: engine.state == pb::EngineState::Running as i32 && engine.healthy,
            in_recovery: rep.in_recovery,
            streaming: rep.streaming,
            upstream: engine.upstream.clone(),
            upstream_lsn: rep.upstream_lsn,
            checked_at: live.as_ref().and_then(crate::fleet::Live::checked_at),
            received: if rep.in_recovery {
                rep.receive_lsn.max(rep.lsn)
            } else {
                rep.lsn
            },
            replayed: rep.lsn,
            lease_until: coord.fleet.lease_until_of(&n.id, c),
            confirms: at.filter(|_| !lease.confirmed_primary.is_empty()).map(|s| {
                (
                    lease.confirmed_primary.clone(),
                    s + Duration::from_millis(u64::from(lease.confirmation_remaining_ms)),
                )
            }),
        }
    };
    let primary = nodes.iter().find(|n| n.role == "primary")?;
    let lease = c.lease();
    // Redis's `sync` (min-replicas-to-write) acknowledges nothing
    // synchronously: no replica is known to hold every acknowledged write,
    // so candidates are chosen as in async mode (position, lag limit).
    let sync = c.sync && crate::engines::family(&c.engine) != crate::engines::Family::Redis;
    Some(ClusterView {
        cluster: c.name.clone(),
        auto_failover: c.auto_failover,
        sync,
        lease,
        margin: corral_proto::lease::margin(lease),
        // Async mode: the most a failover may lose (1 MiB of WAL, Patroni's
        // maximum_lag_on_failover default); beyond it nothing is promoted.
        max_lag: crate::engines::failover_max_lag(&c.engine),
        unit: crate::engines::position_unit(&c.engine),
        primary: node_view(primary),
        replicas: nodes
            .iter()
            .filter(|n| n.role == "replica")
            .map(node_view)
            .collect(),
        ackers: if sync {
            coord
                .fleet
                .ackers(&c.name, c.term)
                .map(|a| a.into_iter().collect())
        } else {
            None
        },
        operation,
    })
}

/// Records the failover (term raised, candidate made primary of record,
/// operation and audit row) in one transaction, then runs it.
fn start_failover(
    coord: &Arc<Coordinator>,
    c: &store::ClusterRow,
    old: &str,
    candidate: &str,
    (behind, unit): (u64, &str),
    lease_ended: Instant,
    now: Instant,
) -> anyhow::Result<()> {
    let detected = now_ms();
    let lease_ended_ms = detected - now.saturating_duration_since(lease_ended).as_millis() as i64;
    let id = ops::new_id();
    let mut preempted = None;
    let started = coord.store.tx(|tx| {
        // Decided on a view read before this transaction: the primary of
        // record must still be the one judged lost.
        let still = store::nodes_of_cluster(tx, &c.name)?
            .iter()
            .any(|n| n.id == old && n.role == "primary");
        if !still {
            return Ok(None);
        }
        if let Some(running) = store::holding_operation_of(tx, &c.name)? {
            if running.kind != ops::REJOIN {
                return Ok(None);
            }
            store::log_operation(tx, &running.id, "preempted by a failover")?;
            store::set_operation_state(
                tx,
                &running.id,
                store::op_state::FAILED,
                "preempted by a failover of the cluster",
            )?;
            preempted = Some(running.id);
        }
        let term = store::raise_term(tx, &c.name, candidate)?;
        let op = store::OperationRow {
            id: id.clone(),
            cluster: c.name.clone(),
            kind: ops::FAILOVER.into(),
            state: store::op_state::PENDING.into(),
            params: serde_json::json!({
                "old": old,
                "candidate": candidate,
                "term": term,
                "detected_at_ms": detected,
                "lease_ended_at_ms": lease_ended_ms,
                "behind": behind,
                "behind_unit": unit,
            })
            .to_string(),
            requested_by: ops::AUTO_FAILOVER.into(),
            created_at_ms: detected,
            updated_at_ms: detected,
            error: String::new(),
        };
        store::insert_operation(tx, &op)?;
        store::log_operation(
            tx,
            &id,
            &format!(
                "detected: primary {old} lost (no heartbeat answered for its lease plus the margin, \
                 no replica confirms it); its lease ended {} ms before detection",
                detected - lease_ended_ms
            ),
        )?;
        store::log_operation(
            tx,
            &id,
            &format!(
                "term raised to {term}; candidate {candidate}{}",
                if behind > 0 {
                    format!(" ({behind} {unit} behind {old}'s last report)")
                } else {
                    " (the most advanced replica)".into()
                }
            ),
        )?;
        store::insert_event(
            tx,
            detected,
            old,
            &c.name,
            "failover_started",
            &format!("primary {old} lost; promoting {candidate} in term {term}"),
            None,
        )?;
        store::insert_audit(
            tx,
            ops::AUTO_FAILOVER,
            "cluster.failover",
            &format!("cluster {} {old} -> {candidate}", c.name),
            "started",
        )?;
        Ok(Some(term))
    })?;
    if let Some(rejoin) = preempted {
        coord.ops.abort(&rejoin);
    }
    if let Some(term) = started {
        tracing::warn!(cluster = %c.name, op = %id, term, "failover: promoting {candidate} (was {old})");
        coord.fleet.term_started(&c.name, term);
        ops::spawn(coord.clone(), id);
    }
    Ok(())
}

/// Starts a rejoin operation for each replica of record that is up but runs
/// as a primary (a former primary back from the dead) or follows another
/// node than the primary.
fn rejoin_strays(
    coord: &Arc<Coordinator>,
    c: &store::ClusterRow,
    nodes: &[store::NodeRow],
    primary: &str,
    rejoins: &mut HashMap<String, Instant>,
) -> anyhow::Result<()> {
    let now = Instant::now();
    for n in nodes.iter().filter(|n| n.role == "replica") {
        if coord.fleet.liveness_of(&n.id, now) != Liveness::Up {
            continue;
        }
        let Some(engine) = coord.fleet.get(&n.id).map(|l| l.engine) else {
            continue;
        };
        let stray = engine.cluster == c.name
            && engine.state != pb::EngineState::Initializing as i32
            && (engine.role == "primary" || engine.upstream != primary);
        if !stray
            || rejoins
                .get(&n.id)
                .is_some_and(|t| t.elapsed() < REJOIN_RETRY)
        {
            continue;
        }
        rejoins.insert(n.id.clone(), now);
        let why = if engine.role == "primary" {
            format!("{} runs as a primary but is a replica of record", n.id)
        } else {
            format!(
                "{} follows {:?}, not the primary {primary}",
                n.id, engine.upstream
            )
        };
        let params = serde_json::json!({ "node": n.id });
        let log = format!("detected: {why}");
        let started = start_unless_busy(coord, &c.name, ops::REJOIN, params, &log, |_, _| Ok(()))?;
        if let Some(id) = started {
            tracing::info!(cluster = %c.name, op = %id, "rejoin: {why}");
        }
        return Ok(());
    }
    Ok(())
}
