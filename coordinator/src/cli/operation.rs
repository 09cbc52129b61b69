//! `corralctl operation`: list and show durable operations; and following
//! one until it ends, which every command that starts an operation does.

use super::connection::Api;
use super::output::{ago, fmt_time, print_json, print_page};
use anyhow::{bail, Result};
use clap::Subcommand;
use corral_proto::pb::{self};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub(super) enum OperationCmd {
    /// The newest operations, oldest first; --before pages back.
    List {
        #[arg(long)]
        cluster: Option<String>,
        /// At most this many (the coordinator caps a page at 10,000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Only operations created before this one (an id printed here).
        #[arg(long, default_value = "")]
        before: String,
    },
    Show {
        id: String,
    },
}

pub(super) async fn run(api: &mut Api, cmd: OperationCmd, json: bool) -> Result<()> {
    match cmd {
        OperationCmd::List {
            cluster,
            limit,
            before,
        } => {
            let r = api
                .list_operations(pb::ListOperationsRequest {
                    cluster: cluster.unwrap_or_default(),
                    limit,
                    before,
                })
                .await?
                .into_inner();
            let rows = r.operations.iter().map(|o| {
                vec![
                    o.id.clone(),
                    o.cluster.clone(),
                    o.kind.clone(),
                    o.state.clone(),
                    o.requested_by.clone(),
                    ago(o.updated_at_ms),
                    o.error.clone(),
                ]
            });
            print_page(
                json,
                &r,
                &[
                    "OPERATION",
                    "CLUSTER",
                    "KIND",
                    "STATE",
                    "BY",
                    "UPDATED",
                    "ERROR",
                ],
                rows,
                &r.next_before,
            )?;
        }
        OperationCmd::Show { id } => {
            let o = api
                .get_operation(pb::GetOperationRequest { id })
                .await?
                .into_inner();
            if json {
                print_json(&o)?;
            } else {
                print_operation(&o);
            }
        }
    }
    Ok(())
}

pub(super) fn print_operation(op: &pb::Operation) {
    println!(
        "operation {} ({}) on cluster {}: {}",
        op.id, op.kind, op.cluster, op.state
    );
    for l in &op.log {
        println!("  {}  {}", fmt_time(l.at_ms), l.message);
    }
    if !op.error.is_empty() {
        println!("error: {}", op.error);
    }
}

/// Follows an operation until it ends, echoing new log lines to stderr and,
/// on a terminal, drawing a progress bar for its long steps.
pub(super) async fn wait_operation(api: &mut Api, id: &str) -> Result<pb::Operation> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut shown = 0;
    loop {
        let op = api
            .get_operation(pb::GetOperationRequest { id: id.into() })
            .await?
            .into_inner();
        for l in op.log.iter().skip(shown) {
            match &bar {
                Some(b) => b.println(format!("  {}", l.message)),
                None => eprintln!("  {}", l.message),
            }
        }
        shown = op.log.len();
        match (&op.progress, tty) {
            (Some(p), true) if p.total_bytes > 0 => {
                let b = bar.get_or_insert_with(|| {
                    let b = indicatif::ProgressBar::new(p.total_bytes);
                    if let Ok(style) = indicatif::ProgressStyle::with_template(
                        "  {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b
                });
                b.set_length(p.total_bytes);
                b.set_position(p.done_bytes);
                b.set_message(p.message.clone());
            }
            _ => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
        }
        if op.state == "succeeded" || op.state == "failed" {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            return Ok(op);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for an accepted operation (unless `no_wait`) and fails if it
/// failed; says "WHAT: done" (or prints the operation with `--json`).
pub(super) async fn follow(
    api: &mut Api,
    op: pb::Operation,
    no_wait: bool,
    json: bool,
    what: &str,
) -> Result<()> {
    let Some(op) = finished(api, op, no_wait, json, what).await? else {
        return Ok(());
    };
    if json {
        print_json(&op)?;
    } else {
        println!("{what}: done");
    }
    Ok(())
}

/// Waits for an accepted operation and fails if it failed. With
/// `no_wait`, says how to follow it instead and returns None.
pub(super) async fn finished(
    api: &mut Api,
    op: pb::Operation,
    no_wait: bool,
    json: bool,
    what: &str,
) -> Result<Option<pb::Operation>> {
    if no_wait {
        if json {
            print_json(&op)?;
        } else {
            println!(
                "operation {} accepted; follow it with `corralctl operation show {}`",
                op.id, op.id
            );
        }
        return Ok(None);
    }
    eprintln!("{what} (operation {})", op.id);
    let op = wait_operation(api, &op.id).await?;
    if op.state != "succeeded" {
        bail!(
            "{what} failed: {} (see `corralctl operation show {}`)",
            op.error,
            op.id
        );
    }
    Ok(Some(op))
}
