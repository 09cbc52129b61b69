//! Reading the table back: whether what `nft -j list` shows is what
//! [`super::render`] writes (drift detection), and nft's "no such table".

use super::gate::LEASE_SET;
use super::render::{named_sets, wanted};
use super::{Rules, TABLE};
use ipnet::IpNet;
use nftables::schema::{NfListObject, NfObject, Nftables};
use nftables::stmt::{Counter, Statement};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Whether nft's stderr says our table does not exist. nft prints
///
/// ```text
/// Error: No such file or directory
/// list table inet corral
///                 ^^^^^^
/// ```
///
/// (`run` sets LC_ALL=C, so the text is the same whatever the host's locale.)
/// Matching the whole shape matters: `ip netns exec` also prints "No such
/// file or directory" when the namespace is missing, and that is an error,
/// not drift.
pub(super) fn is_missing_table(stderr: &str) -> bool {
    let mut lines = stderr.lines().map(str::trim);
    lines.any(|l| l == "Error: No such file or directory")
        && lines.any(|l| l == format!("list table inet {TABLE}"))
}

/// Whether `listed`, the output of `nft -j list table inet corral`, is the
/// table `apply(rules)` writes.
///
/// The sets' elements are compared as addresses, not as JSON: each listed
/// element becomes networks ([`listed_elements`]), and the set matches if
/// they cover exactly the addresses we want. nft 1.0.6 lists exactly what
/// `render` sends, but an element written differently with the same
/// addresses filters the same, so it is not drift.
pub(super) fn listed_matches(listed: &str, rules: &Rules, elements: bool) -> bool {
    let Ok(mut raw) = serde_json::from_str::<Value>(listed) else {
        tracing::warn!("nft printed JSON we cannot read; treating table inet {TABLE} as drifted");
        return false;
    };
    let Some(objects) = raw.get_mut("nftables").and_then(Value::as_array_mut) else {
        tracing::warn!("nft printed no `nftables` list; treating table inet {TABLE} as drifted");
        return false;
    };
    // The crate's `Table` has no `flags`, so look at the raw JSON: we never
    // set flags, and `dormant` would switch every chain of the table off.
    // (nft 1.0.6 prints the table's name as its flags; presence is enough.)
    if objects.iter().any(|o| o["table"].get("flags").is_some()) {
        return false;
    }
    // Take the elements out of the sets: they are compared as addresses
    // below, and 10,000 of them parse much faster this way than as the
    // crate's untagged `Expression`s.
    let mut got_elements = BTreeMap::new();
    for object in objects.iter_mut() {
        let Some(set) = object.get_mut("set").and_then(Value::as_object_mut) else {
            continue;
        };
        let name = set["name"].as_str().unwrap_or_default().to_string();
        if name == LEASE_SET {
            // The lease element comes and goes with its timeout (and the
            // listing shows how long it has left): whether it is there says
            // whether the gate is open now, not whether the table drifted.
            set.remove("elem");
            continue;
        }
        let Some(nets) = listed_elements(set.remove("elem").as_ref()) else {
            tracing::warn!("set {name} holds elements other than addresses and networks; treating table inet {TABLE} as drifted");
            return false;
        };
        got_elements.insert(name, IpNet::aggregate(&nets));
    }
    // Anything the crate cannot parse is not something `apply` writes.
    let listed: Nftables<'static> = match serde_json::from_value(raw) {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!("cannot parse table inet {TABLE} ({e}); treating it as drifted");
            return false;
        }
    };
    let mut got = Vec::new();
    for object in listed.objects.iter() {
        match object {
            NfObject::ListObject(NfListObject::MetainfoObject(_)) => {}
            NfObject::ListObject(object) => got.push(normalized(object.clone())),
            NfObject::CmdObject(_) => return false,
        }
    }
    let sets = named_sets(rules);
    let mut want = wanted(rules, &sets, false);
    sort(&mut got);
    sort(&mut want);
    let want_elements: BTreeMap<String, Vec<IpNet>> = sets
        .into_iter()
        .map(|set| (set.name.to_string(), set.nets))
        .collect();
    if !elements {
        // A terse listing has no elements: compare the sets' names only.
        return got == want && got_elements.keys().eq(want_elements.keys());
    }
    got == want && got_elements == want_elements
}

/// The networks of a set's listed `elem`, in the order listed; None if an
/// element is anything else (a concatenation, an element with a timeout or
/// a comment...), which `apply` never writes.
///
/// nft 1.0.6 lists a single address as a plain string (`"192.0.2.1"`, also
/// for an element sent as a /32 prefix), a network as `{"prefix": {"addr":
/// "10.0.0.0", "len": 8}}`, and an interval that is no network (added by
/// hand, or merged by `auto-merge`) as `{"range": ["10.0.0.1",
/// "10.0.0.5"]}`, which becomes the networks that cover it. An empty set
/// has no `elem` at all.
fn listed_elements(elem: Option<&Value>) -> Option<Vec<IpNet>> {
    let mut nets = Vec::new();
    match elem {
        None => {}
        Some(Value::Array(elements)) => {
            nets.reserve(elements.len());
            for element in elements {
                listed_element(element, &mut nets)?;
            }
        }
        Some(element) => listed_element(element, &mut nets)?,
    }
    Some(nets)
}

fn listed_element(element: &Value, nets: &mut Vec<IpNet>) -> Option<()> {
    let addr = |v: &Value| v.as_str()?.parse::<IpAddr>().ok();
    match element {
        Value::String(_) => nets.push(IpNet::from(addr(element)?)),
        Value::Object(o) if o.len() == 1 => {
            if let Some(prefix) = o.get("prefix") {
                let len = u8::try_from(prefix["len"].as_u64()?).ok()?;
                nets.push(IpNet::new(addr(&prefix["addr"])?, len).ok()?);
            } else if let Some(Value::Array(range)) = o.get("range") {
                let [start, end] = range.as_slice() else {
                    return None;
                };
                match (addr(start)?, addr(end)?) {
                    (IpAddr::V4(start), IpAddr::V4(end)) if start <= end => {
                        nets.extend(ipnet::Ipv4Subnets::new(start, end, 0).map(IpNet::V4));
                    }
                    (IpAddr::V6(start), IpAddr::V6(end)) if start <= end => {
                        nets.extend(ipnet::Ipv6Subnets::new(start, end, 0).map(IpNet::V6));
                    }
                    _ => return None,
                }
            } else {
                return None;
            }
        }
        _ => return None,
    }
    Some(())
}

/// Drops what the kernel adds (handles, counter values) so a listed object
/// compares equal to the one we sent.
fn normalized(object: NfListObject<'static>) -> NfListObject<'static> {
    match object {
        NfListObject::Table(mut t) => {
            t.handle = None;
            NfListObject::Table(t)
        }
        NfListObject::Set(mut s) => {
            s.handle = None;
            NfListObject::Set(s)
        }
        NfListObject::Chain(mut c) => {
            c.handle = None;
            NfListObject::Chain(c)
        }
        NfListObject::Rule(mut r) => {
            r.handle = None;
            r.index = None;
            r.expr = r
                .expr
                .iter()
                .cloned()
                .map(|s| match s {
                    Statement::Counter(Counter::Anonymous(_)) => {
                        Statement::Counter(Counter::Anonymous(None))
                    }
                    s => s,
                })
                .collect::<Vec<_>>()
                .into();
            NfListObject::Rule(r)
        }
        other => other,
    }
}

/// Orders objects as table, sets by name, chains by name, rules by chain; a
/// stable sort, so the rules of one chain keep their order (which matters
/// to nft).
fn sort(objects: &mut [NfListObject<'static>]) {
    objects.sort_by_key(|o| match o {
        NfListObject::Table(_) => (0, String::new()),
        NfListObject::Set(s) => (1, s.name.to_string()),
        NfListObject::Chain(c) => (2, c.name.to_string()),
        NfListObject::Rule(r) => (3, r.chain.to_string()),
        _ => (4, String::new()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::tests::fenced;
    use serde_json::json;

    /// What nft 1.0.6 prints for the fenced table: handles, counter values
    /// and a metainfo object that `render` does not have.
    const LISTED_FENCED_5432: &str = r#"{"nftables": [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "corral", "handle": 2}},
        {"set": {"family": "inet", "name": "allow4", "table": "corral", "type": "ipv4_addr", "handle": 3, "flags": ["interval"]}},
        {"set": {"family": "inet", "name": "allow6", "table": "corral", "type": "ipv6_addr", "handle": 4, "flags": ["interval"]}},
        {"set": {"family": "inet", "name": "always4", "table": "corral", "type": "ipv4_addr", "handle": 5, "flags": ["interval"]}},
        {"set": {"family": "inet", "name": "always6", "table": "corral", "type": "ipv6_addr", "handle": 6, "flags": ["interval"]}},
        {"set": {"family": "inet", "name": "lease", "table": "corral", "type": "inet_service", "handle": 7, "flags": ["timeout"], "elem": [{"elem": {"val": 5432, "timeout": 1, "expires": 0}}]}},
        {"chain": {"family": "inet", "table": "corral", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "corral", "name": "output", "handle": 2, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "corral", "chain": "input", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 5432}}, {"counter": {"packets": 7, "bytes": 420}}, {"drop": null}]}},
        {"rule": {"family": "inet", "table": "corral", "chain": "output", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "sport"}}, "right": 5432}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}
    ]}"#;

    #[test]
    fn listed_table_matches_ignoring_handles_and_counters() {
        assert!(listed_matches(LISTED_FENCED_5432, &fenced(5432), true));
        assert!(!listed_matches(LISTED_FENCED_5432, &fenced(5433), true));
        assert!(!listed_matches(
            LISTED_FENCED_5432,
            &Rules {
                engine_port: Some(5432),
                fenced: false,
                ..Rules::default()
            },
            true
        ));
    }

    #[test]
    fn terse_comparison_ignores_elements_only() {
        let with_list = Rules {
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            ..fenced(5432)
        };
        // The listing has empty sets: the shape matches, the whole does not.
        assert!(listed_matches(LISTED_FENCED_5432, &with_list, false));
        assert!(!listed_matches(LISTED_FENCED_5432, &with_list, true));
        assert!(!listed_matches(LISTED_FENCED_5432, &fenced(5433), false));
    }

    #[test]
    fn listed_table_with_anything_extra_does_not_match() {
        let mut doc: Value = serde_json::from_str(LISTED_FENCED_5432).unwrap();
        let objects = doc["nftables"].as_array_mut().unwrap();
        // A rule someone added by hand.
        let mut extra = objects.clone();
        extra.push(
            json!({"rule": {"family": "inet", "table": "corral", "chain": "input",
            "handle": 9, "expr": [{"accept": null}]}}),
        );
        let text = json!({ "nftables": extra }).to_string();
        assert!(!listed_matches(&text, &fenced(5432), true));
        // The table switched off (`flags dormant`).
        let mut dormant = objects.clone();
        dormant[1]["table"]["flags"] = json!("dormant");
        let text = json!({ "nftables": dormant }).to_string();
        assert!(!listed_matches(&text, &fenced(5432), true));
        // A chain's policy changed.
        objects[7]["chain"]["policy"] = json!("drop");
        assert!(!listed_matches(&doc.to_string(), &fenced(5432), true));
        assert!(!listed_matches("not json", &fenced(5432), true));
    }

    #[test]
    fn only_nfts_own_message_means_missing_table() {
        let nft =
            "Error: No such file or directory\nlist table inet corral\n                ^^^^^^\n";
        assert!(is_missing_table(nft));
        let ip = "Cannot open network namespace \"ns1\": No such file or directory\n";
        assert!(!is_missing_table(ip));
        let other = "Error: No such file or directory\nlist table inet vmfirewall\n";
        assert!(!is_missing_table(other));
    }
}
