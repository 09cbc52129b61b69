//! corral-agent: runs on every VM, supervises the database engine, reports
//! health to the coordinator and executes the coordinator's engine steps.
//!
//! # Layout
//!
//! - [`enroll`]: the node's identity: first enrollment with a join token, and
//!   the key, certificate and CA it keeps in its state directory.
//! - [`credentials`]: the node certificate in use by every client and server,
//!   replaced in place by [`renew`].
//! - [`renew`]: renewal of the node certificate before it expires.
//! - [`members`]: the members of the node's cluster the coordinator named,
//!   the only callers the peer API accepts.
//! - [`metrics`]: CPU, memory, disk, network and load samples (sysinfo,
//!   /proc/net/dev).
//! - [`events`]: events waiting to be acknowledged by the coordinator.
//! - [`heartbeat`]: the periodic report to the coordinator.
//! - [`engine`]: the engine spec, the supervisor and the engine drivers
//!   (PostgreSQL today).
//! - [`lease`]: the primary's lease and a replica's confirmation, on the
//!   boot clock (the rules; [`engine`] applies them, in `engine::safety`).
//! - [`peers`]: a primary's confirmation rounds with its replicas' agents.
//! - [`firewall`]: the agent's own nftables table (`inet corral`): the fence.
//! - [`server`]: the agent's gRPC API (only the coordinator may call it)
//!   and the peer API (only other nodes may call it).
//! - [`health`]: plain-HTTP health endpoints for load balancers.
//! - [`logs`]: the agent's own log file, and reading it and the engine's
//!   log for `corralctl logs`.

pub mod backup;
pub mod credentials;
pub mod engine;
pub mod enroll;
pub mod events;
pub mod firewall;
pub mod health;
pub mod heartbeat;
pub mod lease;
pub mod logs;
pub mod members;
pub mod metrics;
pub mod peers;
pub mod renew;
pub mod server;
pub mod watchdog;

use std::path::PathBuf;
use std::time::Duration;

/// Everything the agent needs to run, from its command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// The coordinator's host:port.
    pub coordinator: String,
    /// Where the agent's gRPC server binds; also the address it advertises.
    pub listen: std::net::SocketAddr,
    pub heartbeat_interval: Duration,
    /// Directory with PostgreSQL's server binaries (initdb, postgres).
    pub pg_bin_dir: PathBuf,
    /// Where the HTTP health endpoints listen.
    pub health_listen: std::net::SocketAddr,
}
