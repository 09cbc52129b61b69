//! Backups of one cluster are out of reach of another cluster's nodes: two
//! clusters back up to the same S3 target; the node of cluster B holds (in
//! its WAL archive configuration) only B's key and a target scoped to B,
//! with which cluster A's archive does not open; and with A's only node
//! down, the coordinator refuses to read or delete A's backup through B's
//! node rather than hand it A's key and objects. Also: per-cluster storage
//! credentials reach only their cluster's nodes, and a cluster archiving
//! WAL with the master key (before per-cluster keys) is moved to its own.

use corral_proto::archive;
use corral_tests::s3::{archive_wal, lab_with_s3};
use corral_tests::{wait_until, Lab};
use prost::Message;
use serde_json::Value;
use std::time::Duration;

fn backup_now(lab: &Lab, cluster: &str) -> Value {
    lab.ctl_ok(&["backup", "now", cluster, "--target", "s3"])
        .unwrap();
    let list = lab.ctl_json(&["backup", "list", cluster]).unwrap();
    let b = list["backups"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(b["state"], "succeeded", "{b}");
    b
}

/// The key id an archive names in its clear header.
fn key_id_of(object: &[u8]) -> String {
    hex::encode(&object[10..18])
}

#[test]
fn a_node_of_cluster_b_cannot_read_or_delete_cluster_a_s_backups() {
    let (mut lab, s3) = lab_with_s3(2, "");
    // Cluster a: Redis on vm1. Cluster b: PostgreSQL on vm2, archiving its
    // WAL to the same target (so vm2 keeps a key and a target on disk).
    lab.ctl_ok(&[
        "cluster", "create", "--name", "a", "--engine", "redis", "--nodes", "vm1",
    ])
    .unwrap();
    lab.create_replicated("b", "vm2", &[]).unwrap();
    archive_wal(&lab, "b", "s3");
    let a = backup_now(&lab, "a");
    let b = backup_now(&lab, "b");
    let a_id = a["id"].as_str().unwrap().to_string();
    let a_object = format!("backups/a/{a_id}.cbk");
    let a_bytes = std::fs::read(s3.object_file(&a_object)).unwrap();

    // Each cluster's archives are under a key of its own, and neither is
    // the coordinator's master key.
    let master_hex = std::fs::read_to_string(lab.dir().join("coordinator/backup.key")).unwrap();
    let master: [u8; 32] = hex::decode(master_hex.trim()).unwrap().try_into().unwrap();
    let master_id = archive::key_id(&master);
    assert_eq!(key_id_of(&a_bytes), a["key_id"].as_str().unwrap());
    assert_ne!(a["key_id"], b["key_id"], "{a} {b}");
    assert_ne!(a["key_id"].as_str().unwrap(), master_id);
    assert_ne!(b["key_id"].as_str().unwrap(), master_id);

    // What vm2 (cluster b) was given: its WAL archive's key and target.
    let saved = std::fs::read_to_string(lab.state_dir(2).join("wal-archive.json")).unwrap();
    let doc: Value = serde_json::from_str(&saved).unwrap();
    let wal = corral_proto::pb::WalArchive::decode(
        &hex::decode(doc["wal_archive"].as_str().unwrap()).unwrap()[..],
    )
    .unwrap();
    let b_key: [u8; 32] = wal.key.as_slice().try_into().unwrap();
    assert_eq!(archive::key_id(&b_key), b["key_id"].as_str().unwrap());
    assert_eq!(wal.target.as_ref().unwrap().scope, "b");
    assert!(wal.prefix.starts_with("wal/b/"), "{}", wal.prefix);
    // With it, cluster a's archive does not open.
    let err = archive::Reader::new(&a_bytes[..], &b_key).err().unwrap();
    assert!(matches!(err, archive::Error::WrongKey { .. }), "{err}");

    // With a's only node down, b's node is the only one up: the
    // coordinator reads and deletes a's backup through no other cluster's
    // node.
    lab.stop_agent(1).unwrap();
    lab.wait_node_state("vm1", "down", Duration::from_secs(30))
        .unwrap();
    let out_file = lab.dir().join("a.rdb");
    let path = out_file.to_string_lossy().into_owned();
    for raw in [false, true] {
        let mut args = vec!["backup", "download", "a", a_id.as_str(), path.as_str()];
        if raw {
            args.push("--raw");
        }
        let out = lab.ctl(&args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "downloaded through vm2: {err}");
        assert!(err.contains("no node of cluster a"), "{err}");
        assert!(!out_file.exists());
    }
    let out = lab
        .ctl(&["backup", "delete", "a", &a_id, "--confirm", &a_id])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "deleted through vm2: {err}");
    assert!(err.contains("no node of cluster a"), "{err}");
    assert!(s3.objects().contains(&a_object), "{:?}", s3.objects());

    // Its own node back, the backup reads again.
    lab.start_agent(1, None).unwrap();
    lab.wait_node_state("vm1", "up", Duration::from_secs(30))
        .unwrap();
    lab.ctl_ok(&["backup", "download", "a", &a_id, &path])
        .unwrap();
    let rdb = std::fs::read(&out_file).unwrap();
    assert!(rdb.starts_with(b"REDIS"), "{:?}", &rdb[..rdb.len().min(16)]);
}

#[test]
fn a_cluster_archiving_wal_with_the_master_key_is_moved_to_its_own_key() {
    let (mut lab, _s3) = lab_with_s3(1, "");
    lab.create_replicated("p", "vm1", &[]).unwrap();
    archive_wal(&lab, "p", "s3");
    let first = lab.operation("p", "configure_backups").unwrap();
    // As a coordinator before per-cluster keys left it: the node archives
    // with the master key under the old prefix, and no keyed archive is
    // recorded.
    lab.stop_coordinator().unwrap();
    let store =
        corral_coordinator::store::Store::open(&lab.dir().join("coordinator/corral.db")).unwrap();
    store
        .read(|c| Ok(c.execute("DELETE FROM backup_wal_keyed", ())?))
        .unwrap();
    drop(store);
    let wal_file = lab.state_dir(1).join("wal-archive.json");
    let read_wal = || {
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(&wal_file).unwrap()).unwrap();
        corral_proto::pb::WalArchive::decode(
            &hex::decode(doc["wal_archive"].as_str().unwrap()).unwrap()[..],
        )
        .unwrap()
    };
    let master_hex = std::fs::read_to_string(lab.dir().join("coordinator/backup.key")).unwrap();
    let mut legacy = read_wal();
    assert!(legacy.prefix.ends_with("/k1/"), "{}", legacy.prefix);
    legacy.prefix = legacy.prefix.trim_end_matches("k1/").to_string();
    legacy.key = hex::decode(master_hex.trim()).unwrap();
    legacy.target.as_mut().unwrap().scope.clear();
    let doc = serde_json::json!({ "wal_archive": hex::encode(legacy.encode_to_vec()) });
    std::fs::write(&wal_file, doc.to_string()).unwrap();

    // The coordinator, restarted, reconfigures the cluster once.
    lab.start_coordinator().unwrap();
    wait_until(
        Duration::from_secs(60),
        "the cluster's WAL archive to move to its key",
        || {
            let op = lab.operation("p", "configure_backups")?;
            Ok(op["id"] != first["id"] && op["state"] == "succeeded")
        },
    )
    .unwrap();
    let moved = lab.operation("p", "configure_backups").unwrap();
    assert!(
        moved["requested_by"]
            .as_str()
            .unwrap()
            .contains("cluster's key"),
        "{moved}"
    );
    let now = read_wal();
    assert!(now.prefix.ends_with("/k1/"), "{}", now.prefix);
    assert_eq!(now.target.unwrap().scope, "p");
    let key: [u8; 32] = now.key.as_slice().try_into().unwrap();
    let master: [u8; 32] = hex::decode(master_hex.trim()).unwrap().try_into().unwrap();
    assert_ne!(key, master);
}

#[test]
fn a_cluster_s_nodes_use_its_own_storage_credentials() {
    // Cluster a has credentials of its own, which the S3 server does not
    // know; a target requiring per-cluster credentials has none for b.
    let (mut lab, s3) = lab_with_s3(2, "");
    let strict = s3
        .target_toml("strict")
        .replace("access_key_id = ", "require_cluster_credentials = true\n# ")
        .replace("secret_access_key = ", "# ");
    lab.opts.coordinator_config = Some(format!(
        "{}\n[backup.targets.s3.clusters.a]\naccess_key_id = \"cluster-a-key\"\n\
         secret_access_key = \"cluster-a-secret-0123456789\"\n{strict}",
        s3.target_toml("s3")
    ));
    lab.stop_coordinator().unwrap();
    lab.start_coordinator().unwrap();
    for i in 1..=2 {
        lab.wait_node_state(&format!("vm{i}"), "up", Duration::from_secs(20))
            .unwrap();
    }
    for (name, vm) in [("a", "vm1"), ("b", "vm2")] {
        lab.ctl_ok(&[
            "cluster", "create", "--name", name, "--engine", "redis", "--nodes", vm,
        ])
        .unwrap();
    }
    // b's node gets the target's credentials: stored.
    let b = backup_now(&lab, "b");
    assert!(s3
        .objects()
        .contains(&format!("backups/b/{}.cbk", b["id"].as_str().unwrap())));
    // a's node gets a's credentials only (the server refuses them here),
    // never the shared ones.
    let out = lab.ctl(&["backup", "now", "a", "--target", "s3"]).unwrap();
    assert!(!out.status.success());
    let list = lab.ctl_json(&["backup", "list", "a"]).unwrap();
    let failed = list["backups"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        !s3.objects().iter().any(|o| o.starts_with("backups/a/")),
        "{:?}",
        s3.objects()
    );
    // The strict target has no credentials for b: refused, naming what to add.
    let out = lab
        .ctl(&["backup", "now", "b", "--target", "strict"])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("[backup.targets.strict.clusters.b]"), "{err}");
}
