//! The fence and the lease gate on the node: the guardian that keeps the
//! node's nftables table and the engine's read-only setting in line with
//! the lease ([`crate::engine::safety`] holds the lease rules).
//!
//! - **Fence.** A primary serving replicas whose lease is about to end is
//!   fenced: first the firewall drops every packet to and from the engine
//!   port (atomic, one nftables transaction), then the engine is made
//!   read-only and its client sessions are ended. The fence is lifted when
//!   a lease is granted again. A single-node cluster is never fenced:
//!   nobody could take over from it, so fencing would only take writes
//!   down.
//! - **Lease gate.** While such a primary holds its lease, its table lets
//!   engine traffic through only as long as a kernel timer runs, which
//!   every renewal of the lease resets ([`crate::firewall::gate`]). The
//!   timer ends where the fence would go up, so an agent that is stopped,
//!   killed or frozen fences its engine all the same, with nothing of it
//!   left running.
//! - **A firewall that cannot be applied** on such a primary stops its
//!   engine, and keeps it stopped until the table applies: an engine no
//!   fence can hold must not take writes (the coordinator then fails over
//!   as for a lost primary).

use super::record::Stored;
use super::transitions::Guard;
use super::Engine;
use crate::firewall::Rules;
use crate::lease::BootTime;
use corral_proto::lease::fence_ahead;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What the node's firewall and engine were last set to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceState {
    /// The whole table; `engine_port` None: no engine here (table removed).
    pub rules: Rules,
    /// The allowlist version those rules hold.
    pub allowlist_version: u64,
}

/// How often the guardian checks the firewall for drift (someone deleting
/// or flushing the agent's table by hand): its shape (table, chains, rules,
/// sets declared) every 5 s, the sets' elements too every 30 s (listing a
/// 10,000-entry allowlist costs nft about 30 ms).
const DRIFT_CHECK_EVERY: Duration = Duration::from_secs(5);
const DRIFT_FULL_CHECK_EVERY: Duration = Duration::from_secs(30);

/// A gate element closer than this to its end may already be gone (the
/// kernel removes it at its timeout, give or take a tick), so it is not
/// renewed in place but written afresh with the whole table.
const GATE_ALIVE_MARGIN: Duration = Duration::from_millis(50);

/// How long a failed firewall write is retried before the engine of a
/// primary that needs it is stopped: one retry absorbs a passing failure
/// (nft killed by a timeout, a busy kernel).
const FIREWALL_RETRY: Duration = Duration::from_millis(100);

impl Engine {
    /// Brings the firewall, the lease gate and the engine's read-only
    /// setting in line with the lease; retries on the next pass when that
    /// fails, and stops the engine of a primary whose firewall cannot be
    /// written at all.
    pub async fn enforce(&self) {
        let mut applied = self.fence.lock().await;
        let stored = self.stored();
        let want = self.wanted_rules(stored.as_ref());
        let gate = self.gate_deadline(stored.as_ref(), &want.rules);
        if applied.as_ref() == Some(&want) {
            if let Some(until) = gate {
                if !self.keep_gate_open(&want.rules, until).await {
                    // Rewritten whole at the next pass.
                    *applied = None;
                }
            }
            return;
        }
        let began = Instant::now();
        let fenced = want.rules.fenced;
        let was_fenced = applied.as_ref().is_some_and(|f| f.rules.fenced);
        let mut outcome = self
            .change(
                stored.as_ref(),
                &want.rules,
                gate,
                was_fenced,
                applied.is_none(),
            )
            .await;
        if outcome.is_err() && needs_firewall(&want.rules) {
            tokio::time::sleep(FIREWALL_RETRY).await;
            outcome = self
                .change(stored.as_ref(), &want.rules, gate, was_fenced, true)
                .await;
        }
        match outcome {
            Ok(()) => {
                let old_version = applied.as_ref().map(|f| f.allowlist_version);
                *applied = Some(want.clone());
                self.fenced_now.store(fenced, Ordering::SeqCst);
                self.allowlist_applied
                    .store(want.allowlist_version, Ordering::SeqCst);
                drop(applied);
                *self
                    .firewall_error_logged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                if self.lock_firewall_broken().take().is_some() {
                    self.events.push(
                        "firewall_restored",
                        "the firewall applies again; the engine may start",
                    );
                }
                self.report_change(stored.as_ref(), &want, old_version, was_fenced, began);
            }
            Err(e) => {
                // Half of it may have been applied: the next pass starts
                // from "unknown" and applies both halves again (each is
                // idempotent). Until then, report it as fenced when that
                // was the aim: better a false alarm than a false all-clear.
                *applied = None;
                if fenced {
                    self.fenced_now.store(true, Ordering::SeqCst);
                }
                let message = format!("applying the firewall: {e:#}");
                if self.firewall_error_is_news(&message) {
                    tracing::error!(fenced, allowlist = want.allowlist_version, "{message}");
                } else {
                    tracing::debug!(fenced, allowlist = want.allowlist_version, "{message}");
                }
                self.update(|s| s.message = message);
                drop(applied);
                if needs_firewall(&want.rules) {
                    self.stop_unfenceable(&e).await;
                }
            }
        }
    }

    /// Writes `rules` (and makes the engine read-only or writable again as
    /// they say). `unknown`: what was applied before is not known.
    async fn change(
        &self,
        stored: Option<&Stored>,
        rules: &Rules,
        gate: Option<BootTime>,
        was_fenced: bool,
        unknown: bool,
    ) -> anyhow::Result<()> {
        let Some(s) = stored else {
            *self.gate_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return self.firewall.remove().await;
        };
        if rules.fenced {
            // The firewall first: it is atomic and immediate.
            let fw = self.write_table(rules, gate).await;
            let ro = self.driver().set_fenced(&s.spec, true).await;
            fw.and(ro)
        } else if was_fenced || unknown {
            let ro = self.driver().set_fenced(&s.spec, false).await;
            let fw = self.write_table(rules, gate).await;
            ro.and(fw)
        } else {
            // Only the allowlist (or membership) changed.
            self.write_table(rules, gate).await
        }
    }

    /// Replaces the table, with the lease gate open until `gate` when the
    /// rules are gated, and records how long the gate is open.
    async fn write_table(&self, rules: &Rules, gate: Option<BootTime>) -> anyhow::Result<()> {
        let open = gate.filter(|_| rules.gated && !rules.fenced);
        *self.gate_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match open {
            Some(until) => {
                self.firewall.apply_gated(rules, until).await?;
                *self.gate_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
                Ok(())
            }
            None => self.firewall.apply(rules).await,
        }
    }

    /// Moves the open gate's end to `until` (the lease was renewed). False
    /// when it could not be: the caller rewrites the table.
    async fn keep_gate_open(&self, rules: &Rules, until: BootTime) -> bool {
        let (Some(port), current) = (
            rules.engine_port,
            *self.gate_until.lock().unwrap_or_else(|p| p.into_inner()),
        ) else {
            return false;
        };
        match current {
            Some(c) if c == until => true,
            Some(c) if c > BootTime::now() + GATE_ALIVE_MARGIN => {
                match self.firewall.renew_gate(port, until) {
                    Ok(()) => {
                        *self.gate_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
                        true
                    }
                    Err(e) => {
                        tracing::warn!("renewing the lease gate: {e:#}; rewriting the table");
                        false
                    }
                }
            }
            // Closed already, or closing: only a fresh table reopens it.
            _ => false,
        }
    }

    /// Where the lease gate should end: where the fence would go up, for a
    /// gated table.
    fn gate_deadline(&self, stored: Option<&Stored>, rules: &Rules) -> Option<BootTime> {
        let s = stored.filter(|_| rules.gated && !rules.fenced)?;
        let until = self.lock_lease().until?;
        Some(until - fence_ahead(s.cluster.lease()))
    }

    /// The firewall of a primary serving replicas cannot be written: stop
    /// its engine (the supervisor does not start it again until the
    /// firewall applies, see [`Engine::start_refused`]).
    async fn stop_unfenceable(&self, e: &anyhow::Error) {
        *self.lock_firewall_broken() = Some(format!("{e:#}"));
        let Some(pid) = self.driver().find_running() else {
            return;
        };
        let message = format!(
            "the firewall cannot be applied ({e:#}): stopping the engine, since a primary \
             that cannot be fenced must not take writes; it starts again once the firewall \
             applies"
        );
        tracing::error!("{message}");
        self.events.push("firewall_failed", &message);
        self.update(|s| s.message = message.clone());
        if let Err(e) = self.driver().stop(pid).await {
            tracing::error!("stopping the engine the firewall cannot fence: {e:#}");
        }
    }

    /// Why the supervisor must not start the engine now, if it must not.
    pub(super) fn start_refused(&self) -> Option<String> {
        self.lock_firewall_broken().as_ref().map(|e| {
            format!(
                "not started: the firewall cannot be applied ({e}), and a primary that cannot \
                 be fenced must not take writes"
            )
        })
    }

    /// A primary's step that failed while its engine was stopped for want
    /// of a firewall failed because of that: say so, rather than only
    /// "connection closed".
    pub(super) fn with_firewall_cause(&self, e: anyhow::Error) -> anyhow::Error {
        match self.start_refused() {
            Some(why) => e.context(format!("the engine is {why}")),
            None => e,
        }
    }

    /// Whether `message` should be logged at its level: the first time,
    /// when it changes, and once a minute while it lasts.
    fn firewall_error_is_news(&self, message: &str) -> bool {
        let mut last = self
            .firewall_error_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let news = match &*last {
            Some((m, at)) => m != message || at.elapsed() >= Duration::from_secs(60),
            None => true,
        };
        if news {
            *last = Some((message.to_string(), Instant::now()));
        }
        news
    }

    fn lock_firewall_broken(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.firewall_broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The events of a change that was applied.
    fn report_change(
        &self,
        stored: Option<&Stored>,
        want: &FenceState,
        old_version: Option<u64>,
        was_fenced: bool,
        began: Instant,
    ) {
        let port = want.rules.engine_port.unwrap_or(0);
        let entries = want.rules.allow.len();
        let version = want.allowlist_version;
        let ms = began.elapsed().as_millis();
        if stored.is_some() && old_version != Some(version) && version > 0 {
            self.events.push(
                "allowlist_applied",
                if entries == 0 {
                    format!(
                        "allowlist version {version} applied in {ms} ms: empty, port {port} \
                         is open to every address"
                    )
                } else {
                    format!(
                        "allowlist version {version} applied in {ms} ms: {entries} entries \
                         may reach port {port}, besides the cluster's nodes"
                    )
                },
            );
        }
        match (was_fenced, want.rules.fenced) {
            (false, true) => self.events.push(
                "fenced",
                format!(
                    "no valid lease: client traffic to port {port} dropped and the engine \
                     made read-only in {ms} ms"
                ),
            ),
            (true, false) if stored.is_some_and(|s| s.spec.role == "primary") => self.events.push(
                "unfenced",
                format!("lease granted: the engine takes writes again ({ms} ms)"),
            ),
            (true, false) => self.events.push(
                "unfenced",
                format!("fence lifted: this node is no longer a primary ({ms} ms)"),
            ),
            _ => {}
        }
    }

    /// Re-applies the table when someone changed or deleted it by hand;
    /// `elements`: compare the sets' elements too.
    async fn repair_drift(&self, elements: bool) {
        // Held throughout: a fence applied meanwhile would otherwise be
        // taken for drift and undone.
        let mut applied = self.fence.lock().await;
        let Some(want) = applied.clone() else {
            return;
        };
        if want.rules.engine_port.is_none() {
            return;
        }
        let same = if elements {
            self.firewall.matches(&want.rules).await
        } else {
            self.firewall.matches_shape(&want.rules).await
        };
        match same {
            Ok(true) => {}
            Ok(false) => {
                let gate = self.gate_deadline(self.stored().as_ref(), &want.rules);
                match self.write_table(&want.rules, gate).await {
                    Ok(()) => self.events.push(
                        "firewall_drift",
                        format!(
                            "the nftables table inet {} was changed or removed by hand; restored it",
                            crate::firewall::TABLE
                        ),
                    ),
                    Err(e) => {
                        *applied = None;
                        tracing::error!("restoring the firewall table: {e:#}");
                    }
                }
            }
            Err(e) => tracing::warn!("reading the firewall table: {e:#}"),
        }
    }

    /// Runs for the agent's life: fences before the lease ends, keeps the
    /// lease gate open while it is renewed, lifts the fence when it is,
    /// repairs drift. Wakes at the next deadline, when woken, and at least
    /// every 250 ms. Each pass pings systemd's watchdog, so a guardian that
    /// stops making progress gets the agent restarted.
    pub async fn guard(self: std::sync::Arc<Self>, watchdog: crate::watchdog::Watchdog) {
        let mut last_drift_check = Instant::now();
        let mut last_full_check = Instant::now();
        loop {
            self.enforce().await;
            watchdog.ping();
            if last_drift_check.elapsed() > DRIFT_CHECK_EVERY {
                last_drift_check = Instant::now();
                let full = last_full_check.elapsed() > DRIFT_FULL_CHECK_EVERY;
                if full {
                    last_full_check = Instant::now();
                }
                self.repair_drift(full).await;
            }
            let next = self.next_deadline().min(Duration::from_millis(250));
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.guard_wake.notified() => {}
            }
        }
    }

    /// Time until the fence must go up, for a primary holding its lease.
    fn next_deadline(&self) -> Duration {
        let Some(stored) = self.stored() else {
            return Duration::from_secs(1);
        };
        let now = BootTime::now();
        let l = self.lock_lease();
        match l.until {
            Some(until) if stored.spec.role == "primary" => {
                let fence_at = until - fence_ahead(stored.cluster.lease());
                now.until(fence_at).max(Duration::from_millis(1))
            }
            _ => Duration::from_secs(1),
        }
    }

    /// The table the node should have now: its engine and health ports,
    /// the fence or the lease gate, the cluster's allowlist and the
    /// addresses always allowed (the cluster's nodes, the coordinator).
    fn wanted_rules(&self, stored: Option<&Stored>) -> FenceState {
        let Some(s) = stored else {
            return FenceState {
                rules: Rules::default(),
                allowlist_version: 0,
            };
        };
        let allow = {
            let mut parsed = self.allow_parsed.lock().unwrap_or_else(|p| p.into_inner());
            if !std::sync::Arc::ptr_eq(&parsed.0, &s.cluster.allowlist) {
                // The coordinator sends canonical entries: a network, or an
                // address alone for a /32 or /128.
                let nets = s.cluster.allowlist.iter().filter_map(|e| {
                    let net = e.parse::<ipnet::IpNet>();
                    net.ok()
                        .or_else(|| e.parse::<std::net::IpAddr>().ok().map(Into::into))
                });
                *parsed = (s.cluster.allowlist.clone(), nets.collect());
            }
            parsed.1.clone()
        };
        let mut always: Vec<std::net::IpAddr> = s
            .cluster
            .always_allowed
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        always.extend(self.coordinator_ips());
        always.sort();
        always.dedup();
        let guard = self.fence_needed(s, BootTime::now());
        FenceState {
            rules: Rules {
                engine_port: Some(s.spec.port),
                fenced: guard == Guard::Fenced,
                gated: guard == Guard::Gated,
                health_port: self.health_port,
                allow,
                always,
            },
            allowlist_version: s.cluster.allowlist_version,
        }
    }
}

/// Whether these rules are those of a primary serving replicas (fenced or
/// gated): one whose engine must not run without a working firewall.
fn needs_firewall(rules: &Rules) -> bool {
    rules.engine_port.is_some() && (rules.fenced || rules.gated)
}
