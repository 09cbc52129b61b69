//! Defence in depth for storage isolation: a request's target carries the
//! cluster whose objects it may touch (`scope`), and the agent refuses any
//! object name or prefix outside that cluster's `backups/<scope>/` and
//! `wal/<scope>/`, whatever the coordinator asked.

use anyhow::{bail, Result};
use corral_proto::pb;

/// Checks that `name` (an object, or a prefix to list or delete) lies in
/// the cluster prefixes `target` is scoped to. An unscoped target (from a
/// coordinator before per-cluster scopes) is not restricted.
pub fn check(target: &pb::BackupTarget, name: &str) -> Result<()> {
    let scope = target.scope.as_str();
    if scope.is_empty() {
        return Ok(());
    }
    if scope.contains('/') || scope == "." || scope == ".." {
        bail!("the backup target's scope {scope:?} is not a cluster name");
    }
    let inside = ["backups", "wal"]
        .iter()
        .any(|top| name.starts_with(&format!("{top}/{scope}/")));
    let climbs = name.split('/').any(|part| part == "..");
    if !inside || climbs {
        bail!(
            "refusing {name:?}: this request is for cluster {scope}, whose objects are under \
             backups/{scope}/ and wal/{scope}/ only; a node is never handed another cluster's \
             backups"
        );
    }
    Ok(())
}

/// For TakeBackup and WAL archiving: the target must be scoped to
/// `cluster`, the one this node serves, when it is scoped at all.
pub fn check_own(target: &pb::BackupTarget, cluster: &str, name: &str) -> Result<()> {
    if !target.scope.is_empty() && target.scope != cluster {
        bail!(
            "refusing to write objects of cluster {:?}: this node serves cluster {cluster:?}",
            target.scope
        );
    }
    check(target, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scoped(scope: &str) -> pb::BackupTarget {
        pb::BackupTarget {
            name: "s3".into(),
            kind: "s3".into(),
            scope: scope.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_scoped_cluster_s_prefixes_pass() {
        let b = scoped("b");
        check(&b, "backups/b/bk-1.cbk").unwrap();
        check(&b, "wal/b/100/k1/000000010000000000000003").unwrap();
        check(&b, "wal/b/").unwrap();
        for bad in [
            "backups/a/bk-1.cbk",
            "wal/a/100/k1/",
            "backups/bb/bk-1.cbk",
            "backups/b",
            "backups/",
            "",
            "other/b/x",
            "backups/b/../a/bk-1.cbk",
        ] {
            let e = check(&b, bad).unwrap_err().to_string();
            assert!(e.contains("for cluster b"), "{bad}: {e}");
        }
        // Unscoped (an older coordinator): not restricted here.
        check(&scoped(""), "backups/a/bk-1.cbk").unwrap();
        assert!(check(&scoped("../x"), "backups/../x/y").is_err());
    }

    #[test]
    fn a_node_writes_only_its_own_cluster_s_objects() {
        check_own(&scoped("b"), "b", "backups/b/bk-1.cbk").unwrap();
        let e = check_own(&scoped("a"), "b", "backups/a/bk-1.cbk")
            .unwrap_err()
            .to_string();
        assert!(e.contains("serves cluster \"b\""), "{e}");
    }
}
