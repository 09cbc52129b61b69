//! MariaDB (and MySQL 8 where its syntax differs): data directory,
//! configuration, process, replication with GTID.
//!
//! Work in progress: the driver is being written; the agent does not offer
//! the engine yet.

use std::path::{Path, PathBuf};

pub struct Mariadb {
    #[allow(dead_code)]
    base: PathBuf,
    #[allow(dead_code)]
    node_id: String,
}

impl Mariadb {
    /// A driver keeping its files under `<state_dir>/mariadb/`.
    pub fn new(state_dir: &Path, node_id: &str) -> Mariadb {
        Mariadb {
            base: state_dir.join("mariadb"),
            node_id: node_id.to_string(),
        }
    }
}
