//! Allowlists: only listed clients admitted over IPv4 and IPv6 between
//! two namespaces, drift in the sets detected, lists replacing each other,
//! and 10 000 entries applied and compared.

use super::support::{
    allowing, fence_packets, roundtrip, sh, unfenced, EchoServer, Netns, CONNECT_TIMEOUT,
};
use corral_agent::firewall::{Rules, TABLE};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The server side of [`Lan`]: the node whose engine the allowlist guards.
const SRV4: &str = "192.0.2.1";
const SRV6: &str = "2001:db8::1";
/// Client A (the allowlist names it) and client B (it does not), each with
/// an IPv4 and an IPv6 address on the same veth.
const A4: &str = "192.0.2.10";
const A6: &str = "2001:db8::a:10";
const B4: &str = "192.0.2.20";
const B6: &str = "2001:db8::b:20";

/// Two namespaces joined by a veth pair: `server` (SRV4, SRV6) and `client`
/// (A4, A6, B4, B6).
struct Lan {
    server: Netns,
    client: Netns,
}

impl Lan {
    fn new() -> Lan {
        let lan = Lan {
            server: Netns::new(),
            client: Netns::new(),
        };
        let (server, client) = (&lan.server, &lan.client);
        server.ip(&[
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            &client.name,
        ]);
        server.ip(&["addr", "add", &format!("{SRV4}/24"), "dev", "veth0"]);
        // `nodad`: usable at once, no duplicate address detection to wait for.
        server.ip(&[
            "addr",
            "add",
            &format!("{SRV6}/64"),
            "dev",
            "veth0",
            "nodad",
        ]);
        for a in [A4, B4] {
            client.ip(&["addr", "add", &format!("{a}/24"), "dev", "veth1"]);
        }
        for a in [A6, B6] {
            client.ip(&["addr", "add", &format!("{a}/64"), "dev", "veth1", "nodad"]);
        }
        // No duplicate address detection on the link-local addresses either:
        // while a node's fe80:: address is tentative (about a second after
        // link up) its first neighbour solicitations go unanswered, and a
        // connection from a client it has not heard from yet times out.
        for (ns, dev) in [(server, "veth0"), (client, "veth1")] {
            let key = format!("net.ipv6.conf.{dev}.accept_dad=0");
            sh("ip", &["netns", "exec", &ns.name, "sysctl", "-qw", &key]).unwrap();
        }
        server.ip(&["link", "set", "veth0", "up"]);
        client.ip(&["link", "set", "veth1", "up"]);
        // Permanent neighbour entries both ways: no ARP or neighbour
        // solicitation can be lost while the link comes up (the kernel
        // activates a new link's queue up to a second after its carrier,
        // and a lost solicitation is retried only after a second, longer
        // than a connection attempt here).
        let mac = |ns: &Netns, dev: &str| -> String {
            let shown = ns.ip(&["-o", "link", "show", dev]);
            let after = shown.split("link/ether ").nth(1).expect("a veth has a MAC");
            after.split_whitespace().next().unwrap().to_string()
        };
        let (server_mac, client_mac) = (mac(server, "veth0"), mac(client, "veth1"));
        for a in [A4, A6, B4, B6] {
            let add = ["neigh", "replace", a, "lladdr", &client_mac, "dev", "veth0"];
            server.ip(&[&add[..], &["nud", "permanent"]].concat());
        }
        for a in [SRV4, SRV6] {
            let add = ["neigh", "replace", a, "lladdr", &server_mac, "dev", "veth1"];
            client.ip(&[&add[..], &["nud", "permanent"]].concat());
        }
        // Then wait until both ends see the link operationally up.
        let deadline = Instant::now() + Duration::from_secs(5);
        for (ns, dev) in [(server, "veth0"), (client, "veth1")] {
            while !ns.ip(&["-o", "link", "show", dev]).contains("state UP") {
                assert!(
                    Instant::now() < deadline,
                    "{dev} in {} never came up",
                    ns.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        lan
    }

    /// The server's address of `client`'s family, port `port`.
    fn server_addr(client: IpAddr, port: u16) -> SocketAddr {
        let ip = if client.is_ipv4() { SRV4 } else { SRV6 };
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    /// Checks, for each (client address, expected), whether a connection
    /// from that client address to the server's port `port` gets an echo;
    /// a refused one must time out (the SYN dropped, no reset). Reports
    /// every mismatch at once.
    async fn expect(&self, port: u16, expected: &[(&str, bool)], what: &str) {
        let mut wrong = Vec::new();
        for &(src, want) in expected {
            let src: IpAddr = src.parse().unwrap();
            let dst = Lan::server_addr(src, port);
            match (echo_from(&self.client, src, dst).await, want) {
                (Ok(()), true) => {}
                (Err(e), false) if e.kind() == std::io::ErrorKind::TimedOut => {}
                (got, _) => wrong.push(format!("{src} -> {dst}: {got:?}, wanted ok={want}")),
            }
        }
        assert!(wrong.is_empty(), "{what}:\n{}", wrong.join("\n"));
    }
}

/// Connects from `src`, an address of `ns`, to `dst` (the source chosen
/// with `TcpSocket::bind` before connecting) and checks the echo answers.
async fn echo_from(ns: &Netns, src: IpAddr, dst: SocketAddr) -> std::io::Result<()> {
    // A socket belongs to the namespace it was created in, wherever it is
    // used afterwards.
    let socket = ns.run(|| {
        let socket = if src.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(src, 0))?;
        Ok::<_, std::io::Error>(socket)
    })?;
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(stream) => stream?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    roundtrip(&stream)
}

/// The input chain's rules, as nft prints them, one a line, numbers as `#`.
fn input_rules(ns: &Netns) -> Vec<String> {
    ns.nft(&["list", "chain", "inet", TABLE, "input"])
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("tcp ") || l.starts_with("iifname "))
        .map(digits_as_hash)
        .collect()
}

/// `s` with every run of digits replaced by one `#`.
fn digits_as_hash(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

#[tokio::test]
async fn allowlist_admits_only_listed_clients_over_ipv4_and_ipv6() {
    let lan = Lan::new();
    // The engine listens dual-stack, as PostgreSQL does with `listen_addresses = '*'`.
    let engine = EchoServer::start(&lan.server, "::", 0);
    let port = engine.addr.port();
    // Another port of the same node (the agent's API): never filtered.
    let api = EchoServer::start(&lan.server, "::", 0);
    let fw = lan.server.firewall();
    let everyone = [(A4, true), (A6, true), (B4, true), (B6, true)];
    let only_a = [(A4, true), (A6, true), (B4, false), (B6, false)];
    lan.expect(port, &everyone, "before any table").await;

    // Single addresses.
    let rules = allowing(port, &["192.0.2.10/32", "2001:db8::a:10/128"], &[]);
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap());
    lan.expect(port, &only_a, "allow = A's addresses").await;
    lan.expect(api.addr.port(), &everyone, "other ports are not filtered")
        .await;
    assert!(
        fence_packets(&lan.server, "input") > 0,
        "the final drop's counter saw B's SYNs"
    );
    assert_eq!(
        input_rules(&lan.server),
        [
            "iifname \"lo\" tcp dport # accept",
            "tcp dport # ip saddr @allow# accept",
            "tcp dport # ip# saddr @allow# accept",
            "tcp dport # ip saddr @always# accept",
            "tcp dport # ip# saddr @always# accept",
            "tcp dport # counter packets # bytes # drop",
        ]
    );

    // Networks: 192.0.2.8/30 holds A4 and not B4, 2001:db8::a:0/112 A6 and not B6.
    let rules = allowing(port, &["192.0.2.8/30", "2001:db8::a:0/112"], &[]);
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap());
    lan.expect(port, &only_a, "allow = networks holding A")
        .await;

    // `always` (the cluster's own nodes, the coordinator) gets in whatever
    // `allow` says.
    let rules = allowing(port, &["192.0.2.8/30", "2001:db8::a:0/112"], &[B4, B6]);
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap());
    lan.expect(port, &everyone, "B in always").await;

    // Loopback always gets in: 127.0.0.1 and ::1, and the node's own
    // addresses (which the kernel routes over lo).
    let rules = allowing(port, &["192.0.2.8/30", "2001:db8::a:0/112"], &[]);
    fw.apply(&rules).await.unwrap();
    for ip in ["127.0.0.1", "::1", SRV4, SRV6] {
        let addr = SocketAddr::new(ip.parse().unwrap(), port);
        lan.server
            .echo(addr)
            .unwrap_or_else(|e| panic!("loopback {addr} with an allowlist: {e}"));
    }
    // The node's own connections to another node's engine on the same port
    // still work: their replies come back to an ephemeral port.
    let other_engine = EchoServer::start(&lan.client, "::", port);
    for ip in [B4, B6] {
        let addr = SocketAddr::new(ip.parse().unwrap(), other_engine.addr.port());
        lan.server
            .echo(addr)
            .unwrap_or_else(|e| panic!("outgoing to {addr} with an allowlist: {e}"));
    }
    drop(other_engine);

    // The fence wins over everything: allow, always, loopback.
    let fenced = Rules {
        fenced: true,
        ..allowing(port, &["192.0.2.8/30", "2001:db8::a:0/112"], &[B4, B6])
    };
    fw.apply(&fenced).await.unwrap();
    assert!(fw.matches(&fenced).await.unwrap());
    lan.expect(
        port,
        &[(A4, false), (A6, false), (B4, false), (B6, false)],
        "fenced",
    )
    .await;
    for ip in ["127.0.0.1", "::1"] {
        let addr = SocketAddr::new(ip.parse().unwrap(), port);
        assert!(lan.server.echo(addr).is_err(), "fenced loopback {addr}");
    }

    // An empty allowlist filters nothing.
    let open = allowing(port, &[], &[B4, B6]);
    fw.apply(&open).await.unwrap();
    assert!(fw.matches(&open).await.unwrap());
    assert!(input_rules(&lan.server).is_empty());
    lan.expect(port, &everyone, "allow emptied").await;
}

/// The `elem` of set `name` in `doc`, a listing or a batch, as JSON.
fn set_elements(doc: &serde_json::Value, name: &str) -> serde_json::Value {
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("set").or_else(|| o.get("add")?.get("set")))
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no set {name} in {doc}"))
        .get("elem")
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test]
async fn matches_detects_allowlist_drift() {
    let ns = Netns::new();
    let fw = ns.firewall();
    // Unnormalised on purpose: a duplicate, adjacent networks, a contained
    // address, host bits, an IPv4-mapped IPv6 address, adjacent `always`
    // addresses.
    let rules = allowing(
        5432,
        &[
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.7/32",
            "10.0.0.7/32",
            "198.51.100.77/16",
            "::ffff:203.0.113.9/128",
            "2001:db8::/48",
            "2001:db8:0:1::/64",
            "2001:db8:ffff::1/128",
        ],
        &["192.0.2.2", "192.0.2.3", "2001:db8::2"],
    );
    assert!(!fw.matches(&rules).await.unwrap(), "no table yet");
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap());

    // nft lists exactly the elements we sent, in the order we sent them.
    let listed: serde_json::Value =
        serde_json::from_str(&ns.nft(&["-j", "list", "table", "inet", TABLE])).unwrap();
    let sent = serde_json::to_value(corral_agent::firewall::render(&rules, None)).unwrap();
    for set in ["allow4", "allow6", "always4", "always6"] {
        assert_eq!(
            set_elements(&listed, set),
            set_elements(&sent, set),
            "{set}"
        );
    }
    assert_eq!(
        set_elements(&listed, "allow4"),
        serde_json::json!([
            {"prefix": {"addr": "10.0.0.0", "len": 23}},
            {"prefix": {"addr": "198.51.0.0", "len": 16}},
            "203.0.113.9"
        ])
    );
    assert_eq!(
        set_elements(&listed, "allow6"),
        serde_json::json!([{"prefix": {"addr": "2001:db8::", "len": 48}}, "2001:db8:ffff::1"])
    );
    assert_eq!(
        set_elements(&listed, "always4"),
        serde_json::json!([{"prefix": {"addr": "192.0.2.2", "len": 31}}])
    );
    assert_eq!(
        set_elements(&listed, "always6"),
        serde_json::json!(["2001:db8::2"])
    );

    // Other rules do not match this table.
    let mut fewer = rules.clone();
    fewer.allow.pop();
    assert!(!fw.matches(&fewer).await.unwrap(), "an entry less");
    let mut other_always = rules.clone();
    other_always.always.pop();
    assert!(!fw.matches(&other_always).await.unwrap(), "always differs");
    assert!(!fw.matches(&unfenced(5432)).await.unwrap(), "no allowlist");
    // The same addresses written differently are the same rules.
    let mut same = rules.clone();
    same.allow.reverse();
    same.allow.push("10.0.1.255/32".parse().unwrap());
    assert!(fw.matches(&same).await.unwrap(), "equivalent allowlist");

    // Hand edits of the sets.
    let edits: [&[&str]; 6] = [
        &["flush", "set", "inet", TABLE, "allow4"],
        &["flush", "set", "inet", TABLE, "always6"],
        &[
            "add",
            "element",
            "inet",
            TABLE,
            "allow6",
            "{ 2001:db8:eeee::1 }",
        ],
        &[
            "delete",
            "element",
            "inet",
            TABLE,
            "always4",
            "{ 192.0.2.2/31 }",
        ],
        &[
            "add",
            "element",
            "inet",
            TABLE,
            "always4",
            "{ 198.18.0.1-198.18.0.5 }",
        ],
        &["add", "set", "inet", TABLE, "extra", "{ type ipv4_addr; }"],
    ];
    for (i, edit) in edits.iter().enumerate() {
        ns.nft(edit);
        assert!(!fw.matches(&rules).await.unwrap(), "after nft {edit:?}");
        // The cheap check sees a new set, not changed elements.
        let shape_same = fw.matches_shape(&rules).await.unwrap();
        assert_eq!(shape_same, i < 5, "matches_shape after nft {edit:?}");
        fw.apply(&rules).await.unwrap();
        assert!(fw.matches(&rules).await.unwrap(), "apply repairs {edit:?}");
    }
    assert!(fw.matches_shape(&rules).await.unwrap());
    ns.nft(&[
        "delete",
        "rule",
        "inet",
        TABLE,
        "input",
        "handle",
        &first_handle(&ns),
    ]);
    assert!(!fw.matches_shape(&rules).await.unwrap(), "a rule deleted");
    fw.apply(&rules).await.unwrap();

    // A range that covers exactly the listed addresses is the same set.
    ns.nft(&["flush", "set", "inet", TABLE, "always4"]);
    ns.nft(&[
        "add",
        "element",
        "inet",
        TABLE,
        "always4",
        "{ 192.0.2.2-192.0.2.3 }",
    ]);
    assert!(fw.matches(&rules).await.unwrap(), "the same addresses");

    ns.nft(&["delete", "table", "inet", TABLE]);
    assert!(!fw.matches(&rules).await.unwrap(), "deleted by hand");
    assert!(!fw.matches_shape(&rules).await.unwrap(), "deleted by hand");
}

/// The handle of the first rule of our input chain.
fn first_handle(ns: &Netns) -> String {
    let listed = ns.nft(&["-a", "list", "chain", "inet", TABLE, "input"]);
    let line = listed
        .lines()
        .find(|l| l.contains("tcp dport") && l.contains("# handle "))
        .expect("a rule");
    line.rsplit("# handle ").next().unwrap().trim().to_string()
}

#[tokio::test]
async fn allowlists_replace_each_other_whatever_they_overlap() {
    // nft refuses overlapping elements in one set; the batch deletes the old
    // table before adding the new one, so old and new elements never meet.
    let ns = Netns::new();
    let fw = ns.firewall();
    let steps = [
        allowing(5432, &["10.0.0.0/24"], &[]),
        allowing(5432, &["10.0.0.0/16"], &["10.0.0.1"]),
        allowing(5432, &["10.0.0.0/24", "10.0.2.0/24", "0.0.0.0/0"], &[]),
        allowing(5432, &["::/0", "10.0.0.5/32"], &["::1"]),
        Rules {
            fenced: true,
            ..allowing(5432, &["10.0.0.0/8"], &[])
        },
        allowing(5432, &[], &[]),
        Rules::default(),
    ];
    for rules in &steps {
        fw.apply(rules).await.unwrap();
        assert!(fw.matches(rules).await.unwrap(), "{rules:?}");
    }
}

/// `n` (< 2^16) distinct numbers below `n`, shuffled (a multiplicative
/// permutation, so the test needs no random number generator).
fn shuffled(n: u32) -> impl Iterator<Item = u32> {
    (0..n).map(move |i| (i * 7919) % n)
}

#[tokio::test]
async fn apply_and_matches_hold_10000_entries() {
    use ipnet::{Ipv4Net, Ipv6Net};
    use std::net::{Ipv4Addr, Ipv6Addr};
    let ns = Netns::new();
    let fw = ns.firewall();
    let v4 = |base: u32, i: u32, len: u8| {
        IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base + i), len).unwrap())
    };
    // Every other address or network, so that nothing merges: 10,000
    // elements reach nft.
    let hosts: Vec<IpNet> = shuffled(10_000)
        .map(|i| v4(0x0a00_0000, 2 * i + 1, 32))
        .collect();
    let nets24: Vec<IpNet> = shuffled(10_000)
        .map(|i| v4(0x0b00_0000, i << 9, 24))
        .collect();
    // Half IPv4 /24s, half IPv6 /64s and /128s, interleaved.
    let mixed: Vec<IpNet> = shuffled(10_000)
        .map(|i| match i % 4 {
            0 | 1 => v4(0x0c00_0000, i << 9, 24),
            2 => IpNet::V6(
                Ipv6Net::new(
                    Ipv6Addr::from((0x2001_0db8u128 << 96) | (u128::from(i) << 65)),
                    64,
                )
                .unwrap(),
            ),
            _ => IpNet::V6(
                Ipv6Net::new(
                    Ipv6Addr::from((0x2001_0db9u128 << 96) | u128::from(2 * i)),
                    128,
                )
                .unwrap(),
            ),
        })
        .collect();
    let always = ["192.0.2.2", "192.0.2.3", "192.0.2.4", "2001:db8::2"];
    for (label, allow) in [
        ("10,000 IPv4 /32s", hosts),
        ("10,000 IPv4 /24s", nets24),
        ("10,000 mixed /24s, /64s, /128s", mixed),
    ] {
        let rules = Rules {
            allow,
            always: always.iter().map(|a| a.parse().unwrap()).collect(),
            ..unfenced(5432)
        };
        let started = Instant::now();
        let payload = serde_json::to_string(&corral_agent::firewall::render(&rules, None)).unwrap();
        let render_time = started.elapsed();
        let elements = payload.matches("\"len\"").count() + payload.matches("\",").count();
        let mut apply_times = Vec::new();
        let mut matches_times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            fw.apply(&rules).await.unwrap();
            apply_times.push(started.elapsed());
            let started = Instant::now();
            assert!(fw.matches(&rules).await.unwrap(), "{label}");
            matches_times.push(started.elapsed());
        }
        // The bare `nft -j list` (through `ip netns exec`), to tell nft's
        // share of `matches` from ours.
        let started = Instant::now();
        ns.nft(&["-j", "list", "table", "inet", TABLE]);
        let list_time = started.elapsed();
        apply_times.sort();
        matches_times.sort();
        let line = format!(
            "{label}: render+serialize {render_time:?} ({} bytes, ~{elements} elements); \
             apply min {:?} median {:?} max {:?}; matches min {:?} median {:?} max {:?} \
             (nft -j list alone {list_time:?})",
            payload.len(),
            apply_times[0],
            apply_times[2],
            apply_times[4],
            matches_times[0],
            matches_times[2],
            matches_times[4],
        );
        eprintln!("{line}");
        // Every element reached the kernel: none merged, none lost.
        let listed: serde_json::Value =
            serde_json::from_str(&ns.nft(&["-j", "list", "table", "inet", TABLE])).unwrap();
        let count = |set: &str| set_elements(&listed, set).as_array().map_or(0, Vec::len);
        assert_eq!(count("allow4") + count("allow6"), 10_000, "{label}");
    }
    // The timings above are figures, not assertions: see docs/benchmarks.md's
    // allowlist benchmark.
}
