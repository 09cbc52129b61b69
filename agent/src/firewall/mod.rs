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
//! The fence needs the agent to run. A primary's table therefore also
//! carries the **lease gate** ([`gate`]): while the primary holds its
//! lease, its engine port passes traffic only as long as a set element
//! lives whose timeout the kernel counts down and each lease renewal
//! resets. An agent that stops, dies or hangs stops renewing it, and the
//! kernel closes the port by itself where the agent would have fenced.
//!
//! The same table carries the **IP allowlist**: when [`Rules::allow`] is not
//! empty, only those clients (plus loopback, and the cluster's own nodes and
//! the coordinator in [`Rules::always`]) reach the engine port. The
//! addresses live in four named sets (`allow4`, `allow6`, `always4`,
//! `always6`, one per family because an `inet` table matches `ip saddr` and
//! `ip6 saddr` separately), so a 10,000-entry list is four rules and a
//! kernel lookup per new connection, not 10,000 rules. The agent's health
//! port (`/primary`, `/metrics`: roles, positions, terms) is filtered by
//! the same list. The wanted state is one struct ([`Rules`]), and every
//! change rewrites the whole table.
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

pub mod gate;
mod listing;
mod render;

pub use render::render;

use crate::lease::BootTime;
use anyhow::Context;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use std::net::IpAddr;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// The name of the agent's table, in the `inet` family.
pub const TABLE: &str = "corral";

/// How long an `nft` run may take between our reading of the clock and the
/// kernel's commit, taken off the lease element it writes.
const NFT_RUN_SLACK: Duration = Duration::from_millis(100);

/// What the agent's table should hold.
///
/// This is the whole wanted state, not a change: [`Firewall::apply`] turns
/// it into a complete table. New concerns become new fields; `Default` is
/// "nothing filtered".
///
/// The rules they make are listed at [`render::wanted`]. Only the engine
/// and health ports are filtered: the agent's own API, and the replies to
/// connections the node opens itself (their destination port is an
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
    /// The lease gate ([`gate`]), for a primary serving replicas while it
    /// holds its lease: packets to and from the engine port pass only while
    /// the `lease` set holds the port. Ignored when fenced.
    pub gated: bool,
    /// The agent's health port: filtered by `allow` like the engine port,
    /// never fenced or gated (a load balancer must see a fenced primary
    /// answer 503).
    pub health_port: Option<u16>,
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
    /// Where the lease gate's netlink socket is opened.
    netns: gate::Netns,
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
            netns: gate::Netns::default(),
        }
    }

    /// A firewall for network namespace `name` (as `ip netns` names it):
    /// `ip netns exec NAME nft`, and the lease gate renewed there.
    pub fn in_netns(name: &str) -> Firewall {
        Firewall {
            netns: gate::Netns(Some(format!("/run/netns/{name}").into())),
            ..Firewall::with_command("ip", &["netns", "exec", name, "nft"])
        }
    }

    /// Replaces the table atomically: ONE nft transaction (one `nft -j -f -`
    /// batch: add table, delete table, add table, add chains, add rules), so
    /// there is never a moment with half the rules. Idempotent. A gated
    /// table is written with its gate closed: see [`Firewall::apply_gated`].
    ///
    /// This runs the moment a lease expires, so it is one `nft` run and
    /// nothing else: about 15 ms (5 to 30 ms) on a 2-core VM, most of it the
    /// kernel committing the transaction. On error the kernel has kept the
    /// table exactly as it was before the call.
    pub async fn apply(&self, rules: &Rules) -> anyhow::Result<()> {
        self.replace(rules, None).await
    }

    /// Like [`apply`](Self::apply), with the lease gate open for `gate`
    /// from now (when `rules.gated`): the table comes with the element (in
    /// whole seconds, rounded down), then [`renew_gate`](Self::renew_gate)
    /// sets it to the millisecond. The gate is never open longer than asked.
    pub async fn apply_gated(&self, rules: &Rules, until: BootTime) -> anyhow::Result<()> {
        let gated = rules.gated && !rules.fenced;
        // Rounded down, and a little less: nft's run takes a few ms
        // between now and the kernel's commit.
        let ttl = BootTime::now().until(until).saturating_sub(NFT_RUN_SLACK);
        let secs = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        self.replace(rules, Some(secs).filter(|_| gated)).await?;
        match rules.engine_port {
            Some(port) if gated => self.renew_gate(port, until),
            _ => Ok(()),
        }
    }

    /// Keeps the lease gate of `port` open until `until` ([`gate`]): one
    /// netlink transaction, microseconds. The table must be in place with
    /// the element still alive (see [`gate::renew`]).
    pub fn renew_gate(&self, port: u16, until: BootTime) -> anyhow::Result<()> {
        gate::renew(&self.netns, TABLE, port, BootTime::now().until(until))
    }

    async fn replace(&self, rules: &Rules, lease_secs: Option<u32>) -> anyhow::Result<()> {
        let started = Instant::now();
        // Serializing the crate's schema types cannot fail: they hold no maps
        // with non-string keys and no types serde_json rejects.
        let payload = serde_json::to_string(&render(rules, lease_secs))
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
            if listing::is_missing_table(&String::from_utf8_lossy(&out.stderr)) {
                return Ok(false);
            }
            return Err(self.failed(args, &what, &out, ""));
        }
        let listed = String::from_utf8_lossy(&out.stdout);
        Ok(listing::listed_matches(&listed, rules, elements))
    }

    /// Deletes the table; Ok if it is not there.
    ///
    /// One batch "add table, delete table": adding an existing table is a
    /// no-op, so the delete always finds it, and we need not tell "absent"
    /// apart from other errors by parsing nft's messages.
    pub async fn remove(&self) -> anyhow::Result<()> {
        let mut batch = Batch::new();
        batch.add(render::table());
        batch.delete(render::table());
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The rules of a fenced engine on `port`, and nothing else.
    pub(crate) fn fenced(port: u16) -> Rules {
        Rules {
            engine_port: Some(port),
            fenced: true,
            ..Rules::default()
        }
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

    #[tokio::test]
    async fn missing_table_does_not_match() {
        let script = "printf 'Error: No such file or directory\\nlist table inet corral\\n                ^^^^^^\\n' >&2; exit 1";
        let fw = Firewall::with_command("sh", &["-c", script, "nft"]);
        assert!(!fw.matches(&Rules::default()).await.unwrap());
    }
}
