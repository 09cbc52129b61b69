//! `corralctl`, the operator CLI: a mutual-TLS client of the operator API,
//! plus the offline PKI commands that need the CA key on disk.
//!
//! Where to connect comes from `--config FILE` (or `CORRAL_CONFIG`, or
//! `~/.config/corral/corralctl.toml`), each field overridable by
//! `CORRAL_COORDINATOR`, `CORRAL_CA`, `CORRAL_CERT` and `CORRAL_KEY`.
//!
//! One file per command group (`cluster.rs`, `node.rs`, `backup.rs`, ...),
//! each with its clap enum and its handlers; `output.rs` and
//! `connection.rs` hold what they share. This file holds the top-level
//! command and the dispatch.

mod alerts;
mod allowlist;
mod backup;
mod cluster;
mod connection;
mod credentials;
mod events;
mod identity;
mod logs;
mod metrics;
mod node;
mod operation;
mod output;
mod pki;
mod token;

pub use metrics::{render_metrics, sparkline};

use alerts::AlertsCmd;
use anyhow::Result;
use backup::BackupCmd;
use clap::{Parser, Subcommand, ValueEnum};
use cluster::ClusterCmd;
use connection::Api;
use connection::{rpc_error, ConnConfig};
use corral_proto::pb::{self, operator_client::OperatorClient};
use events::{AuditCmd, EventCmd};
use node::NodeCmd;
use operation::OperationCmd;
use output::print_json;
use pki::PkiCmd;
use std::path::PathBuf;
use token::TokenCmd;

#[derive(Parser, Debug)]
#[command(
    name = "corralctl",
    version,
    about = "Operate Corral database clusters"
)]
pub struct Cli {
    /// Connection settings file (coordinator address and certificate paths).
    #[arg(long, global = true, env = "CORRAL_CONFIG")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Certificates: the CA and operator certificates (offline, with the CA
    /// key); revocation, renewal and the list (online).
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Join tokens for enrolling new agents.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Database clusters.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Enrolled nodes (VMs running corral-agent).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Durable operations and their step logs.
    #[command(subcommand, alias = "op")]
    Operation(OperationCmd),
    /// The audit trail (admin only).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Events observed on nodes (engine restarts, nodes down/up).
    #[command(subcommand)]
    Event(EventCmd),
    /// Alerts firing now, their history, and the notification channels.
    #[command(subcommand)]
    Alerts(AlertsCmd),
    /// Backups: take, list, verify, download, restore, schedule.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Show who the configured certificate says you are.
    Whoami,
    /// A node's engine log (default) or agent log, from its VM.
    ///
    /// The last 100 lines unless --since or --tail says otherwise; with
    /// --follow, then new lines as they are written, until Ctrl-C.
    Logs(logs::LogsArgs),
}

pub async fn main_with(cli: Cli) -> Result<()> {
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Pki(cmd) if !matches!(cmd, PkiCmd::Online(_)) => pki::offline(cmd, json),
        command => {
            let conn = ConnConfig::load(cli.config.as_deref())?;
            let (channel, addr) = conn.channel()?;
            let result = match command {
                Command::Pki(PkiCmd::Online(cmd)) => identity::pki(channel, cmd, &conn, json).await,
                Command::Node(NodeCmd::Forget(a)) => identity::forget(channel, a, json).await,
                Command::Cluster(ClusterCmd::Credentials { name }) => {
                    credentials::show(channel, &name, &conn, json).await
                }
                command => run(&mut OperatorClient::new(channel), command, json).await,
            };
            result.map_err(|e| match e.downcast::<tonic::Status>() {
                Ok(s) => rpc_error(&addr, s),
                Err(e) => e,
            })
        }
    }
}

/// Runs one command against the operator API (the commands `main_with`
/// handles itself never reach here).
async fn run(api: &mut Api, command: Command, json: bool) -> Result<()> {
    match command {
        Command::Pki(_) => unreachable!("handled in main_with"),
        Command::Whoami => {
            let me = api.who_am_i(pb::WhoAmIRequest {}).await?.into_inner();
            if json {
                print_json(&me)?;
            } else {
                println!("{} ({})", me.name, me.role);
            }
            Ok(())
        }
        Command::Token(cmd) => token::run(api, cmd, json).await,
        Command::Cluster(cmd) => cluster::run(api, cmd, json).await,
        Command::Node(cmd) => node::run(api, cmd, json).await,
        Command::Operation(cmd) => operation::run(api, cmd, json).await,
        Command::Audit(cmd) => events::audit(api, cmd, json).await,
        Command::Event(cmd) => events::events(api, cmd, json).await,
        Command::Backup(cmd) => backup::run(api, cmd, json).await,
        Command::Alerts(cmd) => alerts::run(api, cmd, json).await,
        Command::Logs(args) => logs::run(api, args, json).await,
    }
}
