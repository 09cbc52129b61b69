//! `corralctl cluster`: create, list, show, change settings, resync,
//! delete; its `credentials` and `allowlist` commands live in their own
//! files.

use super::allowlist::{self, AllowlistCmd};
use super::connection::Api;
use super::node::print_nodes;
use super::operation::{finished, follow};
use super::output::{ago, print_json, table};
use anyhow::{anyhow, Result};
use clap::Subcommand;
use corral_proto::pb::{self};

#[derive(Subcommand, Debug)]
pub(super) enum ClusterCmd {
    /// Create a cluster and wait until it runs.
    Create {
        #[arg(long)]
        name: String,
        /// postgres, mariadb (or mysql: MariaDB's driver speaking MySQL 8),
        /// redis (or valkey, keydb: the agents' --redis-server).
        #[arg(long)]
        engine: String,
        /// Nodes to run on, comma-separated or repeated; the first is the
        /// primary (--mode primary-replica), the others its replicas.
        #[arg(long = "nodes", alias = "node", value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// single or primary-replica.
        #[arg(long, default_value = "single")]
        mode: String,
        /// Zero-loss: every commit waits until at least one replica has it.
        #[arg(long)]
        sync: bool,
        /// Clients must use TLS (plaintext is refused); without it TLS is
        /// offered. Redis: the port then speaks TLS only.
        #[arg(long)]
        require_tls: bool,
        /// Return once the operation is accepted instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Change settings: sync=on|off, termination-protection=on|off,
    /// auto-failover=on|off, profile=lan|wan (failover timing: lan, the
    /// default, is a 1s lease and a 250ms heartbeat; wan 4s and 1s), or
    /// lease=DURATION (e.g. 1s) and heartbeat=DURATION (e.g. 250ms).
    Set {
        name: String,
        #[arg(required = true, value_parser = parse_setting)]
        settings: Vec<(String, Setting)>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Erase every (or one) replica's data and clone it again from the primary.
    Resync {
        name: String,
        /// Only this replica.
        #[arg(long)]
        node: Option<String>,
        /// Repeat the cluster's name.
        #[arg(long)]
        confirm: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Take a final backup (kept 15 days), then stop every engine, erase
    /// every node's data and forget the cluster.
    Delete {
        name: String,
        /// Repeat the cluster's name.
        #[arg(long)]
        confirm: Option<String>,
        /// Skip the final backup.
        #[arg(long)]
        no_final_backup: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Print the admin connection string (audited). It uses TLS and names
    /// this corralctl's CA certificate file, which the servers' chain to.
    Credentials {
        name: String,
    },
    /// Which client addresses may reach the cluster's engine port.
    #[command(subcommand)]
    Allowlist(AllowlistCmd),
}

/// The value of a `cluster set` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Setting {
    Flag(bool),
    Millis(u32),
    /// A profile's name, checked by the coordinator.
    Name(String),
}

pub(super) fn parse_setting(s: &str) -> Result<(String, Setting), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid setting {s:?}: use KEY=VALUE, e.g. sync=on or lease=2s"))?;
    let value = match k {
        "sync" | "termination-protection" | "auto-failover" => Setting::Flag(match v {
            "on" | "true" => true,
            "off" | "false" => false,
            _ => return Err(format!("invalid value {v:?} for {k}: use on or off")),
        }),
        "lease" | "heartbeat" => Setting::Millis(parse_millis(v).map_err(|e| format!("{k}: {e}"))?),
        "profile" => Setting::Name(v.to_string()),
        _ => {
            return Err(format!(
                "unknown setting {k:?}: settable are sync, termination-protection, auto-failover, \
                 profile, lease and heartbeat"
            ))
        }
    };
    Ok((k.to_string(), value))
}

/// "500ms", "2s" -> milliseconds.
pub(super) fn parse_millis(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid duration {s:?}: use milliseconds or seconds, e.g. 500ms or 2s");
    let (num, factor) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        return Err(bad());
    };
    let n: u32 = num.parse().map_err(|_| bad())?;
    n.checked_mul(factor).ok_or_else(bad)
}

/// A cluster's settings as `cluster set` takes them.
pub(super) fn settings_line(c: &pb::Cluster) -> String {
    format!(
        "sync={} termination-protection={} auto-failover={} lease={}ms heartbeat={}ms \
         (profile {})",
        on_off(c.sync),
        on_off(c.termination_protection),
        on_off(c.auto_failover),
        c.lease_ms,
        c.heartbeat_interval_ms,
        c.profile
    )
}

pub(super) fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

pub(super) async fn run(api: &mut Api, cmd: ClusterCmd, json: bool) -> Result<()> {
    match cmd {
        ClusterCmd::Credentials { .. } => unreachable!("handled in main_with"),
        ClusterCmd::Create {
            name,
            engine,
            nodes,
            mode,
            sync,
            require_tls,
            no_wait,
        } => {
            corral_proto::names::validate("cluster", &name).map_err(|e| anyhow!(e))?;
            let op = api
                .create_cluster(pb::CreateClusterRequest {
                    name: name.clone(),
                    engine,
                    mode,
                    nodes,
                    sync,
                    require_tls,
                })
                .await?
                .into_inner();
            let what = format!("creating cluster {name}");
            if finished(api, op, no_wait, json, &what).await?.is_none() {
                return Ok(());
            }
            let cluster = api
                .get_cluster(pb::GetClusterRequest { name: name.clone() })
                .await?
                .into_inner();
            if json {
                print_json(&cluster)?;
            } else {
                println!("cluster {name} is {}", cluster.state);
                println!("connection string: corralctl cluster credentials {name}");
            }
        }
        ClusterCmd::List => list(api, json).await?,
        ClusterCmd::Show { name } => show(api, name, json).await?,
        ClusterCmd::Set {
            name,
            settings,
            no_wait,
        } => set(api, name, settings, no_wait, json).await?,
        ClusterCmd::Resync {
            name,
            node,
            confirm,
            no_wait,
        } => {
            let op = api
                .resync_cluster(pb::ResyncClusterRequest {
                    name: name.clone(),
                    node: node.clone().unwrap_or_default(),
                    confirm: confirm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let what = match node {
                Some(n) => format!("resyncing {n} of {name}"),
                None => format!("resyncing the replicas of {name}"),
            };
            follow(api, op, no_wait, json, &what).await?;
        }
        ClusterCmd::Delete {
            name,
            confirm,
            no_final_backup,
            no_wait,
        } => {
            let op = api
                .delete_cluster(pb::DeleteClusterRequest {
                    name: name.clone(),
                    confirm: confirm.unwrap_or_default(),
                    no_final_backup,
                })
                .await?
                .into_inner();
            follow(api, op, no_wait, json, &format!("deleting cluster {name}")).await?;
        }
        ClusterCmd::Allowlist(cmd) => allowlist::run(api, cmd, json).await?,
    }
    Ok(())
}

/// `cluster list`.
pub(super) async fn list(api: &mut Api, json: bool) -> Result<()> {
    let r = api
        .list_clusters(pb::ListClustersRequest {})
        .await?
        .into_inner();
    if json {
        return print_json(&r);
    }
    let mut t = table(&["CLUSTER", "ENGINE", "MODE", "STATE", "NODES", "CREATED"]);
    for c in &r.clusters {
        let nodes: Vec<String> = c
            .nodes
            .iter()
            .map(|n| format!("{} ({}, {})", n.id, n.role, n.state))
            .collect();
        t.add_row(vec![
            c.name.clone(),
            c.engine.clone(),
            c.mode.clone(),
            c.state.clone(),
            nodes.join(", "),
            ago(c.created_at_ms),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// `cluster show`: the cluster, its settings and its nodes.
pub(super) async fn show(api: &mut Api, name: String, json: bool) -> Result<()> {
    let c = api
        .get_cluster(pb::GetClusterRequest { name })
        .await?
        .into_inner();
    if json {
        return print_json(&c);
    }
    println!(
        "cluster {}: {} {} ({}), port {}, database {}, term {}",
        c.name, c.engine, c.mode, c.state, c.port, c.database, c.term
    );
    println!("settings: {}", settings_line(&c));
    if !c.failover_status.is_empty() {
        println!("failover: {}", c.failover_status);
    }
    print_nodes(&c.nodes);
    Ok(())
}

/// `cluster set`: the settings given, the last of each kept.
pub(super) async fn set(
    api: &mut Api,
    name: String,
    settings: Vec<(String, Setting)>,
    no_wait: bool,
    json: bool,
) -> Result<()> {
    let get = |k: &str| {
        settings
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let flag = |k: &str| match get(k) {
        Some(Setting::Flag(v)) => Some(v),
        _ => None,
    };
    let millis = |k: &str| match get(k) {
        Some(Setting::Millis(v)) => Some(v),
        _ => None,
    };
    let r = api
        .set_cluster(pb::SetClusterRequest {
            name: name.clone(),
            sync: flag("sync"),
            termination_protection: flag("termination-protection"),
            auto_failover: flag("auto-failover"),
            lease_ms: millis("lease"),
            heartbeat_interval_ms: millis("heartbeat"),
            profile: match get("profile") {
                Some(Setting::Name(v)) => Some(v),
                _ => None,
            },
        })
        .await?
        .into_inner();
    if let Some(op) = r.operation {
        follow(api, op, no_wait, json, &format!("reconfiguring {name}")).await?;
    } else if json {
        print_json(&r.cluster)?;
    }
    if !json {
        if let Some(c) = r.cluster {
            println!("cluster {name}: {}", settings_line(&c));
        }
    }
    Ok(())
}
