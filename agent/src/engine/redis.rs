//! Redis (and Valkey, KeyDB: the same protocol): configuration, process,
//! replication with REPLICAOF.
//!
//! Work in progress: the driver is being written; the agent does not offer
//! the engine yet.

use std::path::{Path, PathBuf};

pub struct Redis {
    #[allow(dead_code)]
    base: PathBuf,
    #[allow(dead_code)]
    node_id: String,
}

impl Redis {
    /// A driver keeping its files under `<state_dir>/redis/`.
    pub fn new(state_dir: &Path, node_id: &str) -> Redis {
        Redis {
            base: state_dir.join("redis"),
            node_id: node_id.to_string(),
        }
    }
}
