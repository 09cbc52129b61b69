//! The Redis test harness shared by the driver's tests (see redis.rs).
#![allow(dead_code, unused_imports)]

#[path = "../scratch/mod.rs"]
mod scratch;

pub use corral_agent::engine::redis::{Redis, AGENT_USER};
pub use corral_agent::engine::{Backup, BackupInfo, Driver, EngineSpec, Health, Secrets, Upstream};
pub use redis::aio::MultiplexedConnection;
pub use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
pub use std::os::unix::fs::{MetadataExt, PermissionsExt};
pub use std::path::{Path, PathBuf};
pub use std::sync::Mutex;
pub use std::time::{Duration, Instant};

/// With a space, quotes and a backslash: redis.conf must quote it right.
pub const ADMIN_PASSWORD: &str = "admin pass \"quoted\" \\ 0123456789";
pub const REPLICATION_PASSWORD: &str = "replication-pass-0123456789";
pub const DIR_PREFIX: &str = "corral-redis-test-";

/// Retries `$body` (an expression yielding `Result<T, String>`, awaited
/// inside) every 20 ms until Ok, panicking with the last error after
/// `$secs` seconds.
#[macro_export]
macro_rules! eventually {
    ($what:expr, $secs:expr, $body:expr) => {{
        let deadline = Instant::now() + Duration::from_secs($secs);
        loop {
            let r: Result<_, String> = async { $body }.await;
            match r {
                Ok(v) => break v,
                Err(e) if Instant::now() > deadline => {
                    panic!("{} did not happen within {}s: {}", $what, $secs, e)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }};
}

/// The state directories of this run: servers killed and directories
/// removed when dropped, whether the test passed or panicked.
pub struct Dirs(pub Vec<PathBuf>);

impl Drop for Dirs {
    fn drop(&mut self) {
        for d in &self.0 {
            kill_servers_in(d);
            // CORRAL_TEST_KEEP=1 keeps them (the servers' logs) to look at.
            if std::env::var_os("CORRAL_TEST_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// SIGKILLs any redis-server whose pid file lies under `dir`.
pub fn kill_servers_in(dir: &Path) {
    for name in ["redis.pid", "clone.pid", "restore.pid"] {
        let pidfile = dir.join("redis/run").join(name);
        let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "redis-server" {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Removes the directories (and servers) of earlier runs whose process is gone.
pub fn sweep_stale() {
    scratch::sweep_stale(&std::env::temp_dir(), DIR_PREFIX, |dir| {
        kill_servers_in(dir)
    });
}

pub fn free_port(taken: &[u16]) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if !taken.contains(&p) {
            return p;
        }
    }
}

pub struct Node {
    pub id: &'static str,
    pub dir: PathBuf,
    pub port: u16,
    pub driver: Redis,
    /// The server we started (reaped when it stops).
    pub child: Option<tokio::process::Child>,
    /// The certificate the server presents, when made [`Node::with_tls`].
    pub tls: Option<std::sync::Arc<corral_agent::engine::tls::EngineTls>>,
}

impl Node {
    pub fn new(id: &'static str, dir: PathBuf, port: u16) -> Node {
        std::fs::create_dir_all(&dir).unwrap();
        Node {
            id,
            driver: Redis::new(&dir, id),
            dir,
            port,
            child: None,
            tls: None,
        }
    }

    /// The node with a certificate from `ca` for its server, as the agent
    /// gives its node certificate.
    pub fn with_tls(mut self, ca: &corral_proto::pki::CertAuthority) -> Node {
        use corral_agent::engine::tls::{EngineTls, TlsMaterial};
        let node = corral_proto::identity::Identity::Node(self.id.to_string());
        // Also named localhost, so a test client can verify it by name.
        let cert = ca.issue(&node, &["localhost".into()]).unwrap();
        let tls = std::sync::Arc::new(EngineTls::new(TlsMaterial::new(&cert, ca.cert_pem())));
        self.driver = Redis::new(&self.dir, self.id).with_tls(tls.clone());
        self.tls = Some(tls);
        self
    }

    pub fn base(&self) -> PathBuf {
        self.dir.join("redis")
    }

    pub fn upstream(&self) -> Upstream {
        Upstream {
            node: self.id.into(),
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    pub fn primary(&self, sync: bool, replicas: &[&str]) -> EngineSpec {
        EngineSpec {
            cluster: "cache".into(),
            engine: "redis".into(),
            role: "primary".into(),
            port: self.port,
            admin_user: "admin".into(),
            database: "defaultdb".into(),
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            sync,
            upstream: None,
            wal_archive: false,
            require_client_tls: false,
        }
    }

    pub fn replica_of(&self, up: &Node) -> EngineSpec {
        EngineSpec {
            role: "replica".into(),
            replicas: vec![],
            sync: false,
            upstream: Some(up.upstream()),
            ..self.primary(false, &[])
        }
    }

    /// Clones `spec` (a replica's) from `up` as the agent does, writes
    /// its configuration and starts it.
    pub async fn clone_and_start(&mut self, spec: &EngineSpec, up: &Node) {
        self.driver.save_secrets(&Node::secrets()).unwrap();
        self.driver
            .clone_data(spec, &up.upstream(), &|_, _| {})
            .await
            .unwrap();
        self.driver.prepare(spec).await.unwrap();
        self.start(spec).await;
    }

    pub fn secrets() -> Secrets {
        Secrets {
            admin_password: ADMIN_PASSWORD.into(),
            replication_password: REPLICATION_PASSWORD.into(),
        }
    }

    pub async fn start(&mut self, spec: &EngineSpec) {
        assert!(
            self.driver.find_running().is_none(),
            "{} already runs",
            self.id
        );
        self.child = Some(self.driver.start(spec).await.unwrap());
        eventually!(format!("{} answering", self.id), 20, {
            self.driver
                .check(spec)
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        });
        assert!(
            self.driver.find_running().is_some(),
            "{} has no pid file",
            self.id
        );
    }

    /// Stops the server as the agent does; returns its stopped position.
    pub async fn stop(&mut self) -> (u64, String) {
        let pid = self
            .driver
            .find_running()
            .unwrap_or_else(|| panic!("{} is not running", self.id));
        self.driver.stop(pid).await.unwrap();
        assert!(self.driver.find_running().is_none());
        if let Some(mut c) = self.child.take() {
            let status = c.wait().await.unwrap();
            assert!(status.success(), "{} exited with {status}", self.id);
        }
        self.driver.stopped_position().await.unwrap()
    }

    pub async fn health(&self, spec: &EngineSpec) -> Result<Health, String> {
        self.driver.check(spec).await.map_err(|e| format!("{e:#}"))
    }

    /// A TCP client session, as the admin user.
    pub async fn admin(&self) -> MultiplexedConnection {
        connect(self.port, Some("admin"), Some(ADMIN_PASSWORD))
            .await
            .unwrap()
    }

    /// A session as the agent's own ACL user (its password from the
    /// driver's secrets.json), for what an admin may not do.
    pub async fn agent(&self) -> MultiplexedConnection {
        let text = std::fs::read_to_string(self.base().join("secrets.json")).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let password = doc["agent_password"].as_str().unwrap();
        assert_eq!(password.len(), 64, "the agent's password is its own");
        connect(self.port, Some(AGENT_USER), Some(password))
            .await
            .unwrap()
    }
}

pub async fn connect(
    port: u16,
    user: Option<&str>,
    password: Option<&str>,
) -> redis::RedisResult<MultiplexedConnection> {
    let mut settings = RedisConnectionInfo::default();
    if let Some(u) = user {
        settings = settings.set_username(u);
    }
    if let Some(p) = password {
        settings = settings.set_password(p);
    }
    connect_with(port, settings).await
}

/// A connection to the server on `port` with `settings` (user, password,
/// database), with 5 s connection and response timeouts.
pub async fn connect_with(
    port: u16,
    settings: RedisConnectionInfo,
) -> redis::RedisResult<MultiplexedConnection> {
    let info = ConnectionAddr::Tcp("127.0.0.1".into(), port)
        .into_connection_info()?
        .set_redis_settings(settings);
    redis::Client::open(info)?
        .get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(5))),
        )
        .await
}

pub async fn set(c: &mut MultiplexedConnection, k: &str, v: &str) -> Result<(), String> {
    redis::cmd("SET")
        .arg(k)
        .arg(v)
        .query_async::<()>(c)
        .await
        .map_err(|e| e.to_string())
}

pub async fn get(c: &mut MultiplexedConnection, k: &str) -> Result<Option<String>, String> {
    redis::cmd("GET")
        .arg(k)
        .query_async::<Option<String>>(c)
        .await
        .map_err(|e| e.to_string())
}

/// Waits until `node` holds `k` = `v` (read over a fresh session each time).
pub async fn wait_for_key(node: &Node, k: &str, v: &str) {
    eventually!(format!("{k} on {}", node.id), 20, {
        match connect(node.port, Some("admin"), Some(ADMIN_PASSWORD)).await {
            Ok(mut c) => match get(&mut c, k).await {
                Ok(Some(got)) if got == v => Ok(()),
                other => Err(format!("{other:?}")),
            },
            Err(e) => Err(e.to_string()),
        }
    });
}

/// Whether an error (as the redis crate prints it: "NoPerm: ...",
/// "NOREPLICAS: ...") carries the server's error `code`.
pub fn refused(err: &str, code: &str) -> bool {
    err.to_ascii_uppercase().contains(code)
}

pub fn mode_and_owner(p: &Path) -> (u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.permissions().mode() & 0o777, m.uid())
}
