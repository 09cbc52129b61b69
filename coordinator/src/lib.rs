//! The Corral coordinator: holds cluster topology and desired state, runs
//! durable operations against node agents, and serves the operator API.
//!
//! # Layout
//!
//! - [`statelock`]: one coordinator per state directory.
//! - [`store`]: what survives a restart (SQLite), and what deliberately does not.
//! - [`fleet`]: the live view rebuilt from heartbeats; the liveness rule.
//! - [`secrets`]: encryption at rest for database passwords.
//! - [`revocation`]: who may still call: revoked certificates and each
//!   node's current one, checked on every call.
//! - [`limits`], [`ratelimit`]: bounds on what callers send, and rate
//!   limits for callers without a certificate.
//! - [`listing`]: paged lists of the audit log, events and operations.
//! - [`retention`]: how long audit rows, events and operation logs stay.
//! - [`api`]: what the coordinator serves, each a thin adapter: the operator
//!   and identities gRPC APIs, the agents' upcalls, `/metrics`.
//! - [`service`]: the rules of every operator request (validation, roles,
//!   refusals, audit, the operation it records), with no protocol types.
//! - [`ops`]: the operation runner: one operation at a time per cluster,
//!   each step logged, resumed after a restart.
//! - [`agents`]: mutual-TLS clients to the agents.
//! - [`allowlist`]: a cluster's IP allowlist: validation, changes, lockout guard.
//! - [`failover`]: the failover decision, a pure function of the observed
//!   cluster and the time, and its [`failover::monitor`], which turns
//!   missing heartbeats into `node_down` events and judges each cluster
//!   (starting failovers and rejoins).
//! - [`config`]: the configuration file: alert rules and notification channels.
//! - [`history`]: each node's metrics over the last hour and 7 days.
//! - [`alerts`]: alert rules over the live fleet, and notices of events.
//! - [`notify`]: delivery to Alertmanager, webhooks and email.
//! - [`logs`]: `corralctl logs`: a node's log relayed from its agent.
//! - [`cli`]: `corralctl`, the operator CLI, one file per command group.

pub mod agents;
pub mod alerts;
pub mod allowlist;
pub mod api;
pub mod backups;
pub mod cli;
pub mod cluster_tls;
pub mod config;
pub mod durations;
pub mod engines;
pub mod failover;
pub mod fleet;
pub mod history;
pub mod limits;
pub mod listing;
pub mod logs;
pub mod model;
pub mod notify;
pub mod ops;
pub mod ratelimit;
pub mod retention;
pub mod revocation;
pub mod secrets;
pub mod service;
pub mod statelock;
pub mod store;

use anyhow::{Context, Result};
use corral_proto::pb;
use corral_proto::pki::{self, CertAuthority, CertKey};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything the coordinator needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds `corral.db` and `secret.key`.
    pub state_dir: PathBuf,
    /// What `corralctl pki init` wrote: the CA and the coordinator's certificate.
    pub pki_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where `/metrics` is served (plain HTTP); None: not served.
    pub http_listen: Option<SocketAddr>,
    /// The configuration file (alert rules, notification channels).
    pub file: config::FileConfig,
    /// How long the node and operator certificates signed here are valid.
    pub lifetimes: service::identities::Lifetimes,
}

/// Shared state of a running coordinator; every service holds an `Arc` of it.
pub struct Coordinator {
    pub store: store::Store,
    pub fleet: fleet::Fleet,
    pub secrets: secrets::SecretBox,
    pub ca: CertAuthority,
    pub ca_fingerprint: String,
    pub agents: agents::AgentClients,
    pub ops: ops::Runner,
    pub judgements: failover::monitor::Judgements,
    pub history: Arc<history::History>,
    pub alerts: alerts::Alerts,
    pub counters: api::http::Counters,
    /// The backup key, targets and settings.
    pub backups: backups::Backups,
    /// The CA's and the coordinator's certificates, with their expiry.
    pub certificates: Vec<(String, i64)>,
    /// Revoked certificates and each node's current one.
    pub trust: revocation::Trust,
    pub lifetimes: service::identities::Lifetimes,
    /// The coordinator's own certificate, which must not be revoked.
    pub coordinator_fingerprint: String,
    /// This process's hold of the state directory (one coordinator each).
    _state_lock: statelock::StateLock,
    /// Per-source rate limits of callers without a certificate.
    pub anonymous: ratelimit::Anonymous,
    /// Enrollments handled at once (each holds the store briefly).
    pub enroll_slots: tokio::sync::Semaphore,
}

impl Coordinator {
    /// Opens the store and starts the notification channels (inside a
    /// tokio runtime).
    pub fn open(config: &Config) -> Result<Arc<Coordinator>> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        // Before the store is opened: a second coordinator touches nothing.
        let state_lock = statelock::StateLock::take(&config.state_dir)?;
        let ca = CertAuthority::load(&config.pki_dir).with_context(|| {
            format!(
                "loading the CA from {} (run `corralctl pki init --dir {}` first)",
                config.pki_dir.display(),
                config.pki_dir.display()
            )
        })?;
        let me = CertKey {
            cert_pem: pki::read(&config.pki_dir.join("coordinator.crt"))?,
            key_pem: pki::read(&config.pki_dir.join("coordinator.key"))?,
        };
        let store = store::Store::open(&config.state_dir.join("corral.db"))?;
        let trust = revocation::Trust::load(&store).context("loading the revoked certificates")?;
        let secrets = secrets::SecretBox::load_or_create(&config.state_dir.join("secret.key"))?;
        let history = history::History::open(&config.state_dir.join("metrics.db"))?;
        let notifier = notify::Notifier::start(&config.file.notify)
            .context("starting the notification channels ([notify] in the configuration file)")?;
        let mut certificates = Vec::new();
        for (what, pem) in [
            ("the CA certificate", ca.cert_pem()),
            ("the coordinator's certificate", me.cert_pem.as_str()),
        ] {
            match pki::not_after_ms(pem) {
                Ok(at) => certificates.push((what.to_string(), at)),
                Err(e) => tracing::warn!("reading the expiry of {what}: {e:#}"),
            }
        }
        Ok(Arc::new(Coordinator {
            coordinator_fingerprint: pki::fingerprint_pem(&me.cert_pem)?,
            trust,
            lifetimes: config.lifetimes,
            store,
            fleet: fleet::Fleet::new(),
            secrets,
            ca_fingerprint: ca.fingerprint()?,
            agents: agents::AgentClients::new(ca.cert_pem().to_string(), me),
            ca,
            ops: ops::Runner::default(),
            judgements: failover::monitor::Judgements::default(),
            history: Arc::new(history),
            alerts: alerts::Alerts::new(config.file.alerts.clone(), notifier),
            counters: api::http::Counters::default(),
            backups: backups::Backups::open(config.file.backup.clone(), &config.state_dir)
                .context("opening the backup key ([backup] in the configuration file)")?,
            certificates,
            _state_lock: state_lock,
            anonymous: ratelimit::Anonymous::new(config.file.limits.clone()),
            enroll_slots: tokio::sync::Semaphore::new(4),
        }))
    }
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let coord = Coordinator::open(&config)?;
    let me = CertKey {
        cert_pem: pki::read(&config.pki_dir.join("coordinator.crt"))?,
        key_pem: pki::read(&config.pki_dir.join("coordinator.key"))?,
    };
    // Optional client auth: a new agent enrolls before it has a certificate.
    // Every other RPC checks the peer's certificate itself.
    let incoming =
        corral_proto::tls::serve_tls(config.listen, &me, coord.ca.cert_pem(), true).await?;

    // Bound before anything starts: a taken port is a start-up error.
    let http_listener = match config.http_listen {
        Some(listen) => Some(api::http::bind(listen).await?),
        None => None,
    };

    ops::resume_unfinished(&coord);
    let monitor = tokio::spawn(failover::monitor::run(coord.clone()));
    let failover = tokio::spawn(failover::monitor::run_failover(coord.clone()));
    let history = tokio::spawn(history::run(coord.history.clone()));
    let alerts = tokio::spawn(alerts::run(coord.clone()));
    let backup_jobs = tokio::spawn({
        let c = coord.clone();
        async move { tokio::join!(backups::run(c.clone()), backups::upgrade::run(c)) }
    });
    let retention = tokio::spawn(retention::run(coord.clone(), config.file.retention.clone()));
    let http = http_listener.map(|listener| {
        let c = coord.clone();
        tokio::spawn(async move {
            if let Err(e) = api::http::serve(c, listener).await {
                tracing::error!("{e:#}");
            }
        })
    });

    tracing::info!(listen = %config.listen, state_dir = %config.state_dir.display(), "coordinator serving");
    let result = tonic::transport::Server::builder()
        // Every call, over a new connection or an old one, passes the
        // revocation check first.
        .layer(tonic::service::InterceptorLayer::new(revocation::Gate(
            coord.clone(),
        )))
        .add_service(pb::identities_server::IdentitiesServer::new(
            api::identities::IdentitiesApi(service::Service(coord.clone())),
        ))
        .add_service(
            pb::agent_upcalls_server::AgentUpcallsServer::new(api::upcalls::Upcalls(coord.clone()))
                .max_decoding_message_size(limits::MAX_UPCALL_MESSAGE),
        )
        .add_service(pb::operator_server::OperatorServer::new(
            api::operator::OperatorApi(service::Service(coord.clone())),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .with_context(|| format!("serving on {}", config.listen));
    monitor.abort();
    failover.abort();
    alerts.abort();
    backup_jobs.abort();
    retention.abort();
    history.abort();
    if let Some(h) = http {
        h.abort();
    }
    // The open minutes of metrics history are kept for the next start.
    let h = coord.history.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || h.flush(true))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
    {
        tracing::error!("writing the metrics history at shutdown: {e:#}");
    }
    result
}
