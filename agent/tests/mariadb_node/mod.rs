//! The MariaDB test harness shared by the driver's tests: nodes with a
//! state directory and a server of their own (see mariadb.rs).
#![allow(dead_code)]

use corral_agent::engine::mariadb::Mariadb;
pub use corral_agent::engine::{Driver, EngineSpec, Secrets, Upstream};
use corral_proto::pb;
pub use mysql_async::prelude::*;
#[path = "../scratch/mod.rs"]
mod scratch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

pub const PREFIX: &str = "corral-mariadb-test-";
pub const WAIT: Duration = Duration::from_secs(30);

/// Quotes and backslashes: the driver must quote them right everywhere
/// (CHANGE MASTER, mariadb-dump's environment, the accounts).
pub fn secrets() -> Secrets {
    Secrets {
        admin_password: "adm'in\\pass-0123456789".into(),
        replication_password: "re'pl\\pass-0123456789".into(),
    }
}

/// Kills the mariadbd processes whose pid files are under `dir`.
pub fn kill_servers(dir: &Path) {
    for name in ["mariadbd.pid", "temp.pid", "byhand.pid", "restore.pid"] {
        let path = dir.join("mariadb/run").join(name);
        let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        // Only a server of this directory: a stale pid may be anybody's now.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let began = Instant::now();
            while Path::new(&format!("/proc/{pid}/comm")).exists()
                && began.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
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
    pub driver: Mariadb,
    pub child: Option<tokio::process::Child>,
    /// The admin password clients use.
    pub password: String,
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
            driver: Mariadb::new(&dir, id),
            dir,
            port: free_port(),
            child: None,
            password: secrets().admin_password,
        }
    }

    /// The node with a certificate from `ca` for its server, as the agent
    /// gives its node certificate.
    pub fn with_tls(mut self, ca: &corral_proto::pki::CertAuthority) -> Node {
        use corral_agent::engine::tls::{EngineTls, TlsMaterial};
        let node = corral_proto::identity::Identity::Node(self.id.clone());
        let cert = ca.issue(&node, &[]).unwrap();
        let tls = EngineTls::new(TlsMaterial::new(&cert, ca.cert_pem()));
        self.driver = Mariadb::new(&self.dir, &self.id).with_tls(tls.into());
        self
    }

    pub fn base(&self) -> PathBuf {
        self.dir.join("mariadb")
    }

    pub fn upstream(&self) -> Upstream {
        Upstream {
            node: self.id.clone(),
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    pub fn primary_spec(&self, replicas: &[&str], sync: bool) -> EngineSpec {
        EngineSpec {
            cluster: "orders".into(),
            engine: "mariadb".into(),
            role: "primary".into(),
            port: self.port,
            admin_user: "admin".into(),
            database: "app".into(),
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            sync,
            upstream: None,
            wal_archive: false,
            require_client_tls: false,
        }
    }

    pub fn replica_spec(&self, upstream: &Node) -> EngineSpec {
        EngineSpec {
            role: "replica".into(),
            replicas: vec![],
            sync: false,
            upstream: Some(upstream.upstream()),
            ..self.primary_spec(&[], false)
        }
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.driver.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// This node as a new cluster's first node, running as a primary with
    /// table `t` (as the agent's converge_primary makes it); returns its
    /// spec.
    pub async fn make_primary(&mut self) -> EngineSpec {
        self.driver.save_secrets(&secrets()).unwrap();
        self.driver.initialize().await.unwrap();
        let spec = self.primary_spec(&[], false);
        self.driver.prepare(&spec).await.unwrap();
        self.start(&spec).await;
        self.driver.bootstrap(&spec, &secrets()).await.unwrap();
        self.driver.converge_slots(&spec).await.unwrap();
        let mut c = self.client().await;
        c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, note VARCHAR(100))")
            .await
            .unwrap();
        spec
    }

    /// A replica of `upstream`, cloned and started as the agent makes
    /// one; returns its spec.
    pub async fn new_replica(&mut self, upstream: &Node) -> EngineSpec {
        self.driver.save_secrets(&secrets()).unwrap();
        let spec = self.replica_spec(upstream);
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

    /// Stops the server cleanly; returns its stopped position.
    pub async fn stop(&mut self) -> (u64, String) {
        let pid = self
            .driver
            .find_running()
            .unwrap_or_else(|| panic!("{} is not running", self.id));
        self.driver.stop(pid).await.unwrap();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait().await;
        }
        assert!(self.driver.find_running().is_none());
        self.driver.stopped_position().await.unwrap()
    }

    /// Polls health checks (which converge replication) until `ok`.
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
                    assert!(h.version.contains("MariaDB"), "version {}", h.version);
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

    /// A client session over TCP as the cluster's admin user.
    pub async fn client(&self) -> mysql_async::Conn {
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(self.port)
            .user(Some("admin"))
            .pass(Some(self.password.clone()))
            .db_name(Some("app"))
            .prefer_socket(false);
        mysql_async::Conn::new(opts)
            .await
            .unwrap_or_else(|e| panic!("connecting to {} as admin: {e}", self.id))
    }

    pub async fn insert(&self, id: u32, note: &str) -> Result<(), mysql_async::Error> {
        let mut c = self.client().await;
        let r = c
            .exec_drop("INSERT INTO t (id, note) VALUES (?, ?)", (id, note))
            .await;
        let _ = c.disconnect().await;
        r
    }

    pub async fn has_row(&self, id: u32) -> bool {
        let mut c = self.client().await;
        let n: Option<i64> = c
            .exec_first("SELECT COUNT(*) FROM t WHERE id = ?", (id,))
            .await
            .unwrap();
        let _ = c.disconnect().await;
        n == Some(1)
    }

    /// Waits until row `id` is there.
    pub async fn wait_row(&self, id: u32) {
        let began = Instant::now();
        while !self.has_row(id).await {
            if began.elapsed() > WAIT {
                panic!(
                    "row {id} did not reach {} within {} s\nserver log:\n{}",
                    self.id,
                    WAIT.as_secs(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Starts the stopped data by hand as a writable standalone server,
    /// commits one row as root over its socket, and stops it: an errant
    /// transaction, as a partitioned old primary would have.
    pub async fn write_errant_row(&self, id: u32) {
        let mysql = nix::unistd::User::from_name("mysql").unwrap().unwrap();
        let run = self.base().join("run");
        let socket = run.join("byhand.sock");
        let mut server = tokio::process::Command::new("/usr/sbin/mariadbd")
            .arg(format!(
                "--defaults-file={}",
                self.base().join("my.cnf").display()
            ))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", run.join("byhand.pid").display()))
            .args(["--skip-networking", "--read-only=OFF"])
            .uid(mysql.uid.as_raw())
            .gid(mysql.gid.as_raw())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let opts = mysql_async::OptsBuilder::default()
            .socket(Some(socket.to_string_lossy().into_owned()))
            .user(Some("root"));
        let began = Instant::now();
        let mut c = loop {
            if let Ok(c) = mysql_async::Conn::new(opts.clone()).await {
                break c;
            }
            assert!(
                began.elapsed() < WAIT,
                "the hand-started server did not answer"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        c.exec_drop("INSERT INTO app.t (id, note) VALUES (?, 'errant')", (id,))
            .await
            .unwrap();
        let _ = c.query_drop("SHUTDOWN").await;
        let status = tokio::time::timeout(WAIT, server.wait()).await.unwrap();
        assert!(status.unwrap().success());
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
