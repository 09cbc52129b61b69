//! `corralctl audit list` and `corralctl event list`: paged tables of the
//! audit trail and of what was observed on nodes.

use super::connection::Api;
use super::output::{ago, print_page};
use anyhow::Result;
use clap::Subcommand;
use corral_proto::pb::{self};

#[derive(Subcommand, Debug)]
pub(super) enum AuditCmd {
    /// The newest entries, oldest first; --before pages back.
    List {
        /// At most this many (the coordinator caps a page at 10,000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only entries with an id below this one.
        #[arg(long, default_value_t = 0)]
        before: i64,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum EventCmd {
    List {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        /// At most this many (the coordinator caps a page at 10,000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only events with an id below this one.
        #[arg(long, default_value_t = 0)]
        before: i64,
    },
}

/// `audit list`.
pub(super) async fn audit(api: &mut Api, cmd: AuditCmd, json: bool) -> Result<()> {
    match cmd {
        AuditCmd::List { limit, before } => {
            let r = api
                .list_audit(pb::ListAuditRequest { limit, before })
                .await?
                .into_inner();
            let rows = r.entries.iter().map(|a| {
                vec![
                    a.id.to_string(),
                    ago(a.at_ms),
                    a.who.clone(),
                    a.action.clone(),
                    a.target.clone(),
                    a.result.clone(),
                ]
            });
            print_page(
                json,
                &r,
                &["ID", "WHEN", "WHO", "ACTION", "TARGET", "RESULT"],
                rows,
                &r.next_before,
            )?;
        }
    }
    Ok(())
}

/// `event list`.
pub(super) async fn events(api: &mut Api, cmd: EventCmd, json: bool) -> Result<()> {
    match cmd {
        EventCmd::List {
            node,
            cluster,
            limit,
            before,
        } => {
            let r = api
                .list_events(pb::ListEventsRequest {
                    node: node.unwrap_or_default(),
                    cluster: cluster.unwrap_or_default(),
                    limit,
                    before,
                })
                .await?
                .into_inner();
            let rows = r.events.iter().map(|e| {
                vec![
                    ago(e.at_ms),
                    e.node.clone(),
                    e.cluster.clone(),
                    e.kind.clone(),
                    e.message.clone(),
                ]
            });
            print_page(
                json,
                &r,
                &["WHEN", "NODE", "CLUSTER", "KIND", "MESSAGE"],
                rows,
                &r.next_before,
            )?;
        }
    }
    Ok(())
}
