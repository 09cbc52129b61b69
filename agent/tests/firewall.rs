//! The firewall against real nftables, in network namespaces of our own.
//!
//! Each test creates namespaces named `crlfw-<pid>-<n>` and deletes them when
//! it ends, panic or not; a run that was killed leaves namespaces whose pid is
//! gone, and the next run sweeps them. All traffic stays on the loopback of
//! those namespaces, or on a veth pair between two of them (192.0.2.0/24,
//! an address block reserved for documentation). Needs root.

use corral_agent::firewall::{Firewall, Rules, TABLE};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PREFIX: &str = "crlfw-";
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes `crlfw-<pid>-*` namespaces whose test process is gone.
fn sweep_stale() {
    let list = sh("ip", &["netns", "list"]).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh("ip", &["netns", "del", name]);
        }
    }
}

/// A network namespace with `lo` up, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static SWEEP: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(sweep_stale);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("{PREFIX}{}-{n}", std::process::id());
        sh("ip", &["netns", "add", &name]).expect("ip netns add (tests need root)");
        // From here on, Drop deletes the namespace even if a step fails.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS args...`
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend(args);
        sh("ip", &all).unwrap()
    }

    /// `nft args...` inside the namespace, as an operator would type it.
    fn nft(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, "nft"];
        all.extend(args);
        sh("ip", &all).unwrap()
    }

    fn firewall(&self) -> Firewall {
        Firewall::with_command("ip", &["netns", "exec", &self.name, "nft"])
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets created
    /// there stay in the namespace wherever they are used afterwards.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// Connects from inside the namespace and checks the echo server answers.
    fn echo(&self, addr: SocketAddr) -> std::io::Result<()> {
        self.run(|| {
            let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            roundtrip(&stream)
        })
    }

    /// A connection from inside the namespace.
    fn connect(&self, addr: SocketAddr) -> TcpStream {
        self.run(|| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
            .unwrap()
    }
}

impl std::ops::Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = sh("ip", &["netns", "del", &self.name]) {
            eprintln!("cannot delete namespace {}: {e}", self.name);
        }
    }
}

/// Sends a line and reads it back, with short timeouts.
fn roundtrip(mut stream: &TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    stream.write_all(b"ping\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line != "ping\n" {
        return Err(std::io::Error::other(format!("echo sent back {line:?}")));
    }
    Ok(())
}

/// A line echo server (the "engine") on a listener bound inside a namespace;
/// stops on drop.
struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `ip:port` (port 0: any free port) inside `ns`.
    fn start(ns: &Netns, ip: &str, port: u16) -> EchoServer {
        let listener = ns.run(|| TcpListener::bind((ip, port)).unwrap());
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || {
                            stream.set_nonblocking(false).unwrap();
                            let mut reader = BufReader::new(&stream);
                            let mut line = String::new();
                            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                                if (&stream).write_all(line.as_bytes()).is_err() {
                                    break;
                                }
                                line.clear();
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        EchoServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl std::ops::Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn fence(port: u16) -> Rules {
    Rules {
        engine_port: Some(port),
        fenced: true,
    }
}

fn unfenced(port: u16) -> Rules {
    Rules {
        engine_port: Some(port),
        fenced: false,
    }
}

/// Whether `nft list tables` inside `ns` shows `family name`.
fn has_table(ns: &Netns, family: &str, name: &str) -> bool {
    ns.nft(&["list", "tables"])
        .lines()
        .any(|l| l.trim() == format!("table {family} {name}"))
}

/// The packet count of the fence rule in `chain`.
fn fence_packets(ns: &Netns, chain: &str) -> u64 {
    let listed: serde_json::Value =
        serde_json::from_str(&ns.nft(&["-j", "list", "chain", "inet", TABLE, chain])).unwrap();
    listed["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .flat_map(|r| r["expr"].as_array().unwrap().clone())
        .filter_map(|s| s["counter"]["packets"].as_u64())
        .sum()
}

#[tokio::test]
async fn fence_blocks_the_engine_port_and_lifting_it_restores_traffic() {
    let ns = Netns::new();
    let engine = EchoServer::start(&ns, "127.0.0.1", 0);
    let port = engine.addr.port();
    let fw = ns.firewall();

    ns.echo(engine.addr)
        .expect("the engine answers before the fence");
    let established = ns.connect(engine.addr);
    roundtrip(&established).unwrap();

    fw.apply(&fence(port)).await.unwrap();
    let err = ns.echo(engine.addr).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "a fenced port drops the SYN (no reset): {err}"
    );
    assert!(
        roundtrip(&established).is_err(),
        "a connection opened before the fence cannot write through it either"
    );
    assert!(
        fence_packets(&ns, "input") > 0,
        "the input counter saw the SYNs"
    );
    // Applying again is harmless and still fences.
    fw.apply(&fence(port)).await.unwrap();
    assert!(ns.echo(engine.addr).is_err());
    assert!(fw.matches(&fence(port)).await.unwrap());

    fw.apply(&unfenced(port)).await.unwrap();
    ns.echo(engine.addr)
        .expect("the engine answers once the fence is lifted");
    assert!(fw.matches(&unfenced(port)).await.unwrap());
    let listed = ns.nft(&["list", "table", "inet", TABLE]);
    assert!(!listed.contains("drop"), "{listed}");
}

#[tokio::test]
async fn fenced_node_still_reaches_other_nodes_engines() {
    // Two "VMs" joined by a veth pair: `old` is the fenced former primary,
    // `new` runs the engine it must clone from (pg_rewind, pg_basebackup).
    let old = Netns::new();
    let new = Netns::new();
    old.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &new.name,
    ]);
    old.ip(&["addr", "add", "192.0.2.1/24", "dev", "veth0"]);
    new.ip(&["addr", "add", "192.0.2.2/24", "dev", "veth1"]);
    old.ip(&["link", "set", "veth0", "up"]);
    new.ip(&["link", "set", "veth1", "up"]);

    let old_engine = EchoServer::start(&old, "192.0.2.1", 0);
    let port = old_engine.addr.port();
    // The same port on both nodes, as in a real cluster.
    let new_engine = EchoServer::start(&new, "192.0.2.2", port);
    new.echo(old_engine.addr)
        .expect("reachable before the fence");

    old.firewall().apply(&fence(port)).await.unwrap();
    assert!(
        new.echo(old_engine.addr).is_err(),
        "other nodes cannot reach the fenced engine"
    );
    old.echo(new_engine.addr)
        .expect("the fenced node still reaches the new primary's engine on the same port");
}

#[tokio::test]
async fn matches_detects_drift() {
    let ns = Netns::new();
    let fw = ns.firewall();
    let rules = fence(5432);

    assert!(!fw.matches(&rules).await.unwrap(), "no table yet");
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap());
    assert!(!fw.matches(&unfenced(5432)).await.unwrap());
    assert!(!fw.matches(&fence(5433)).await.unwrap());

    ns.nft(&["delete", "table", "inet", TABLE]);
    assert!(!fw.matches(&rules).await.unwrap(), "deleted by hand");

    fw.apply(&rules).await.unwrap();
    ns.nft(&["flush", "ruleset"]);
    assert!(!fw.matches(&rules).await.unwrap(), "nft flush ruleset");

    fw.apply(&rules).await.unwrap();
    ns.nft(&[
        "insert", "rule", "inet", TABLE, "input", "tcp", "dport", "5432", "accept",
    ]);
    assert!(!fw.matches(&rules).await.unwrap(), "a rule added by hand");
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap(), "apply repairs it");

    ns.nft(&["add", "table", "inet", TABLE, "{ flags dormant; }"]);
    assert!(!fw.matches(&rules).await.unwrap(), "table switched off");
    fw.apply(&rules).await.unwrap();
    assert!(fw.matches(&rules).await.unwrap());
}

#[tokio::test]
async fn remove_is_idempotent_and_leaves_other_tables_alone() {
    let ns = Netns::new();
    let fw = ns.firewall();
    // The VM's own firewall, with a rule of its own.
    ns.nft(&["add", "table", "inet", "vmfirewall"]);
    ns.nft(&[
        "add",
        "chain",
        "inet",
        "vmfirewall",
        "input",
        "{ type filter hook input priority -10; policy accept; }",
    ]);
    ns.nft(&[
        "add",
        "rule",
        "inet",
        "vmfirewall",
        "input",
        "tcp",
        "dport",
        "22",
        "accept",
    ]);
    let before = ns.nft(&["list", "table", "inet", "vmfirewall"]);

    fw.remove().await.expect("removing an absent table is fine");
    fw.apply(&fence(5432)).await.unwrap();
    assert!(has_table(&ns, "inet", TABLE));
    assert_eq!(ns.nft(&["list", "table", "inet", "vmfirewall"]), before);
    fw.remove().await.unwrap();
    assert!(!has_table(&ns, "inet", TABLE));
    assert!(!fw.matches(&Rules::default()).await.unwrap());
    fw.remove().await.expect("removing twice is fine");
    assert_eq!(ns.nft(&["list", "table", "inet", "vmfirewall"]), before);
}

#[tokio::test]
async fn apply_is_fast() {
    let ns = Netns::new();
    let fw = ns.firewall();
    let direct = Firewall::new();
    let mut times = Vec::new();
    for i in 0..20u16 {
        let rules = if i % 2 == 0 {
            fence(5432)
        } else {
            unfenced(5432)
        };
        let started = Instant::now();
        fw.apply(&rules).await.unwrap();
        times.push(started.elapsed());
    }
    // The same through `nft` directly, without `ip netns exec`, in the
    // namespace we entered: what the agent pays on a VM.
    let direct_times = {
        let path = format!("/run/netns/{}", ns.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                (0..20u16)
                    .map(|i| {
                        let rules = if i % 2 == 0 {
                            fence(5432)
                        } else {
                            unfenced(5432)
                        };
                        let started = Instant::now();
                        rt.block_on(direct.apply(&rules)).unwrap();
                        started.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap()
        })
    };
    let report = |label: &str, times: &mut Vec<Duration>| {
        times.sort();
        eprintln!(
            "apply via {label}: min {:?}, median {:?}, max {:?} over {} runs",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1],
            times.len()
        );
        times[times.len() / 2]
    };
    let median = report("ip netns exec nft", &mut times);
    let mut direct_times = direct_times;
    let direct_median = report("nft", &mut direct_times);
    // Generous bounds: the machine may be busy building; a fence that takes
    // seconds would still be a bug.
    assert!(median < Duration::from_secs(1), "{median:?}");
    assert!(direct_median < Duration::from_secs(1), "{direct_median:?}");
}

#[tokio::test]
async fn errors_carry_the_command_and_its_stderr() {
    // A namespace that does not exist: `ip` fails before reading the batch.
    let name = format!("{PREFIX}{}-absent", std::process::id());
    let fw = Firewall::with_command("ip", &["netns", "exec", &name, "nft"]);
    let message = format!("{:#}", fw.apply(&fence(5432)).await.unwrap_err());
    assert!(
        message.contains("replacing table inet corral failed"),
        "{message}"
    );
    assert!(
        message.contains(&format!("ip netns exec {name} nft -j -f -")),
        "{message}"
    );
    assert!(
        message.contains("Cannot open network namespace"),
        "{message}"
    );
    assert!(message.contains("the table is unchanged"), "{message}");
    let message = format!("{:#}", fw.matches(&fence(5432)).await.unwrap_err());
    assert!(
        message.contains("Cannot open network namespace"),
        "{message}"
    );
    eprintln!("{message}");
}
