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
//! - this file: the lab itself (namespaces, coordinator, agents, corralctl);
//! - [`faults`]: network partitions ([`Lab::cut`], [`Lab::isolate`]);
//! - [`haproxy`]: HAProxy in the client namespace, routing by the agents'
//!   health endpoints ([`Lab::start_haproxy`]);
//! - [`checker`]: a split-brain detector writing to every node at once;
//! - [`writer`]: a client writing through the multi-host connection string;
//! - [`stress`]: CPU load with stress-ng;
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
pub mod stress;
pub mod writer;

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

fn pid_file(k: u32) -> PathBuf {
    Path::new(ROOT).join("labs").join(format!("{k}.pid"))
}

fn ns_names(k: u32) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        let prefix = format!("crl{k}-");
        for line in list.lines() {
            if let Some(name) = line.split_whitespace().next() {
                if name.starts_with(&prefix) {
                    out.push(name.to_string());
                }
            }
        }
    }
    out
}

fn kill_ns_processes(ns: &str) {
    for _ in 0..20 {
        let pids = sh("ip", &["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            unsafe_kill(pid, 9);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Removes every trace of lab `k`: processes in its namespaces, the
/// namespaces, veths, the pid file and, last, the bridge: the bridge is the
/// lab's lock, so nothing of the next owner of `k` is touched.
pub fn teardown(k: u32) {
    for ns in ns_names(k) {
        kill_ns_processes(&ns);
        let _ = sh("ip", &["netns", "del", &ns]);
    }
    unmount_under(&format!("{ROOT}/lab-{k}/"));
    if let Ok(links) = sh("ip", &["-o", "link", "show"]) {
        let prefix = format!("crl{k}h");
        for line in links.lines() {
            if let Some(name) = line
                .split(':')
                .nth(1)
                .map(|s| s.trim().split('@').next().unwrap_or(""))
            {
                if name.starts_with(&prefix) {
                    let _ = sh("ip", &["link", "del", name]);
                }
            }
        }
    }
    let _ = std::fs::remove_file(pid_file(k));
    let _ = sh("ip", &["link", "del", &format!("crlb{k}")]);
}

/// Mounts a tmpfs of `mib` MiB on `dir` (under a lab's directory, its
/// teardown unmounts it).
pub fn mount_tmpfs(dir: &Path, mib: u64) -> Result<()> {
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0755"),
            "tmpfs",
            &dir.to_string_lossy(),
        ],
    )?;
    Ok(())
}

/// Unmounts the filesystems mounted under `dir` (LabOptions::small_disk).
fn unmount_under(dir: &str) {
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if m.starts_with(dir) {
                let _ = sh("umount", &["-l", m]);
            }
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Lab bridges and their interface indexes.
fn lab_bridges() -> Vec<(u32, String)> {
    let Ok(links) = sh("ip", &["-o", "link", "show", "type", "bridge"]) else {
        return Vec::new();
    };
    links
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(':');
            let index = parts.next()?.trim().to_string();
            let k = parts.next()?.trim().strip_prefix("crlb")?.parse().ok()?;
            Some((k, index))
        })
        .collect()
}

/// Tears down every lab whose owning process is gone.
pub fn sweep_stale() {
    for (k, index) in lab_bridges() {
        let owner = std::fs::read_to_string(pid_file(k))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let stale = match owner {
            Some(pid) => !pid_alive(pid),
            // A lab being created (or torn down) has its bridge without a
            // pid file for a moment: stale only if the very same bridge
            // still has none a while later.
            None => {
                std::thread::sleep(Duration::from_millis(500));
                !pid_file(k).exists() && lab_bridges().contains(&(k, index))
            }
        };
        if stale {
            eprintln!("sweeping stale lab {k}");
            teardown(k);
        }
    }
}

impl Lab {
    pub fn start(vms: usize) -> Result<Lab> {
        Lab::start_with(LabOptions {
            vms,
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
            sh(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("10.231.{k}.{host}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            sh(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("fd31::{k:x}:{host}/112"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
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

    pub fn start_coordinator(&mut self) -> Result<()> {
        self.start_coordinator_env(&[])
    }

    /// Starts the coordinator with extra environment (e.g. the test-only
    /// `CORRAL_FAILPOINTS`).
    pub fn start_coordinator_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        if let Some(config) = &self.opts.coordinator_config {
            std::fs::write(self.dir.join("coordinator.toml"), config)?;
        }
        let args = [
            "--state-dir".to_string(),
            self.dir.join("coordinator").to_string_lossy().into_owned(),
            "--pki-dir".into(),
            self.pki_dir().to_string_lossy().into_owned(),
            "--listen".into(),
            self.ctl_addr(),
            "--http-listen".into(),
            format!("0.0.0.0:{COORDINATOR_HTTP_PORT}"),
        ]
        .into_iter()
        .chain(
            self.opts
                .coordinator_config
                .as_ref()
                .map(|_| {
                    [
                        "--config".to_string(),
                        self.dir
                            .join("coordinator.toml")
                            .to_string_lossy()
                            .into_owned(),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .collect::<Vec<_>>();
        self.coordinator = Some(self.spawn_in_env(
            "ctl",
            &bin("corral-coordinator"),
            &args,
            "coordinator.log",
            env,
        )?);
        wait_until(
            Duration::from_secs(20),
            "the coordinator to answer `corralctl whoami`",
            || {
                if let Some(c) = self.coordinator.as_mut() {
                    if let Some(status) = c.try_wait()? {
                        bail!("the coordinator exited: {status}");
                    }
                }
                Ok(self.ctl(&["whoami"])?.status.success())
            },
        )
    }

    /// Kills the coordinator with SIGKILL (a crash) and waits for it.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the coordinator with SIGTERM and waits for it.
    pub fn stop_coordinator(&mut self) -> Result<()> {
        if let Some(mut c) = self.coordinator.take() {
            stop_child(&mut c)?;
        }
        Ok(())
    }

    /// Starts agent `i` (node id `vmI`), enrolling with `token` if given
    /// (from a file, as the README says to: not on the command line).
    pub fn start_agent(&mut self, i: usize, token: Option<&str>) -> Result<()> {
        let mut extra = Vec::new();
        if let Some(t) = token {
            let file = self.dir.join(format!("vm{i}.join"));
            std::fs::write(&file, t)?;
            extra.push("--join-file".to_string());
            extra.push(file.to_string_lossy().into_owned());
        }
        extra.push("--node-id".into());
        extra.push(format!("vm{i}"));
        let child = self.spawn_agent(i, &extra)?;
        self.agents[i - 1] = Some(child);
        Ok(())
    }

    /// Spawns an agent in VM `i` with `extra` arguments, not tracked as the
    /// VM's agent: for tests that expect it to exit.
    pub fn spawn_agent(&self, i: usize, extra: &[String]) -> Result<Child> {
        self.spawn_agent_env(i, extra, &[])
    }

    /// Starts the agent of enrolled VM `i` again, with extra environment
    /// (e.g. systemd's NOTIFY_SOCKET and WATCHDOG_USEC).
    pub fn start_agent_env(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let extra = ["--node-id".to_string(), format!("vm{i}")];
        let child = self.spawn_agent_env(i, &extra, env)?;
        self.agents[i - 1] = Some(child);
        Ok(())
    }

    fn spawn_agent_env(&self, i: usize, extra: &[String], env: &[(&str, &str)]) -> Result<Child> {
        let mut args = vec![
            "--state-dir".to_string(),
            self.state_dir(i).to_string_lossy().into_owned(),
            "--coordinator".into(),
            self.ctl_addr(),
            "--listen".into(),
            self.vm_addr(i),
            "--heartbeat-interval-ms".into(),
            self.opts.heartbeat_interval_ms.to_string(),
        ];
        args.extend(extra.iter().cloned());
        self.spawn_in_env(
            &format!("vm{i}"),
            &bin("corral-agent"),
            &args,
            &format!("vm{i}-agent.log"),
            env,
        )
    }

    /// Runs an agent in VM `i` that is expected to exit (a refused
    /// enrollment); returns its exit status and stderr.
    pub fn run_agent_to_exit(
        &self,
        i: usize,
        extra: &[&str],
        state_dir: &Path,
    ) -> Result<(Option<i32>, String)> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(&format!("vm{i}"))])
            .arg(bin("corral-agent"))
            .args([
                "--state-dir",
                &state_dir.to_string_lossy(),
                "--coordinator",
                &self.ctl_addr(),
                "--listen",
                &self.vm_addr(i),
            ]);
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                let out = child.wait_with_output()?;
                return Ok((
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ));
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "the agent kept running; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.agents[i - 1].take() {
            stop_child(&mut c)?;
        }
        Ok(())
    }

    /// Kills every process in VM `i` (agent and engine) with SIGKILL, like a
    /// VM losing power.
    pub fn kill_vm(&mut self, i: usize) {
        kill_ns_processes(&self.ns(&format!("vm{i}")));
        if let Some(mut c) = self.agents[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`) to VM `i`'s agent
    /// alone: the engine it supervises keeps running. After `TERM` or
    /// `KILL` this waits for the agent to be gone ([`Lab::restart_vm`]
    /// starts it again, as systemd would); after `STOP` it is frozen until
    /// `CONT`.
    pub fn signal_agent(&mut self, i: usize, signal: &str) -> Result<()> {
        let c = self.agents[i - 1]
            .as_mut()
            .ok_or_else(|| anyhow!("vm{i} runs no agent"))?;
        sh("kill", &[&format!("-{signal}"), &c.id().to_string()])?;
        if matches!(signal, "TERM" | "KILL") {
            let began = Instant::now();
            while c.try_wait()?.is_none() {
                if began.elapsed() > Duration::from_secs(20) {
                    bail!("vm{i}'s agent did not exit within 20 s of SIG{signal}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Starts agent `i` again after [`Lab::kill_vm`] (or
    /// [`Lab::stop_agent`]), like a VM booting: no token, since its node
    /// certificate is still in its state directory. Does not wait for the
    /// node to be up: after a failover the test usually wants to watch what
    /// the returning node does first ([`Lab::wait_node_state`] waits).
    pub fn restart_vm(&mut self, i: usize) -> Result<()> {
        if let Some(c) = self.agents[i - 1].as_mut() {
            if c.try_wait()?.is_none() {
                bail!("agent {i} is still running: kill_vm({i}) or stop_agent({i}) first");
            }
        }
        self.start_agent(i, None)
    }

    /// Pids of processes named `comm` running in VM `i`.
    pub fn pids_in_vm(&self, i: usize, comm: &str) -> Vec<i32> {
        let pids = sh("ip", &["netns", "pids", &self.ns(&format!("vm{i}"))]).unwrap_or_default();
        pids.split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
            })
            .collect()
    }

    /// Runs a command in namespace `crlK-<ns>`.
    pub fn in_ns(&self, ns: &str, program: &str, args: &[&str]) -> Result<Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), program])
            .args(args)
            .output()?)
    }

    /// `corralctl` run in the client namespace with the lab's admin config.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        self.ctl_env(args, &[])
    }

    /// `corralctl` with extra environment (CORRAL_CERT, ...).
    pub fn ctl_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let config = self.pki_dir().join("corralctl.toml");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns("cli")])
            .arg(bin("corralctl"))
            .arg("--config")
            .arg(&config)
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(cmd.output()?)
    }

    /// `corralctl ARGS` writing into a pipe whose reader is already gone
    /// (`corralctl ... | head -0`); returns its exit status and stderr.
    pub fn ctl_into_closed_pipe(
        &self,
        args: &[&str],
    ) -> Result<(std::process::ExitStatus, String)> {
        let config = self.pki_dir().join("corralctl.toml");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns("cli")])
            .arg(bin("corralctl"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        let out = child.wait_with_output()?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `corralctl ARGS`, which must succeed; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        if !out.status.success() {
            bail!(
                "corralctl {} failed ({}):\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `corralctl --output json ARGS`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let text = self.ctl_ok(&full)?;
        serde_json::from_str(&text)
            .with_context(|| format!("corralctl {} printed invalid JSON: {text}", args.join(" ")))
    }

    /// Issues an operator certificate offline (`pki issue-operator`):
    /// returns the prefix of its `.crt` and `.key` files.
    pub fn issue_operator(&self, name: &str, role: &str) -> Result<PathBuf> {
        let prefix = self.dir.join(name);
        sh(
            &bin("corralctl").to_string_lossy(),
            &[
                "pki",
                "issue-operator",
                "--dir",
                &self.pki_dir().to_string_lossy(),
                "--name",
                name,
                "--role",
                role,
                "--out",
                &prefix.to_string_lossy(),
            ],
        )?;
        Ok(prefix)
    }

    /// A fresh join token.
    pub fn token(&self) -> Result<String> {
        Ok(self
            .ctl_ok(&["token", "create", "--ttl", "10m"])?
            .trim()
            .to_string())
    }

    /// Node `id` as `node list --output json` shows it.
    pub fn node(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let v = self.ctl_json(&["node", "list"])?;
        Ok(v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["id"] == id))
            .cloned())
    }

    pub fn wait_node_state(&self, id: &str, state: &str, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("node {id} to be {state}"), || {
            Ok(self.node(id)?.is_some_and(|n| n["state"] == state))
        })
    }

    /// `psql` from the client namespace; returns unaligned, tuples-only output.
    pub fn psql(&self, uri: &str, sql: &str) -> Result<String> {
        let out = self.in_ns(
            "cli",
            "psql",
            &["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", uri, "-c", sql],
        )?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates a PostgreSQL primary/replica cluster on `nodes` ("vm1,vm2",
    /// the first is the primary) with extra `cluster create` flags, waits
    /// for it, and returns `cluster credentials --output json`.
    pub fn create_replicated(
        &self,
        name: &str,
        nodes: &str,
        extra: &[&str],
    ) -> Result<serde_json::Value> {
        self.create_engine_cluster(name, "postgres", nodes, extra)
    }

    /// [`Lab::create_replicated`] for any engine.
    pub fn create_engine_cluster(
        &self,
        name: &str,
        engine: &str,
        nodes: &str,
        extra: &[&str],
    ) -> Result<serde_json::Value> {
        let mut args = vec![
            "cluster",
            "create",
            "--name",
            name,
            "--engine",
            engine,
            "--mode",
            "primary-replica",
            "--nodes",
            nodes,
        ];
        args.extend_from_slice(extra);
        self.ctl_ok(&args)?;
        self.ctl_json(&["cluster", "credentials", name])
    }

    /// A connection string for node `i` alone, with the credentials of
    /// `corralctl --output json cluster credentials`.
    /// The cluster's engine decides the scheme and port (from its own
    /// URI and port).
    pub fn node_uri(&self, creds: &serde_json::Value, i: usize) -> String {
        format!(
            "{}://{}:{}@{}:{}/{}",
            uri_scheme(creds),
            creds["user"].as_str().unwrap_or_default(),
            creds["password"].as_str().unwrap_or_default(),
            self.vm_ip(i),
            creds["port"].as_u64().unwrap_or(5432),
            creds["database"].as_str().unwrap_or_default()
        )
    }

    /// Node `node` of `cluster` as `cluster show --output json` shows it.
    pub fn cluster_node(&self, cluster: &str, node: &str) -> Result<serde_json::Value> {
        let c = self.ctl_json(&["cluster", "show", cluster])?;
        c["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["id"] == node))
            .cloned()
            .ok_or_else(|| anyhow!("{node} is not in {c}"))
    }

    /// Waits until `cluster show` names exactly one node of `cluster` with
    /// role `primary`, and returns its id. "Exactly one" because during a
    /// failover the store may briefly hold none, and must never hold two.
    pub fn wait_until_primary(&self, cluster: &str, timeout: Duration) -> Result<String> {
        let mut primary = String::new();
        wait_until(timeout, &format!("{cluster} to have one primary"), || {
            let c = self.ctl_json(&["cluster", "show", cluster])?;
            let primaries: Vec<&str> = c["nodes"]
                .as_array()
                .map(|ns| {
                    ns.iter()
                        .filter(|n| n["role"] == "primary")
                        .filter_map(|n| n["id"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            match primaries[..] {
                [one] => {
                    primary = one.to_string();
                    Ok(true)
                }
                _ => bail!("primaries: {primaries:?}"),
            }
        })?;
        Ok(primary)
    }

    /// `GET /<path>` on VM `i`'s health port, from the test process (the
    /// host reaches every VM): the status code, as HAProxy would see it.
    /// An error means no answer within 1 s (refused, cut off, hung), which
    /// HAProxy counts as a failed check too.
    pub fn health(&self, i: usize, path: &str) -> Result<u16> {
        http_status(
            &format!("{}:{HEALTH_PORT}", self.vm_ip(i)),
            path,
            Duration::from_secs(1),
        )
    }

    /// The coordinator's `/metrics` text, fetched from the test process.
    pub fn coordinator_metrics(&self) -> Result<String> {
        let addr = format!("10.231.{}.1:{COORDINATOR_HTTP_PORT}", self.k);
        http_get(&addr, "/metrics", Duration::from_secs(5))
    }

    /// Agent `i`'s `/metrics` text.
    pub fn agent_metrics(&self, i: usize) -> Result<String> {
        http_get(
            &format!("{}:{HEALTH_PORT}", self.vm_ip(i)),
            "/metrics",
            Duration::from_secs(5),
        )
    }

    /// Waits until the primary reports `node` of `cluster` streaming (or a
    /// sync standby) and less than 16 MiB behind: eligible for promotion.
    pub fn wait_streaming(&self, cluster: &str, node: &str) -> Result<()> {
        wait_until(
            Duration::from_secs(30),
            &format!("{node} to stream"),
            || {
                let n = self.cluster_node(cluster, node)?;
                let lag = n["lag_bytes"].as_i64().unwrap_or(-1);
                Ok(
                    matches!(n["replication"].as_str(), Some("streaming" | "sync"))
                        && (0..16 << 20).contains(&lag),
                )
            },
        )
    }

    /// Every row of `query` (one column) on node `i`.
    pub fn column_on(
        &self,
        creds: &serde_json::Value,
        i: usize,
        query: &str,
    ) -> Result<Vec<String>> {
        Ok(self
            .psql(&self.node_uri(creds, i), query)?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// The operation of `kind` on `cluster` (the latest), as JSON.
    pub fn operation(&self, cluster: &str, kind: &str) -> Result<serde_json::Value> {
        let ops = self.ctl_json(&["operation", "list", "--cluster", cluster])?;
        ops["operations"]
            .as_array()
            .and_then(|a| a.iter().rev().find(|o| o["kind"] == kind))
            .cloned()
            .ok_or_else(|| anyhow!("no {kind} operation on {cluster}: {ops}"))
    }

    /// The messages of an operation's log.
    pub fn operation_log(op: &serde_json::Value) -> Vec<String> {
        op["log"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["message"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
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

/// A bare HTTP/1.0 `GET` returning the status code: enough for a health
/// endpoint, without an HTTP client crate. HTTP/1.0 because HAProxy's
/// `option httpchk` sends the same, so an endpoint that answers this answers
/// HAProxy. `timeout` bounds the connect and each read and write.
pub fn http_status(addr: &str, path: &str, timeout: Duration) -> Result<u16> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&sock, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let path = path.trim_start_matches('/');
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    // The status line is all we need; stop reading once it is in.
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the answer of {addr}/{path}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    match line.split_whitespace().collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/") => code
            .parse()
            .with_context(|| format!("status line {line:?} from {addr}/{path}")),
        _ => bail!("no HTTP status line from {addr}/{path}: {line:?}"),
    }
}

/// `GET /<path>` on `addr`: the body of a 200 answer.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&sock, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let path = path.trim_start_matches('/');
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .with_context(|| format!("reading the answer of {addr}/{path}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP answer from {addr}/{path}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{addr}/{path}: {status}: {body}");
    }
    Ok(body.to_string())
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
