//! Backups on the node: taking them (the engine's own stream, compressed
//! and encrypted by [`corral_proto::archive`], streamed to a [`target`]),
//! verifying and reading them back, restoring, and PostgreSQL's continuous
//! WAL archiving.

pub mod target;
