//! Reading an archive: open chunks in order, then decompress ([`Reader`]).

use std::io::{self, BufRead, Read};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Tag};
use sha2::{Digest, Sha256};

use super::format::*;

/// Reads an archive: the header at once, the plain bytes through `io::Read`.
///
/// Bytes come out only from chunks that opened, so a caller may stream them
/// into a restore; but only reaching EOF without an error proves the whole
/// backup was there, so a restore must not be declared good before that.
pub struct Reader<R: Read> {
    decoder: zstd::stream::read::Decoder<'static, Opener<R>>,
    header: Header,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header: magic, version, and that `key` is the one
    /// the archive was written with.
    pub fn new(mut input: R, key: &[u8; 32]) -> Result<Self> {
        let mut fixed = [0u8; FIXED_HEADER];
        let got = read_full(&mut input, &mut fixed)?;
        if got < MAGIC.len() || &fixed[..MAGIC.len()] != MAGIC {
            return Err(Error::BadMagic);
        }
        let short = |got: usize| Error::BadHeader {
            what: format!("the object ends after {got} bytes, inside the header"),
        };
        if got < FIXED_HEADER {
            return Err(short(got));
        }
        let version = u16::from_be_bytes([fixed[8], fixed[9]]);
        if version > VERSION {
            return Err(Error::NewerVersion { found: version });
        }
        if version == 0 {
            return Err(Error::BadHeader {
                what: "format version 0 does not exist".into(),
            });
        }
        let archive_key_id = hex::encode(&fixed[10..18]);
        let nonce_prefix: [u8; 8] = fixed[18..26].try_into().expect("8 bytes");
        let chunk_size = u32::from_be_bytes(fixed[26..30].try_into().expect("4 bytes")) as usize;
        let meta_len = u32::from_be_bytes(fixed[30..34].try_into().expect("4 bytes")) as usize;
        if !(1..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(Error::BadHeader {
                what: format!("chunk size {chunk_size} is out of range"),
            });
        }
        if meta_len > MAX_META {
            return Err(Error::BadHeader {
                what: format!("metadata length {meta_len} is out of range"),
            });
        }
        let mut meta = vec![0u8; meta_len];
        let got_meta = read_full(&mut input, &mut meta)?;
        if got_meta < meta_len {
            return Err(short(FIXED_HEADER + got_meta));
        }
        let configured = key_id(key);
        if archive_key_id != configured {
            return Err(Error::WrongKey {
                archive: archive_key_id,
                configured,
            });
        }
        let header_hash: [u8; 32] = Sha256::new()
            .chain_update(fixed)
            .chain_update(&meta)
            .finalize()
            .into();
        let meta = serde_json::from_slice(&meta).map_err(|e| Error::BadHeader {
            what: format!("metadata is not JSON ({e})"),
        })?;
        let opener = Opener {
            input,
            cipher: ChaCha20Poly1305::new(key.into()),
            nonce_prefix,
            header_hash,
            chunk_size,
            buf: Vec::new(),
            pos: 0,
            chunk: 0,
            offset: (FIXED_HEADER + meta_len) as u64,
            done: false,
        };
        let decoder = zstd::stream::read::Decoder::with_buffer(opener)?;
        Ok(Reader {
            decoder,
            header: Header { meta },
        })
    }

    /// The header as written, available before any data is read.
    pub fn header(&self) -> &Header {
        &self.header
    }
}

impl<R: Read> Read for Reader<R> {
    /// Plain bytes; a damaged archive fails with an `io::Error` carrying
    /// [`Error::Corrupt`] or [`Error::Truncated`] (see `Error::from`).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.decoder.read(buf)
    }
}

/// Opens sealed chunks one at a time and hands their compressed bytes to zstd.
pub(super) struct Opener<R> {
    input: R,
    cipher: ChaCha20Poly1305,
    nonce_prefix: [u8; 8],
    header_hash: [u8; 32],
    chunk_size: usize,
    /// The opened chunk's compressed bytes; `pos` of them have been consumed.
    buf: Vec<u8>,
    pos: usize,
    /// Number of the next chunk to open.
    chunk: u64,
    /// Stored offset of the next chunk, for error messages.
    offset: u64,
    /// The final chunk opened and nothing followed it.
    done: bool,
}

impl<R: Read> Opener<R> {
    fn open_next(&mut self) -> Result<()> {
        let (chunk, offset) = (self.chunk, self.offset);
        let corrupt = |what: String| Error::Corrupt {
            chunk,
            offset,
            what,
        };
        let truncated = |what: String| Error::Truncated {
            chunk,
            offset,
            what,
        };

        let mut head = [0u8; CHUNK_HEAD];
        match read_full(&mut self.input, &mut head)? {
            0 => return Err(truncated("the stream ends before its final chunk".into())),
            n if n < CHUNK_HEAD => {
                return Err(truncated(format!(
                    "the stream ends {n} bytes into the chunk"
                )))
            }
            _ => {}
        }
        let flag = head[0];
        if flag != FLAG_MORE && flag != FLAG_FINAL {
            return Err(corrupt(format!("unknown chunk flag {flag}")));
        }
        let len = u32::from_be_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        if len > self.chunk_size {
            return Err(corrupt(format!(
                "chunk length {len} exceeds the chunk size {}",
                self.chunk_size
            )));
        }
        let counter = u32::try_from(chunk)
            .map_err(|_| corrupt("more chunks than the format allows".into()))?;

        self.buf.resize(len + TAG_LEN, 0);
        let got = read_full(&mut self.input, &mut self.buf)?;
        if got < len + TAG_LEN {
            return Err(truncated(format!(
                "the stream ends {} bytes into the chunk",
                CHUNK_HEAD + got
            )));
        }
        let tag = Tag::clone_from_slice(&self.buf[len..]);
        self.buf.truncate(len);
        let nonce = chunk_nonce(&self.nonce_prefix, counter);
        self.cipher
            .decrypt_in_place_detached(&nonce, &chunk_aad(&self.header_hash, flag), &mut self.buf, &tag)
            .map_err(|_| {
                corrupt("the chunk fails its authentication check (bytes changed, or chunks missing or out of order)".into())
            })?;
        self.pos = 0;
        self.chunk += 1;
        self.offset += (CHUNK_HEAD + len + TAG_LEN) as u64;

        if flag == FLAG_FINAL {
            let mut extra = [0u8; 1];
            if read_full(&mut self.input, &mut extra)? > 0 {
                return Err(Error::Corrupt {
                    chunk: self.chunk,
                    offset: self.offset,
                    what: "bytes follow the final chunk".into(),
                });
            }
            self.done = true;
        }
        Ok(())
    }
}

impl<R: Read> BufRead for Opener<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.buf.len() && !self.done {
            self.open_next().map_err(Error::into_io)?;
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.buf.len());
    }
}

impl<R: Read> Read for Opener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
pub(super) fn read_full<R: Read>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
