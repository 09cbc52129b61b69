//! `corralctl alerts`: the alerts firing now with the notification
//! channels' state, and the history of alerts and notices.

use super::connection::Api;
use super::output::{ago, print_json, table, table_of};
use anyhow::Result;
use clap::Subcommand;
use comfy_table::Table;
use corral_proto::pb::{self};

#[derive(Subcommand, Debug)]
pub(super) enum AlertsCmd {
    /// Alerts firing now, and how each notification channel is doing.
    List,
    /// Alerts that fired (and resolved) and one-shot notices, newest last.
    History {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

pub(super) async fn run(api: &mut Api, cmd: AlertsCmd, json: bool) -> Result<()> {
    match cmd {
        AlertsCmd::List => {
            let r = api
                .list_alerts(pb::ListAlertsRequest {})
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            if r.alerts.is_empty() {
                println!("no alerts firing");
            } else {
                println!("{}", alerts_table(&r.alerts, false));
            }
            if r.channels.is_empty() {
                println!("no notification channels configured ([notify] in the coordinator's configuration file)");
            } else {
                let rows = r.channels.iter().map(|c| {
                    vec![
                        c.name.clone(),
                        c.kind.clone(),
                        c.delivered.to_string(),
                        c.failed_attempts.to_string(),
                        c.dropped.to_string(),
                        c.queued.to_string(),
                        ago(c.last_success_ms),
                        c.last_error.clone(),
                    ]
                });
                println!(
                    "{}",
                    table_of(
                        &[
                            "CHANNEL",
                            "KIND",
                            "DELIVERED",
                            "FAILED ATTEMPTS",
                            "DROPPED",
                            "QUEUED",
                            "LAST SUCCESS",
                            "LAST ERROR",
                        ],
                        rows
                    )
                );
            }
        }
        AlertsCmd::History { cluster, limit } => {
            let r = api
                .list_alert_history(pb::ListAlertHistoryRequest {
                    cluster: cluster.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            println!("{}", alerts_table(&r.alerts, true));
        }
    }
    Ok(())
}

pub(super) fn alerts_table(alerts: &[pb::AlertInfo], with_state: bool) -> Table {
    let mut header = vec!["SINCE", "SEVERITY", "ALERT", "CLUSTER", "NODE", "SUMMARY"];
    if with_state {
        header.insert(1, "STATE");
        header.insert(2, "ENDED");
    }
    let mut t = table(&header);
    for a in alerts {
        let label = |k: &str| a.labels.get(k).cloned().unwrap_or_default();
        let mut row = vec![
            ago(a.started_at_ms),
            a.severity.clone(),
            a.name.clone(),
            label("cluster"),
            label("node"),
            a.summary.clone(),
        ];
        if with_state {
            row.insert(1, a.state.clone());
            row.insert(
                2,
                // A notice is a moment; only alerts that resolved ended.
                if a.state == "resolved" {
                    ago(a.ended_at_ms)
                } else {
                    String::new()
                },
            );
        }
        t.add_row(row);
    }
    t
}
