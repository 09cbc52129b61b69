//! The namespace "lab": VMs as Linux network namespaces on a bridge, a real
//! coordinator, real agents and real engines, torn down even when a test
//! fails.
//!
//! Lab `K` (1..=250) is claimed by creating the bridge `crlbK`: the kernel
//! refuses a second bridge of that name, so parallel tests (and parallel test
//! processes) never share a lab. Then:
//!
//! | namespace   | address                      | runs                     |
//! |-------------|------------------------------|--------------------------|
//! | `crlK-ctl`  | 10.231.K.1, fd31::K:1        | the coordinator (:7400)  |
//! | `crlK-vmI`  | 10.231.K.(10+I), fd31::K:1I  | an agent (:7401), engine |
//! | `crlK-cli`  | 10.231.K.100, fd31::K:100    | clients (corralctl, psql)|
//!
//! The host end of the bridge is 10.231.K.254. Logs and state live in
//! `/tmp/corral-tests/lab-K`; a failing test keeps that directory and prints
//! the tail of every log. `/tmp/corral-tests/labs/K.pid` names the owning
//! process; a lab whose owner is gone is swept by the next [`Lab::start`]
//! (or `scripts/sweep-labs.sh`).
//!
//! Layout:
//! - this file: the lab itself ([`Lab::start`], its addresses and directories, teardown);
//! - `namespaces`: teardown of a lab's namespaces, mounts and bridge, and the sweep of stale labs;
//! - `processes`: the coordinator and agents ([`Lab::start_coordinator`], [`Lab::start_agent`]);
//! - `ctl`: commands in a namespace and corralctl ([`Lab::in_ns`], [`Lab::ctl`]);
//! - `clusters`: clusters, psql, roles, metrics, operations ([`Lab::create_replicated`]);
//! - `http`: a bare HTTP/1.0 client ([`http_status`], [`http_get`]);
//! - [`faults`]: network partitions ([`Lab::cut`], [`Lab::isolate`]);
//! - [`haproxy`]: HAProxy in the client namespace, routing by the agents'
//!   health endpoints ([`Lab::start_haproxy`]);
//! - [`checker`]: a split-brain detector writing to every node at once;
//! - [`writer`]: a client writing through the multi-host connection string;
//! - [`stress`]: CPU load with stress-ng;
//! - [`slowlinks`]: delay and loss on members' links ([`Lab::slow_links`]);
//! - [`alerting`]: Alertmanager, a webhook receiver, a hung endpoint and an
//!   OpenMetrics parser, for the alert tests.

pub mod alerting;
pub mod checker;
pub mod client;
pub mod faults;
pub mod ha;
pub mod haproxy;
pub mod procstat;
pub mod s3;
pub mod slowlinks;
pub mod stress;
pub mod writer;

mod clusters;
mod ctl;
mod http;
mod namespaces;
mod processes;

pub use http::{http_get, http_status};
use namespaces::{kill_ns_processes, ns_names, pid_file, unmount_under, unsafe_kill};
pub use namespaces::{mount_tmpfs, sweep_stale, teardown};

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = "/tmp/corral-tests";
pub const COORDINATOR_PORT: u16 = 7400;
pub const AGENT_PORT: u16 = 7401;
/// The agents' plain-HTTP health endpoints (`/primary`, `/replica`,
/// `/health`), which HAProxy and [`Lab::health`] ask.
pub const HEALTH_PORT: u16 = 7402;
/// The coordinator's plain-HTTP port (`/metrics`), on all its addresses in
/// the lab.
pub const COORDINATOR_HTTP_PORT: u16 = 7403;

/// The number in environment variable `name` (a benchmark's or a long
/// test's knob), or `default` when it is unset or not a number.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fails the test with the command's stderr unless it exited 0.
#[track_caller]
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How many objects of the JSON array `list` have `key` equal to `value`.
pub fn count_where(list: &serde_json::Value, key: &str, value: &str) -> usize {
    list.as_array()
        .map_or(0, |l| l.iter().filter(|e| e[key] == value).count())
}

/// The (`a`, `b`) string fields of each object in the JSON array `list`,
/// in its order: e.g. the (id, role) of a cluster's `nodes`.
pub fn field_pairs(list: &serde_json::Value, a: &str, b: &str) -> Vec<(String, String)> {
    let field = |n: &serde_json::Value, k: &str| n[k].as_str().unwrap_or_default().to_string();
    list.as_array()
        .map(|l| l.iter().map(|n| (field(n, a), field(n, b))).collect())
        .unwrap_or_default()
}

/// The scheme of a cluster's connection URI (`postgresql`, `mysql`), from
/// `corralctl --output json cluster credentials`.
pub fn uri_scheme(creds: &serde_json::Value) -> &str {
    creds["uri"]
        .as_str()
        .and_then(|u| u.split_once("://"))
        .map_or("postgresql", |(scheme, _)| scheme)
}

/// Where the binaries under test are: `CORRAL_BIN_DIR`, else target/debug.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("CORRAL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    dir.join(name)
}

/// Runs a command, failing with its output if it does not succeed.
pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` every 100 ms until it returns true, or fails after
/// `timeout` naming `what` and the last error.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let started = Instant::now();
    let mut last;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => last = "condition false".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if started.elapsed() > timeout {
            bail!(
                "timed out after {:?} waiting for {what} (last: {last})",
                timeout
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, Clone)]
pub struct LabOptions {
    pub vms: usize,
    /// Start and enroll one agent per VM (otherwise only the coordinator runs).
    pub enroll: bool,
    pub heartbeat_interval_ms: u64,
    /// More client namespaces besides `cli`: `cl2`, `cl3`, ... at
    /// 10.231.K.101, .102, ... (clients with addresses of their own, for
    /// allowlists).
    pub extra_clients: usize,
    /// The coordinator's configuration file (TOML: alert rules,
    /// notification channels), passed with `--config`.
    pub coordinator_config: Option<String>,
    /// (VM, MiB): VM's state directory (the engine's data) on a tmpfs of
    /// that size, for disk-full alerts. Unmounted by the teardown.
    pub small_disk: Option<(usize, u64)>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            vms: 3,
            enroll: true,
            heartbeat_interval_ms: 1000,
            extra_clients: 0,
            coordinator_config: None,
            small_disk: None,
        }
    }
}

pub struct Lab {
    pub k: u32,
    pub opts: LabOptions,
    dir: PathBuf,
    coordinator: Option<Child>,
    agents: Vec<Option<Child>>,
    /// HAProxy in the client namespace, once [`Lab::start_haproxy`] ran.
    haproxy: Option<Child>,
}

impl Lab {
    pub fn start(vms: usize) -> Result<Lab> {
        Lab::start_with(LabOptions {
            vms,
            ..Default::default()
        })
    }

    /// A lab of `vms` VMs where only the coordinator runs: no agent is
    /// started or enrolled (the test does that itself).
    pub fn unenrolled(vms: usize) -> Result<Lab> {
        Lab::start_with(LabOptions {
            vms,
            enroll: false,
            ..Default::default()
        })
    }

    pub fn start_with(opts: LabOptions) -> Result<Lab> {
        for b in ["corral-coordinator", "corral-agent", "corralctl"] {
            if !bin(b).exists() {
                bail!(
                    "{} is missing: run `cargo build --workspace` first (or set CORRAL_BIN_DIR)",
                    bin(b).display()
                );
            }
        }
        std::fs::create_dir_all(Path::new(ROOT).join("labs"))?;
        sweep_stale();
        let k = (1..=250u32)
            .find(|k| {
                Command::new("ip")
                    .args(["link", "add", &format!("crlb{k}"), "type", "bridge"])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or_else(|| anyhow!("no free lab number (bridges crlb1..crlb250 all exist): run scripts/sweep-labs.sh"))?;
        std::fs::write(pid_file(k), std::process::id().to_string())?;
        let dir = Path::new(ROOT).join(format!("lab-{k}"));
        let mut lab = Lab {
            k,
            agents: (0..opts.vms).map(|_| None).collect(),
            opts,
            dir,
            coordinator: None,
            haproxy: None,
        };
        if let Err(e) = lab.setup() {
            lab.report_failure();
            return Err(e.context(format!("setting up lab {k}")));
        }
        Ok(lab)
    }

    fn setup(&mut self) -> Result<()> {
        let k = self.k;
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir)?;
        sh("chmod", &["755", ROOT, &self.dir.to_string_lossy()])?;
        let br = format!("crlb{k}");
        sh(
            "ip",
            &["addr", "add", &format!("10.231.{k}.254/24"), "dev", &br],
        )?;
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("fd31::{k:x}:254/112"),
                "dev",
                &br,
                "nodad",
            ],
        )?;
        sh("ip", &["link", "set", &br, "up"])?;
        let mut hosts = vec![("ctl".to_string(), 1u32), ("cli".to_string(), 100)];
        for i in 1..=self.opts.vms {
            hosts.push((format!("vm{i}"), 10 + i as u32));
        }
        // After the VMs, so their veth numbers stay vm + 1 (see faults.rs).
        for c in 0..self.opts.extra_clients {
            hosts.push((format!("cl{}", c + 2), 101 + c as u32));
        }
        for (idx, (name, host)) in hosts.iter().enumerate() {
            let ns = self.ns(name);
            let veth = format!("crl{k}h{idx}");
            sh("ip", &["netns", "add", &ns])?;
            sh(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            sh("ip", &["link", "set", &veth, "master", &br, "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            // IPv6 without duplicate address detection: usable at once.
            let v4 = format!("10.231.{k}.{host}/24");
            let v6 = format!("fd31::{k:x}:{host}/112");
            sh("ip", &["-n", &ns, "addr", "add", &v4, "dev", "eth0"])?;
            sh(
                "ip",
                &["-n", &ns, "addr", "add", &v6, "dev", "eth0", "nodad"],
            )?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        let pki = self.pki_dir();
        sh(
            &bin("corralctl").to_string_lossy(),
            &[
                "pki",
                "init",
                "--dir",
                &pki.to_string_lossy(),
                "--coordinator",
                &self.ctl_addr(),
            ],
        )?;
        if let Some((i, mib)) = self.opts.small_disk {
            let dir = self.state_dir(i);
            std::fs::create_dir_all(&dir)?;
            mount_tmpfs(&dir, mib)?;
        }
        self.start_coordinator()?;
        if self.opts.enroll {
            for i in 1..=self.opts.vms {
                let token = self.token()?;
                self.start_agent(i, Some(&token))?;
            }
            for i in 1..=self.opts.vms {
                self.wait_node_state(&format!("vm{i}"), "up", Duration::from_secs(30))?;
            }
        }
        Ok(())
    }

    pub fn ns(&self, name: &str) -> String {
        format!("crl{}-{name}", self.k)
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("vm{i}"))
    }
    /// The host's address on the lab's bridge: services a test runs on the
    /// host (Alertmanager, webhook receivers) listen there.
    pub fn host_ip(&self) -> String {
        format!("10.231.{}.254", self.k)
    }
    pub fn ctl_addr(&self) -> String {
        format!("10.231.{}.1:{COORDINATOR_PORT}", self.k)
    }
    pub fn vm_ip(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.k, 10 + i)
    }
    pub fn vm_addr(&self, i: usize) -> String {
        format!("{}:{AGENT_PORT}", self.vm_ip(i))
    }

    fn log(&self, name: &str) -> Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))?)
    }

    fn spawn_in(&self, ns: &str, program: &Path, args: &[String], log: &str) -> Result<Child> {
        self.spawn_in_env(ns, program, args, log, &[])
    }

    fn spawn_in_env(
        &self,
        ns: &str,
        program: &Path,
        args: &[String],
        log: &str,
        env: &[(&str, &str)],
    ) -> Result<Child> {
        let log = self.log(log)?;
        Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .arg(program)
            .args(args)
            .env(
                "CORRAL_LOG",
                "info,corral_coordinator=debug,corral_agent=debug",
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} in {ns}", program.display()))
    }

    fn report_failure(&self) {
        eprintln!(
            "\n=== lab {} failed (logs in {}) ===",
            self.k,
            self.dir.display()
        );
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        for vm in 1..=self.opts.vms {
            logs.push(self.state_dir(vm).join("postgres/server.log"));
        }
        logs.sort();
        for path in logs
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last 30 lines) ---", path.display());
            for l in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("{l}");
            }
        }
    }
}

fn stop_child(c: &mut Child) -> Result<()> {
    unsafe_kill(c.id() as i32, 15);
    let started = Instant::now();
    while c.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            c.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c.wait()?;
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.report_failure();
        }
        for c in self
            .agents
            .iter_mut()
            .flatten()
            .chain(self.coordinator.as_mut())
            .chain(self.haproxy.as_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The directory goes (or, after a failure, moves aside) before the
        // bridge: the bridge is the lab's lock, and once it is gone another
        // test may claim lab K and wipe this very directory.
        for ns in ns_names(self.k) {
            kill_ns_processes(&ns);
        }
        unmount_under(&format!("{}/", self.dir.display()));
        // CORRAL_KEEP_LABS=1 keeps every lab's logs, for reading after a
        // benchmark or a passing test.
        let keep = std::env::var_os("CORRAL_KEEP_LABS").is_some_and(|v| v == "1");
        if failed || keep {
            let kept = self.dir.with_file_name(format!(
                "lab-{}.{}-{}-{}",
                self.k,
                if failed { "failed" } else { "kept" },
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            ));
            match std::fs::rename(&self.dir, &kept) {
                Ok(()) => eprintln!("=== lab {} logs kept in {} ===", self.k, kept.display()),
                Err(e) => eprintln!("could not keep {}: {e}", self.dir.display()),
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        teardown(self.k);
    }
}
