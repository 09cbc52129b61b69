//! Network faults between a lab's namespaces: the partitions a failover
//! must survive without two primaries.
//!
//! Two kinds, because they fail differently:
//!
//! - [`Lab::cut`] drops every packet between two namespaces, in both
//!   directions, and nothing else: the links each keeps with everyone else
//!   still work (a primary cut off from the coordinator but still reaching
//!   its replicas, or the reverse). Packets are dropped, not refused, so
//!   established connections hang until their timeouts, as on a real
//!   partition.
//! - [`Lab::isolate`] takes a VM's link down: it reaches no one, and the
//!   host (the test process) cannot reach it either.
//!
//! Cuts live in an nftables table of the test's own, `inet crltest`, in the
//! namespace named first: one pair of base chains per peer
//! (`cut_<peer>_in`, `cut_<peer>_out`), so [`Lab::heal`] removes exactly one
//! cut by deleting its chains. The table `inet corral` belongs to the agent
//! (its allowlist) and is never touched: a packet dropped by either table
//! is dropped, so the two do not interfere. Nothing here is tracked in the
//! [`Lab`]: `nft list ruleset` and `ip link` in the namespaces are the
//! state, and the lab teardown deletes the namespaces with everything in
//! them.

use crate::{sh, Lab};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::process::{Command, Stdio};

/// The test's own nftables table (family `inet`: IPv4 and IPv6).
pub const TABLE: &str = "crltest";

impl Lab {
    /// The host number of a lab member: `ctl` 1, `vmI` 10+I, `cli` 100, and
    /// `host` (the root namespace, where the test runs) 254. Its IPv4
    /// address is 10.231.K.<n>, its IPv6 address fd31::K:<n> (the same
    /// digits, read as hex, as `Lab::setup` writes them).
    fn host_number(&self, name: &str) -> Result<u32> {
        let n = match name {
            "ctl" => 1,
            "cli" => 100,
            "host" => 254,
            _ => match (
                name.strip_prefix("vm")
                    .and_then(|i| i.parse::<usize>().ok()),
                name.strip_prefix("cl")
                    .and_then(|i| i.parse::<usize>().ok()),
            ) {
                (Some(i), _) if (1..=self.opts.vms).contains(&i) => 10 + i as u32,
                (_, Some(c)) if (2..2 + self.opts.extra_clients).contains(&c) => 99 + c as u32,
                _ => bail!(
                    "no lab member {name:?}: ctl, cli, host, vm1..vm{} or the extra clients",
                    self.opts.vms
                ),
            },
        };
        Ok(n)
    }

    /// The IPv4 address of `name` ("ctl", "cli", "vmI" or "host").
    pub fn ip4_of(&self, name: &str) -> Result<String> {
        Ok(format!("10.231.{}.{}", self.k, self.host_number(name)?))
    }

    /// The IPv6 address of `name` ("ctl", "cli", "vmI" or "host").
    pub fn ip6_of(&self, name: &str) -> Result<String> {
        Ok(format!("fd31::{:x}:{}", self.k, self.host_number(name)?))
    }

    /// Drops all traffic between namespaces `a` and `b` ("ctl", "cli",
    /// "vmI"; `b` may also be "host", the test process), both directions,
    /// IPv4 and IPv6, established connections included. Applied in `a`
    /// alone, so it is one switch to flip back ([`Lab::heal`]). Cutting
    /// again is harmless.
    pub fn cut(&self, a: &str, b: &str) -> Result<()> {
        if a == b || a == "host" {
            bail!(
                "cut({a:?}, {b:?}): the first must be a lab namespace, the second another member"
            );
        }
        self.host_number(a)?;
        let (v4, v6) = (self.ip4_of(b)?, self.ip6_of(b)?);
        let (cin, cout) = chains(b);
        // `add` of what exists is a no-op and `flush` empties the chains, so
        // a second cut leaves one set of rules, not two.
        let script = format!(
            "add table inet {TABLE}
add chain inet {TABLE} {cin} {{ type filter hook input priority -10; policy accept; }}
add chain inet {TABLE} {cout} {{ type filter hook output priority -10; policy accept; }}
flush chain inet {TABLE} {cin}
flush chain inet {TABLE} {cout}
add rule inet {TABLE} {cin} ip saddr {v4} drop
add rule inet {TABLE} {cin} ip6 saddr {v6} drop
add rule inet {TABLE} {cout} ip daddr {v4} drop
add rule inet {TABLE} {cout} ip6 daddr {v6} drop
"
        );
        self.nft(a, &script)
            .with_context(|| format!("cutting {a} from {b}"))
    }

    /// Removes the cut [`Lab::cut`]`(a, b)` made, and only that one (other
    /// cuts in `a` stay). Healing what is not cut is a no-op.
    pub fn heal(&self, a: &str, b: &str) -> Result<()> {
        self.host_number(a)?;
        self.host_number(b)?;
        let ns = self.ns(a);
        let listed = sh(
            "ip",
            &["netns", "exec", &ns, "nft", "list", "table", "inet", TABLE],
        );
        let Ok(table) = listed else {
            return Ok(()); // no table: nothing was ever cut in `a`
        };
        let present = |chain: &str| table.contains(&format!("chain {chain} {{"));
        let (cin, cout) = chains(b);
        let mut script = String::new();
        for chain in [cin, cout] {
            if present(&chain) {
                script.push_str(&format!("delete chain inet {TABLE} {chain}\n"));
            }
        }
        if script.is_empty() {
            return Ok(());
        }
        self.nft(a, &script)
            .with_context(|| format!("healing the cut between {a} and {b}"))
    }

    /// Cuts VM `vm` off from everyone (coordinator, other VMs, clients and
    /// the test process) by taking the host end of its veth down: its
    /// interface loses carrier, as when a VM's network goes away. Processes
    /// in it keep running. [`Lab::reconnect`] undoes it.
    pub fn isolate(&self, vm: usize) -> Result<()> {
        let veth = self.vm_veth(vm)?;
        sh("ip", &["link", "set", &veth, "down"])
            .map(|_| ())
            .with_context(|| format!("isolating vm{vm}"))
    }

    /// Brings VM `vm`'s link back after [`Lab::isolate`].
    pub fn reconnect(&self, vm: usize) -> Result<()> {
        let veth = self.vm_veth(vm)?;
        sh("ip", &["link", "set", &veth, "up"])
            .map(|_| ())
            .with_context(|| format!("reconnecting vm{vm}"))
    }

    /// The host end of VM `vm`'s veth: `crlKhN`, N the VM's place in
    /// `Lab::setup`'s list (ctl 0, cli 1, vm1 2, ...).
    fn vm_veth(&self, vm: usize) -> Result<String> {
        if !(1..=self.opts.vms).contains(&vm) {
            bail!("no vm{vm} in lab {} (vm1..vm{})", self.k, self.opts.vms);
        }
        Ok(format!("crl{}h{}", self.k, vm + 1))
    }

    /// Runs an nft script in namespace `name`, from stdin.
    fn nft(&self, name: &str, script: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(name), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft")?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft -f - in {name} failed ({}): {}\nscript:\n{script}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// The input and output chains holding the cut from `peer`.
fn chains(peer: &str) -> (String, String) {
    (format!("cut_{peer}_in"), format!("cut_{peer}_out"))
}
