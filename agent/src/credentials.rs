//! The node certificate in use, everywhere the agent presents it: to the
//! coordinator (heartbeats, renewal), to its peers (confirmation rounds)
//! and on its own gRPC server. [`crate::renew`] replaces it in place, so a
//! renewed certificate is used without a restart: the server presents it
//! from the next handshake on, and clients are rebuilt on it at their next
//! call.

use anyhow::Result;
use corral_proto::certs::LiveCert;
use corral_proto::pb::agent_upcalls_client::AgentUpcallsClient;
use corral_proto::pki::{CertKey, COORDINATOR_DNS};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::Channel;

pub struct Credentials {
    pub node_id: String,
    pub ca_pem: String,
    /// The coordinator's host:port.
    coordinator: String,
    current: RwLock<Current>,
    /// What the agent's gRPC server presents.
    pub server: Arc<LiveCert>,
}

struct Current {
    cert: CertKey,
    /// The certificate replaced last, while it is still valid: a replica
    /// that has not yet heard of the renewal (the coordinator names the new
    /// certificate in its next heartbeat answer, which an outage may delay)
    /// still knows only this one ([`crate::peers`] falls back to it).
    previous: Option<CertKey>,
    /// Raised at every replacement: clients built before are rebuilt.
    generation: u64,
    /// A channel to the coordinator with `cert` as the client certificate.
    upcalls: AgentUpcallsClient<Channel>,
}

impl Credentials {
    pub fn new(
        node_id: &str,
        ca_pem: &str,
        cert: CertKey,
        coordinator: &str,
    ) -> Result<Arc<Credentials>> {
        let upcalls = upcalls_client(coordinator, ca_pem, &cert)?;
        Ok(Arc::new(Credentials {
            node_id: node_id.to_string(),
            ca_pem: ca_pem.to_string(),
            coordinator: coordinator.to_string(),
            server: Arc::new(LiveCert::new(&cert)?),
            current: RwLock::new(Current {
                cert,
                previous: None,
                generation: 0,
                upcalls,
            }),
        }))
    }

    /// A client of the coordinator presenting the current certificate.
    pub fn upcalls(&self) -> AgentUpcallsClient<Channel> {
        self.read().upcalls.clone()
    }

    /// The current certificate and its generation.
    pub fn cert(&self) -> (CertKey, u64) {
        let c = self.read();
        (c.cert.clone(), c.generation)
    }

    /// The certificate in use before the last renewal and its generation,
    /// until it expires.
    pub fn previous(&self) -> Option<(CertKey, u64)> {
        let c = self.read();
        let prev = c.previous.clone()?;
        let (_, not_after) = corral_proto::pki::validity_ms(&prev.cert_pem).ok()?;
        (not_after > corral_proto::now_ms()).then_some((prev, c.generation))
    }

    /// Uses `cert` from now on. Nothing changes if it does not match its
    /// key or cannot be used for a channel.
    pub fn replace(&self, cert: CertKey) -> Result<()> {
        let upcalls = upcalls_client(&self.coordinator, &self.ca_pem, &cert)?;
        self.server.replace(&cert)?;
        let mut c = self.current.write().unwrap_or_else(|p| p.into_inner());
        c.previous = Some(std::mem::replace(&mut c.cert, cert));
        c.generation += 1;
        c.upcalls = upcalls;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn upcalls_client(
    coordinator: &str,
    ca_pem: &str,
    cert: &CertKey,
) -> Result<AgentUpcallsClient<Channel>> {
    let tls = corral_proto::tls::client_config(ca_pem, Some(cert), COORDINATOR_DNS);
    let channel = corral_proto::tls::channel(coordinator, tls, Duration::from_secs(5))?;
    Ok(AgentUpcallsClient::new(channel))
}
