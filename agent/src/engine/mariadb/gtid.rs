//! MariaDB GTIDs: parsing, formatting, counting and comparing positions.

use anyhow::Result;

/// One MariaDB GTID: replication domain, originating server, sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl std::fmt::Display for Gtid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

/// Parses a GTID position such as `@@gtid_binlog_pos`: `"0-1-100,1-2-5"`,
/// or `""` for none.
pub fn parse_gtid_list(s: &str) -> Result<Vec<Gtid>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut it = p.splitn(3, '-');
            let (Some(d), Some(sv), Some(n)) = (it.next(), it.next(), it.next()) else {
                return Err(format!("{p:?} is not a GTID (domain-server-sequence)"));
            };
            Ok(Gtid {
                domain: d.parse().map_err(|_| format!("{p:?}: bad domain"))?,
                server: sv.parse().map_err(|_| format!("{p:?}: bad server id"))?,
                seq: n
                    .parse()
                    .map_err(|_| format!("{p:?}: bad sequence number"))?,
            })
        })
        .collect()
}

pub fn format_gtids(gtids: &[Gtid]) -> String {
    gtids
        .iter()
        .map(Gtid::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The latest GTID of `domain` in a position (the one with the highest
/// sequence number: strict mode keeps them increasing).
pub fn last_in_domain(gtids: &[Gtid], domain: u32) -> Option<Gtid> {
    gtids
        .iter()
        .filter(|g| g.domain == domain)
        .max_by_key(|g| g.seq)
        .copied()
}

/// The sequence number of domain 0 in a position; 0 when absent or unreadable.
pub fn domain0_seq(pos: &str) -> u64 {
    parse_gtid_list(pos)
        .ok()
        .and_then(|g| last_in_domain(&g, 0))
        .map(|g| g.seq)
        .unwrap_or(0)
}

/// MySQL's position: the number of transactions in a GTID set
/// (`uuid:1-5:7,uuid2:1-3` holds 9). Without errant transactions it grows
/// across failovers, as MariaDB's domain sequence number does.
pub fn gtid_set_count(s: &str) -> u64 {
    let mut n = 0u64;
    for member in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        // uuid[:tag]:interval[:interval...]; a tag does not parse as one.
        for iv in member.split(':').skip(1) {
            let iv = iv.trim();
            match iv.split_once('-') {
                Some((a, b)) => {
                    if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                        n += b.saturating_sub(a) + 1;
                    }
                }
                None => {
                    if iv.parse::<u64>().is_ok() {
                        n += 1;
                    }
                }
            }
        }
    }
    n
}

/// Whether `own` (a stopped node's binlog position) holds transactions the
/// upstream, at position `upstream`, does not.
#[derive(Debug, PartialEq, Eq)]
pub enum Containment {
    /// Every transaction of ours is the upstream's last or before it.
    Contained,
    /// These are ours only.
    Diverged(Vec<Gtid>),
    /// Ours are behind the upstream's position: whether the upstream's
    /// binlog holds these very GTIDs (and not others with the same
    /// sequence numbers) only its binlog can tell.
    Unknown(Vec<Gtid>),
}

pub fn containment(own: &[Gtid], upstream: &[Gtid]) -> Containment {
    let mut diverged = Vec::new();
    let mut unknown = Vec::new();
    let mut domains: Vec<u32> = own.iter().map(|g| g.domain).collect();
    domains.dedup();
    for d in domains {
        let Some(ours) = last_in_domain(own, d) else {
            continue;
        };
        match last_in_domain(upstream, d) {
            None => diverged.push(ours),
            Some(theirs) if ours.seq > theirs.seq => diverged.push(ours),
            Some(theirs) if ours.seq == theirs.seq && ours.server != theirs.server => {
                diverged.push(ours)
            }
            Some(theirs) if ours.seq == theirs.seq => {}
            Some(_) => unknown.push(ours),
        }
    }
    if !diverged.is_empty() {
        Containment::Diverged(diverged)
    } else if !unknown.is_empty() {
        Containment::Unknown(unknown)
    } else {
        Containment::Contained
    }
}

/// A server_id from the node id (FNV-1a), never 0.
pub fn server_id(node_id: &str) -> u32 {
    let h = node_id.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x01000193)
    });
    h.max(1)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::engine::mariadb) fn g(domain: u32, server: u32, seq: u64) -> Gtid {
        Gtid {
            domain,
            server,
            seq,
        }
    }

    #[test]
    fn gtid_lists_parse() {
        assert_eq!(parse_gtid_list("").unwrap(), vec![]);
        assert_eq!(parse_gtid_list("  ").unwrap(), vec![]);
        assert_eq!(parse_gtid_list("0-1-100").unwrap(), vec![g(0, 1, 100)]);
        assert_eq!(
            parse_gtid_list("0-1-100,1-2-5").unwrap(),
            vec![g(0, 1, 100), g(1, 2, 5)]
        );
        assert_eq!(
            parse_gtid_list("1-2-5, 0-4294967295-18446744073709551615\n").unwrap(),
            vec![g(1, 2, 5), g(0, u32::MAX, u64::MAX)]
        );
        for bad in ["0-1", "a-1-2", "0-1-x", "0-1-2-3", "0--1-2"] {
            assert!(parse_gtid_list(bad).is_err(), "{bad} should not parse");
        }
        assert_eq!(format_gtids(&[g(0, 1, 100), g(1, 2, 5)]), "0-1-100,1-2-5");
    }

    #[test]
    fn domain_zero_sequence() {
        assert_eq!(domain0_seq(""), 0);
        assert_eq!(domain0_seq("0-1-100,1-2-5"), 100);
        assert_eq!(domain0_seq("1-2-5,0-3-7"), 7);
        assert_eq!(domain0_seq("1-2-5"), 0);
        assert_eq!(domain0_seq("garbage"), 0);
        assert_eq!(
            last_in_domain(&[g(0, 1, 4), g(0, 2, 9)], 0),
            Some(g(0, 2, 9))
        );
    }

    #[test]
    fn mysql_gtid_sets_count_transactions() {
        assert_eq!(gtid_set_count(""), 0);
        assert_eq!(
            gtid_set_count("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5"),
            5
        );
        assert_eq!(
            gtid_set_count(
                "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7,\n4e11fa47-71ca-11e1-9e33-c80aa9429562:1-3"
            ),
            9
        );
        // MySQL 8.3 tags.
        assert_eq!(
            gtid_set_count("3e11fa47-71ca-11e1-9e33-c80aa9429562:tag:1-2"),
            2
        );
    }

    #[test]
    fn containment_of_a_former_primary() {
        let up = vec![g(0, 1, 10)];
        assert_eq!(containment(&[], &up), Containment::Contained);
        assert_eq!(containment(&[g(0, 1, 10)], &up), Containment::Contained);
        // Ahead of the upstream: ours only.
        assert_eq!(
            containment(&[g(0, 1, 11)], &up),
            Containment::Diverged(vec![g(0, 1, 11)])
        );
        // Same number, another server: a different transaction.
        assert_eq!(
            containment(&[g(0, 2, 10)], &up),
            Containment::Diverged(vec![g(0, 2, 10)])
        );
        // A domain the upstream never saw.
        assert_eq!(
            containment(&[g(0, 1, 10), g(1, 3, 1)], &up),
            Containment::Diverged(vec![g(1, 3, 1)])
        );
        // Behind: only the upstream's binlog can tell.
        assert_eq!(
            containment(&[g(0, 2, 7)], &up),
            Containment::Unknown(vec![g(0, 2, 7)])
        );
        assert_eq!(
            containment(&[g(0, 2, 7)], &[]),
            Containment::Diverged(vec![g(0, 2, 7)])
        );
    }

    #[test]
    fn server_ids_are_stable_and_never_zero() {
        assert_eq!(server_id("vm1"), server_id("vm1"));
        assert_ne!(server_id("vm1"), server_id("vm2"));
        assert_ne!(server_id(""), 0);
    }
}
