//! The backup archive: one stream, compressed, encrypted and checked.
//!
//! A backup leaves the node as a single object that the coordinator can store
//! anywhere without being able to read it: the agent compresses the engine's
//! output with zstd, then seals it in chunks with ChaCha20-Poly1305 under a
//! key the coordinator holds. Both ends stream: [`Writer`] and [`Reader`] hold
//! one chunk (plus zstd's window), never the whole backup.
//!
//! # Layout
//!
//! All integers are big-endian.
//!
//! ```text
//! header  "CORRALBK"        magic, 8 bytes
//!         version   u16     format version, 1
//!         key id    8 bytes first 8 bytes of SHA-256("corral backup key id\0" || key)
//!         nonce     8 bytes random per archive, the prefix of every chunk's nonce
//!         chunk     u32     most compressed bytes one chunk carries (1 MiB)
//!         meta len  u32     length of the metadata, at most 1 MiB
//!         meta      JSON    what the caller passed in Header::meta
//! chunks  flag      u8      0 = more chunks follow, 1 = final chunk
//!         len       u32     compressed bytes in this chunk, at most `chunk`
//!         data      len     ciphertext
//!         tag       16      Poly1305 tag
//! ```
//!
//! Chunk `i` is sealed with nonce `nonce prefix || i as u32` and associated data
//! `SHA-256(header) || flag`. So every chunk vouches for the whole header, for
//! its own place in the sequence (a dropped, repeated or reordered chunk fails
//! to open) and for whether it is the last one (a stream cut at a chunk
//! boundary lacks its final chunk). Only the final chunk may be short, so the
//! writer never has to look back; bytes after the final chunk are rejected.
//!
//! The key id is in the clear so that a restore with the wrong key says which
//! key it needs rather than failing as "corrupt". [`sha256_of`] checks a stored
//! object against the checksum recorded at upload without needing the key.

mod format;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

pub use format::{
    key_id, sha256_of, Error, Header, Result, Summary, CHUNK_SIZE, DEFAULT_LEVEL, MAGIC, VERSION,
};
pub use reader::Reader;
pub use writer::Writer;
