//! What the firewall tests share: namespaces of our own (swept when their
//! test process is gone), an echo server, the rules the tests apply, and
//! reading back what nftables holds.

use corral_agent::firewall::{Firewall, Rules, TABLE};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

pub(crate) const PREFIX: &str = "crlfw-";
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

pub(crate) fn sh(program: &str, args: &[&str]) -> Result<String, String> {
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
pub(crate) fn sweep_stale() {
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
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    pub(crate) fn new() -> Netns {
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
    pub(crate) fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend(args);
        sh("ip", &all).unwrap()
    }

    /// `nft args...` inside the namespace, as an operator would type it.
    pub(crate) fn nft(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, "nft"];
        all.extend(args);
        sh("ip", &all).unwrap()
    }

    pub(crate) fn firewall(&self) -> Firewall {
        Firewall::in_netns(&self.name)
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets created
    /// there stay in the namespace wherever they are used afterwards.
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
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
    pub(crate) fn echo(&self, addr: SocketAddr) -> std::io::Result<()> {
        self.run(|| {
            let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            roundtrip(&stream)
        })
    }

    /// A connection from inside the namespace.
    pub(crate) fn connect(&self, addr: SocketAddr) -> TcpStream {
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
pub(crate) fn roundtrip(mut stream: &TcpStream) -> std::io::Result<()> {
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
pub(crate) struct EchoServer {
    pub(crate) addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `ip:port` (port 0: any free port) inside `ns`.
    pub(crate) fn start(ns: &Netns, ip: &str, port: u16) -> EchoServer {
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

pub(crate) fn fence(port: u16) -> Rules {
    Rules {
        engine_port: Some(port),
        fenced: true,
        ..Rules::default()
    }
}

pub(crate) fn unfenced(port: u16) -> Rules {
    Rules {
        engine_port: Some(port),
        fenced: false,
        ..Rules::default()
    }
}

/// Unfenced, with an allowlist.
pub(crate) fn allowing(port: u16, allow: &[&str], always: &[&str]) -> Rules {
    Rules {
        engine_port: Some(port),
        fenced: false,
        allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
        always: always.iter().map(|a| a.parse().unwrap()).collect(),
        ..Rules::default()
    }
}

/// Whether `nft list tables` inside `ns` shows `family name`.
pub(crate) fn has_table(ns: &Netns, family: &str, name: &str) -> bool {
    ns.nft(&["list", "tables"])
        .lines()
        .any(|l| l.trim() == format!("table {family} {name}"))
}

/// The packet count of the fence rule in `chain`.
pub(crate) fn fence_packets(ns: &Netns, chain: &str) -> u64 {
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

pub(crate) fn gated(port: u16) -> Rules {
    Rules {
        engine_port: Some(port),
        gated: true,
        ..Rules::default()
    }
}
