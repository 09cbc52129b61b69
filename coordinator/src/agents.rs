//! Mutual-TLS clients from the coordinator to node agents.
//!
//! The coordinator presents its own certificate (the agents accept no other)
//! and checks that the agent's certificate names the node it meant to reach.

use anyhow::Result;
use corral_proto::pb::agent_client::AgentClient;
use corral_proto::pki::{node_dns, CertKey};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::Channel;

/// Engine steps such as initdb may take a while on a busy machine.
const AGENT_RPC_TIMEOUT: Duration = Duration::from_secs(120);

pub struct AgentClients {
    ca_pem: String,
    me: CertKey,
    /// node id -> (address, channel); a new address replaces the channel.
    channels: Mutex<HashMap<String, (String, Channel)>>,
}

impl AgentClients {
    pub fn new(ca_pem: String, me: CertKey) -> Self {
        AgentClients {
            ca_pem,
            me,
            channels: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self, node: &str, address: &str) -> Result<AgentClient<Channel>> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((addr, ch)) = channels.get(node) {
            if addr == address {
                return Ok(AgentClient::new(ch.clone()));
            }
        }
        let tls = corral_proto::tls::client_config(&self.ca_pem, Some(&self.me), &node_dns(node));
        let ch = corral_proto::tls::channel(address, tls, AGENT_RPC_TIMEOUT)?;
        channels.insert(node.to_string(), (address.to_string(), ch.clone()));
        Ok(AgentClient::new(ch))
    }
}
