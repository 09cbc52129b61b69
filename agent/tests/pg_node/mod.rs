//! The PostgreSQL test harness shared by the driver's tests: nodes with
//! a state directory and a server of their own (see postgres.rs).
#![allow(dead_code)]

use corral_agent::engine::postgres::Postgres;
pub use corral_agent::engine::{
    Backup, BackupInfo, Driver, EngineSpec, Recovery, Secrets, Upstream,
};
use corral_proto::pb;
#[path = "../scratch/mod.rs"]
mod scratch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

pub const PREFIX: &str = "corral-pgbk-test-";
pub const WAIT: Duration = Duration::from_secs(60);

pub fn bin_dir() -> PathBuf {
    std::env::var_os("CORRAL_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

pub fn secrets() -> Secrets {
    Secrets {
        admin_password: "adm'in\\pass-0123456789".into(),
        replication_password: "re'pl\\pass-0123456789".into(),
    }
}

/// The pids of live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) && corral_agent::engine::process_alive(pid as u32) {
            found.push(pid);
        }
    }
    found
}

/// Stops every process (servers, tools) started on a directory under `dir`.
pub fn kill_servers(dir: &Path) {
    use nix::sys::signal::{kill, Signal};
    let needle = dir.to_string_lossy().into_owned();
    for sig in [Signal::SIGQUIT, Signal::SIGKILL] {
        let pids = processes_mentioning(&needle);
        if pids.is_empty() {
            return;
        }
        for pid in &pids {
            let _ = kill(nix::unistd::Pid::from_raw(*pid), sig);
        }
        let began = Instant::now();
        while !processes_mentioning(&needle).is_empty() && began.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes the directories (and servers) of test runs that are gone.
pub fn sweep_stale() {
    scratch::sweep_stale(Path::new("/tmp"), PREFIX, kill_servers);
}

pub use scratch::free_port;

/// One node: a driver, its state directory, its port, its running server.
pub struct Node {
    pub id: String,
    pub dir: PathBuf,
    pub port: u16,
    pub driver: Postgres,
    pub child: Option<tokio::process::Child>,
    /// The certificate the server presents, when made [`Node::with_tls`].
    pub tls: Option<std::sync::Arc<corral_agent::engine::tls::EngineTls>>,
}

impl Node {
    pub fn new(id: &str) -> Node {
        static SWEEP: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(sweep_stale);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/{PREFIX}{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Node {
            id: id.into(),
            driver: Postgres::new(bin_dir(), &dir, id),
            dir,
            port: free_port(),
            child: None,
            tls: None,
        }
    }

    /// The node with a certificate from `ca` for its server, as the agent
    /// gives its node certificate.
    pub fn with_tls(mut self, ca: &corral_proto::pki::CertAuthority) -> Node {
        use corral_agent::engine::tls::{EngineTls, TlsMaterial};
        let node = corral_proto::identity::Identity::Node(self.id.clone());
        let cert = ca.issue(&node, &[]).unwrap();
        let tls = std::sync::Arc::new(EngineTls::new(TlsMaterial::new(&cert, ca.cert_pem())));
        self.driver = Postgres::new(bin_dir(), &self.dir, &self.id).with_tls(tls.clone());
        self.tls = Some(tls);
        self
    }

    pub fn upstream(&self) -> Upstream {
        Upstream {
            node: self.id.clone(),
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    pub fn primary_spec(&self, replicas: &[&str], wal_archive: bool) -> EngineSpec {
        EngineSpec {
            cluster: "orders".into(),
            engine: "postgres".into(),
            role: "primary".into(),
            port: self.port,
            admin_user: "admin".into(),
            database: "app".into(),
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            sync: false,
            upstream: None,
            wal_archive,
            require_client_tls: false,
        }
    }

    pub fn replica_spec(&self, upstream: &Node) -> EngineSpec {
        EngineSpec {
            role: "replica".into(),
            upstream: Some(upstream.upstream()),
            ..self.primary_spec(&[], false)
        }
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.driver.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A new cluster's primary, as the agent's converge_primary makes it.
    pub async fn new_primary(&mut self, spec: &EngineSpec) {
        self.driver.save_secrets(&secrets()).unwrap();
        self.driver.initialize().await.unwrap();
        self.driver.prepare(spec).await.unwrap();
        self.start(spec).await;
        self.driver.bootstrap(spec, &secrets()).await.unwrap();
        self.driver.converge_slots(spec).await.unwrap();
    }

    /// A replica of `upstream`, cloned and started as the agent's
    /// converge_replica makes it; returns its spec.
    pub async fn new_replica(&mut self, upstream: &Node) -> EngineSpec {
        let spec = self.replica_spec(upstream);
        self.driver.save_secrets(&secrets()).unwrap();
        self.driver
            .clone_data(&spec, &upstream.upstream(), &|_, _| {})
            .await
            .unwrap();
        self.driver.prepare(&spec).await.unwrap();
        self.start(&spec).await;
        spec
    }

    /// Starts the server and waits until a health check passes.
    pub async fn start(&mut self, spec: &EngineSpec) -> pb::Replication {
        assert!(
            self.driver.find_running().is_none(),
            "{} already runs",
            self.id
        );
        self.child = Some(self.driver.start(spec).await.unwrap());
        self.wait(spec, "answer health checks", |_| true).await
    }

    pub async fn wait(
        &self,
        spec: &EngineSpec,
        what: &str,
        ok: impl Fn(&pb::Replication) -> bool,
    ) -> pb::Replication {
        let began = Instant::now();
        loop {
            let last = match self.driver.check(spec).await {
                Ok(h) if ok(&h.replication) => {
                    assert!(h.version.starts_with("15."), "version {}", h.version);
                    return h.replication;
                }
                Ok(h) => format!("{:?}", h.replication),
                Err(e) => format!("{e:#}"),
            };
            if began.elapsed() > WAIT {
                panic!(
                    "{} did not {what} within {} s; last: {last}\nserver log:\n{}",
                    self.id,
                    WAIT.as_secs(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A session over the socket as postgres, in database `db`.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(self.driver.socket_dir())
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{}", self.id, self.log()));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    pub async fn sql(&self, sql: &str) {
        self.client("app")
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} on {}: {e}", self.id));
    }

    /// The ids in table t, sorted.
    pub async fn ids(&self) -> Vec<i32> {
        self.client("app")
            .await
            .query("SELECT id FROM t ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn setting(&self, name: &str) -> String {
        self.client("postgres")
            .await
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .unwrap()
            .get(0)
    }

    /// A backup of this node's running server into memory.
    pub fn backup(&self, spec: &EngineSpec) -> (Vec<u8>, BackupInfo) {
        let mut buf = Vec::new();
        let calls = AtomicU64::new(0);
        let last = AtomicU64::new(0);
        let progress = |done: u64, _total: u64| {
            calls.fetch_add(1, Ordering::SeqCst);
            last.store(done, Ordering::SeqCst);
        };
        let info = tokio::task::block_in_place(|| self.driver.backup(spec, &mut buf, &progress))
            .unwrap_or_else(|e| panic!("backup of {}: {e:#}", self.id));
        assert!(calls.load(Ordering::SeqCst) > 0, "progress was reported");
        assert_eq!(last.load(Ordering::SeqCst), buf.len() as u64);
        (buf, info)
    }

    pub fn restore(&self, spec: &EngineSpec, stream: &[u8], recovery: Option<&Recovery>) {
        let mut input = stream;
        tokio::task::block_in_place(|| self.driver.restore(spec, &mut input, recovery))
            .unwrap_or_else(|e| panic!("restore into {}: {e:#}", self.id));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill_servers(&self.dir);
        if std::env::var_os("CORRAL_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
