//! `corralctl node`: list, add, remove, promote, reboot, metrics (`node
//! forget` is in identity.rs), and the nodes table `cluster show` prints too.

use super::connection::Api;
use super::identity::ForgetArgs;
use super::metrics::render_metrics;
use super::operation::follow;
use super::output::{ago, parse_duration, print_json, table};
use anyhow::Result;
use clap::Subcommand;
use corral_proto::pb::{self};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub(super) enum NodeCmd {
    List,
    /// Deregister a node that serves no cluster and revoke its certificate
    /// (admin); the id can then be enrolled again with a new join token.
    Forget(ForgetArgs),
    /// Add a node to a cluster as a replica cloned from the primary.
    Add {
        cluster: String,
        node: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Detach a replica, stop its engine and erase its data.
    Remove {
        cluster: String,
        node: String,
        /// Repeat the node's name.
        #[arg(long)]
        confirm: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Planned switchover: make this replica the primary; the old primary follows it.
    Promote {
        cluster: String,
        node: String,
        /// Repeat the node's name.
        #[arg(long)]
        confirm: Option<String>,
        /// Promote even if the node is unhealthy or lagging, or the primary is down.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Restart a node's engine cleanly (a primary needs --force: writes pause).
    Reboot {
        cluster: String,
        node: String,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// A node's CPU, memory, disk, network and engine figures over time:
    /// one sample a second for the last hour, 5-minute buckets up to 7 days.
    Metrics {
        cluster: String,
        node: String,
        /// How far back, e.g. 10m, 1h, 24h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        since: Duration,
    },
}

pub(super) async fn run(api: &mut Api, cmd: NodeCmd, json: bool) -> Result<()> {
    match cmd {
        NodeCmd::Forget(_) => unreachable!("handled in main_with"),
        NodeCmd::Add {
            cluster,
            node,
            no_wait,
        } => {
            let op = api
                .add_node(pb::AddNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                })
                .await?
                .into_inner();
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("adding {node} to {cluster}"),
            )
            .await?;
        }
        NodeCmd::Remove {
            cluster,
            node,
            confirm,
            no_wait,
        } => {
            let op = api
                .remove_node(pb::RemoveNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    confirm: confirm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("removing {node} from {cluster}"),
            )
            .await?;
        }
        NodeCmd::Promote {
            cluster,
            node,
            confirm,
            force,
            no_wait,
        } => {
            let op = api
                .promote_node(pb::PromoteNodeRequest {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    confirm: confirm.unwrap_or_default(),
                    force,
                })
                .await?
                .into_inner();
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("promoting {node} in {cluster}"),
            )
            .await?;
        }
        NodeCmd::Reboot {
            cluster,
            node,
            force,
            no_wait,
        } => reboot(api, cluster, node, force, no_wait, json).await?,
        NodeCmd::List => {
            let r = api.list_nodes(pb::ListNodesRequest {}).await?.into_inner();
            if json {
                print_json(&r)?;
            } else {
                print_nodes(&r.nodes);
            }
        }
        NodeCmd::Metrics {
            cluster,
            node,
            since,
        } => metrics(api, cluster, node, since, json).await?,
    }
    Ok(())
}

/// `node reboot`: restart a node's engine.
pub(super) async fn reboot(
    api: &mut Api,
    cluster: String,
    node: String,
    force: bool,
    no_wait: bool,
    json: bool,
) -> Result<()> {
    let op = api
        .reboot_node(pb::RebootNodeRequest {
            cluster: cluster.clone(),
            node: node.clone(),
            force,
        })
        .await?
        .into_inner();
    if force {
        eprintln!(
            "warning: if {node} is the primary, writes to {cluster} pause until its engine is back"
        );
    }
    follow(
        api,
        op,
        no_wait,
        json,
        &format!("restarting the engine on {node}"),
    )
    .await?;
    Ok(())
}

/// `node metrics`: a node's figures over time, as sparklines.
pub(super) async fn metrics(
    api: &mut Api,
    cluster: String,
    node: String,
    since: Duration,
    json: bool,
) -> Result<()> {
    let r = api
        .get_node_metrics(pb::GetNodeMetricsRequest {
            cluster,
            node,
            since_ms: corral_proto::now_ms() - since.as_millis() as i64,
        })
        .await?
        .into_inner();
    if json {
        return print_json(&r);
    }
    print!("{}", render_metrics(&r, 60));
    Ok(())
}

pub(super) fn print_nodes(nodes: &[pb::Node]) {
    let mut t = table(&[
        "NODE",
        "ADDRESS",
        "STATE",
        "CLUSTER",
        "ROLE",
        "ENGINE",
        "REPLICATION",
        "LAG",
        "CPU",
        "MEM",
        "DISK",
        "LAST HEARTBEAT",
    ]);
    for n in nodes {
        let m = n.metrics.unwrap_or_default();
        t.add_row(vec![
            n.id.clone(),
            n.address.clone(),
            n.state.clone(),
            if n.cluster.is_empty() {
                "-".into()
            } else {
                n.cluster.clone()
            },
            if n.role.is_empty() {
                "-".into()
            } else {
                n.role.clone()
            },
            engine_label(&n.engine),
            if n.replication.is_empty() {
                "-".into()
            } else {
                n.replication.clone()
            },
            lag_label(n),
            format!("{:.0}%", m.cpu_percent),
            format!("{}/{}", gib(m.memory_used_bytes), gib(m.memory_total_bytes)),
            format!("{}/{}", gib(m.disk_used_bytes), gib(m.disk_total_bytes)),
            ago(n.last_heartbeat_ms),
        ]);
    }
    println!("{t}");
}

pub(super) fn engine_label(e: &Option<pb::EngineStatus>) -> String {
    match e {
        Some(e) if !e.engine.is_empty() => {
            let state = pb::EngineState::try_from(e.state)
                .unwrap_or_default()
                .label();
            let mut s = format!("{} {state}", e.engine);
            if e.restarts > 0 {
                s.push_str(&format!(
                    " ({} restart{})",
                    e.restarts,
                    if e.restarts == 1 { "" } else { "s" }
                ));
            }
            if e.lease.as_ref().is_some_and(|l| l.fenced) {
                s.push_str(", FENCED (no lease)");
            }
            if let Some(n) = e.stats.get("connections") {
                s.push_str(&format!(", {n:.0} conn"));
            }
            if let Some(n) = e.stats.get("keys") {
                s.push_str(&format!(", {n:.0} keys"));
            }
            s
        }
        _ => "-".into(),
    }
}

pub(super) fn lag_label(n: &pb::Node) -> String {
    if n.role != "replica" || n.lag_bytes < 0 {
        return "-".into();
    }
    let bytes = match n.lag_bytes {
        b if b < 1 << 10 => format!("{b} B"),
        b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    };
    if n.lag_ms >= 0 {
        format!("{bytes}, {:.1}s", n.lag_ms as f64 / 1000.0)
    } else {
        bytes
    }
}

pub(super) fn gib(b: u64) -> String {
    format!("{:.1}G", b as f64 / (1u64 << 30) as f64)
}
