//! The MariaDB driver against real servers, driven as the agent drives it.
//!
//! Each node is a `Mariadb` driver with a state directory of its own,
//! `/tmp/corral-mariadb-test-<pid>-<n>`, and a server on 127.0.0.1 at a free
//! port. A node's servers are killed and its directory removed when the
//! node is dropped, panic or not; a run that was killed leaves directories
//! whose pid is gone, and the next run sweeps them (servers included).
//! With `CORRAL_TEST_KEEP=1` the directories (server logs) stay until then.
//! Needs root (servers run as the `mysql` user) and MariaDB installed.
//!
//! Backups (the last tests): a backup of a primary and of a replica,
//! restored into a fresh node that the agent's usual steps (prepare, start,
//! bootstrap) turn into a primary; verify; a truncated stream; a writer
//! that fails mid-stream (needs mariadb-backup).

mod mariadb_node;

use corral_agent::engine::mariadb::Mariadb;
use corral_agent::engine::Backup;
use corral_proto::pb;
use mariadb_node::*;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};
fn is_read_only_refusal(e: &mysql_async::Error) -> bool {
    // ER_OPTION_PREVENTS_STATEMENT: "running with the --read-only option".
    matches!(e, mysql_async::Error::Server(s) if s.code == 1290)
}

fn standby<'a>(r: &'a pb::Replication, name: &str) -> Option<&'a pb::Standby> {
    r.standbys.iter().find(|s| s.name == name)
}

/// Primary A, replica B cloned from it; semi-sync; replica C; switchover to
/// B, C repointed to B while running; A rejoins B; A's errant transaction
/// makes a rejoin fail; a clone repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_switch_over_and_refuse_errant_transactions() {
    let secrets = secrets();
    let mut a = Node::new("vm-a");
    let mut b = Node::new("vm-b");
    let mut c3 = Node::new("vm-c");

    // Primary A, as a new cluster's first node.
    a.driver.save_secrets(&secrets).unwrap();
    a.driver.initialize().await.unwrap();
    assert!(a.driver.has_data());
    assert!(!a.driver.data_is_standby().unwrap());
    let a_spec = a.primary_spec(&[], false);
    a.driver.prepare(&a_spec).await.unwrap();
    let r = a.start(&a_spec).await;
    assert!(!r.in_recovery);
    a.driver.bootstrap(&a_spec, &secrets).await.unwrap();
    // Idempotent: a retried configure runs it again.
    a.driver.bootstrap(&a_spec, &secrets).await.unwrap();
    a.driver.converge_slots(&a_spec).await.unwrap();
    let mut c = a.client().await;
    c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, note VARCHAR(100))")
        .await
        .unwrap();
    for id in 1..=3 {
        a.insert(id, "before the clone").await.unwrap();
    }

    // Replica B, cloned from A.
    b.driver.save_secrets(&secrets).unwrap();
    let b_spec = b.replica_spec(&a);
    let reports = Mutex::new(Vec::new());
    b.driver
        .clone_data(&b_spec, &a.upstream(), &|done, total| {
            reports.lock().unwrap().push((done, total))
        })
        .await
        .unwrap();
    let reports = reports.into_inner().unwrap();
    assert!(
        reports
            .iter()
            .any(|(done, total)| *done > 0 && *total >= *done),
        "clone progress was not reported: {reports:?}"
    );
    assert!(b.driver.has_data());
    assert!(b.driver.data_is_standby().unwrap());
    b.driver.prepare(&b_spec).await.unwrap();
    b.start(&b_spec).await;
    let r = b
        .wait(&b_spec, "stream from A", |r| {
            r.in_recovery && r.streaming && r.upstream_host == "127.0.0.1"
        })
        .await;
    assert!(r.receive_lsn >= r.lsn && r.lsn > 0, "{r:?}");
    a.wait(&a_spec, "list B as a streaming standby", |r| {
        standby(r, "vm-b").is_some_and(|s| s.state == "streaming" && s.sync_state == "async")
    })
    .await;
    for id in 1..=3 {
        assert!(b.has_row(id).await, "row {id} was not cloned");
    }
    a.insert(4, "streamed").await.unwrap();
    b.wait_row(4).await;
    // The replica is read-only, for the admin user too.
    let refused = b.insert(50, "on a replica").await.unwrap_err();
    assert!(is_read_only_refusal(&refused), "{refused}");

    // Synchronous mode: commits wait for B.
    let a_sync = a.primary_spec(&["vm-b"], true);
    a.driver.prepare(&a_sync).await.unwrap();
    a.driver.converge_slots(&a_sync).await.unwrap();
    b.driver.converge_slots(&b_spec).await.unwrap();
    a.wait(&a_sync, "wait for B's acknowledgements", |r| {
        r.synchronous_standby_names == "semi-sync"
            && standby(r, "vm-b").is_some_and(|s| s.sync_state == "quorum")
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), a.insert(5, "acknowledged"))
        .await
        .expect("a commit with B streaming waits for nothing")
        .unwrap();
    b.stop().await;
    let a_port = a.port;
    let admin_password = secrets.admin_password.clone();
    let pending = tokio::spawn(async move {
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(a_port)
            .user(Some("admin"))
            .pass(Some(admin_password))
            .db_name(Some("app"))
            .prefer_socket(false);
        let mut c = mysql_async::Conn::new(opts).await?;
        c.query_drop("INSERT INTO t (id, note) VALUES (6, 'waited for B')")
            .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !pending.is_finished(),
        "a commit completed with its only synchronous replica down"
    );
    b.start(&b_spec).await;
    b.wait(&b_spec, "stream from A again", |r| r.streaming)
        .await;
    tokio::time::timeout(WAIT, pending)
        .await
        .expect("the commit did not complete once B was back")
        .unwrap()
        .unwrap();
    b.wait_row(6).await;

    // Replica C, also from A.
    let c_spec = c3.new_replica(&a).await;
    c3.wait(&c_spec, "stream from A", |r| r.streaming).await;
    c3.wait_row(6).await;

    // Switchover: stop A, B catches up, B is promoted, A follows B.
    let a_at = a.wait(&a_sync, "report its position", |_| true).await.lsn;
    let (a_stopped, state) = a.stop().await;
    assert_eq!(state, "shut down");
    assert_eq!(
        a_stopped, a_at,
        "the stopped position is the last transaction"
    );
    b.wait(&b_spec, "replay everything A wrote", |r| r.lsn >= a_stopped)
        .await;
    c3.wait(&c_spec, "replay everything A wrote", |r| r.lsn >= a_stopped)
        .await;
    let b_primary = b.primary_spec(&[], false);
    b.driver.prepare(&b_primary).await.unwrap();
    let began = Instant::now();
    b.driver.promote(&b_primary).await.unwrap();
    let promote_ms = began.elapsed().as_millis();
    assert!(promote_ms < 5000, "promotion took {promote_ms} ms");
    assert!(!b.driver.data_is_standby().unwrap());
    b.driver.converge_slots(&b_primary).await.unwrap();
    let r = b
        .wait(&b_primary, "report as a primary", |r| !r.in_recovery)
        .await;
    assert!(r.lsn >= a_stopped);
    // C follows B from here, without a restart.
    let c_from_b = c3.replica_spec(&b);
    c3.driver.prepare(&c_from_b).await.unwrap();
    c3.wait(&c_from_b, "stream from B", |r| r.streaming).await;
    b.insert(7, "written on B").await.unwrap();
    // A is down: only B can have sent it.
    c3.wait_row(7).await;
    let r = b.wait(&b_primary, "count B's write", |_| true).await;
    assert!(
        r.lsn > a_stopped,
        "B's own transactions continue A's sequence ({} after {a_stopped})",
        r.lsn
    );

    let a_replica = a.replica_spec(&b);
    a.driver.rejoin(&a_replica, &b.upstream()).await.unwrap();
    assert!(a.driver.data_is_standby().unwrap());
    a.driver.prepare(&a_replica).await.unwrap();
    a.start(&a_replica).await;
    a.wait(&a_replica, "stream from B", |r| {
        r.in_recovery && r.streaming
    })
    .await;
    a.wait_row(7).await;
    b.insert(8, "streamed to A").await.unwrap();
    a.wait_row(8).await;
    b.wait(&b_primary, "list A as a standby", |r| {
        standby(r, "vm-a").is_some()
    })
    .await;

    // An errant transaction on A: a rejoin must refuse it, ahead of B...
    let (_, state) = a.stop().await;
    assert_eq!(state, "shut down in recovery");
    a.write_errant_row(100).await;
    let err = a
        .driver
        .rejoin(&a_replica, &b.upstream())
        .await
        .expect_err("rejoined with an errant transaction");
    assert!(err.to_string().starts_with("diverged:"), "{err:#}");
    // ...and behind B, once B wrote more (same sequence numbers, another server).
    b.insert(9, "after the errant one").await.unwrap();
    b.insert(10, "after the errant one").await.unwrap();
    let err = a
        .driver
        .rejoin(&a_replica, &b.upstream())
        .await
        .expect_err("rejoined with an errant transaction behind the upstream");
    assert!(err.to_string().starts_with("diverged:"), "{err:#}");
    // What the agent does then: clone again.
    a.driver
        .clone_data(&a_replica, &b.upstream(), &|_, _| {})
        .await
        .unwrap();
    a.driver.prepare(&a_replica).await.unwrap();
    a.start(&a_replica).await;
    a.wait(&a_replica, "stream from B after the clone", |r| r.streaming)
        .await;
    a.wait_row(10).await;
    assert!(!a.has_row(100).await, "the errant row survived the clone");
    // The copy's binary log continues at the dump's position (so its own
    // transactions, after a promotion, would continue the sequence).
    let b_at = b
        .wait(&b_primary, "report its position", |_| true)
        .await
        .lsn;
    let (a_at, _) = a.stop().await;
    assert_eq!(
        a_at, b_at,
        "the clone's binary log does not start at its position"
    );
    a.start(&a_replica).await;
    b.insert(11, "after the clone").await.unwrap();
    a.wait_row(11).await;

    b.wait(&b_primary, "list both replicas", |r| {
        standby(r, "vm-a").is_some() && standby(r, "vm-c").is_some()
    })
    .await;
    a.stop().await;
    c3.stop().await;
    b.stop().await;
}

/// A fenced primary: sessions ended, writes refused, across a restart;
/// unfenced, writable again. Then wipe leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_survives_a_restart_and_wipe_erases() {
    let secrets = secrets();

    // Data that is not MariaDB's is never touched.
    let foreign = Node::new("vm-f");
    std::fs::create_dir_all(foreign.base().join("data")).unwrap();
    std::fs::write(foreign.base().join("data/precious"), "keep").unwrap();
    let err = foreign.driver.initialize().await.unwrap_err();
    assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    assert!(foreign.base().join("data/precious").exists());

    let mut n = Node::new("vm-c");
    n.driver.save_secrets(&secrets).unwrap();
    let secrets_file = n.base().join("secrets.json");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&secrets_file).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0));
    n.driver.initialize().await.unwrap();
    let meta = std::fs::metadata(n.base().join("data")).unwrap();
    let mysql = nix::unistd::User::from_name("mysql").unwrap().unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.uid()),
        (0o700, mysql.uid.as_raw())
    );
    let spec = n.primary_spec(&[], false);
    n.driver.prepare(&spec).await.unwrap();
    n.start(&spec).await;
    n.driver.bootstrap(&spec, &secrets).await.unwrap();
    n.driver.converge_slots(&spec).await.unwrap();

    // A second driver on the same state adopts the running server.
    let again = Mariadb::new(&n.dir, "vm-c");
    assert_eq!(again.find_running(), n.driver.find_running());
    assert!(again.check(&spec).await.is_ok());

    let mut session = n.client().await;
    session
        .query_drop("CREATE TABLE t (id INT PRIMARY KEY, note VARCHAR(100))")
        .await
        .unwrap();
    n.insert(1, "before the fence").await.unwrap();

    n.driver.set_fenced(&spec, true).await.unwrap();
    assert!(
        session.query_drop("SELECT 1").await.is_err(),
        "a session opened before the fence survived it"
    );
    let refused = n.insert(2, "fenced").await.unwrap_err();
    assert!(is_read_only_refusal(&refused), "{refused}");
    // Health checks leave the fence alone.
    n.wait(&spec, "answer while fenced", |r| !r.in_recovery)
        .await;
    let refused = n.insert(2, "fenced").await.unwrap_err();
    assert!(is_read_only_refusal(&refused), "{refused}");

    // Across a restart.
    let (_, state) = n.stop().await;
    assert_eq!(state, "shut down");
    n.start(&spec).await;
    let refused = n.insert(2, "fenced, restarted").await.unwrap_err();
    assert!(is_read_only_refusal(&refused), "{refused}");

    n.driver.set_fenced(&spec, false).await.unwrap();
    n.insert(2, "unfenced").await.unwrap();
    assert!(n.has_row(2).await);

    // Fencing a stopped server works too, and holds at its start.
    n.stop().await;
    n.driver.set_fenced(&spec, true).await.unwrap();
    n.start(&spec).await;
    let refused = n.insert(3, "fenced while stopped").await.unwrap_err();
    assert!(is_read_only_refusal(&refused), "{refused}");
    n.driver.set_fenced(&spec, false).await.unwrap();
    n.insert(3, "unfenced").await.unwrap();

    n.stop().await;
    n.driver.wipe().await.unwrap();
    n.driver.forget_secrets().unwrap();
    assert!(!n.driver.has_data());
    let left: Vec<String> = std::fs::read_dir(n.base())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["server.log"], "wipe left files behind");
}

// ------------------------------------------------------------- backups

/// Secrets of another cluster: what a restored node is bootstrapped with.
fn other_secrets() -> Secrets {
    Secrets {
        admin_password: "another-admin-pass-0123456789".into(),
        replication_password: "another-repl-pass-0123456789".into(),
    }
}

/// A new cluster's first node, running as a primary with `t` created.
async fn new_primary(id: &str) -> Node {
    let mut n = Node::new(id);
    n.make_primary().await;
    let mut c = n.client().await;
    c.query_drop("CREATE DATABASE extra").await.unwrap();
    c.query_drop("CREATE TABLE extra.u (k VARCHAR(10) PRIMARY KEY)")
        .await
        .unwrap();
    c.query_drop("INSERT INTO extra.u VALUES ('x'), ('y')")
        .await
        .unwrap();
    let _ = c.disconnect().await;
    n
}

/// The rows of `t`, in order.
async fn rows(n: &Node) -> Vec<(u32, String)> {
    let mut c = n.client().await;
    let r = c.query("SELECT id, note FROM t ORDER BY id").await.unwrap();
    let _ = c.disconnect().await;
    r
}

/// Backs `n` up into memory.
fn backup(n: &Node, spec: &EngineSpec) -> (Vec<u8>, corral_agent::engine::BackupInfo) {
    let mut buf = Vec::new();
    let reports = std::sync::Mutex::new(Vec::new());
    let began = Instant::now();
    let info = tokio::task::block_in_place(|| {
        n.driver.backup(spec, &mut buf, &|done, total| {
            reports.lock().unwrap().push((done, total))
        })
    })
    .unwrap_or_else(|e| panic!("backup of {}: {e:#}", n.id));
    eprintln!(
        "backup of {}: {} bytes in {} ms, {info:?}",
        n.id,
        buf.len(),
        began.elapsed().as_millis()
    );
    let reports = reports.into_inner().unwrap();
    assert_eq!(
        reports.last().copied(),
        Some((buf.len() as u64, buf.len() as u64)),
        "the last progress report is the whole stream"
    );
    (buf, info)
}

/// Restores `stream` into the fresh node `n` and runs it as the agent runs
/// a primary (configure: prepare, start, bootstrap, converge), with the new
/// cluster's secrets. Returns its spec and its position once started.
async fn restore_as_primary(n: &mut Node, stream: &[u8]) -> (EngineSpec, u64) {
    let secrets = other_secrets();
    n.password = secrets.admin_password.clone();
    n.driver.save_secrets(&secrets).unwrap();
    assert!(!n.driver.has_data());
    let spec = n.primary_spec(&[], false);
    let began = Instant::now();
    tokio::task::block_in_place(|| n.driver.restore(&spec, &mut &stream[..], None))
        .unwrap_or_else(|e| panic!("restore into {}: {e:#}", n.id));
    eprintln!("restore into {}: {} ms", n.id, began.elapsed().as_millis());
    assert!(n.driver.has_data());
    assert!(!n.driver.data_is_standby().unwrap());
    assert!(!n.base().join("data.restore").exists());
    n.driver.prepare(&spec).await.unwrap();
    let r = n.start(&spec).await;
    assert!(!r.in_recovery, "the restored node follows somebody: {r:?}");
    n.driver.bootstrap(&spec, &secrets).await.unwrap();
    n.driver.converge_slots(&spec).await.unwrap();
    (spec, r.lsn)
}

/// Whether a mariadb-backup process of `dir` is alive.
fn backup_tool_running(dir: &Path) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(p.join("cmdline")).unwrap_or_default();
        comm.trim() == "mariadb-backup"
            && String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy())
    })
}

/// A writer that fails once it has taken `limit` bytes.
struct FailingWriter {
    taken: usize,
    limit: usize,
}

impl std::io::Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.taken >= self.limit {
            return Err(std::io::Error::other("the target went away"));
        }
        let n = buf.len().min(self.limit - self.taken);
        self.taken += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A primary's backup restores exactly what it held then, as a writable
/// primary of the new cluster; verify counts it; a truncated stream and a
/// failing writer are errors that leave nothing running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_backup_restores_verifies_and_fails_cleanly() {
    let a = new_primary("vm-a").await;
    let a_spec = a.primary_spec(&[], false);
    for id in 1..=3 {
        a.insert(id, "before the backup").await.unwrap();
    }
    let at_backup = a.wait(&a_spec, "report its position", |_| true).await.lsn;
    let expected = rows(&a).await;
    let (stream, info) = backup(&a, &a_spec);
    assert!(info.version.starts_with("10."), "{info:?}");
    assert_eq!(
        corral_agent::engine::mariadb::domain0_seq(&info.position),
        at_backup,
        "the backup's position is the primary's last transaction: {info:?}"
    );
    assert!(info.position_time_ms > 0);
    a.insert(4, "after the backup").await.unwrap();

    // Restored: exactly the data at backup time, a primary, writable.
    let mut b = Node::new("vm-b");
    let (b_spec, restored_at) = restore_as_primary(&mut b, &stream).await;
    assert_eq!(
        restored_at, at_backup,
        "the restored binary log starts at the backup"
    );
    assert_eq!(rows(&b).await, expected);
    assert!(!b.has_row(4).await, "a write after the backup was restored");
    b.insert(5, "on the restored primary").await.unwrap();
    assert!(b.has_row(5).await);
    let r = b.wait(&b_spec, "report its position", |_| true).await;
    assert!(!r.in_recovery);
    assert!(
        r.lsn > at_backup,
        "the restored primary's transactions continue the backup's sequence"
    );
    // The old cluster's admin password no longer works there.
    let old = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(b.port)
        .user(Some("admin"))
        .pass(Some(secrets().admin_password))
        .prefer_socket(false);
    assert!(mysql_async::Conn::new(old).await.is_err());

    // Verify: the counts of the backup (app and extra; t and u).
    let scratch = a.dir.join("verify");
    let began = Instant::now();
    let summary =
        tokio::task::block_in_place(|| a.driver.verify(&mut &stream[..], &scratch)).unwrap();
    eprintln!("verify: {summary} ({} ms)", began.elapsed().as_millis());
    assert!(
        summary.starts_with("MariaDB 10.") && summary.ends_with(": 2 databases, 2 tables"),
        "{summary}"
    );
    assert!(
        !scratch.join("mariadbd.pid").exists() || {
            let pid = std::fs::read_to_string(scratch.join("mariadbd.pid")).unwrap();
            !Path::new(&format!("/proc/{}", pid.trim())).exists()
        }
    );
    // The node's own server was not touched.
    a.insert(6, "after verify").await.unwrap();

    // A truncated stream: a clear error.
    let scratch = a.dir.join("verify-truncated");
    let err =
        tokio::task::block_in_place(|| a.driver.verify(&mut &stream[..stream.len() / 2], &scratch))
            .expect_err("a truncated stream verified");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("cut short") || msg.contains("not a valid mariadb-backup stream"),
        "{msg}"
    );
    eprintln!("verify of a truncated stream: {msg}");

    // A writer that fails mid-stream: an error, and no mariadb-backup left.
    let mut w = FailingWriter {
        taken: 0,
        limit: 100_000,
    };
    let err = tokio::task::block_in_place(|| a.driver.backup(&a_spec, &mut w, &|_, _| {}))
        .expect_err("a backup into a failing writer succeeded");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("writing the backup stream") && msg.contains("the target went away"),
        "{msg}"
    );
    eprintln!("backup into a failing writer: {msg}");
    assert!(
        !backup_tool_running(&a.dir),
        "mariadb-backup was left running"
    );
    // And the server is fine.
    a.insert(7, "after the failed backup").await.unwrap();
}

/// A replica's backup restores as a primary that follows nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_backup_restores_as_a_primary() {
    let a = new_primary("vm-a").await;
    for id in 1..=3 {
        a.insert(id, "before the clone").await.unwrap();
    }
    let mut b = Node::new("vm-b");
    let b_spec = b.new_replica(&a).await;
    b.wait(&b_spec, "stream from A", |r| r.streaming).await;
    a.insert(4, "streamed").await.unwrap();
    b.wait_row(4).await;
    let at_backup = b.wait(&b_spec, "report its position", |_| true).await.lsn;
    let expected = rows(&b).await;

    let (stream, info) = backup(&b, &b_spec);
    assert_eq!(
        corral_agent::engine::mariadb::domain0_seq(&info.position),
        at_backup,
        "{info:?}"
    );
    a.insert(5, "after the backup").await.unwrap();
    b.wait_row(5).await;

    let mut c = Node::new("vm-c");
    let (c_spec, restored_at) = restore_as_primary(&mut c, &stream).await;
    assert_eq!(
        restored_at, at_backup,
        "the restored binary log starts at the backup"
    );
    assert_eq!(rows(&c).await, expected);
    assert!(!c.has_row(5).await, "a write after the backup was restored");
    c.insert(6, "on the restored primary").await.unwrap();
    // It does not follow A: A's next write does not reach it.
    a.insert(7, "only on A").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!c.has_row(7).await, "the restored node replicates from A");
    let r = c.wait(&c_spec, "report as a primary", |_| true).await;
    assert!(
        !r.in_recovery && !r.streaming && r.upstream_host.is_empty(),
        "{r:?}"
    );
    assert!(r.lsn > at_backup);
}
