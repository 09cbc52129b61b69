use anyhow::{Context, Result};
use clap::Parser;
use corral_agent::{
    backup, credentials, engine, enroll, events, firewall, health, heartbeat, logs, members,
    metrics, peers, renew, server, watchdog, Config,
};
use corral_proto::pb;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Corral node agent: supervises the database engine on this VM, reports to
/// the coordinator and executes its steps.
#[derive(Parser, Debug)]
#[command(name = "corral-agent", version)]
struct Args {
    /// Holds the node's key, certificate and the engine's data.
    #[arg(
        long,
        env = "CORRAL_STATE_DIR",
        default_value = "/var/lib/corral-agent"
    )]
    state_dir: PathBuf,
    /// The coordinator's host:port.
    #[arg(long, env = "CORRAL_COORDINATOR")]
    coordinator: String,
    /// Where the agent's API listens; also the address it advertises, so use
    /// this VM's own IP, not 0.0.0.0.
    #[arg(long, env = "CORRAL_LISTEN")]
    listen: SocketAddr,
    /// Join token from `corralctl token create`, needed on the first start
    /// only; `-` reads it from standard input. Prefer --join-file: a token
    /// on the command line is visible to every user of the machine (ps).
    #[arg(long, env = "CORRAL_JOIN_TOKEN", conflicts_with = "join_file")]
    join: Option<String>,
    /// A file holding the join token (first line); read only when the node
    /// is not enrolled yet, so it may be deleted afterwards.
    #[arg(long, env = "CORRAL_JOIN_FILE", value_name = "PATH")]
    join_file: Option<PathBuf>,
    /// This node's id (default: the hostname).
    #[arg(long, env = "CORRAL_NODE_ID")]
    node_id: Option<String>,
    #[arg(long, env = "CORRAL_HEARTBEAT_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    heartbeat_interval_ms: u64,
    /// Where the plain-HTTP health endpoints for load balancers listen
    /// (/primary, /replica, /health). Default: the --listen address, port 7402.
    #[arg(long, env = "CORRAL_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// Directory with PostgreSQL's initdb and postgres.
    #[arg(
        long,
        env = "CORRAL_PG_BIN_DIR",
        default_value = "/usr/lib/postgresql/15/bin"
    )]
    pg_bin_dir: PathBuf,
    /// The server the redis, valkey and keydb engines run: a name looked
    /// for in /usr/bin, /usr/local/bin, ... (redis-server, valkey-server,
    /// keydb-server) or a path. They speak the same protocol.
    #[arg(long, env = "CORRAL_REDIS_SERVER", default_value = "redis-server")]
    redis_server: String,
}

/// Port of the health endpoints unless --health-listen says otherwise.
const DEFAULT_HEALTH_PORT: u16 = 7402;

#[tokio::main]
async fn main() -> ExitCode {
    corral_proto::tls::install_crypto_provider();
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let args = match <Args as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    init_tracing(&args.state_dir);
    let on_command_line =
        matches.value_source("join") == Some(clap::parser::ValueSource::CommandLine);
    if on_command_line && args.join.as_deref() != Some("-") {
        tracing::warn!(
            "a join token on the command line is visible to every user of this machine (ps): \
             use --join-file PATH (or --join - for standard input, or CORRAL_JOIN_TOKEN)"
        );
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<enroll::Refused>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Logs to stderr (journald under systemd) and to
/// `<state_dir>/log/agent.log` (see [`logs::writer`]), both stamped with
/// RFC 3339 UTC times. Without the file (say, a read-only state directory)
/// the agent still runs, logging to stderr alone.
fn init_tracing(state_dir: &std::path::Path) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let path = logs::writer::agent_log(state_dir);
    let (file, file_error) =
        match logs::writer::RotatingFile::open(path.clone(), logs::writer::MAX_BYTES) {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(e)),
        };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_env("CORRAL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(file.map(|f| {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(f)
        }))
        .init();
    if let Some(e) = file_error {
        tracing::warn!("not logging to {}: {e}", path.display());
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The agent's settings from its flags, and its state directory made
/// ready (created, traversable for the engines' users).
fn config_of(args: &Args) -> Result<Config> {
    if args.listen.ip().is_unspecified() {
        anyhow::bail!(
            "--listen {} is advertised to the coordinator, so it must be this VM's own address, not {}",
            args.listen,
            args.listen.ip()
        );
    }
    let config = Config {
        state_dir: args.state_dir.clone(),
        coordinator: args.coordinator.clone(),
        listen: args.listen,
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
        pg_bin_dir: args.pg_bin_dir.clone(),
        health_listen: args
            .health_listen
            .unwrap_or_else(|| SocketAddr::new(args.listen.ip(), DEFAULT_HEALTH_PORT)),
    };
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            config.state_dir.display()
        )
    })?;
    // Secrets inside are 0600; the directory itself must stay traversable for
    // the postgres user, whose data lives below it.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("chmod {}", config.state_dir.display()))?;
    }
    Ok(config)
}

/// How to enroll, if this node has no certificate yet.
fn join_of(args: Args) -> enroll::Join {
    match (args.join, args.join_file) {
        (_, Some(path)) => enroll::Join::File(path),
        (Some(t), None) if t == "-" => enroll::Join::Stdin,
        (Some(t), None) => enroll::Join::Token(t),
        (None, None) => enroll::Join::None,
    }
}

/// One driver per engine name the coordinator may ask for, each presenting
/// the node's certificate.
fn drivers(
    config: &Config,
    node_id: &str,
    redis_server: &str,
    engine_tls: &Arc<engine::tls::EngineTls>,
) -> engine::Drivers {
    let postgres: Arc<dyn engine::Driver> = Arc::new(
        engine::postgres::Postgres::new(config.pg_bin_dir.clone(), &config.state_dir, node_id)
            .with_tls(engine_tls.clone()),
    );
    let redis: Arc<dyn engine::Driver> = Arc::new(
        engine::redis::Redis::new(&config.state_dir, node_id)
            .with_server(redis_server)
            .with_tls(engine_tls.clone()),
    );
    let mariadb: Arc<dyn engine::Driver> = Arc::new(
        engine::mariadb::Mariadb::new(&config.state_dir, node_id).with_tls(engine_tls.clone()),
    );
    vec![
        ("postgres", postgres),
        ("mariadb", mariadb.clone()),
        ("mysql", mariadb),
        ("redis", redis.clone()),
        ("valkey", redis.clone()),
        ("keydb", redis),
    ]
}

/// The HTTP health endpoints and the agent's own /metrics.
fn spawn_health(
    health_addr: SocketAddr,
    engine: Arc<engine::Engine>,
    telemetry: Arc<metrics::Telemetry>,
    node: String,
) -> tokio::task::JoinHandle<()> {
    let exporter = health::Exporter {
        engine: engine.clone(),
        telemetry,
        node,
    };
    tokio::spawn(async move {
        if let Err(e) = health::serve(health_addr, engine, exporter).await {
            tracing::error!("{e:#}");
        }
    })
}

/// This node's certificate: the stored one, or a new one from enrolling
/// with the join token (under `--node-id`, the stored id or the hostname).
async fn enroll_node(config: &Config, args: Args) -> Result<enroll::NodeIdentity> {
    let stored = enroll::load(&config.state_dir)?;
    let node_id = args
        .node_id
        .clone()
        .or_else(|| stored.as_ref().map(|s| s.info.node_id.clone()))
        .unwrap_or_else(hostname);
    let join = join_of(args);
    enroll::ensure(&config.state_dir, &config.coordinator, &join, &node_id).await
}

async fn run(args: Args) -> Result<()> {
    let config = config_of(&args)?;
    let redis_server = args.redis_server.clone();
    let identity = enroll_node(&config, args).await?;
    tracing::info!(node = %identity.info.node_id, coordinator = %config.coordinator, "agent starting");

    let events = Arc::new(events::Events::new());
    // The engines present the node's certificate to their clients and
    // replicas (renewed with it).
    let engine_tls = Arc::new(engine::tls::EngineTls::new(engine::tls::TlsMaterial::new(
        &identity.cert,
        &identity.ca_pem,
    )));
    let drivers = drivers(&config, &identity.info.node_id, &redis_server, &engine_tls);
    let health_listen = config.health_listen;
    let engine = engine::Engine::new(
        config.state_dir.clone(),
        drivers,
        events.clone(),
        firewall::Firewall::new(),
        Some(health_listen.port()),
    );
    if let Err(e) = engine.resume().await {
        // Reported through the engine status; the agent keeps running so the
        // coordinator can see it.
        tracing::error!("resuming the engine: {e:#}");
    }
    // Only now the first network call: the fence is in place whatever
    // the lookup does (a resolver can take seconds to answer).
    tokio::spawn(resolve_coordinator(
        engine.clone(),
        config.coordinator.clone(),
    ));

    // One certificate for every client and server, renewed in place.
    let creds = credentials::Credentials::new(
        &identity.info.node_id,
        &identity.ca_pem,
        identity.cert.clone(),
        &config.coordinator,
    )?;
    let members = Arc::new(members::Members::load(&config.state_dir));
    let renewals = tokio::spawn(renew::run(creds.clone(), config.state_dir.clone()));
    let engine_renewals = tokio::spawn(engine::tls::follow_renewals(
        creds.clone(),
        engine_tls,
        engine.clone(),
    ));
    let telemetry = Arc::new(metrics::Telemetry::default());
    let heartbeat = heartbeat::Heartbeat {
        creds: creds.clone(),
        members: members.clone(),
        interval: config.heartbeat_interval,
        address: config.listen.to_string(),
        sampler: metrics::Sampler::new(config.state_dir.clone())?,
        telemetry: telemetry.clone(),
        engine: engine.clone(),
        events,
    };
    let heartbeats = tokio::spawn(heartbeat.run());
    let archiver = Arc::new(backup::wal::Archiver::default());
    let wal_uploads = tokio::spawn(
        archiver
            .clone()
            .run(engine.clone(), config.state_dir.clone()),
    );
    let guardian = tokio::spawn(engine.clone().guard(watchdog::Watchdog::from_env()));
    let peers = Arc::new(peers::Peers::new(creds.clone()));
    let rounds = tokio::spawn(peers.run(engine.clone()));
    let health = spawn_health(
        health_listen,
        engine.clone(),
        telemetry,
        identity.info.node_id.clone(),
    );

    let stop = Stop::default();
    let incoming = corral_proto::tls::serve_tls_live(
        config.listen,
        creds.server.clone(),
        &identity.ca_pem,
        false,
    )
    .await?;
    // systemd (Type=notify) counts the agent started once it has fenced and
    // listens.
    watchdog::ready();
    let serve = tonic::transport::Server::builder()
        .add_service(pb::agent_server::AgentServer::new(server::AgentApi {
            engine: engine.clone(),
            backups: backup::Backups::new(
                engine.clone(),
                identity.info.node_id.clone(),
                config.state_dir.clone(),
            ),
            archiver: archiver.clone(),
            agent_log: logs::writer::agent_log(&config.state_dir),
        }))
        .add_service(pb::peer_server::PeerServer::new(server::PeerApi {
            engine,
            members,
        }))
        .serve_with_incoming_shutdown(incoming, stop.signalled());
    let result = stop
        .within_grace(serve)
        .await
        .with_context(|| format!("serving the agent API on {}", config.listen));
    for task in [
        heartbeats,
        guardian,
        rounds,
        health,
        wal_uploads,
        renewals,
        engine_renewals,
    ] {
        task.abort();
    }
    result
}

/// The coordinator's addresses are always allowed to reach the engine,
/// whatever the cluster's allowlist says: resolved in the background (and
/// again until it works), never before the first fence pass.
async fn resolve_coordinator(engine: Arc<engine::Engine>, coordinator: String) {
    loop {
        let looked_up = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::lookup_host(coordinator.clone()),
        )
        .await;
        match looked_up {
            Ok(Ok(addrs)) => {
                let ips = addrs.map(|a| a.ip().to_canonical()).collect();
                engine.set_coordinator_ips(ips).await;
                return;
            }
            Ok(Err(e)) => tracing::warn!(%coordinator, "resolving the coordinator: {e}"),
            Err(_) => tracing::warn!(%coordinator, "resolving the coordinator: no answer in 10 s"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// How long requests in flight may take to finish after SIGTERM: a step
/// waiting for an engine that cannot start must not keep the agent (and
/// systemd's stop) waiting for ever.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM or Ctrl-C, then at most [`SHUTDOWN_GRACE`] for the requests in
/// flight.
#[derive(Default)]
struct Stop(Arc<tokio::sync::Notify>);

impl Stop {
    fn signalled(&self) -> impl std::future::Future<Output = ()> + use<> {
        let notify = self.0.clone();
        async move {
            shutdown_signal().await;
            notify.notify_one();
        }
    }

    async fn within_grace<T>(
        &self,
        serve: impl std::future::Future<Output = Result<T, tonic::transport::Error>>,
    ) -> Result<(), tonic::transport::Error> {
        tokio::select! {
            r = serve => r.map(|_| ()),
            _ = async {
                self.0.notified().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("requests still running {} s after the signal: stopping without them", SHUTDOWN_GRACE.as_secs());
                Ok(())
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(e) => {
            tracing::warn!("no SIGTERM handler ({e}); stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    watchdog::stopping();
    tracing::info!("agent shutting down; the engine keeps running");
}
