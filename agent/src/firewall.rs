//! The node's packet filter: one nftables table that the agent owns.
//!
//! The agent writes exactly one table, `inet corral`, and never reads or
//! changes any other: the VM may have a firewall of its own (a cloud image's
//! defaults, the platform team's rules), and the two must live side by side.
//! An `inet` table sees both IPv4 and IPv6, so one rule covers both.
//!
//! Today the table carries the **fence**. When a primary loses its lease it
//! may no longer be the primary (the coordinator may already be promoting a
//! replica), yet its engine still runs and still accepts writes. The fence
//! drops every packet to and from the engine's port, so no client can write
//! to the old primary and no replica can acknowledge a synchronous commit to
//! it: a split brain cannot take writes.
//!
//! The same table carries the **IP allowlist**: when [`Rules::allow`] is not
//! empty, only those clients (plus loopback, and the cluster's own nodes and
//! the coordinator in [`Rules::always`]) reach the engine port. The
//! addresses live in four named sets (`allow4`, `allow6`, `always4`,
//! `always6`, one per family because an `inet` table matches `ip saddr` and
//! `ip6 saddr` separately), so a 10,000-entry list is four rules and a
//! kernel lookup per new connection, not 10,000 rules. The wanted state is
//! one struct ([`Rules`]), and every change rewrites the whole table.
//!
//! The table is always replaced as a whole, in one nftables transaction
//! (see [`render`]): the kernel applies a batch all or nothing, so there is
//! never a moment with half of the rules, and applying the same [`Rules`]
//! twice is harmless. [`Firewall::matches`] reads the table back to notice
//! drift (an operator's `nft flush ruleset`, a reboot, a configuration tool
//! that deletes tables it does not know), so the agent can re-apply.
//!
//! We drive the `nft` command with its JSON interface (`nft -j`), through
//! the schema types of the `nftables` crate, rather than talking netlink
//! ourselves: `nft` is what operators use to look at the same table, and
//! one `nft` run is fast enough (about 15 ms, most of it the kernel
//! committing the transaction; TIMINGS_10K).

use anyhow::Context;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType};
use nftables::schema::{SetTypeValue, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::process::{Output, Stdio};
use std::time::Instant;
use tokio::io::AsyncWriteExt;

/// The name of the agent's table, in the `inet` family.
pub const TABLE: &str = "corral";

/// The base chain that filters packets addressed to this node.
const INPUT: &str = "input";
/// The base chain that filters packets this node sends.
const OUTPUT: &str = "output";

/// The named sets, declared in every table (possibly empty) so that the
/// table always has one shape: [`Rules::allow`] split by family, then
/// [`Rules::always`] split by family.
const ALLOW4: &str = "allow4";
const ALLOW6: &str = "allow6";
const ALWAYS4: &str = "always4";
const ALWAYS6: &str = "always6";

/// What the agent's table should hold.
///
/// This is the whole wanted state, not a change: [`Firewall::apply`] turns
/// it into a complete table. New concerns become new fields; `Default` is
/// "nothing filtered".
///
/// For the engine port P, the input chain holds, in order:
///
/// - fenced: `tcp dport P counter drop` (and the output chain `tcp sport P
///   counter drop`): nobody, loopback included, whatever `allow` says;
/// - not fenced, `allow` empty: nothing (everyone reaches P);
/// - not fenced, `allow` not empty: `iifname "lo" tcp dport P accept`, then
///   `tcp dport P ip saddr @allow4 accept`, the same for `@allow6` (`ip6
///   saddr`), `@always4` and `@always6`, then `tcp dport P counter drop`.
///
/// Only the engine port is filtered: the agent's own ports, and the replies
/// to connections the node opens itself (their destination port is an
/// ephemeral one), are untouched. The sets hold the addresses whatever the
/// rules are (fenced, no port, empty `allow`): the table has one shape.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rules {
    /// The engine's TCP port; None: the table exists with empty chains.
    pub engine_port: Option<u16>,
    /// Fence: drop every packet to the engine port (input chain, `tcp dport P`)
    /// and from it (output chain, `tcp sport P`), loopback included. Connections
    /// the node itself opens to other nodes' engines (pg_rewind, pg_basebackup,
    /// streaming from a new primary) use an ephemeral local port and still work.
    /// The fence wins over `allow` and `always`.
    pub fenced: bool,
    /// Clients allowed to reach the engine port; empty: everyone (no filtering).
    ///
    /// Networks or single addresses (`/32`, `/128`), in any order: overlapping,
    /// adjacent and duplicate entries are merged before they reach nft (see
    /// [`normalize`]), and host bits are ignored (`10.1.2.3/8` is `10.0.0.0/8`).
    /// IPv4-mapped IPv6 networks (`::ffff:192.0.2.1/128`) count as the IPv4
    /// ones, since IPv4 clients of a dual-stack engine send IPv4 packets.
    pub allow: Vec<IpNet>,
    /// Always allowed whatever `allow` says, when `allow` is not empty: the cluster's
    /// own nodes (replication, pg_rewind, clones) and the coordinator.
    pub always: Vec<IpAddr>,
}

/// The addresses `apply` puts in an allowlist's sets: IPv4-mapped IPv6
/// networks turned into IPv4 ones, host bits cleared, overlapping, adjacent
/// and duplicate networks merged ([`IpNet::aggregate`]), sorted, and split
/// by family. This is exactly what `nft -j list` shows back (nft refuses
/// overlapping elements in a set without `auto-merge`, and sorts them).
pub fn normalize(nets: &[IpNet]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let canonical: Vec<IpNet> = nets.iter().copied().map(canonical).collect();
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    // `aggregate` returns the IPv4 networks, then the IPv6 ones, each sorted.
    for net in IpNet::aggregate(&canonical) {
        match net {
            IpNet::V4(n) => v4.push(n),
            IpNet::V6(n) => v6.push(n),
        }
    }
    (v4, v6)
}

/// `::ffff:a.b.c.d/N` (N >= 96) as `a.b.c.d/(N-96)`; anything else as is.
fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net {
        if n.prefix_len() >= 96 {
            if let Some(v4) = n.network().to_ipv4_mapped() {
                let v4 = Ipv4Net::new(v4, n.prefix_len() - 96).expect("0 <= len - 96 <= 32");
                return IpNet::V4(v4);
            }
        }
    }
    net
}

/// Runs `nft` to write, read and delete the agent's table.
///
/// The command is configurable so that tests (and a VM whose engine lives in
/// a network namespace) can run `ip netns exec NS nft`; the `nft` arguments
/// are appended to it.
#[derive(Debug, Clone)]
pub struct Firewall {
    program: String,
    args: Vec<String>,
}

impl Default for Firewall {
    fn default() -> Self {
        Self::new()
    }
}

impl Firewall {
    /// A firewall driven by `nft`, found in `PATH`.
    pub fn new() -> Firewall {
        Firewall::with_command("nft", &[])
    }

    /// A firewall driven by `program args... <nft arguments>`, for example
    /// `("ip", &["netns", "exec", "ns1", "nft"])` to work in namespace `ns1`.
    pub fn with_command(program: &str, args: &[&str]) -> Firewall {
        Firewall {
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Replaces the table atomically: ONE nft transaction (one `nft -j -f -`
    /// batch: add table, delete table, add table, add chains, add rules), so
    /// there is never a moment with half the rules. Idempotent.
    ///
    /// This runs the moment a lease expires, so it is one `nft` run and
    /// nothing else: about 15 ms (5 to 30 ms) on a 2-core VM, most of it the
    /// kernel committing the transaction. On error the kernel has kept the
    /// table exactly as it was before the call.
    pub async fn apply(&self, rules: &Rules) -> anyhow::Result<()> {
        let started = Instant::now();
        // Serializing the crate's schema types cannot fail: they hold no maps
        // with non-string keys and no types serde_json rejects.
        let payload = serde_json::to_string(&render(rules))
            .context("serializing the nftables ruleset (a bug in corral)")?;
        let what = format!("replacing table inet {TABLE}");
        let out = self.run(&["-j", "-f", "-"], Some(&payload), &what).await?;
        if !out.status.success() {
            let note = "; the table is unchanged (nft applies a batch all or nothing)";
            return Err(self.failed(&["-j", "-f", "-"], &what, &out, note));
        }
        tracing::debug!(?rules, elapsed = ?started.elapsed(), "applied table inet {TABLE}");
        Ok(())
    }

    /// Whether the table exists and holds exactly what `apply(rules)` writes
    /// (chains with hook/priority/policy and rules; ignore handles and counter
    /// values). Used to detect drift (someone ran `nft delete table inet
    /// corral` or `nft flush ruleset`).
    ///
    /// Anything else in our table (an extra chain, set or rule, a `dormant`
    /// flag that switches every chain off) is drift too: `Ok(false)`. An
    /// `Err` means `nft` itself could not be run or failed for another
    /// reason than a missing table.
    pub async fn matches(&self, rules: &Rules) -> anyhow::Result<bool> {
        self.compare(rules, true).await
    }

    /// Like [`matches`](Self::matches) but without the sets' elements
    /// (`nft --terse`): a table, chain, rule or set declaration changed or
    /// gone. Much cheaper with a long allowlist (listing 10,000 elements
    /// costs nft about 30 ms), so the agent runs it often and the full
    /// check less often.
    pub async fn matches_shape(&self, rules: &Rules) -> anyhow::Result<bool> {
        self.compare(rules, false).await
    }

    async fn compare(&self, rules: &Rules, elements: bool) -> anyhow::Result<bool> {
        let full = ["-j", "list", "table", "inet", TABLE];
        let terse = ["-t", "-j", "list", "table", "inet", TABLE];
        let args: &[&str] = if elements { &full } else { &terse };
        let what = format!("reading table inet {TABLE}");
        let out = self.run(args, None, &what).await?;
        if !out.status.success() {
            if is_missing_table(&String::from_utf8_lossy(&out.stderr)) {
                return Ok(false);
            }
            return Err(self.failed(args, &what, &out, ""));
        }
        let listed = String::from_utf8_lossy(&out.stdout);
        Ok(listed_matches(&listed, rules, elements))
    }

    /// Deletes the table; Ok if it is not there.
    ///
    /// One batch "add table, delete table": adding an existing table is a
    /// no-op, so the delete always finds it, and we need not tell "absent"
    /// apart from other errors by parsing nft's messages.
    pub async fn remove(&self) -> anyhow::Result<()> {
        let mut batch = Batch::new();
        batch.add(table());
        batch.delete(table());
        let payload = serde_json::to_string(&batch.to_nftables())
            .context("serializing the nftables ruleset (a bug in corral)")?;
        let what = format!("deleting table inet {TABLE}");
        let out = self.run(&["-j", "-f", "-"], Some(&payload), &what).await?;
        if !out.status.success() {
            return Err(self.failed(&["-j", "-f", "-"], &what, &out, ""));
        }
        Ok(())
    }

    /// Runs the command with `nft_args`, feeding `stdin` if given, and
    /// returns its output whatever its exit status.
    ///
    /// We spawn the process ourselves rather than use the crate's helpers:
    /// its `apply_ruleset*` functions do not capture nft's stderr (the
    /// message would go to the agent's own stderr, and the error would say
    /// only "did not return successfully").
    async fn run(
        &self,
        nft_args: &[&str],
        stdin: Option<&str>,
        what: &str,
    ) -> anyhow::Result<Output> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .args(nft_args)
            // nft's messages come from strerror(); `matches` looks for one.
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // If our caller gives up (a timeout), do not leave nft behind.
            // Killing it mid-way is safe: the kernel commits a batch whole
            // or not at all.
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| self.spawn_error(e, nft_args, what))?;
        let mut write_result = Ok(());
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            write_result = pipe.write_all(input.as_bytes()).await;
            // Closing stdin tells nft the batch is complete.
            drop(pipe);
        }
        let out = child
            .wait_with_output()
            .await
            .with_context(|| format!("{what}: waiting for `{}`", self.command_line(nft_args)))?;
        // If nft exited early (bad arguments, a missing namespace), the write
        // fails with a broken pipe; its stderr says why, so report that first.
        if out.status.success() {
            write_result.with_context(|| {
                format!(
                    "{what}: writing the ruleset to `{}`",
                    self.command_line(nft_args)
                )
            })?;
        }
        Ok(out)
    }

    fn command_line(&self, nft_args: &[&str]) -> String {
        let mut words = vec![self.program.as_str()];
        words.extend(self.args.iter().map(String::as_str));
        words.extend(nft_args);
        words.join(" ")
    }

    /// The error for a command that could not even start.
    fn spawn_error(&self, e: std::io::Error, nft_args: &[&str], what: &str) -> anyhow::Error {
        let line = self.command_line(nft_args);
        let is_nft = std::path::Path::new(&self.program)
            .file_name()
            .is_some_and(|name| name == "nft");
        match e.kind() {
            std::io::ErrorKind::NotFound if is_nft => anyhow::anyhow!(
                "{what}: {} not found: install nftables (apt install nftables)",
                self.program
            ),
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "{what}: {} not found (needed to run `{line}`): install it or fix the command",
                self.program
            ),
            _ => anyhow::Error::new(e).context(format!("{what}: cannot run `{line}`")),
        }
    }

    /// The error for a command that ran and failed: nft's own message, what
    /// to do about the failures we know, then `note`.
    fn failed(&self, nft_args: &[&str], what: &str, out: &Output, note: &str) -> anyhow::Error {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let hint = if stderr.contains("Operation not permitted") {
            " (the agent must run as root or with CAP_NET_ADMIN)"
        } else if stderr.contains("Protocol not supported") {
            " (the kernel lacks nf_tables: load it with `modprobe nf_tables`)"
        } else {
            ""
        };
        let stderr = if stderr.is_empty() {
            "no message on stderr"
        } else {
            stderr
        };
        anyhow::anyhow!(
            "{what} failed: `{}` exited with {}: {stderr}{hint}{note}",
            self.command_line(nft_args),
            out.status
        )
    }
}

/// The ruleset `apply` sends (pure; unit-tested).
///
/// One batch: `add table` (so that the next command finds a table even on
/// a fresh host), `delete table` (which drops whatever the table held,
/// including rules and set elements someone added by hand), then the table
/// as [`Rules`] wants it, the sets' elements included. nft runs the whole
/// batch as one kernel transaction.
pub fn render(rules: &Rules) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(table());
    batch.delete(table());
    for object in wanted(rules, &named_sets(rules), true) {
        batch.add(object);
    }
    batch.to_nftables()
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    })
}

/// One of the table's named sets and the addresses it holds, normalised.
#[derive(Debug)]
struct NamedSet {
    name: &'static str,
    set_type: SetType,
    nets: Vec<IpNet>,
}

/// The four sets, in the order they are declared.
fn named_sets(rules: &Rules) -> [NamedSet; 4] {
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

/// The table's contents as `nft -j list table` shows them, less handles and
/// counter values: the table, its sets (with their elements if
/// `with_elements`), its chains, then each chain's rules in order.
fn wanted(rules: &Rules, sets: &[NamedSet], with_elements: bool) -> Vec<NfListObject<'static>> {
    let mut objects = vec![table()];
    objects.extend(sets.iter().map(|set| set_object(set, with_elements)));
    // The chains exist even when empty, so the table always has one shape
    // and `nft list table inet corral` shows where rules will go.
    objects.push(base_chain(INPUT, NfHook::Input));
    objects.push(base_chain(OUTPUT, NfHook::Output));
    let Some(port) = rules.engine_port else {
        return objects;
    };
    if rules.fenced {
        // Nothing after the fence: it drops every packet to the port, so an
        // allowlist rule behind it would never be reached.
        objects.push(rule(INPUT, drop_port("dport", port)));
        objects.push(rule(OUTPUT, drop_port("sport", port)));
    } else if !rules.allow.is_empty() {
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
        objects.push(rule(INPUT, lo));
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
            objects.push(rule(INPUT, expr));
        }
        objects.push(rule(INPUT, drop_port("dport", port)));
    }
    objects
}

/// A named set of addresses in our table. `flags interval` for all four:
/// elements may be networks as well as single addresses.
fn set_object(set: &NamedSet, with_elements: bool) -> NfListObject<'static> {
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
/// allowlist. The counter lets an operator see, with `nft list table inet
/// corral`, that the rule is holding traffic back.
fn drop_port(field: &'static str, port: u16) -> Vec<Statement<'static>> {
    vec![
        port_match(field, port),
        Statement::Counter(Counter::Anonymous(None)),
        // `None`, not `Some(Drop {})`: nft lists a drop as `"drop": null`,
        // and `matches` compares what it lists with what we send.
        Statement::Drop(None),
    ]
}

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
fn is_missing_table(stderr: &str) -> bool {
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
fn listed_matches(listed: &str, rules: &Rules, elements: bool) -> bool {
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
    use serde_json::{json, Value};

    fn commands(rules: &Rules) -> Vec<Value> {
        let doc = serde_json::to_value(render(rules)).unwrap();
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
            json!({"add": {"chain": {"family": "inet", "table": "corral", "name": "input",
                "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}})
        );
        assert_eq!(
            commands[8],
            json!({"add": {"chain": {"family": "inet", "table": "corral", "name": "output",
                "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}})
        );
        assert_eq!(commands.len(), 11, "{commands:#?}");
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
        assert_eq!(commands.len(), 9, "{commands:#?}");
        assert!(rule_exprs(&commands, "input").is_empty());
        assert!(rule_exprs(&commands, "output").is_empty());
        assert!(commands[7]["add"]["chain"]["name"] == "input");
        assert!(commands[8]["add"]["chain"]["name"] == "output");
    }

    #[test]
    fn render_without_port_has_empty_chains_even_when_fenced() {
        let rules = Rules {
            engine_port: None,
            fenced: true,
            ..Rules::default()
        };
        assert_eq!(commands(&rules), commands(&Rules::default()));
        assert_eq!(commands(&rules).len(), 9);
    }

    /// What nft 1.0.6 prints for the fenced table: handles, counter values
    /// and a metainfo object that `render` does not have.
    const LISTED_FENCED_5432: &str = r#"{"nftables": [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "corral", "handle": 2}},
        {"set": {"family": "inet", "name": "allow4", "table": "corral", "type": "ipv4_addr", "handle": 3, "flags": ["interval"]}},
        {"set": {"family": "inet", "name": "allow6", "table": "corral", "type": "ipv6_addr", "handle": 4, "flags": ["interval"]}},
        {"set": {"family": "inet", "name": "always4", "table": "corral", "type": "ipv4_addr", "handle": 5, "flags": ["interval"]}},
        {"set": {"family": "inet", "name": "always6", "table": "corral", "type": "ipv6_addr", "handle": 6, "flags": ["interval"]}},
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
        objects[6]["chain"]["policy"] = json!("drop");
        assert!(!listed_matches(&doc.to_string(), &fenced(5432), true));
        assert!(!listed_matches("not json", &fenced(5432), true));
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

    #[tokio::test]
    async fn missing_nft_says_to_install_nftables() {
        let fw = Firewall::with_command("/nonexistent/corral-test/nft", &[]);
        let err = fw.apply(&fenced(5432)).await.unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("install nftables (apt install nftables)"),
            "{message}"
        );
        assert!(message.contains("replacing table inet corral"), "{message}");
    }

    #[tokio::test]
    async fn failing_nft_reports_its_stderr() {
        // A stand-in for nft that reads the batch and rejects it.
        let script = "cat >/dev/null; echo 'Error: Could not process rule: Operation not permitted' >&2; exit 1";
        let fw = Firewall::with_command("sh", &["-c", script, "nft"]);
        let message = format!("{:#}", fw.apply(&fenced(5432)).await.unwrap_err());
        assert!(
            message.contains("Could not process rule: Operation not permitted"),
            "{message}"
        );
        assert!(message.contains("root or with CAP_NET_ADMIN"), "{message}");
        assert!(message.contains("the table is unchanged"), "{message}");
        let message = format!("{:#}", fw.matches(&fenced(5432)).await.unwrap_err());
        assert!(
            message.contains("reading table inet corral failed"),
            "{message}"
        );
        let message = format!("{:#}", fw.remove().await.unwrap_err());
        assert!(
            message.contains("deleting table inet corral failed"),
            "{message}"
        );
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

    #[tokio::test]
    async fn missing_table_does_not_match() {
        let script = "printf 'Error: No such file or directory\\nlist table inet corral\\n                ^^^^^^\\n' >&2; exit 1";
        let fw = Firewall::with_command("sh", &["-c", script, "nft"]);
        assert!(!fw.matches(&Rules::default()).await.unwrap());
    }
}
