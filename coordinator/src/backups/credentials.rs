//! Per-cluster storage credentials for S3 targets.
//!
//! A target's own credentials reach every node that backs up to it. With
//! one bucket shared by every cluster, that lets a database VM list, read
//! and delete every cluster's (encrypted) objects. To confine each cluster
//! at the storage level, give each one credentials whose policy allows only
//! its prefixes (`<prefix>/backups/<cluster>/*` and `<prefix>/wal/<cluster>/*`):
//!
//! ```toml
//! [backup.targets.offsite]
//! kind = "s3"
//! endpoint = "https://s3.eu-west-1.amazonaws.com"
//! bucket = "corral-backups"
//! require_cluster_credentials = true
//!
//! [backup.targets.offsite.clusters.orders]
//! access_key_id_env = "CORRAL_S3_ORDERS_KEY_ID"
//! secret_access_key_env = "CORRAL_S3_ORDERS_SECRET"
//! ```
//!
//! A node is handed the credentials of the cluster whose objects the
//! request is about, never another cluster's.

use crate::config::BackupConfig;
use anyhow::{bail, Result};
use corral_proto::pb;

/// The target `name` as a node gets it for the objects of `cluster`:
/// scoped to that cluster, with that cluster's credentials when it has its
/// own.
pub fn target_for(cfg: &BackupConfig, name: &str, cluster: &str) -> Result<pb::BackupTarget> {
    let mut t = cfg.target(name)?;
    t.scope = cluster.to_string();
    let Some(tc) = cfg.targets.get(name) else {
        return Ok(t);
    };
    match tc.clusters.get(cluster) {
        Some(c) => {
            let at = format!("backup.targets.{name}.clusters.{cluster}");
            (t.access_key_id, t.secret_access_key) = c.resolve(&at)?;
        }
        None if tc.require_cluster_credentials => bail!(
            "backup target {name} requires per-cluster credentials \
             (require_cluster_credentials = true) and cluster {cluster} has none: add \
             [backup.targets.{name}.clusters.{cluster}] with access_key_id(_env) and \
             secret_access_key(_env) to the coordinator's configuration, with a storage policy \
             limited to backups/{cluster}/ and wal/{cluster}/"
        ),
        None => {}
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use crate::config::FileConfig;

    const CONFIG: &str = r#"
        [backup.targets.shared]
        kind = "s3"
        endpoint = "https://e"
        bucket = "b"
        access_key_id = "fleet-key"
        secret_access_key = "fleet-secret"

        [backup.targets.shared.clusters.a]
        access_key_id = "a-key"
        secret_access_key = "a-secret"

        [backup.targets.strict]
        kind = "s3"
        endpoint = "https://e"
        bucket = "b"
        require_cluster_credentials = true

        [backup.targets.strict.clusters.a]
        access_key_id = "a-key"
        secret_access_key = "a-secret"
    "#;

    #[test]
    fn a_cluster_s_nodes_get_its_own_credentials_and_scope_only() {
        let c = FileConfig::parse(CONFIG).unwrap();
        let a = super::target_for(&c.backup, "shared", "a").unwrap();
        assert_eq!(
            (a.access_key_id.as_str(), a.secret_access_key.as_str()),
            ("a-key", "a-secret")
        );
        assert_eq!(a.scope, "a");
        let b = super::target_for(&c.backup, "shared", "b").unwrap();
        assert_eq!(b.access_key_id, "fleet-key");
        assert_eq!(b.scope, "b");
        // Strict: cluster b is refused rather than handed shared ones.
        let a = super::target_for(&c.backup, "strict", "a").unwrap();
        assert_eq!(a.access_key_id, "a-key");
        let e = super::target_for(&c.backup, "strict", "b")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[backup.targets.strict.clusters.b]") && !e.contains("a-secret"),
            "{e}"
        );
        assert!(!format!("{c:?}").contains("a-secret"));
        let local = super::target_for(&c.backup, "local", "b").unwrap();
        assert_eq!((local.kind.as_str(), local.scope.as_str()), ("local", "b"));
    }

    #[test]
    fn bad_per_cluster_sections_are_named() {
        for (text, want) in [
            (
                "[backup.targets.x]\nkind = \"local\"\nrequire_cluster_credentials = true",
                "s3 targets only",
            ),
            (
                "[backup.targets.x]\nkind = \"s3\"\nendpoint = \"https://e\"\nbucket = \"b\"\n\
                 require_cluster_credentials = true\n[backup.targets.x.clusters.a]\n\
                 access_key_id = \"k\"",
                "backup.targets.x.clusters.a: an s3 target needs secret_access_key",
            ),
            (
                "[backup.targets.x]\nkind = \"s3\"\nendpoint = \"https://e\"\nbucket = \"b\"\n\
                 require_cluster_credentials = true\n[backup.targets.x.clusters.a]\n\
                 access_key = \"k\"",
                "unknown field",
            ),
        ] {
            let e = format!("{:#}", FileConfig::parse(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
