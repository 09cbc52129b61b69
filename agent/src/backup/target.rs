//! Where backups are stored: a directory on the node, or an S3-compatible
//! object store (object_store). Objects are written as streams, never
//! staged whole on disk, and appear only once complete.
//!
//! (Skeleton: the API the rest of the agent uses. Implementation pending.)

use anyhow::{bail, Result};
use bytes::Bytes;
use corral_proto::pb;
use futures::stream::BoxStream;
use std::io::{Read, Write};
use std::path::Path;

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its full name inside the target (what `put_stream` was given).
    pub name: String,
    pub size: u64,
    pub modified_ms: i64,
}

/// An opened backup target.
pub struct Target {
    name: String,
}

impl Target {
    /// Opens a target the coordinator described. `local_default` is the
    /// directory of a local target whose path is empty. Checks the
    /// description only (no I/O): a bad one is named with what to fix.
    pub fn open(t: &pb::BackupTarget, local_default: &Path) -> Result<Target> {
        let _ = local_default;
        bail!("backup target {:?}: not implemented yet", t.name)
    }

    /// The operator's name of the target and where it points, for messages
    /// (never credentials), e.g. `offsite (s3 http://10.0.0.1:9000 bucket corral)`.
    pub fn describe(&self) -> String {
        self.name.clone()
    }

    /// Runs `produce` on a blocking thread and streams what it writes to
    /// `object`. The object exists afterwards only if `produce` returned Ok
    /// and every byte was stored; otherwise nothing is left under that name
    /// (an S3 multipart upload is aborted, a local temporary file removed).
    /// Returns `produce`'s value and the bytes stored.
    pub async fn put_stream<T, F>(&self, object: &str, produce: F) -> Result<(T, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
    {
        let _ = (object, produce);
        bail!("not implemented")
    }

    /// Streams `object` into `consume`, run on a blocking thread.
    pub async fn get_stream<T, F>(&self, object: &str, consume: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
    {
        let _ = (object, consume);
        bail!("not implemented")
    }

    /// The object's stored bytes, in chunks (for downloads).
    pub async fn get_chunks(&self, object: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let _ = object;
        bail!("not implemented")
    }

    /// Objects whose name starts with `prefix`, sorted by name.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let _ = prefix;
        bail!("not implemented")
    }

    /// Deletes every object whose name starts with `prefix` (refused when
    /// empty); returns how many. Idempotent.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let _ = prefix;
        bail!("not implemented")
    }
}
