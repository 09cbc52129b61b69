//! Reading the binary log of a stopped server (where its history ends).

use super::gtid::Gtid;
use super::settings::BINLOG;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::Path;

// ---------------------------------------------------------------------------
// The binary log of a stopped server.
// ---------------------------------------------------------------------------

pub(super) const FORMAT_DESCRIPTION_EVENT: u8 = 15;
pub(super) const GTID_EVENT: u8 = 162;
pub(super) const GTID_LIST_EVENT: u8 = 163;
pub(super) const START_ENCRYPTION_EVENT: u8 = 164;
/// Set in the first event's header while the server has the file open.
pub(super) const LOG_EVENT_BINLOG_IN_USE_F: u16 = 0x1;

/// What the end of a binary log file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogTail {
    /// The last GTID of each domain (what `@@gtid_binlog_pos` would say).
    pub gtids: Vec<Gtid>,
    /// The server closed the file (a clean shutdown), not a crash.
    pub closed_cleanly: bool,
}

/// Reads as many bytes as there are, up to `buf.len()`.
pub(super) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Walks a MariaDB binary log file event by event (headers only, plus the
/// GTID events' bodies): its GTID list at the start, then each GTID. A
/// truncated last event (a crash) ends the walk.
pub fn scan_binlog<R: Read + Seek>(mut r: R) -> std::io::Result<BinlogTail> {
    use std::io::{Error, ErrorKind};
    let mut magic = [0u8; 4];
    if read_full(&mut r, &mut magic)? < 4 || magic != *b"\xfebin" {
        return Err(Error::new(ErrorKind::InvalidData, "not a binary log"));
    }
    let mut last: BTreeMap<u32, Gtid> = BTreeMap::new();
    let mut closed_cleanly = false;
    let mut first = true;
    loop {
        let mut h = [0u8; 19];
        if read_full(&mut r, &mut h)? < 19 {
            break;
        }
        let kind = h[4];
        let server = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
        let len = u32::from_le_bytes([h[9], h[10], h[11], h[12]]) as u64;
        let flags = u16::from_le_bytes([h[17], h[18]]);
        if len < 19 {
            break;
        }
        if first {
            first = false;
            closed_cleanly =
                kind == FORMAT_DESCRIPTION_EVENT && flags & LOG_EVENT_BINLOG_IN_USE_F == 0;
        }
        let body = len - 19;
        let mut read = 0u64;
        match kind {
            GTID_EVENT => {
                let mut b = [0u8; 12];
                if body < 12 || read_full(&mut r, &mut b)? < 12 {
                    break;
                }
                read = 12;
                let seq = u64::from_le_bytes(b[0..8].try_into().unwrap_or_default());
                let domain = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
                last.insert(
                    domain,
                    Gtid {
                        domain,
                        server,
                        seq,
                    },
                );
            }
            GTID_LIST_EVENT => {
                let mut c = [0u8; 4];
                if body < 4 || read_full(&mut r, &mut c)? < 4 {
                    break;
                }
                let count = (u32::from_le_bytes(c) & 0x0fff_ffff) as u64;
                if body < 4 + 16 * count {
                    break;
                }
                read = 4 + 16 * count;
                for _ in 0..count {
                    let mut e = [0u8; 16];
                    if read_full(&mut r, &mut e)? < 16 {
                        return Ok(BinlogTail {
                            gtids: last.into_values().collect(),
                            closed_cleanly: false,
                        });
                    }
                    let g = Gtid {
                        domain: u32::from_le_bytes(e[0..4].try_into().unwrap_or_default()),
                        server: u32::from_le_bytes(e[4..8].try_into().unwrap_or_default()),
                        seq: u64::from_le_bytes(e[8..16].try_into().unwrap_or_default()),
                    };
                    // The list holds each server's last GTID per domain;
                    // the domain's last is the highest (strict mode).
                    if last.get(&g.domain).is_none_or(|l| l.seq <= g.seq) {
                        last.insert(g.domain, g);
                    }
                }
            }
            START_ENCRYPTION_EVENT => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "the binary log is encrypted; its position cannot be read without the server",
                ));
            }
            _ => {}
        }
        r.seek_relative((body - read) as i64)?;
    }
    Ok(BinlogTail {
        gtids: last.into_values().collect(),
        closed_cleanly,
    })
}

/// The tail of the newest binary log in `data`; None without a binary log.
pub(super) fn read_binlog_tail(data: &Path) -> Result<Option<BinlogTail>> {
    let index = data.join(format!("{BINLOG}.index"));
    let text = match std::fs::read_to_string(&index) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", index.display())),
    };
    let Some(last) = text.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let path = data.join(last);
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let t = scan_binlog(std::io::BufReader::with_capacity(64 * 1024, f))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(t))
}

#[cfg(test)]
mod tests {
    use super::super::gtid::tests::g;
    use super::*;

    /// One binlog event: header (19 bytes) + body.
    fn event(kind: u8, server: u32, flags: u16, body: &[u8]) -> Vec<u8> {
        let len = 19 + body.len() as u32;
        let mut e = Vec::new();
        e.extend_from_slice(&0u32.to_le_bytes());
        e.push(kind);
        e.extend_from_slice(&server.to_le_bytes());
        e.extend_from_slice(&len.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(body);
        e
    }

    fn gtid_event(server: u32, domain: u32, seq: u64) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&[0u8; 7]);
        event(GTID_EVENT, server, 0, &b)
    }

    fn gtid_list(gtids: &[Gtid]) -> Vec<u8> {
        let mut b = (gtids.len() as u32).to_le_bytes().to_vec();
        for g in gtids {
            b.extend_from_slice(&g.domain.to_le_bytes());
            b.extend_from_slice(&g.server.to_le_bytes());
            b.extend_from_slice(&g.seq.to_le_bytes());
        }
        b.extend_from_slice(&[1, 2, 3, 4]); // checksum
        event(GTID_LIST_EVENT, 1, 0, &b)
    }

    fn binlog(in_use: bool, events: &[Vec<u8>]) -> Vec<u8> {
        let mut f = b"\xfebin".to_vec();
        f.extend(event(
            FORMAT_DESCRIPTION_EVENT,
            1,
            if in_use { LOG_EVENT_BINLOG_IN_USE_F } else { 0 },
            &[0u8; 40],
        ));
        for e in events {
            f.extend_from_slice(e);
        }
        f
    }

    #[test]
    fn binlog_tails() {
        let scan = |b: Vec<u8>| scan_binlog(std::io::Cursor::new(b)).unwrap();
        // Only the state at the start of the file: the list's last per domain.
        let t = scan(binlog(
            false,
            &[gtid_list(&[g(0, 2, 7), g(0, 1, 9), g(1, 5, 3)])],
        ));
        assert_eq!(t.gtids, vec![g(0, 1, 9), g(1, 5, 3)]);
        assert!(t.closed_cleanly);
        // Transactions after it, with other events between.
        let t = scan(binlog(
            true,
            &[
                gtid_list(&[g(0, 1, 9)]),
                gtid_event(1, 0, 10),
                event(2, 1, 0, b"BEGIN"),
                gtid_event(3, 0, 11),
                event(16, 3, 0, &[0u8; 12]),
            ],
        ));
        assert_eq!(t.gtids, vec![g(0, 3, 11)]);
        assert!(!t.closed_cleanly);
        // A crash mid-event: the incomplete one does not count.
        let mut b = binlog(true, &[gtid_list(&[]), gtid_event(1, 0, 1)]);
        let partial = gtid_event(1, 0, 2);
        b.extend_from_slice(&partial[..25]);
        let t = scan(b);
        assert_eq!(t.gtids, vec![g(0, 1, 1)]);
        // Empty and foreign files.
        assert_eq!(scan(binlog(false, &[])).gtids, vec![]);
        assert!(scan_binlog(std::io::Cursor::new(b"hello".to_vec())).is_err());
    }
}
