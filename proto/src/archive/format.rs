//! The archive's format: constants, header and summary types, errors, key ids,
//! and the nonce and associated data that bind each chunk to its place.

use std::io::{self, Read};

use chacha20poly1305::Nonce;
use sha2::{Digest, Sha256};

/// The first bytes of every archive.
pub const MAGIC: &[u8; 8] = b"CORRALBK";
/// The format version this binary writes, and the newest it reads.
pub const VERSION: u16 = 1;
/// Compressed bytes per chunk: big enough that the 21 bytes of framing and tag
/// are noise, small enough that reader and writer hold little.
pub const CHUNK_SIZE: usize = 1 << 20;
/// zstd level 1. The backup benchmark found level 3 (zstd's default) the
/// bottleneck of a 1 GB PostgreSQL backup: one core at about 100 MB/s,
/// three quarters of it compressing. Level 1 is about three times faster on
/// such data and compresses it as well (hex text: 2.00x, level 3 1.92x).
pub const DEFAULT_LEVEL: i32 = 1;

/// A reader refuses headers that would make it allocate more than this per chunk.
pub(super) const MAX_CHUNK_SIZE: usize = 16 << 20;
/// Metadata is a few fields (engine, cluster, node, times, position), not data.
pub(super) const MAX_META: usize = 1 << 20;
/// Header bytes before the metadata: magic, version, key id, nonce, chunk, meta len.
pub(super) const FIXED_HEADER: usize = 8 + 2 + 8 + 8 + 4 + 4;
/// Flag and length in front of each chunk's ciphertext.
pub(super) const CHUNK_HEAD: usize = 1 + 4;
pub(super) const TAG_LEN: usize = 16;
pub(super) const FLAG_MORE: u8 = 0;
pub(super) const FLAG_FINAL: u8 = 1;

/// What an archive says about itself, readable before any chunk is opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Whatever the caller records: engine, cluster, node, times, position.
    /// It is in the clear (stores list backups without the key) but
    /// authenticated: changing it makes every chunk fail to open.
    pub meta: serde_json::Value,
}

/// What [`Writer::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Bytes the caller wrote, before compression.
    pub plain_bytes: u64,
    /// Bytes of the archive, header included: the size of the stored object.
    pub stored_bytes: u64,
    /// Sealed chunks, the final one included.
    pub chunks: u64,
    /// SHA-256 of the stored bytes in lowercase hex, to record next to the
    /// object and check later with [`sha256_of`].
    pub sha256_hex: String,
}

/// Why an archive could not be written or read.
///
/// [`Reader`] reports through `std::io::Read`, so its errors arrive as
/// `io::Error`; `Error::from` turns them back into this type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "not a Corral backup (bad magic): the object does not start with CORRALBK; \
         check that the right object was fetched"
    )]
    BadMagic,
    #[error(
        "backup format version {found} is newer than this binary reads (version {VERSION}); \
         restore with a newer corral"
    )]
    NewerVersion { found: u16 },
    #[error("backup header is corrupt: {what}; restore from another backup")]
    BadHeader { what: String },
    #[error(
        "backup was encrypted with key {archive}, not this key {configured}; \
         configure the key the backup was made with"
    )]
    WrongKey { archive: String, configured: String },
    #[error(
        "backup is corrupt at chunk {chunk} (stored byte offset {offset}): {what}; \
         the object changed after it was written, restore from another backup"
    )]
    Corrupt {
        chunk: u64,
        offset: u64,
        what: String,
    },
    #[error(
        "backup is truncated at chunk {chunk} (stored byte offset {offset}): {what}; \
         fetch the object again, or restore from another backup"
    )]
    Truncated {
        chunk: u64,
        offset: u64,
        what: String,
    },
    #[error("backup metadata cannot be written as JSON: {0}")]
    Meta(#[source] serde_json::Error),
    #[error("backup metadata is {len} bytes, more than the {MAX_META} allowed; record less in it")]
    MetaTooLarge { len: usize },
    #[error("reading or writing the backup stream: {0}")]
    Io(#[source] io::Error),
}

impl From<io::Error> for Error {
    /// Unwraps the archive errors that [`Reader`] and [`Writer`] carry inside
    /// `io::Error`; any other I/O failure stays [`Error::Io`].
    fn from(e: io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            return Error::Io(e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(ours)) => *ours,
            Some(Err(other)) => Error::Io(io::Error::new(kind, other)),
            None => Error::Io(kind.into()),
        }
    }
}

impl Error {
    pub(super) fn into_io(self) -> io::Error {
        let kind = match self {
            Error::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            Error::Io(e) => return e,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The short, public name of a key: shown to operators and written in every
/// archive so a restore can tell a wrong key from a corrupt object.
pub fn key_id(key: &[u8; 32]) -> String {
    hex::encode(key_id_bytes(key))
}

pub(super) fn key_id_bytes(key: &[u8; 32]) -> [u8; 8] {
    // Domain-separated so the id is never the hash of the key used elsewhere.
    let digest = Sha256::new()
        .chain_update(b"corral backup key id\0")
        .chain_update(key)
        .finalize();
    digest[..8].try_into().expect("SHA-256 is 32 bytes")
}

/// SHA-256 of everything `reader` yields, in lowercase hex: checks a stored
/// object against [`Summary::sha256_hex`] without the key.
pub fn sha256_of<R: Read>(mut reader: R) -> Result<String> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(hex::encode(hash.finalize())),
            Ok(n) => hash.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes an archive to `W`: write the plain bytes, then [`Writer::finish`].
pub(super) fn chunk_nonce(prefix: &[u8; 8], counter: u32) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(prefix);
    nonce[8..].copy_from_slice(&counter.to_be_bytes());
    nonce.into()
}

pub(super) fn chunk_aad(header_hash: &[u8; 32], flag: u8) -> [u8; 33] {
    let mut aad = [0u8; 33];
    aad[..32].copy_from_slice(header_hash);
    aad[32] = flag;
    aad
}
