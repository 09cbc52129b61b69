//! The Corral coordinator: holds cluster topology and desired state, runs
//! durable operations against node agents, and serves the operator API.
//!
//! # Layout
//!
//! - [`store`]: what survives a restart (SQLite), and what deliberately does not.
//! - [`fleet`]: the live view rebuilt from heartbeats; the liveness rule.
//! - [`secrets`]: encryption at rest for database passwords.
//! - [`upcalls`]: the API agents call: enrollment and heartbeats.
//! - [`operator`]: the API operators call (through `corralctl`).
//! - [`ops`]: the operation runner: one operation at a time per cluster,
//!   each step logged, resumed after a restart.
//! - [`agents`]: mutual-TLS clients to the agents.
//! - [`allowlist`]: a cluster's IP allowlist: validation, changes, lockout guard.
//! - [`monitor`]: turns missing heartbeats into `node_down` events, and runs
//!   the failover monitor (judging each cluster, starting failovers and
//!   rejoins).
//! - [`failover`]: the failover decision, a pure function of the observed
//!   cluster and the time.
//! - [`logs`]: `corralctl logs`: a node's log relayed from its agent.
//! - [`cli`]: `corralctl`, the operator CLI.

pub mod agents;
pub mod allowlist;
pub mod cli;
pub mod engines;
pub mod failover;
pub mod fleet;
pub mod logs;
pub mod monitor;
pub mod operator;
pub mod ops;
pub mod secrets;
pub mod store;
pub mod upcalls;

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
    pub judgements: monitor::Judgements,
}

impl Coordinator {
    pub fn open(config: &Config) -> Result<Arc<Coordinator>> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
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
        let secrets = secrets::SecretBox::load_or_create(&config.state_dir.join("secret.key"))?;
        Ok(Arc::new(Coordinator {
            store,
            fleet: fleet::Fleet::new(),
            secrets,
            ca_fingerprint: ca.fingerprint()?,
            agents: agents::AgentClients::new(ca.cert_pem().to_string(), me),
            ca,
            ops: ops::Runner::default(),
            judgements: monitor::Judgements::default(),
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

    ops::resume_unfinished(&coord);
    let monitor = tokio::spawn(monitor::run(coord.clone()));
    let failover = tokio::spawn(monitor::run_failover(coord.clone()));

    tracing::info!(listen = %config.listen, state_dir = %config.state_dir.display(), "coordinator serving");
    let result = tonic::transport::Server::builder()
        .add_service(pb::agent_upcalls_server::AgentUpcallsServer::new(
            upcalls::Upcalls(coord.clone()),
        ))
        .add_service(pb::operator_server::OperatorServer::new(
            operator::OperatorApi(coord.clone()),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .with_context(|| format!("serving on {}", config.listen));
    monitor.abort();
    failover.abort();
    result
}
