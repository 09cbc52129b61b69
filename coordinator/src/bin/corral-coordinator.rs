use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Corral coordinator: cluster topology, operations and the operator API.
#[derive(Parser, Debug)]
#[command(name = "corral-coordinator", version)]
struct Args {
    /// Holds the SQLite store (corral.db) and the secrets key.
    #[arg(
        long,
        env = "CORRAL_STATE_DIR",
        default_value = "/var/lib/corral-coordinator"
    )]
    state_dir: PathBuf,
    /// What `corralctl pki init` wrote.
    #[arg(long, env = "CORRAL_PKI_DIR", default_value = "/etc/corral/pki")]
    pki_dir: PathBuf,
    /// Address for agents and operators (mutual TLS).
    #[arg(long, env = "CORRAL_LISTEN", default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    corral_proto::tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CORRAL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = corral_coordinator::Config {
        state_dir: args.state_dir,
        pki_dir: args.pki_dir,
        listen: args.listen,
    };
    match corral_coordinator::run(config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}
