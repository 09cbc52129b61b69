//! `corralctl cluster allowlist`: which client addresses may reach a
//! cluster's engine port; show, change (waiting until every node applied
//! it), history.

use super::connection::Api;
use super::output::{fmt_time, print_json};
use anyhow::{Context, Result};
use clap::Subcommand;
use corral_proto::pb::{self};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub(super) enum AllowlistCmd {
    /// The list, and whether every node applied it.
    Show { cluster: String },
    /// Replace the list (no entries: open to every address).
    Set {
        cluster: String,
        #[command(flatten)]
        change: AllowlistChange,
    },
    /// Add addresses or ranges.
    Add {
        cluster: String,
        #[command(flatten)]
        change: AllowlistChange,
    },
    /// Remove addresses or ranges.
    Remove {
        cluster: String,
        #[command(flatten)]
        change: AllowlistChange,
    },
    /// Every change: when, who, old and new lists.
    History { cluster: String },
}

#[derive(clap::Args, Debug)]
pub(super) struct AllowlistChange {
    /// IPv4/IPv6 addresses or CIDR ranges: 203.0.113.5 203.0.113.0/24
    /// 2001:db8::1 2001:db8::/48.
    entries: Vec<String>,
    /// Also read entries from FILE, one per line (# starts a comment).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Apply even if the list keeps out the address this request comes from.
    #[arg(long)]
    force: bool,
    /// Return at once instead of waiting for every node to apply it.
    #[arg(long)]
    no_wait: bool,
}

impl AllowlistChange {
    /// The entries from the command line and the file, in order.
    fn entries(&self) -> Result<Vec<String>> {
        let mut out = self.entries.clone();
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading allowlist entries from {}", path.display()))?;
            out.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
        Ok(out)
    }
}

pub(super) async fn run(api: &mut Api, cmd: AllowlistCmd, json: bool) -> Result<()> {
    let (cluster, how, change) = match cmd {
        AllowlistCmd::Show { cluster } => {
            let a = api
                .get_allowlist(pb::GetAllowlistRequest { cluster })
                .await?
                .into_inner();
            if json {
                return print_json(&a);
            }
            print_allowlist(&a);
            return Ok(());
        }
        AllowlistCmd::History { cluster } => {
            let r = api
                .list_allowlist_changes(pb::ListAllowlistChangesRequest { cluster })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            for c in &r.changes {
                println!(
                    "{} version {} by {}: {} -> {} entries\n  old: {}\n  new: {}",
                    fmt_time(c.at_ms),
                    c.version,
                    c.who,
                    c.old_entries.len(),
                    c.new_entries.len(),
                    c.old_entries.join(" "),
                    c.new_entries.join(" ")
                );
            }
            return Ok(());
        }
        AllowlistCmd::Set { cluster, change } => (cluster, "set", change),
        AllowlistCmd::Add { cluster, change } => (cluster, "add", change),
        AllowlistCmd::Remove { cluster, change } => (cluster, "remove", change),
    };
    let a = api
        .set_allowlist(pb::SetAllowlistRequest {
            cluster: cluster.clone(),
            change: how.into(),
            entries: change.entries()?,
            force: change.force,
        })
        .await?
        .into_inner();
    if !json {
        println!("{}", a.message);
    }
    let a = if change.no_wait {
        a
    } else {
        wait_allowlist(api, &cluster, json).await?
    };
    if json {
        print_json(&a)?;
    } else {
        print_allowlist(&a);
    }
    Ok(())
}

/// Prints an allowlist and where each node stands.
pub(super) fn print_allowlist(a: &pb::Allowlist) {
    if a.entries.is_empty() {
        println!(
            "cluster {}: allowlist empty (version {}): every address may connect",
            a.cluster, a.version
        );
    } else {
        println!(
            "cluster {}: {} allowlist entr{} (version {}):",
            a.cluster,
            a.entries.len(),
            if a.entries.len() == 1 { "y" } else { "ies" },
            a.version
        );
        for e in &a.entries {
            println!("  {e}");
        }
    }
    for n in &a.nodes {
        println!(
            "  node {:<12} {:<8} {}",
            n.node,
            n.state,
            if n.current {
                "applied".to_string()
            } else {
                format!("holds version {} (not yet this one)", n.applied_version)
            }
        );
    }
}

/// Waits until every node that is up holds the list's version.
pub(super) async fn wait_allowlist(
    api: &mut Api,
    cluster: &str,
    json: bool,
) -> Result<pb::Allowlist> {
    let began = std::time::Instant::now();
    loop {
        let a = api
            .get_allowlist(pb::GetAllowlistRequest {
                cluster: cluster.to_string(),
            })
            .await?
            .into_inner();
        let pending: Vec<&str> = a
            .nodes
            .iter()
            .filter(|n| n.state == "up" && !n.current)
            .map(|n| n.node.as_str())
            .collect();
        if pending.is_empty() {
            return Ok(a);
        }
        if began.elapsed() > Duration::from_secs(30) {
            if !json {
                eprintln!(
                    "warning: {} not applied version {} after 30 s; they apply it at their next \
                     heartbeat (see `corralctl event list --cluster {cluster}`)",
                    pending.join(", "),
                    a.version
                );
            }
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
