//! Round trips and tamper detection for the archive format.

use super::format::*;
use super::*;
use std::io::{self, Read, Write};

const KEY: [u8; 32] = [7; 32];

fn meta() -> serde_json::Value {
    serde_json::json!({"engine": "postgres", "cluster": "main", "node": "n1", "position": "0/3000060"})
}

/// Half compressible text, half noise, so chunks carry both kinds of zstd blocks.
fn mixed_data(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        if (out.len() / 65_536) % 2 == 0 {
            out.extend_from_slice(
                format!("row {} of a table that compresses well\n", out.len()).as_bytes(),
            );
        } else {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Writes `data` in uneven pieces of 1 to 4096 bytes; returns the stored bytes.
fn archive(data: &[u8], chunk_size: usize) -> (Vec<u8>, Summary) {
    let mut out = Vec::new();
    let mut w =
        Writer::with_chunk_size(&mut out, &KEY, Header { meta: meta() }, chunk_size).unwrap();
    let (mut at, mut step) = (0, 1);
    while at < data.len() {
        let end = (at + step).min(data.len());
        w.write_all(&data[at..end]).unwrap();
        at = end;
        step = (step * 5 + 1) % 4096 + 1;
    }
    let summary = w.finish().unwrap();
    (out, summary)
}

/// Reads everything back in uneven pieces; errors come back typed.
fn restore(stored: &[u8], key: &[u8; 32]) -> Result<(Header, Vec<u8>)> {
    let mut r = Reader::new(stored, key)?;
    let mut out = Vec::new();
    let mut piece = [0u8; 5000];
    let mut step = 1;
    loop {
        let n = r.read(&mut piece[..step])?;
        if n == 0 {
            return Ok((r.header().clone(), out));
        }
        out.extend_from_slice(&piece[..n]);
        step = (step * 7 + 3) % piece.len() + 1;
    }
}

/// (start, end) of each chunk in a stored archive, walking the framing.
fn chunks(stored: &[u8]) -> Vec<(usize, usize)> {
    let meta_len = u32::from_be_bytes(stored[30..34].try_into().unwrap()) as usize;
    let mut at = FIXED_HEADER + meta_len;
    let mut out = Vec::new();
    while at < stored.len() {
        let len = u32::from_be_bytes(stored[at + 1..at + 5].try_into().unwrap()) as usize;
        out.push((at, at + CHUNK_HEAD + len + TAG_LEN));
        at += CHUNK_HEAD + len + TAG_LEN;
    }
    assert_eq!(at, stored.len());
    out
}

fn round_trip(data: &[u8], chunk_size: usize) -> (Vec<u8>, Summary) {
    let (stored, summary) = archive(data, chunk_size);
    assert_eq!(summary.plain_bytes, data.len() as u64);
    assert_eq!(summary.stored_bytes, stored.len() as u64);
    assert_eq!(summary.sha256_hex, sha256_of(&stored[..]).unwrap());
    assert_eq!(summary.chunks, chunks(&stored).len() as u64);
    let (header, plain) = restore(&stored, &KEY).unwrap();
    assert_eq!(header.meta, meta());
    assert!(
        plain == data,
        "restored {} bytes, wrote {}",
        plain.len(),
        data.len()
    );
    (stored, summary)
}

#[test]
fn round_trips_empty_tiny_and_multi_chunk_inputs() {
    let (_, empty) = round_trip(b"", CHUNK_SIZE);
    assert_eq!(empty.chunks, 1);
    round_trip(b"x", CHUNK_SIZE);
    round_trip(b"hello, backup", CHUNK_SIZE);
    // 5 MiB of which half is noise: several 1 MiB chunks.
    let (_, big) = round_trip(&mixed_data(5 << 20), CHUNK_SIZE);
    assert!(big.chunks >= 3, "{big:?}");
    assert!(
        big.stored_bytes < 5 << 20,
        "compression should help: {big:?}"
    );
}

#[test]
fn compressed_data_that_exactly_fills_chunks_round_trips() {
    let data = mixed_data(300_000);
    let (whole, summary) = archive(&data, MAX_CHUNK_SIZE);
    let compressed = summary.stored_bytes as usize - chunks_overhead(&whole);
    // Exactly one full chunk: sealed once, as final.
    let (_, s) = round_trip(&data, compressed);
    assert_eq!(s.chunks, 1);
    // One byte short: a full chunk and a one-byte final chunk.
    let (stored, s) = round_trip(&data, compressed - 1);
    assert_eq!(s.chunks, 2);
    let last = *chunks(&stored).last().unwrap();
    assert_eq!(last.1 - last.0, CHUNK_HEAD + 1 + TAG_LEN);
    // Two exactly full chunks, if the length splits evenly.
    if compressed.is_multiple_of(2) {
        assert_eq!(round_trip(&data, compressed / 2).1.chunks, 2);
    }
}

/// Header, framing and tags: everything in a stored archive but compressed data.
fn chunks_overhead(stored: &[u8]) -> usize {
    let list = chunks(stored);
    list[0].0 + list.len() * (CHUNK_HEAD + TAG_LEN)
}

#[test]
fn each_archive_has_its_own_nonce_prefix() {
    let (a, _) = archive(b"same", CHUNK_SIZE);
    let (b, _) = archive(b"same", CHUNK_SIZE);
    assert_ne!(a[18..26], b[18..26]);
    assert_ne!(a, b);
}

/// An archive of dozens of 4 KiB chunks for the tampering tests.
fn many_chunks() -> (Vec<u8>, Vec<u8>) {
    let data = mixed_data(200_000);
    let (stored, s) = round_trip(&data, 4096);
    assert!(s.chunks > 10, "{s:?}");
    (data, stored)
}

#[track_caller]
fn expect_corrupt(stored: &[u8], at_chunk: u64) -> String {
    match restore(stored, &KEY) {
        Err(e @ Error::Corrupt { chunk, .. }) => {
            assert_eq!(chunk, at_chunk, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("corrupt") && msg.contains(&format!("chunk {at_chunk}")),
                "{msg}"
            );
            msg
        }
        other => panic!("expected corruption at chunk {at_chunk}, got {other:?}"),
    }
}

#[track_caller]
fn expect_truncated(stored: &[u8]) -> (u64, String) {
    match restore(stored, &KEY) {
        Err(e @ Error::Truncated { chunk, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("truncated"), "{msg}");
            (chunk, msg)
        }
        other => panic!("expected truncation, got {other:?}"),
    }
}

#[test]
fn one_changed_byte_in_a_chunk_is_reported_with_its_chunk() {
    let (_, stored) = many_chunks();
    let list = chunks(&stored);
    let middle = list.len() / 2;
    let last = list.len() - 1;
    for (i, &(start, end)) in list.iter().enumerate() {
        if ![0, 1, middle, last].contains(&i) {
            continue;
        }
        // The flag, the first data byte, one in the middle, the last tag byte.
        for pos in [start, start + CHUNK_HEAD, (start + end) / 2, end - 1] {
            for bit in [0x01, 0x80] {
                let mut bad = stored.clone();
                bad[pos] ^= bit;
                expect_corrupt(&bad, i as u64);
            }
        }
        // A changed length either overruns the chunk size, or misframes the
        // stream, which fails the check or runs off the end.
        for pos in start + 1..start + CHUNK_HEAD {
            let mut bad = stored.clone();
            bad[pos] ^= 0x01;
            match restore(&bad, &KEY) {
                Err(Error::Corrupt { chunk, .. } | Error::Truncated { chunk, .. }) => {
                    assert!(chunk >= i as u64, "chunk {chunk} for a change in chunk {i}")
                }
                other => panic!("length byte {pos} changed: {other:?}"),
            }
        }
    }
    let mut last_byte = stored.clone();
    *last_byte.last_mut().unwrap() ^= 0xff;
    expect_corrupt(&last_byte, last as u64);
}

#[test]
fn one_changed_byte_in_the_header_is_never_accepted() {
    let (_, stored) = many_chunks();
    let header_end = chunks(&stored)[0].0;
    for pos in 0..header_end {
        let mut bad = stored.clone();
        bad[pos] ^= 0x01;
        let err = restore(&bad, &KEY).expect_err(&format!("header byte {pos} changed"));
        let expected = match pos {
            0..8 => matches!(err, Error::BadMagic),
            8..10 => matches!(err, Error::NewerVersion { .. } | Error::BadHeader { .. }),
            10..18 => matches!(err, Error::WrongKey { .. }),
            // The nonce prefix, chunk size and metadata all feed every chunk's check.
            _ => matches!(
                err,
                Error::Corrupt { chunk: 0, .. } | Error::BadHeader { .. } | Error::Truncated { .. }
            ),
        };
        assert!(expected, "header byte {pos}: {err}");
    }
    // Changed metadata that is still valid JSON is caught by the first chunk.
    let needle = b"\"n1\"";
    let at = stored
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let mut bad = stored.clone();
    bad[at + 2] = b'2';
    expect_corrupt(&bad, 0);
}

#[test]
fn dropped_repeated_and_swapped_chunks_are_detected() {
    let (_, stored) = many_chunks();
    let list = chunks(&stored);
    let splice = |parts: &[(usize, usize)]| -> Vec<u8> {
        let mut out = stored[..list[0].0].to_vec();
        for &(s, e) in parts {
            out.extend_from_slice(&stored[s..e]);
        }
        out
    };
    // Chunk 3 dropped: what arrives as chunk 3 is chunk 4.
    let mut parts = list.clone();
    parts.remove(3);
    expect_corrupt(&splice(&parts), 3);
    // Chunk 3 repeated.
    let mut parts = list.clone();
    parts.insert(3, list[3]);
    expect_corrupt(&splice(&parts), 4);
    // Chunks 1 and 2 swapped.
    let mut parts = list.clone();
    parts.swap(1, 2);
    expect_corrupt(&splice(&parts), 1);
    // The first chunk dropped.
    expect_corrupt(&splice(&list[1..]), 0);
    // A chunk from another archive made with the same key does not fit.
    let (other, _) = archive(&mixed_data(200_000), 4096);
    let mut mixed = stored[..list[2].0].to_vec();
    let other_list = chunks(&other);
    mixed.extend_from_slice(&other[other_list[2].0..]);
    expect_corrupt(&mixed, 2);
}

#[test]
fn truncation_at_every_chunk_boundary_and_inside_chunks_is_detected() {
    let (_, stored) = many_chunks();
    let list = chunks(&stored);
    for (i, &(start, end)) in list.iter().enumerate() {
        // Cut exactly before chunk i: everything read so far opened fine,
        // only the missing final chunk gives it away.
        let (chunk, msg) = expect_truncated(&stored[..start]);
        assert_eq!(chunk, i as u64, "{msg}");
        assert!(msg.contains("before its final chunk"), "{msg}");
        // Cut inside chunk i: in its framing, its data and its tag.
        for cut in [start + 1, start + CHUNK_HEAD, (start + end) / 2, end - 1] {
            let (chunk, msg) = expect_truncated(&stored[..cut]);
            assert_eq!(chunk, i as u64, "{msg}");
        }
    }
    // The header itself cut short.
    for cut in [8, 20, FIXED_HEADER, list[0].0 - 1] {
        assert!(
            matches!(restore(&stored[..cut], &KEY), Err(Error::BadHeader { .. })),
            "cut at {cut}"
        );
    }
}

#[test]
fn a_cut_dressed_up_as_the_end_is_detected() {
    // Cutting after chunk i and marking it final would pass for a whole
    // archive if the flag were not part of what each chunk's tag covers.
    let (_, stored) = many_chunks();
    let list = chunks(&stored);
    for i in [0, 1, list.len() / 2, list.len() - 2] {
        let mut cut = stored[..list[i].1].to_vec();
        cut[list[i].0] = FLAG_FINAL;
        expect_corrupt(&cut, i as u64);
    }
}

#[test]
fn bytes_after_the_final_chunk_are_rejected() {
    let (_, stored) = many_chunks();
    let n = chunks(&stored).len() as u64;
    for garbage in [&b"\0"[..], b"more data", &stored[..100]] {
        let mut bad = stored.clone();
        bad.extend_from_slice(garbage);
        let msg = expect_corrupt(&bad, n);
        assert!(msg.contains("follow the final chunk"), "{msg}");
    }
}

#[test]
fn an_unfinished_writer_leaves_a_truncated_archive() {
    let mut out = Vec::new();
    {
        let mut w = Writer::with_chunk_size(&mut out, &KEY, Header { meta: meta() }, 4096).unwrap();
        w.write_all(&mixed_data(100_000)).unwrap();
        w.flush().unwrap();
    }
    expect_truncated(&out);
}

#[test]
fn the_wrong_key_is_named_not_reported_as_corruption() {
    let (stored, _) = archive(b"secret rows", CHUNK_SIZE);
    let other = [9u8; 32];
    let err = restore(&stored, &other).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::WrongKey { .. }), "{err:?}");
    assert!(
        msg.contains(&key_id(&KEY)) && msg.contains(&key_id(&other)),
        "{msg}"
    );
    assert_eq!(key_id(&KEY).len(), 16);
    assert_ne!(key_id(&KEY), key_id(&other));
}

#[test]
fn foreign_objects_and_newer_versions_are_refused_by_name() {
    for foreign in [
        &b""[..],
        b"CORRAL",
        b"PGDMP\x01\x0e\x00 a pg_dump file, not ours",
        &[0u8; 100],
    ] {
        let err = restore(foreign, &KEY).unwrap_err();
        assert!(matches!(err, Error::BadMagic), "{err:?}");
        assert!(
            err.to_string().contains("not a Corral backup (bad magic)"),
            "{err}"
        );
    }
    let (mut stored, _) = archive(b"rows", CHUNK_SIZE);
    stored[8..10].copy_from_slice(&2u16.to_be_bytes());
    let err = restore(&stored, &KEY).unwrap_err();
    assert!(matches!(err, Error::NewerVersion { found: 2 }), "{err:?}");
    assert!(
        err.to_string()
            .contains("format version 2 is newer than this binary reads"),
        "{err}"
    );
}

#[test]
fn header_is_readable_before_the_data() {
    let (stored, _) = archive(b"rows", CHUNK_SIZE);
    let r = Reader::new(&stored[..], &KEY).unwrap();
    assert_eq!(r.header().meta["engine"], "postgres");
}

#[test]
fn read_errors_keep_their_type_through_io_error() {
    let (_, stored) = many_chunks();
    let mut bad = stored.clone();
    let mid = chunks(&stored)[5].0 + 10;
    bad[mid] ^= 1;
    let mut r = Reader::new(&bad[..], &KEY).unwrap();
    let io_err = io::copy(&mut r, &mut io::sink()).unwrap_err();
    assert_eq!(io_err.kind(), io::ErrorKind::InvalidData);
    assert!(
        io_err.to_string().contains("corrupt at chunk 5"),
        "{io_err}"
    );
    assert!(matches!(
        Error::from(io_err),
        Error::Corrupt { chunk: 5, .. }
    ));
    // Other I/O errors stay I/O errors.
    assert!(matches!(
        Error::from(io::Error::other("disk on fire")),
        Error::Io(_)
    ));
}

#[test]
fn a_changed_byte_changes_the_object_checksum() {
    let (stored, summary) = archive(b"rows", CHUNK_SIZE);
    let mut bad = stored.clone();
    bad[40] ^= 1;
    assert_ne!(sha256_of(&bad[..]).unwrap(), summary.sha256_hex);
    assert_eq!(
        sha256_of(&b""[..]).unwrap(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn oversized_metadata_is_refused_when_writing() {
    let meta = serde_json::Value::String("x".repeat(MAX_META + 1));
    assert!(matches!(
        Writer::new(Vec::new(), &KEY, Header { meta }),
        Err(Error::MetaTooLarge { .. })
    ));
}
