//! A cluster's IP allowlist: which client addresses may reach its engine
//! port (the seed's "Restricting Access by IP"). Pure: parsing, validation,
//! changes and the lockout guard, unit-tested; the operator API stores the
//! result and every agent applies it in its nftables table.
//!
//! Entries are IPv4 or IPv6 addresses (`203.0.113.5`, `2001:db8::1`) or
//! CIDR ranges (`203.0.113.0/24`, `2001:db8::/48`). They are kept in their
//! canonical form: an address alone for a /32 or /128, the network address
//! and length otherwise. An empty list means open: every address may
//! connect.

use ipnet::IpNet;
use std::net::IpAddr;

/// The most entries a list may hold (the agent applies 10,000 in well
/// under a second; far beyond that, a list is better kept in a firewall
/// appliance than in a per-node table).
pub const MAX_ENTRIES: usize = 100_000;

/// How a request changes the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Replace the whole list (an empty one opens the cluster).
    Set,
    Add,
    Remove,
}

impl Change {
    pub fn parse(s: &str) -> Result<Change, String> {
        match s {
            "set" => Ok(Change::Set),
            "add" => Ok(Change::Add),
            "remove" => Ok(Change::Remove),
            _ => Err(format!(
                "unknown allowlist change {s:?}: use set, add or remove"
            )),
        }
    }
}

/// The canonical text of an entry.
pub fn canonical(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// Parses one entry; the error names it and says what is wrong.
pub fn parse_entry(entry: &str) -> Result<IpNet, String> {
    let e = entry.trim();
    if e.is_empty() {
        return Err("an entry is empty: give an address or a CIDR range".into());
    }
    let example = "e.g. 203.0.113.5, 203.0.113.0/24, 2001:db8::1 or 2001:db8::/48";
    match e.split_once('/') {
        None => e
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{entry:?} is not an IPv4 or IPv6 address ({example})")),
        Some((addr, len)) => {
            let addr: IpAddr = addr.parse().map_err(|_| {
                format!("{entry:?}: {addr:?} is not an IPv4 or IPv6 address ({example})")
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
                format!(
                    "{entry:?}: prefix length {len:?} is out of range for {} (0 to {max})",
                    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                )
            })?;
            let net = IpNet::new(addr, len).map_err(|e| format!("{entry:?}: {e}"))?;
            if net.trunc() != net {
                return Err(format!(
                    "{entry:?} has host bits set: the range it names is {}; write that, or the \
                     address alone",
                    net.trunc()
                ));
            }
            Ok(net)
        }
    }
}

/// Parses a request's entries: every one valid, none twice.
pub fn parse_entries(entries: &[String]) -> Result<Vec<IpNet>, String> {
    let mut out: Vec<IpNet> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let net =
            parse_entry(e).map_err(|why| format!("entry {} of {}: {why}", i + 1, entries.len()))?;
        if let Some(j) = out.iter().position(|n| *n == net) {
            return Err(format!(
                "{e:?} is listed twice (entries {} and {}, both {}): list each address or range once",
                j + 1,
                i + 1,
                canonical(&net)
            ));
        }
        out.push(net);
    }
    Ok(out)
}

/// The list after `change` with `entries` (already parsed). Adding an
/// entry that is there already changes nothing (a retried request is
/// harmless); removing one that is not there is refused, as a likely typo.
pub fn change(current: &[IpNet], how: Change, entries: &[IpNet]) -> Result<Vec<IpNet>, String> {
    let next: Vec<IpNet> = match how {
        Change::Set => entries.to_vec(),
        Change::Add => {
            if entries.is_empty() {
                return Err("nothing to add: give one or more addresses or ranges".into());
            }
            let mut next = current.to_vec();
            for e in entries {
                if !next.contains(e) {
                    next.push(*e);
                }
            }
            next
        }
        Change::Remove => {
            if entries.is_empty() {
                return Err("nothing to remove: give one or more addresses or ranges".into());
            }
            let missing: Vec<String> = entries
                .iter()
                .filter(|e| !current.contains(e))
                .map(canonical)
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "{} not in the allowlist (see `corralctl cluster allowlist show`); nothing was changed",
                    if missing.len() == 1 {
                        format!("{} is", missing[0])
                    } else {
                        format!("{} are", missing.join(", "))
                    }
                ));
            }
            current
                .iter()
                .filter(|c| !entries.contains(c))
                .copied()
                .collect()
        }
    };
    if next.len() > MAX_ENTRIES {
        return Err(format!(
            "the allowlist would hold {} entries; at most {MAX_ENTRIES}: merge ranges",
            next.len()
        ));
    }
    Ok(next)
}

/// Whether `list` keeps `addr` out: a non-empty list that no entry of
/// covers it. (IPv4 addresses seen through an IPv6 socket are compared as
/// IPv4.)
pub fn locks_out(list: &[IpNet], addr: IpAddr) -> bool {
    let addr = addr.to_canonical();
    !list.is_empty() && !list.iter().any(|n| n.contains(&addr))
}

/// Parses a stored list (written by this module: canonical, valid).
pub fn from_stored(entries: &[String]) -> Vec<IpNet> {
    entries.iter().filter_map(|e| parse_entry(e).ok()).collect()
}

/// A summary for the audit trail: every entry up to `max`, then a count.
pub fn summary(list: &[IpNet], max: usize) -> String {
    if list.is_empty() {
        return "[] (open)".into();
    }
    let shown: Vec<String> = list.iter().take(max).map(canonical).collect();
    if list.len() > max {
        format!("[{}, ... {} more]", shown.join(", "), list.len() - max)
    } else {
        format!("[{}]", shown.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| parse_entry(s).unwrap()).collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accepts_addresses_and_ranges_in_canonical_form() {
        let got = parse_entries(&strings(&[
            "203.0.113.5",
            "203.0.113.0/24",
            "2001:db8::1",
            "2001:db8::/48",
            " 198.51.100.7/32 ",
            "0.0.0.0/0",
        ]))
        .unwrap();
        let text: Vec<String> = got.iter().map(canonical).collect();
        assert_eq!(
            text,
            [
                "203.0.113.5",
                "203.0.113.0/24",
                "2001:db8::1",
                "2001:db8::/48",
                "198.51.100.7",
                "0.0.0.0/0"
            ]
        );
    }

    #[test]
    fn every_invalid_entry_is_named() {
        let cases = [
            ("", "is empty"),
            ("  ", "is empty"),
            (
                "db.example.com",
                "\"db.example.com\" is not an IPv4 or IPv6 address",
            ),
            ("203.0.113", "is not an IPv4 or IPv6 address"),
            (
                "203.0.113.5/24",
                "has host bits set: the range it names is 203.0.113.0/24",
            ),
            (
                "2001:db8::1/48",
                "has host bits set: the range it names is 2001:db8::/48",
            ),
            (
                "10.0.0.0/33",
                "prefix length \"33\" is out of range for IPv4 (0 to 32)",
            ),
            ("2001:db8::/129", "out of range for IPv6 (0 to 128)"),
            ("10.0.0.0/-1", "out of range"),
            ("10.0.0.0/x", "out of range"),
            ("300.0.0.1", "is not an IPv4 or IPv6 address"),
        ];
        for (entry, want) in cases {
            let err = parse_entries(&strings(&["192.0.2.1", entry])).unwrap_err();
            assert!(err.contains(want), "{entry:?}: {err}");
            assert!(err.starts_with("entry 2 of 2"), "{entry:?}: {err}");
        }
    }

    #[test]
    fn duplicates_are_refused_even_in_another_spelling() {
        let err =
            parse_entries(&strings(&["203.0.113.5", "10.0.0.0/8", "203.0.113.5/32"])).unwrap_err();
        assert!(
            err.contains("listed twice (entries 1 and 3, both 203.0.113.5)"),
            "{err}"
        );
    }

    #[test]
    fn changes() {
        let cur = nets(&["203.0.113.5", "10.0.0.0/8"]);
        assert_eq!(
            change(&cur, Change::Add, &nets(&["10.0.0.0/8", "2001:db8::/48"])).unwrap(),
            nets(&["203.0.113.5", "10.0.0.0/8", "2001:db8::/48"])
        );
        assert_eq!(
            change(&cur, Change::Remove, &nets(&["203.0.113.5"])).unwrap(),
            nets(&["10.0.0.0/8"])
        );
        let err = change(&cur, Change::Remove, &nets(&["192.0.2.1"])).unwrap_err();
        assert!(err.contains("192.0.2.1 is not in the allowlist"), "{err}");
        assert!(change(&cur, Change::Set, &[]).unwrap().is_empty());
        assert!(change(&cur, Change::Add, &[]).is_err());
        assert_eq!(Change::parse("set").unwrap(), Change::Set);
        assert!(Change::parse("replace").is_err());
    }

    #[test]
    fn lockout() {
        let list = nets(&["203.0.113.0/24", "2001:db8::/48"]);
        assert!(!locks_out(&list, "203.0.113.9".parse().unwrap()));
        assert!(locks_out(&list, "198.51.100.1".parse().unwrap()));
        assert!(!locks_out(&list, "2001:db8::5".parse().unwrap()));
        // An IPv4 client seen through a dual-stack socket.
        assert!(!locks_out(&list, "::ffff:203.0.113.9".parse().unwrap()));
        // An empty list keeps nobody out.
        assert!(!locks_out(&[], "198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn summaries_are_bounded() {
        let list = nets(&["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert_eq!(summary(&list, 2), "[192.0.2.1, 192.0.2.2, ... 1 more]");
        assert_eq!(summary(&[], 2), "[] (open)");
    }
}
