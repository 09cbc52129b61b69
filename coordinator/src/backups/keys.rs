//! Per-cluster backup keys and storage scopes.
//!
//! The coordinator's backup key file holds the master key, which never
//! leaves the coordinator. Each cluster's backups (and PostgreSQL's
//! archived WAL) are encrypted with a key derived from it by HKDF-SHA256,
//! bound to the cluster's identity: its name and the millisecond it was
//! created (clusters are never renamed, and a cluster re-created under a
//! former name has another creation time, so another key). A node gets only
//! the key of its own cluster, so a database VM of cluster B cannot open
//! cluster A's archives with anything it was given.
//!
//! Each backup records the scope its key was derived for (`key_scope`);
//! backups taken before per-cluster keys have an empty scope and were
//! encrypted with the master key itself. Those stay restorable: for them
//! the master key is handed, per request, only to a node allowed to read
//! that backup (a node of its own cluster, a node in no cluster, or the
//! node a restore fills), exactly as every node held it before.

use crate::store::{ClusterRow, NodeRow};
use hkdf::Hkdf;
use sha2::Sha256;

/// Binds derived keys to their use, and versions the derivation.
const INFO_PREFIX: &str = "corral backup key v1\0";
/// HKDF's salt: fixed, since the master key is already uniformly random.
const SALT: &[u8] = b"corral-backup-key-derivation";

/// The key scope of `cluster`: what its key is derived for.
pub fn scope_of(cluster: &ClusterRow) -> String {
    scope_for(&cluster.name, cluster.created_at_ms)
}

/// The key scope of the cluster `name` created at `created_at_ms`.
pub fn scope_for(name: &str, created_at_ms: i64) -> String {
    format!("cluster:{name}:{created_at_ms}")
}

/// The key for `scope`: the master key itself for the empty scope (backups
/// taken before per-cluster keys), else HKDF-SHA256 of it.
pub fn derive(master: &[u8; 32], scope: &str) -> [u8; 32] {
    if scope.is_empty() {
        return *master;
    }
    let hk = Hkdf::<Sha256>::new(Some(SALT), master);
    let mut out = [0u8; 32];
    let info = [INFO_PREFIX.as_bytes(), scope.as_bytes()].concat();
    hk.expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// Whether `node` may be handed the objects and key of a backup of
/// `cluster`: a node of that cluster, or a node in no cluster (a spare,
/// which reads for a deleted cluster's backups); never a node of another
/// cluster.
pub fn may_read(node: &NodeRow, cluster: &str) -> bool {
    match node.cluster.as_deref() {
        None | Some("") => true,
        Some(c) => c == cluster,
    }
}

/// Pure: among the nodes `up`, the one to read backup `id` of `cluster`
/// (taken by `taker`) through; `local`: the target is the taker's own
/// directory, so only the taker can.
pub fn pick_reader(
    up: &[NodeRow],
    id: &str,
    cluster: &str,
    taker: &str,
    local: bool,
) -> anyhow::Result<NodeRow> {
    if let Some(n) = up.iter().find(|n| n.id == taker) {
        if may_read(n, cluster) {
            return Ok(n.clone());
        }
        if local {
            anyhow::bail!(
                "backup {id} of cluster {cluster} is in the local target of node {taker}, which                  now serves cluster {}: a node of another cluster is never handed a cluster's                  backups or key; free {taker} (`corralctl node remove`) to read it there",
                n.cluster.as_deref().unwrap_or_default()
            );
        }
    }
    if local {
        anyhow::bail!(
            "backup {id} is in the local target of node {taker}, which is not up; it can be              read only there"
        );
    }
    up.iter()
        .filter(|n| may_read(n, cluster))
        .max_by_key(|n| n.cluster.as_deref() == Some(cluster))
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no node of cluster {cluster} (nor a node in no cluster) is up to read backup                  {id} through; a node of another cluster is never handed its objects or key:                  start a node of {cluster}, or a free node"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::archive;
    use std::io::{Read, Write};

    fn seal(key: &[u8; 32], data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let header = archive::Header {
            meta: serde_json::json!({ "kind": "backup" }),
        };
        let mut w = archive::Writer::new(&mut out, key, header).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn keys_differ_per_cluster_and_incarnation_and_from_the_master() {
        let master = [42u8; 32];
        let a = derive(&master, &scope_for("a", 1000));
        let b = derive(&master, &scope_for("b", 1000));
        let a_again = derive(&master, &scope_for("a", 1000));
        let a_recreated = derive(&master, &scope_for("a", 2000));
        assert_eq!(a, a_again, "the derivation is stable");
        assert_ne!(a, b);
        assert_ne!(a, a_recreated, "a re-created cluster gets a new key");
        assert_ne!(a, master);
        assert_ne!(
            derive(&[43u8; 32], &scope_for("a", 1000)),
            a,
            "another master key derives another key"
        );
        // The empty scope is the old format: the master key itself.
        assert_eq!(derive(&master, ""), master);
        // Names cannot be confused with the creation time.
        assert_ne!(
            derive(&master, &scope_for("a:1", 0)),
            derive(&master, &scope_for("a", 10))
        );
    }

    #[test]
    fn an_archive_of_cluster_a_does_not_open_with_cluster_b_s_key() {
        let master = [7u8; 32];
        let ka = derive(&master, &scope_for("a", 5));
        let kb = derive(&master, &scope_for("b", 6));
        let obj = seal(&ka, b"cluster a's rows");
        let err = archive::Reader::new(&obj[..], &kb).err().unwrap();
        assert!(matches!(err, archive::Error::WrongKey { .. }), "{err}");
        let mut plain = Vec::new();
        archive::Reader::new(&obj[..], &ka)
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, b"cluster a's rows");
    }

    #[test]
    fn an_old_format_archive_opens_with_the_empty_scope() {
        let master = [9u8; 32];
        let obj = seal(&master, b"taken before per-cluster keys");
        let mut plain = Vec::new();
        archive::Reader::new(&obj[..], &derive(&master, ""))
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, b"taken before per-cluster keys");
        assert!(archive::Reader::new(&obj[..], &derive(&master, &scope_for("c", 1))).is_err());
    }

    fn node(id: &str, cluster: Option<&str>) -> NodeRow {
        NodeRow {
            id: id.into(),
            address: String::new(),
            cluster: cluster.map(str::to_string),
            role: String::new(),
            enrolled_at_ms: 0,
            cert_not_after_ms: 0,
        }
    }

    #[test]
    fn a_backup_is_read_only_through_its_cluster_s_nodes_or_a_spare() {
        let a1 = node("a1", Some("a"));
        let a2 = node("a2", Some("a"));
        let b1 = node("b1", Some("b"));
        let free = node("f", None);
        let pick = |up: &[NodeRow], local| pick_reader(up, "bk-1", "a", "a1", local).map(|n| n.id);
        assert_eq!(
            pick(&[b1.clone(), a1.clone(), a2.clone()], false).unwrap(),
            "a1"
        );
        assert_eq!(
            pick(&[b1.clone(), a2.clone(), free.clone()], false).unwrap(),
            "a2"
        );
        assert_eq!(pick(&[b1.clone(), free.clone()], false).unwrap(), "f");
        let e = pick(std::slice::from_ref(&b1), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no node of cluster a") && e.contains("never handed"),
            "{e}"
        );
        // Local: only the taker, and not once it serves another cluster.
        assert!(pick(std::slice::from_ref(&a2), true).is_err());
        let moved = node("a1", Some("b"));
        let e = pick(&[moved, a2.clone()], true).unwrap_err().to_string();
        assert!(e.contains("now serves cluster b"), "{e}");
        let moved = node("a1", Some("b"));
        assert_eq!(pick(&[moved, a2], false).unwrap(), "a2");
    }

    #[test]
    fn only_the_cluster_s_own_nodes_and_spares_may_read() {
        let node = |cluster: Option<&str>| NodeRow {
            id: "n".into(),
            address: String::new(),
            cluster: cluster.map(str::to_string),
            role: String::new(),
            enrolled_at_ms: 0,
            cert_not_after_ms: 0,
        };
        assert!(may_read(&node(Some("a")), "a"));
        assert!(may_read(&node(None), "a"));
        assert!(!may_read(&node(Some("b")), "a"));
        assert!(!may_read(&node(Some("ab")), "a"));
    }
}
