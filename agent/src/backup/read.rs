//! Reading a stored backup object back: decrypting it through the
//! cluster's key ([`corral_proto::archive`]) while hashing and counting
//! what passes, so that whatever the consumer makes of a damaged object,
//! the error names the damage.

use anyhow::{anyhow, Result};
use corral_proto::archive;
use sha2::{Digest, Sha256};
use std::io::Read;

/// Bytes read from a stored object and out of it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub stored: u64,
    pub plain: u64,
}

/// Counts and hashes what passes through.
struct Hashing<'a, R> {
    inner: R,
    hash: &'a mut Sha256,
    bytes: &'a mut u64,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        *self.bytes += n as u64;
        Ok(n)
    }
}

/// Decrypts and keeps the first error, so that whatever the consumer
/// (a tar process, a driver) makes of a broken stream, the report names
/// the damaged chunk.
struct Checked<'a, R: Read> {
    inner: &'a mut archive::Reader<R>,
    first_error: Option<String>,
    plain: u64,
}

impl<R: Read> Read for Checked<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.plain += n as u64;
                Ok(n)
            }
            Err(e) => {
                if self.first_error.is_none() {
                    self.first_error = Some(e.to_string());
                }
                Err(e)
            }
        }
    }
}

/// Reads the stored object `input` through `key` into `consume`, then
/// checks that the whole object was sound: every chunk authenticated to
/// the end, and (when `expected` is given) its sha256 as recorded at
/// backup time. A damaged object is reported as such, naming where,
/// whatever `consume` made of it.
pub fn read_checked<T>(
    input: &mut dyn Read,
    key: &[u8; 32],
    expected: &str,
    object: &str,
    consume: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<(T, Counts)> {
    let mut hash = Sha256::new();
    let mut stored = 0u64;
    let hashing = Hashing {
        inner: input,
        hash: &mut hash,
        bytes: &mut stored,
    };
    let damaged = |what: String| {
        anyhow!(
            "backup object {object} is damaged: {what}; it cannot be restored (another \
             backup can: `corralctl backup list`)"
        )
    };
    let mut reader = archive::Reader::new(hashing, key).map_err(|e| match e {
        archive::Error::WrongKey { .. } => anyhow!(
            "backup object {object} was encrypted with another key ({e}); the coordinator's \
             backup key file must be the one it was taken with"
        ),
        e => damaged(e.to_string()),
    })?;
    let mut checked = Checked {
        inner: &mut reader,
        first_error: None,
        plain: 0,
    };
    let out = consume(&mut checked);
    if let Some(e) = checked.first_error.take() {
        return Err(damaged(e));
    }
    let out = out?;
    // The consumer may stop at the end of its format (a tar's end marker);
    // the rest must still authenticate, up to the final chunk.
    let rest = std::io::copy(&mut checked, &mut std::io::sink());
    if let Some(e) = checked.first_error.take() {
        return Err(damaged(e));
    }
    rest.map_err(|e| damaged(e.to_string()))?;
    let plain = checked.plain;
    drop(reader);
    let sha = hex::encode(hash.finalize());
    if !expected.is_empty() && sha != expected {
        return Err(damaged(format!(
            "its sha256 is {sha}, but {expected} was recorded when it was taken"
        )));
    }
    Ok((out, Counts { stored, plain }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn archive_of(data: &[u8], key: &[u8; 32]) -> (Vec<u8>, String) {
        let mut out = Vec::new();
        let mut w = archive::Writer::new(
            &mut out,
            key,
            archive::Header {
                meta: serde_json::json!({}),
            },
        )
        .unwrap();
        w.write_all(data).unwrap();
        let s = w.finish().unwrap();
        (out, s.sha256_hex)
    }

    #[test]
    fn read_checked_passes_a_sound_object_and_counts_it() {
        let key = [7u8; 32];
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (obj, sha) = archive_of(&data, &key);
        let (got, counts) = read_checked(&mut &obj[..], &key, &sha, "o", |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            Ok(v)
        })
        .unwrap();
        assert_eq!(got, data);
        assert_eq!(counts.stored, obj.len() as u64);
        assert_eq!(counts.plain, data.len() as u64);
    }

    #[test]
    fn a_changed_byte_is_named_even_when_the_consumer_hides_it() {
        let key = [7u8; 32];
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let (mut obj, sha) = archive_of(&data, &key);
        let at = obj.len() / 2;
        obj[at] ^= 1;
        // A consumer that swallows read errors (as a tar process would
        // report "broken pipe") still yields an error naming the damage.
        let err = read_checked(&mut &obj[..], &key, &sha, "backups/c/b1", |r| {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("backup object backups/c/b1 is damaged"),
            "{err}"
        );
        assert!(err.contains("chunk"), "{err}");
    }

    #[test]
    fn a_consumer_stopping_early_does_not_skip_the_check_of_the_rest() {
        let key = [9u8; 32];
        let data = vec![1u8; 3 << 20];
        let (mut obj, sha) = archive_of(&data, &key);
        let last = obj.len() - 3;
        obj[last] ^= 0x40;
        let err = read_checked(&mut &obj[..], &key, &sha, "o", |r| {
            let mut first = [0u8; 10];
            r.read_exact(&mut first)?;
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn a_recorded_checksum_that_differs_is_refused() {
        let key = [3u8; 32];
        let (obj, _) = archive_of(b"hello", &key);
        let err = read_checked(&mut &obj[..], &key, &"0".repeat(64), "o", |r| {
            std::io::copy(r, &mut std::io::sink())?;
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("was recorded when it was taken"), "{err}");
    }

    #[test]
    fn a_wrong_key_says_so() {
        let (obj, sha) = archive_of(b"hello", &[1u8; 32]);
        let err = read_checked(&mut &obj[..], &[2u8; 32], &sha, "o", |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another key"), "{err}");
    }
}
