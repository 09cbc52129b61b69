//! The table `apply` writes, as the `nftables` crate's schema objects
//! (pure; unit-tested): [`render`] for the batch sent to nft, [`wanted`]
//! for what `nft -j list` should show back.

use super::gate::LEASE_SET;
use super::{normalize, Rules, TABLE};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use nftables::expr::{
    Elem, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Set, SetFlag, SetType};
use nftables::schema::{SetTypeValue, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::collections::HashSet;

/// The base chain that filters packets addressed to this node.
pub(super) const INPUT: &str = "input";
/// The base chain that filters packets this node sends.
pub(super) const OUTPUT: &str = "output";

/// The named sets of addresses, declared in every table (possibly empty) so
/// that the table always has one shape: [`Rules::allow`] split by family,
/// then [`Rules::always`] split by family.
const ALLOW4: &str = "allow4";
const ALLOW6: &str = "allow6";
const ALWAYS4: &str = "always4";
const ALWAYS6: &str = "always6";

/// The ruleset `apply` sends.
///
/// One batch: `add table` (so that the next command finds a table even on
/// a fresh host), `delete table` (which drops whatever the table held,
/// including rules and set elements someone added by hand), then the table
/// as [`Rules`] wants it, the sets' elements included. nft runs the whole
/// batch as one kernel transaction.
///
/// `lease_secs`: for a gated table, the lease element goes in with this
/// timeout, so the gate is open from the transaction on. nft's JSON takes
/// whole seconds only (and 0 would mean "for ever"), so the caller rounds
/// down and renews the element to the millisecond right after
/// ([`super::gate::renew`]); under a second, no element: the gate opens
/// with that renewal.
pub fn render(rules: &Rules, lease_secs: Option<u32>) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(table());
    batch.delete(table());
    let lease = lease_secs.filter(|s| *s > 0 && rules.gated && !rules.fenced);
    for object in wanted(rules, &named_sets(rules), true) {
        batch.add(match (object, lease, rules.engine_port) {
            (NfListObject::Set(set), Some(secs), Some(port)) if set.name == LEASE_SET => {
                NfListObject::Set(Box::new(Set {
                    elem: Some(vec![lease_element(port, secs)].into()),
                    ..*set
                }))
            }
            (object, _, _) => object,
        });
    }
    batch.to_nftables()
}

fn lease_element(port: u16, secs: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Elem(Elem {
        val: Box::new(Expression::Number(u32::from(port))),
        timeout: Some(secs),
        expires: None,
        comment: None,
        counter: None,
    }))
}

pub(super) fn table() -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    })
}

/// One of the table's named sets and the addresses it holds, normalised.
#[derive(Debug)]
pub(super) struct NamedSet {
    pub name: &'static str,
    set_type: SetType,
    pub nets: Vec<IpNet>,
}

/// The four sets, in the order they are declared.
pub(super) fn named_sets(rules: &Rules) -> [NamedSet; 4] {
    let (allow4, allow6) = normalize(&rules.allow);
    let always: Vec<IpNet> = rules.always.iter().copied().map(IpNet::from).collect();
    let (always4, always6) = normalize(&always);
    let v4 = |nets: Vec<Ipv4Net>| nets.into_iter().map(IpNet::V4).collect();
    let v6 = |nets: Vec<Ipv6Net>| nets.into_iter().map(IpNet::V6).collect();
    [
        (ALLOW4, SetType::Ipv4Addr, v4(allow4)),
        (ALLOW6, SetType::Ipv6Addr, v6(allow6)),
        (ALWAYS4, SetType::Ipv4Addr, v4(always4)),
        (ALWAYS6, SetType::Ipv6Addr, v6(always6)),
    ]
    .map(|(name, set_type, nets)| NamedSet {
        name,
        set_type,
        nets,
    })
}

/// The table's contents as `nft -j list table` shows them, less handles,
/// counter values and the lease element: the table, its sets (with their
/// addresses if `with_elements`), its chains, then each chain's rules in
/// order.
///
/// For the engine port P (when set) the input chain holds, in order:
/// - fenced: `tcp dport P counter drop`, and the output chain `tcp sport P
///   counter drop`;
/// - gated: `tcp dport P tcp dport != @lease counter drop`, and the output
///   chain `tcp sport P tcp sport != @lease counter drop`;
/// - then, when `allow` is not empty, for P (unless fenced) and for the
///   health port: `iifname "lo" tcp dport X accept`, one `tcp dport X ip
///   saddr @set accept` per address set, then `tcp dport X counter drop`.
pub(super) fn wanted(
    rules: &Rules,
    sets: &[NamedSet],
    with_elements: bool,
) -> Vec<NfListObject<'static>> {
    let mut objects = vec![table()];
    objects.extend(sets.iter().map(|set| set_object(set, with_elements)));
    objects.push(lease_set());
    // The chains exist even when empty, so the table always has one shape
    // and `nft list table inet corral` shows where rules will go.
    objects.push(base_chain(INPUT, NfHook::Input));
    objects.push(base_chain(OUTPUT, NfHook::Output));
    let Some(port) = rules.engine_port else {
        return objects;
    };
    if rules.fenced {
        objects.push(rule(INPUT, drop_port("dport", port, false)));
        objects.push(rule(OUTPUT, drop_port("sport", port, false)));
    } else if rules.gated {
        objects.push(rule(INPUT, drop_port("dport", port, true)));
        objects.push(rule(OUTPUT, drop_port("sport", port, true)));
    }
    if rules.allow.is_empty() {
        return objects;
    }
    // The fence drops every packet to the engine port: an allowlist rule
    // behind it would never be reached.
    let engine = Some(port).filter(|_| !rules.fenced);
    for port in engine.into_iter().chain(rules.health_port) {
        objects.extend(allowlist_rules(port));
    }
    objects
}

/// Only the allowlist's addresses, the node's own loopback and the
/// always-allowed ones reach `port`.
fn allowlist_rules(port: u16) -> Vec<NfListObject<'static>> {
    // The engine's own tools (psql on the node, the agent's health
    // checks) connect over loopback.
    let mut lo = vec![Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::Iifname,
        })),
        right: Expression::String("lo".into()),
        op: Operator::EQ,
    })];
    lo.extend([port_match("dport", port), Statement::Accept(None)]);
    let mut rules = vec![rule(INPUT, lo)];
    for (protocol, set) in [
        ("ip", ALLOW4),
        ("ip6", ALLOW6),
        ("ip", ALWAYS4),
        ("ip6", ALWAYS6),
    ] {
        let expr = vec![
            port_match("dport", port),
            Statement::Match(Match {
                left: payload(protocol, "saddr"),
                right: Expression::String(format!("@{set}").into()),
                op: Operator::EQ,
            }),
            Statement::Accept(None),
        ];
        rules.push(rule(INPUT, expr));
    }
    rules.push(rule(INPUT, drop_port("dport", port, false)));
    rules
}

/// The lease gate's set ([`super::gate`]): ports, each with a timeout.
fn lease_set() -> NfListObject<'static> {
    NfListObject::Set(Box::new(Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: LEASE_SET.into(),
        set_type: SetTypeValue::Single(SetType::InetService),
        flags: Some(HashSet::from([SetFlag::Timeout])),
        ..Set::default()
    }))
}

/// A named set of addresses in our table. `flags interval` for all four:
/// elements may be networks as well as single addresses.
pub(super) fn set_object(set: &NamedSet, with_elements: bool) -> NfListObject<'static> {
    // nft lists an empty set without `elem`, so we send none either.
    let elem = (with_elements && !set.nets.is_empty())
        .then(|| set.nets.iter().map(element).collect::<Vec<_>>().into());
    NfListObject::Set(Box::new(Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: set.name.into(),
        set_type: SetTypeValue::Single(set.set_type),
        flags: Some(HashSet::from([SetFlag::Interval])),
        elem,
        ..Set::default()
    }))
}

/// A set element as nft lists it: a single address as a plain string
/// (`"192.0.2.1"`), a network as `{"prefix": {"addr": ..., "len": ...}}`.
fn element(net: &IpNet) -> Expression<'static> {
    let addr = Expression::String(net.network().to_string().into());
    if net.prefix_len() == net.max_prefix_len() {
        return addr;
    }
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(addr),
        len: u32::from(net.prefix_len()),
    }))
}

/// A base chain at the filter priority (0) that accepts by default: the
/// table only ever drops what it names, and the VM's own tables keep
/// deciding everything else.
fn base_chain(name: &'static str, hook: NfHook) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: chain.into(),
        expr: expr.into(),
        ..Rule::default()
    })
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

/// `tcp <field> <port>`.
fn port_match(field: &'static str, port: u16) -> Statement<'static> {
    Statement::Match(Match {
        left: payload("tcp", field),
        right: Expression::Number(u32::from(port)),
        op: Operator::EQ,
    })
}

/// `tcp <field> <port> counter drop`: the fence, and the end of an
/// allowlist; with `gate`, `tcp <field> <port> tcp <field> != @lease counter
/// drop`: the closed gate. The counter lets an operator see, with `nft list
/// table inet corral`, that the rule is holding traffic back.
fn drop_port(field: &'static str, port: u16, gate: bool) -> Vec<Statement<'static>> {
    let mut expr = vec![port_match(field, port)];
    if gate {
        expr.push(Statement::Match(Match {
            left: payload("tcp", field),
            right: Expression::String(format!("@{LEASE_SET}").into()),
            op: Operator::NEQ,
        }));
    }
    expr.extend([
        Statement::Counter(Counter::Anonymous(None)),
        // `None`, not `Some(Drop {})`: nft lists a drop as `"drop": null`,
        // and `matches` compares what it lists with what we send.
        Statement::Drop(None),
    ]);
    expr
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn commands(rules: &Rules) -> Vec<Value> {
        let doc = serde_json::to_value(render(rules, None)).unwrap();
        doc["nftables"].as_array().unwrap().clone()
    }

    /// The `add rule` commands of `chain`, as JSON expression lists.
    fn rule_exprs(commands: &[Value], chain: &str) -> Vec<Value> {
        commands
            .iter()
            .filter_map(|c| c.get("add")?.get("rule"))
            .filter(|r| r["chain"] == chain)
            .map(|r| r["expr"].clone())
            .collect()
    }

    fn fenced(port: u16) -> Rules {
        Rules {
            engine_port: Some(port),
            fenced: true,
            ..Rules::default()
        }
    }

    #[test]
    fn render_replaces_the_table_in_one_batch() {
        let commands = commands(&fenced(5432));
        let table = json!({"table": {"family": "inet", "name": "corral"}});
        assert_eq!(commands[0], json!({ "add": table }));
        assert_eq!(commands[1], json!({ "delete": table }));
        assert_eq!(commands[2], json!({ "add": table }));
        for (i, (name, kind)) in [
            ("allow4", "ipv4_addr"),
            ("allow6", "ipv6_addr"),
            ("always4", "ipv4_addr"),
            ("always6", "ipv6_addr"),
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(
                commands[3 + i],
                json!({"add": {"set": {"family": "inet", "table": "corral", "name": name,
                    "type": kind, "flags": ["interval"]}}})
            );
        }
        assert_eq!(
            commands[7],
            json!({"add": {"set": {"family": "inet", "table": "corral", "name": "lease",
                "type": "inet_service", "flags": ["timeout"]}}})
        );
        assert_eq!(
            commands[8],
            json!({"add": {"chain": {"family": "inet", "table": "corral", "name": "input",
                "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}})
        );
        assert_eq!(
            commands[9],
            json!({"add": {"chain": {"family": "inet", "table": "corral", "name": "output",
                "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}})
        );
        assert_eq!(commands.len(), 12, "{commands:#?}");
        // Everything after the delete is an `add` into our table only.
        for c in &commands[2..] {
            let (verb, object) = c.as_object().unwrap().iter().next().unwrap();
            assert_eq!(verb, "add");
            let object = object.as_object().unwrap().values().next().unwrap();
            assert_eq!(object["family"], "inet");
            assert!(object["name"] == "corral" || object["table"] == "corral");
        }
    }

    #[test]
    fn render_fence_drops_the_engine_port_both_ways() {
        let commands = commands(&fenced(6543));
        let port_match = |field: &str| {
            json!({"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": field}},
                "right": 6543}})
        };
        assert_eq!(
            rule_exprs(&commands, "input"),
            vec![json!([port_match("dport"), {"counter": null}, {"drop": null}])]
        );
        assert_eq!(
            rule_exprs(&commands, "output"),
            vec![json!([port_match("sport"), {"counter": null}, {"drop": null}])]
        );
    }

    #[test]
    fn render_unfenced_has_empty_chains() {
        let rules = Rules {
            engine_port: Some(5432),
            fenced: false,
            ..Rules::default()
        };
        let commands = commands(&rules);
        assert_eq!(commands.len(), 10, "{commands:#?}");
        assert!(rule_exprs(&commands, "input").is_empty());
        assert!(rule_exprs(&commands, "output").is_empty());
        assert!(commands[8]["add"]["chain"]["name"] == "input");
        assert!(commands[9]["add"]["chain"]["name"] == "output");
    }

    #[test]
    fn render_without_port_has_empty_chains_even_when_fenced() {
        let rules = Rules {
            engine_port: None,
            fenced: true,
            ..Rules::default()
        };
        assert_eq!(commands(&rules), commands(&Rules::default()));
        assert_eq!(commands(&rules).len(), 10);
    }

    #[test]
    fn normalize_merges_splits_by_family_and_unmaps_ipv4() {
        let nets: Vec<IpNet> = [
            "10.1.2.3/8",
            "10.0.0.0/8",
            "192.0.2.0/25",
            "192.0.2.128/25",
            "::ffff:198.51.100.7/128",
            "2001:db8::/48",
            "2001:db8:0:1::/64",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let (v4, v6) = normalize(&nets);
        let v4: Vec<String> = v4.iter().map(ToString::to_string).collect();
        let v6: Vec<String> = v6.iter().map(ToString::to_string).collect();
        assert_eq!(v4, ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.7/32"]);
        assert_eq!(v6, ["2001:db8::/48"]);
    }

    #[test]
    fn render_allowlist_puts_elements_in_the_sets() {
        let rules = Rules {
            engine_port: Some(5432),
            fenced: false,
            allow: vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8::1/128".parse().unwrap(),
            ],
            always: vec!["10.231.1.2".parse().unwrap()],
            ..Rules::default()
        };
        let commands = commands(&rules);
        let elems = |name: &str| {
            commands
                .iter()
                .filter_map(|c| c.get("add")?.get("set"))
                .find(|s| s["name"] == name)
                .map(|s| s.get("elem").cloned())
                .unwrap()
        };
        assert_eq!(
            elems("allow4"),
            Some(json!([{"prefix": {"addr": "192.0.2.0", "len": 24}}]))
        );
        assert_eq!(elems("allow6"), Some(json!(["2001:db8::1"])));
        assert_eq!(elems("always4"), Some(json!(["10.231.1.2"])));
        assert_eq!(elems("always6"), None, "an empty set has no elem");
        // lo, 4 set rules, the final drop; nothing on output.
        assert_eq!(rule_exprs(&commands, "input").len(), 6);
        assert!(rule_exprs(&commands, "output").is_empty());
    }
    #[test]
    fn render_gated_drops_the_engine_port_unless_the_lease_set_holds_it() {
        let rules = Rules {
            engine_port: Some(5432),
            gated: true,
            ..Rules::default()
        };
        let gate = |field: &str| {
            let port = json!({"payload": {"protocol": "tcp", "field": field}});
            json!([
                {"match": {"op": "==", "left": port, "right": 5432}},
                {"match": {"op": "!=", "left": port, "right": "@lease"}},
                {"counter": null}, {"drop": null}
            ])
        };
        let closed = commands(&rules);
        assert_eq!(rule_exprs(&closed, "input"), vec![gate("dport")]);
        assert_eq!(rule_exprs(&closed, "output"), vec![gate("sport")]);
        let lease = |c: &[Value]| {
            c.iter()
                .filter_map(|c| c.get("add")?.get("set"))
                .find(|s| s["name"] == "lease")
                .and_then(|s| s.get("elem").cloned())
        };
        assert_eq!(lease(&closed), None, "no seconds given: the gate is closed");
        let doc = serde_json::to_value(render(&rules, Some(1))).unwrap();
        let open = doc["nftables"].as_array().unwrap();
        let elem = &lease(open).unwrap()[0]["elem"];
        assert_eq!((&elem["val"], &elem["timeout"]), (&json!(5432), &json!(1)));
        // 0 s would mean "no timeout": never written.
        let doc = serde_json::to_value(render(&rules, Some(0))).unwrap();
        assert_eq!(lease(doc["nftables"].as_array().unwrap()), None);
        // The fence wins: no gate, no element.
        let fenced = Rules {
            fenced: true,
            ..rules.clone()
        };
        let doc = serde_json::to_value(render(&fenced, Some(5))).unwrap();
        let c = doc["nftables"].as_array().unwrap();
        assert_eq!(lease(c), None);
        assert_eq!(rule_exprs(c, "input").len(), 1);
    }

    #[test]
    fn render_filters_the_health_port_by_the_allowlist_but_never_fences_it() {
        let rules = Rules {
            engine_port: Some(5432),
            health_port: Some(7402),
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            ..Rules::default()
        };
        let dports = |c: &[Value]| -> Vec<Value> {
            rule_exprs(c, "input")
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .find(|s| s["match"]["left"]["payload"]["field"] == "dport")
                        .unwrap()["match"]["right"]
                        .clone()
                })
                .collect()
        };
        // lo, 4 sets, drop: for the engine port, then the health port.
        let open = dports(&commands(&rules));
        assert_eq!(open.len(), 12);
        assert!(open[..6].iter().all(|p| p == 5432));
        assert!(open[6..].iter().all(|p| p == 7402));
        // Fenced: the engine port dropped outright, the health port as
        // before (a load balancer must see the 503).
        let fenced = Rules {
            fenced: true,
            ..rules.clone()
        };
        let c = commands(&fenced);
        let ports = dports(&c);
        assert_eq!(ports.len(), 7);
        assert_eq!(ports[0], 5432);
        assert!(ports[1..].iter().all(|p| p == 7402));
        // No allowlist: the health port is open to all.
        let open_list = Rules {
            allow: vec![],
            ..rules
        };
        assert!(rule_exprs(&commands(&open_list), "input").is_empty());
    }
}
