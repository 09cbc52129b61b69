//! Writing an archive: compress, then seal in chunks ([`Writer`]).

use std::io::{self, Write};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use sha2::{Digest, Sha256};

use super::format::*;

/// A writer dropped without `finish` leaves a stream without its final chunk,
/// which every reader reports as truncated.
pub struct Writer<W: Write> {
    encoder: zstd::stream::write::Encoder<'static, Sealer<W>>,
    plain_bytes: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the header to `out` and readies the compressor.
    pub fn new(out: W, key: &[u8; 32], header: Header) -> Result<Self> {
        Self::with_chunk_size(out, key, header, CHUNK_SIZE)
    }

    /// Like `new` with another chunk size: tests use small ones to make many chunks.
    pub(super) fn with_chunk_size(
        out: W,
        key: &[u8; 32],
        header: Header,
        chunk_size: usize,
    ) -> Result<Self> {
        debug_assert!((1..=MAX_CHUNK_SIZE).contains(&chunk_size));
        let mut nonce_prefix = [0u8; 8];
        getrandom::fill(&mut nonce_prefix).map_err(|e| {
            Error::Io(io::Error::other(format!(
                "reading the OS random number generator: {e}"
            )))
        })?;
        let meta = serde_json::to_vec(&header.meta).map_err(Error::Meta)?;
        if meta.len() > MAX_META {
            return Err(Error::MetaTooLarge { len: meta.len() });
        }
        let mut head = Vec::with_capacity(FIXED_HEADER + meta.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_be_bytes());
        head.extend_from_slice(&key_id_bytes(key));
        head.extend_from_slice(&nonce_prefix);
        head.extend_from_slice(&(chunk_size as u32).to_be_bytes());
        head.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        head.extend_from_slice(&meta);

        let mut out = Counted {
            inner: out,
            bytes: 0,
            hash: Sha256::new(),
        };
        out.write_all(&head)?;
        let sealer = Sealer {
            out,
            cipher: ChaCha20Poly1305::new(key.into()),
            nonce_prefix,
            header_hash: Sha256::digest(&head).into(),
            chunk_size,
            buf: Vec::with_capacity(chunk_size),
            chunks: 0,
        };
        let encoder = zstd::stream::write::Encoder::new(sealer, DEFAULT_LEVEL)?;
        Ok(Writer {
            encoder,
            plain_bytes: 0,
        })
    }

    /// Ends the compressed stream, seals the final chunk and flushes `W`.
    pub fn finish(self) -> Result<Summary> {
        let mut sealer = self.encoder.finish()?;
        sealer.seal(FLAG_FINAL)?;
        sealer.out.flush()?;
        Ok(Summary {
            plain_bytes: self.plain_bytes,
            stored_bytes: sealer.out.bytes,
            chunks: sealer.chunks,
            sha256_hex: hex::encode(sealer.out.hash.finalize()),
        })
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.encoder.write(buf)?;
        self.plain_bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Pushes compressed data down; chunks still seal only when full.
        self.encoder.flush()
    }
}

/// Counts and hashes what reaches the stored object.
pub(super) struct Counted<W> {
    inner: W,
    bytes: u64,
    hash: Sha256,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Takes compressed bytes from zstd and writes them out as sealed chunks.
pub(super) struct Sealer<W> {
    out: Counted<W>,
    cipher: ChaCha20Poly1305,
    nonce_prefix: [u8; 8],
    header_hash: [u8; 32],
    chunk_size: usize,
    /// Compressed bytes of the chunk being filled, at most `chunk_size`.
    buf: Vec<u8>,
    /// Chunks sealed so far, which is also the next chunk's number.
    chunks: u64,
}

impl<W: Write> Sealer<W> {
    fn seal(&mut self, flag: u8) -> io::Result<()> {
        let counter = u32::try_from(self.chunks).map_err(|_| {
            io::Error::other(format!(
                "a backup holds at most {} chunks",
                u32::MAX as u64 + 1
            ))
        })?;
        let nonce = chunk_nonce(&self.nonce_prefix, counter);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, &chunk_aad(&self.header_hash, flag), &mut self.buf)
            .map_err(|_| io::Error::other("sealing a backup chunk failed"))?;
        self.out.write_all(&[flag])?;
        self.out.write_all(&(self.buf.len() as u32).to_be_bytes())?;
        self.out.write_all(&self.buf)?;
        self.out.write_all(&tag)?;
        self.buf.clear();
        self.chunks += 1;
        Ok(())
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // A full chunk is sealed as "more follow" only once more data arrives,
        // so the final chunk is never empty unless the whole stream is.
        if self.buf.len() == self.chunk_size && !data.is_empty() {
            self.seal(FLAG_MORE)?;
        }
        let n = data.len().min(self.chunk_size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
