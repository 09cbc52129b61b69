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
    /// Plain-HTTP address of /metrics (Prometheus) and /healthz; "off" to
    /// serve none. Metrics name clusters and nodes: keep it on loopback or
    /// a monitoring network.
    #[arg(long, env = "CORRAL_HTTP_LISTEN", default_value = "127.0.0.1:7403")]
    http_listen: String,
    /// Alert rules and notification channels (TOML). Default: this file
    /// when it exists.
    #[arg(long, env = "CORRAL_CONFIG")]
    config: Option<PathBuf>,
    /// Only read the configuration file, say whether it is valid, and exit.
    #[arg(long)]
    check_config: bool,
    /// Lifetime of the node certificates this coordinator signs (agents
    /// renew theirs when a third is left), e.g. 30d; tests use seconds.
    #[arg(long, env = "CORRAL_NODE_CERT_LIFETIME", default_value = "30d", hide = true,
          value_parser = lifetime)]
    node_cert_lifetime: std::time::Duration,
    /// Lifetime of the operator certificates renewed here (`pki renew`).
    #[arg(long, env = "CORRAL_OPERATOR_CERT_LIFETIME", default_value = "90d", hide = true,
          value_parser = lifetime)]
    operator_cert_lifetime: std::time::Duration,
}

/// A certificate lifetime: at least 10 s (a shorter one could expire
/// before an agent is able to renew it), at most 10 years (the CA's).
fn lifetime(s: &str) -> Result<std::time::Duration, String> {
    let d = corral_coordinator::config::parse_duration(s)?;
    if d < std::time::Duration::from_secs(10) || d > std::time::Duration::from_secs(3650 * 86_400) {
        return Err(format!(
            "{s}: a certificate lifetime must be between 10s and 3650d"
        ));
    }
    Ok(d)
}

const DEFAULT_CONFIG: &str = "/etc/corral/coordinator.toml";

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
    let http_listen = match args.http_listen.as_str() {
        "off" | "" => None,
        a => {
            match a.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    eprintln!("error: --http-listen {a:?}: {e}: use HOST:PORT, e.g. 127.0.0.1:7403, or off");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
    };
    let config_path = args.config.or_else(|| {
        let p = PathBuf::from(DEFAULT_CONFIG);
        p.exists().then_some(p)
    });
    let file = match &config_path {
        Some(p) => match corral_coordinator::config::FileConfig::load(p) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => Default::default(),
    };
    if args.check_config {
        // The channels check their keys (secrets in the environment, CA
        // files) as they start; started here only to be checked.
        if let Err(e) = corral_coordinator::notify::Notifier::start(&file.notify) {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
        match &config_path {
            Some(p) => println!("{}: valid", p.display()),
            None => {
                println!("no configuration file ({DEFAULT_CONFIG} does not exist): defaults apply")
            }
        }
        return std::process::ExitCode::SUCCESS;
    }
    if let Some(p) = &config_path {
        tracing::info!(config = %p.display(), "configuration loaded");
    }
    let config = corral_coordinator::Config {
        state_dir: args.state_dir,
        pki_dir: args.pki_dir,
        listen: args.listen,
        http_listen,
        file,
        lifetimes: corral_coordinator::service::identities::Lifetimes {
            node: args.node_cert_lifetime,
            operator: args.operator_cert_lifetime,
        },
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
