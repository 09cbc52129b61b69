//! Where WAL is archived (`wal-archive.json`, 0600), as the primary's
//! ConfigureEngine last said: saved by the engine, read by the uploader.
//! It depends only on the key check, so the engine can use it without a cycle.

use super::key::key_of;
use anyhow::{Context, Result};
use corral_proto::pb;
use prost::Message;
use std::path::{Path, PathBuf};

fn config_path(state_dir: &Path) -> PathBuf {
    state_dir.join("wal-archive.json")
}

/// Records where WAL goes (None: nowhere), for the uploader.
pub fn save(state_dir: &Path, wal: Option<&pb::WalArchive>) -> Result<()> {
    let path = config_path(state_dir);
    match wal {
        Some(w) => {
            key_of(&w.key)?;
            let doc = serde_json::json!({ "wal_archive": hex::encode(w.encode_to_vec()) });
            let text = serde_json::to_string(&doc)?;
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                corral_proto::pki::write_private(&path, &text)?;
            }
        }
        None => match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        },
    }
    Ok(())
}

/// Where WAL goes, as last saved.
pub fn load(state_dir: &Path) -> Result<Option<pb::WalArchive>> {
    let path = config_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
    let bytes = hex::decode(doc["wal_archive"].as_str().unwrap_or_default())
        .with_context(|| format!("{} is not valid", path.display()))?;
    Ok(Some(pb::WalArchive::decode(&bytes[..]).with_context(
        || format!("{} is not valid", path.display()),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let w = pb::WalArchive {
            target: Some(pb::BackupTarget {
                name: "t".into(),
                kind: "local".into(),
                ..Default::default()
            }),
            key: vec![5; 32],
            prefix: "wal/c/1/".into(),
        };
        save(dir.path(), Some(&w)).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(w));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(config_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        save(dir.path(), None).unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let bad = pb::WalArchive {
            key: vec![1; 5],
            ..Default::default()
        };
        assert!(save(dir.path(), Some(&bad)).is_err());
    }
}
