//! What the coordinator serves, each a thin adapter over the layers below:
//!
//! - [`operator`] and [`identities`]: corralctl's gRPC APIs, over
//!   [`crate::service`];
//! - [`upcalls`]: the API agents call (enrollment, heartbeats, renewal);
//! - [`http`]: Prometheus metrics and the liveness probe;
//! - [`status`]: the caller and error mapping between gRPC and the service
//!   layer.

pub mod http;
pub mod identities;
pub mod operator;
pub mod status;
pub mod upcalls;
