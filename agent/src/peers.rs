//! A primary's confirmation rounds: every heartbeat interval (up to every
//! other one while the coordinator renews the lease, see [`pace`]) it asks
//! each of its replicas' agents to confirm it (mutual TLS with its node
//! certificate). A round in which every replica confirmed renews the lease
//! from the moment the round began, which keeps writes going while the
//! coordinator is unreachable (DESIGN.md: a coordinator outage must not
//! take writes down). One replica missing, refusing or silent is enough to
//! let the lease run out: the replica that did not answer may be the one the
//! coordinator is about to promote.
//!
//! Rounds run whether or not the coordinator answers, so a replica's
//! confirmation (and its refusal to be promoted while it holds) is always
//! current, not only after the coordinator went away.

use crate::engine::{Engine, Round};
use crate::lease::BootTime;
use corral_proto::pb;
use corral_proto::pb::peer_client::PeerClient;
use corral_proto::pki::node_dns;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

pub struct Peers {
    /// The node certificate presented to the replicas (renewed in place).
    creds: Arc<crate::credentials::Credentials>,
    /// (node id, with the previous certificate) -> (address, certificate
    /// generation, channel); a new address or a renewed certificate
    /// replaces the channel.
    channels: Mutex<Channels>,
}

type Channels = HashMap<(String, bool), (String, u64, Channel)>;

/// Why a replica did not answer with a confirmation or a reasoned refusal.
struct Failed {
    /// The replica refused the caller itself (its certificate).
    permission_denied: bool,
    message: String,
}

/// The outcome of one round, for logging changes only.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Confirmed,
    NotConfirmed(String),
}

impl Peers {
    pub fn new(creds: Arc<crate::credentials::Credentials>) -> Peers {
        Peers {
            creds,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client of `node`'s agent presenting the current certificate, or
    /// with `previous` the one replaced last (None when there is none).
    fn client(
        &self,
        node: &str,
        address: &str,
        previous: bool,
    ) -> Option<anyhow::Result<PeerClient<Channel>>> {
        let (me, generation) = if previous {
            self.creds.previous()?
        } else {
            self.creds.cert()
        };
        let key = (node.to_string(), previous);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((addr, gen, ch)) = channels.get(&key) {
            if addr == address && *gen == generation {
                return Some(Ok(PeerClient::new(ch.clone())));
            }
        }
        let tls = corral_proto::tls::client_config(&self.creds.ca_pem, Some(&me), &node_dns(node));
        Some(
            corral_proto::tls::channel(address, tls, Duration::from_secs(5)).map(|ch| {
                channels.insert(key, (address.to_string(), generation, ch.clone()));
                PeerClient::new(ch)
            }),
        )
    }

    /// Runs for the agent's life.
    pub async fn run(self: Arc<Self>, engine: Arc<Engine>) {
        let mut last = Outcome::Confirmed;
        loop {
            let interval = engine
                .cluster_state()
                .map(|c| Duration::from_millis(u64::from(c.heartbeat_ms)))
                .unwrap_or(Duration::from_secs(1));
            let began = tokio::time::Instant::now();
            let outcome = match engine.confirmation_round() {
                None => None,
                Some(Err(replica)) => Some(Outcome::NotConfirmed(format!(
                    "the coordinator has not told this primary where replica {replica}'s agent is"
                ))),
                Some(Ok(round)) => Some(self.round(&engine, &round).await),
            };
            if let Some(outcome) = outcome {
                if outcome != last {
                    match &outcome {
                        Outcome::Confirmed => tracing::info!("every replica confirms this primary"),
                        Outcome::NotConfirmed(why) => {
                            tracing::warn!("replicas do not all confirm this primary: {why}")
                        }
                    }
                    last = outcome;
                }
            }
            tokio::time::sleep_until(began + pace(&engine, interval)).await;
        }
    }

    async fn round(&self, engine: &Arc<Engine>, round: &Round) -> Outcome {
        let asked_at = BootTime::now();
        // An answer renews the lease from `asked_at`: it is of use until the
        // fence would go up, however slow the link (a round trip of a few
        // hundred ms on a distant or lossy one is longer than an interval).
        let patience = round.lease - corral_proto::lease::fence_ahead(round.lease);
        let mut calls = tokio::task::JoinSet::new();
        for (node, address) in &round.peers {
            let client = self.client(node, address, false);
            let fallback = self.client(node, address, true);
            let req = pb::ConfirmPrimaryRequest {
                cluster: round.cluster.clone(),
                term: round.term,
                lease_ms: round.lease.as_millis() as u32,
            };
            let node = node.clone();
            calls.spawn(async move {
                let mut answer = ask(client, req.clone(), patience).await;
                // Just after a renewal, a replica may not know the new
                // certificate yet (the coordinator names it in the replica's
                // next heartbeat answer, which an outage may delay): it
                // still knows the previous one.
                if matches!(&answer, Err(f) if f.permission_denied) {
                    if let Some(previous) = fallback {
                        answer = ask(Some(previous), req, patience).await;
                    }
                }
                (node, answer.map_err(|f| f.message))
            });
        }
        let mut refusals = Vec::new();
        while let Some(joined) = calls.join_next().await {
            let Ok((node, answer)) = joined else {
                refusals.push("a confirmation call panicked".to_string());
                continue;
            };
            match answer {
                Ok(a) if a.confirmed => {}
                Ok(a) => {
                    if a.term > round.term {
                        engine.superseded(a.term, &node);
                    }
                    refusals.push(format!("{node} refused: {}", a.reason));
                }
                Err(e) => refusals.push(format!("{node}: {e}")),
            }
        }
        if refusals.is_empty() {
            engine.confirmed_by_replicas(asked_at, round.lease, round.term);
            Outcome::Confirmed
        } else {
            Outcome::NotConfirmed(refusals.join("; "))
        }
    }
}

/// The time between two rounds: one heartbeat interval, or up to two while
/// the coordinator renews the lease itself, as long as the next round
/// still comes before half of the coordinator's last lease has run. The
/// rounds then only keep the replicas' confirmations current (each holds
/// for the lease plus the margin); should the coordinator's renewals stop,
/// the next round is due with half a lease left to renew it before the
/// fence. Half the rounds, on the primary's busiest path, when nothing is
/// wrong.
fn pace(engine: &Engine, interval: Duration) -> Duration {
    let Some(lease) = engine.cluster_state().map(|c| c.lease()) else {
        return interval;
    };
    let status = engine.lease_status();
    if status.source != crate::lease::Source::Coordinator.as_str() {
        return interval;
    }
    Duration::from_millis(u64::from(status.remaining_ms))
        .saturating_sub(lease / 2)
        .clamp(interval, interval * 2)
}

/// One confirmation request.
async fn ask(
    client: Option<anyhow::Result<PeerClient<Channel>>>,
    req: pb::ConfirmPrimaryRequest,
    patience: Duration,
) -> Result<pb::ConfirmPrimaryResponse, Failed> {
    let failed = |permission_denied, message| Failed {
        permission_denied,
        message,
    };
    match client {
        None => Err(failed(false, "no certificate".into())),
        Some(Err(e)) => Err(failed(false, format!("{e:#}"))),
        Some(Ok(mut c)) => match tokio::time::timeout(patience, c.confirm_primary(req)).await {
            Err(_) => Err(failed(
                false,
                format!("no answer within {} ms", patience.as_millis()),
            )),
            Ok(Err(s)) => Err(failed(
                s.code() == tonic::Code::PermissionDenied,
                s.message().to_string(),
            )),
            Ok(Ok(r)) => Ok(r.into_inner()),
        },
    }
}
