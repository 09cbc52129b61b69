//! The Redis driver against real `redis-server` processes, driven as the
//! agent drives it: a primary, a replica cloned from it, writes refused on
//! the replica and (with `sync`) on a primary without replicas, a
//! switchover with the old primary rejoining, the fence, and wipe; and
//! backups: of a primary and of a replica, restored into a fresh node that
//! the agent's usual steps (prepare, start, bootstrap) turn into a primary,
//! surviving a restart there (the driver runs with the append-only file);
//! verify; a truncated stream; a writer that fails mid-stream.
//!
//! Each node keeps its state under `/tmp/corral-redis-test-<pid>-<n>`,
//! removed at the end (also on a panic; leftovers of a killed run are swept
//! by the next one). The servers listen on every address, on free ports;
//! the test talks to them on 127.0.0.1. Needs root (the servers run as the
//! `redis` user) and redis-server.

#[macro_use]
mod redis_node;

use redis_node::*;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_replica_switchover_fence_and_wipe() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test starts redis-server as the redis user: run it as root"
    );
    let redis_uid = nix::unistd::User::from_name("redis")
        .unwrap()
        .expect("a `redis` user (apt install redis-server)")
        .uid
        .as_raw();
    sweep_stale();
    let dirs: Vec<PathBuf> = (1..=2)
        .map(|n| std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id())))
        .collect();
    let _cleanup = Dirs(dirs.clone());
    let pa = free_port(&[]);
    let pb = free_port(&[pa]);
    let mut a = Node::new("node-a", dirs[0].clone(), pa);
    let mut b = Node::new("node-b", dirs[1].clone(), pb);
    let began = Instant::now();

    // --- Primary A, as ConfigureEngine(initialize) does it.
    let a_primary = a.primary(false, &["node-b"]);
    assert!(!a.driver.has_data());
    a.driver.save_secrets(&Node::secrets()).unwrap();
    a.driver.initialize().await.unwrap();
    assert!(a.driver.has_data());
    assert!(!a.driver.data_is_standby().unwrap());
    a.driver.prepare(&a_primary).await.unwrap();
    a.start(&a_primary).await;
    a.driver
        .bootstrap(&a_primary, &Node::secrets())
        .await
        .unwrap();
    a.driver.converge_slots(&a_primary).await.unwrap();
    let h = a.health(&a_primary).await.unwrap();
    assert!(
        h.version.starts_with(|c: char| c.is_ascii_digit()),
        "{}",
        h.version
    );
    assert!(!h.replication.in_recovery);
    assert_eq!(h.replication.synchronous_standby_names, "");

    // Files: the server's own, private; the passwords root's.
    assert_eq!(mode_and_owner(&a.base().join("data")), (0o700, redis_uid));
    assert_eq!(mode_and_owner(&a.base().join("run")), (0o700, redis_uid));
    assert_eq!(
        mode_and_owner(&a.base().join("redis.conf")),
        (0o600, redis_uid)
    );
    assert_eq!(mode_and_owner(&a.base().join("secrets.json")), (0o600, 0));
    assert!(a.base().join("data/appendonlydir").is_dir(), "AOF is on");
    let pid = a.driver.find_running().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == redis_uid.to_string()),
        "the server must run as redis: {uid_line}"
    );

    // Clients: a password is needed, the admin user and the password alone
    // both work, the replication user can only replicate.
    let mut anon = connect(pa, None, None).await.unwrap();
    let err = get(&mut anon, "k").await.unwrap_err();
    assert!(refused(&err, "NOAUTH"), "{err}");
    assert!(connect(pa, Some("admin"), Some("wrong-password"))
        .await
        .is_err());
    let mut ca = a.admin().await;
    for i in 0..100 {
        set(&mut ca, &format!("k{i}"), &format!("v{i}"))
            .await
            .unwrap();
    }
    let mut by_password = connect(pa, None, Some(ADMIN_PASSWORD)).await.unwrap();
    assert_eq!(
        get(&mut by_password, "k7").await.unwrap().as_deref(),
        Some("v7")
    );
    let mut repl = connect(pa, Some("corral_replication"), Some(REPLICATION_PASSWORD))
        .await
        .unwrap();
    let err = get(&mut repl, "k7").await.unwrap_err();
    assert!(refused(&err, "NOPERM"), "{err}");
    // Neither the admin nor a password-only client may repoint, reconfigure
    // (lift the fence, make a replica writable) or change the users.
    for c in [&mut ca, &mut by_password] {
        for (what, args) in [
            ("REPLICAOF", &["REPLICAOF", "127.0.0.1", "1"][..]),
            (
                "CONFIG SET",
                &["CONFIG", "SET", "min-replicas-to-write", "0"],
            ),
            ("ACL SETUSER", &["ACL", "SETUSER", "admin", "+@all"]),
        ] {
            let mut q = redis::cmd(args[0]);
            q.arg(&args[1..]);
            let err = q.query_async::<()>(c).await.unwrap_err().to_string();
            assert!(refused(&err, "NOPERM"), "{what}: {err}");
        }
    }

    // --- Replica B: cloned from A, then started as its replica.
    let b_replica = b.replica_of(&a);
    b.driver.save_secrets(&Node::secrets()).unwrap();
    assert!(!b.driver.has_data());
    let reports: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
    let progress = |done: u64, total: u64| reports.lock().unwrap().push((done, total));
    b.driver
        .clone_data(&b_replica, &a.upstream(), &progress)
        .await
        .unwrap();
    let last = *reports
        .lock()
        .unwrap()
        .last()
        .expect("clone progress reported");
    assert!(last.0 > 0 && last.0 == last.1, "final progress {last:?}");
    assert!(b.driver.has_data());
    assert!(b.driver.data_is_standby().unwrap());
    assert!(!b.base().join("data.clone").exists());
    assert!(
        b.driver.find_running().is_none(),
        "the clone's server is stopped"
    );
    b.driver.prepare(&b_replica).await.unwrap();
    b.start(&b_replica).await;
    let hb = eventually!("B streaming from A", 20, {
        let h = b.health(&b_replica).await?;
        let r = &h.replication;
        if r.in_recovery && r.streaming && r.upstream_host == "127.0.0.1" {
            Ok(h)
        } else {
            Err(format!("{r:?}"))
        }
    });
    let mut cb = b.admin().await;
    assert_eq!(get(&mut cb, "k99").await.unwrap().as_deref(), Some("v99"));
    // A lists B under its node id.
    let ha = eventually!("A listing node-b as streaming", 20, {
        let h = a.health(&a_primary).await?;
        if h.replication
            .standbys
            .iter()
            .any(|s| s.name == "node-b" && s.state == "streaming")
        {
            Ok(h)
        } else {
            Err(format!("{:?}", h.replication.standbys))
        }
    });
    assert_eq!(
        ha.replication.system_identifier,
        hb.replication.system_identifier
    );
    assert!(!ha.replication.system_identifier.is_empty());

    // Writes reach B; B refuses writes of its own.
    set(&mut ca, "after-clone", "1").await.unwrap();
    wait_for_key(&b, "after-clone", "1").await;
    let err = set(&mut cb, "on-replica", "1").await.unwrap_err();
    assert!(refused(&err, "READONLY"), "{err}");

    // Positions: the replica is never ahead, and catches up.
    let b_lsn = b.health(&b_replica).await.unwrap().replication.lsn;
    let a_lsn = a.health(&a_primary).await.unwrap().replication.lsn;
    assert!(a_lsn >= b_lsn && a_lsn > 0, "A {a_lsn} B {b_lsn}");
    eventually!("B reaching A's offset", 20, {
        let h = b.health(&b_replica).await?;
        if h.replication.lsn >= a_lsn {
            Ok(())
        } else {
            Err(format!("B at {} of {a_lsn}", h.replication.lsn))
        }
    });

    // --- sync: a primary without a replica refuses writes.
    let a_sync = a.primary(true, &["node-b"]);
    a.driver.prepare(&a_sync).await.unwrap();
    a.driver.converge_slots(&a_sync).await.unwrap();
    let h = a.health(&a_sync).await.unwrap();
    assert_eq!(
        h.replication.synchronous_standby_names,
        "min-replicas-to-write 1"
    );
    set(&mut ca, "sync-1", "1").await.unwrap();
    let (b_stopped, state) = b.stop().await;
    assert_eq!(state, "shut down");
    assert!(b_stopped >= a_lsn);
    eventually!("A refusing writes without B", 10, {
        match set(&mut ca, "sync-2", "1").await {
            Err(e) if refused(&e, "NOREPLICAS") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    b.driver.prepare(&b_replica).await.unwrap();
    b.start(&b_replica).await;
    eventually!("A accepting writes with B back", 20, {
        set(&mut ca, "sync-3", "1").await
    });
    a.driver.prepare(&a_primary).await.unwrap();
    a.driver.converge_slots(&a_primary).await.unwrap();
    assert_eq!(
        a.health(&a_primary)
            .await
            .unwrap()
            .replication
            .synchronous_standby_names,
        ""
    );

    // --- Switchover: stop A, B catches up, B promoted, A rejoins B.
    set(&mut ca, "before-switchover", "1").await.unwrap();
    let (stopped_at, _) = a.stop().await;
    assert!(stopped_at > a_lsn, "{stopped_at} after {a_lsn}");
    eventually!("B replaying A's last write", 20, {
        let h = b.health(&b_replica).await?;
        if h.replication.lsn >= stopped_at {
            Ok(())
        } else {
            Err(format!("B at {} of {stopped_at}", h.replication.lsn))
        }
    });
    let mut cb = b.admin().await;
    assert_eq!(
        get(&mut cb, "before-switchover").await.unwrap().as_deref(),
        Some("1")
    );
    let b_primary = b.primary(false, &["node-a"]);
    let promoting = Instant::now();
    b.driver.prepare(&b_primary).await.unwrap();
    assert!(
        b.driver.data_is_standby().unwrap(),
        "prepare never promotes"
    );
    let h = b.health(&b_primary).await.unwrap();
    assert!(
        h.replication.in_recovery,
        "nor does a health check with a primary's spec"
    );
    b.driver.promote(&b_primary).await.unwrap();
    let promote_ms = promoting.elapsed().as_millis();
    assert!(!b.driver.data_is_standby().unwrap());
    b.driver.converge_slots(&b_primary).await.unwrap();
    assert!(!b.health(&b_primary).await.unwrap().replication.in_recovery);
    set(&mut cb, "on-new-primary", "1").await.unwrap();

    let a_replica = a.replica_of(&b);
    a.driver.rejoin(&a_replica, &b.upstream()).await.unwrap();
    assert!(a.driver.data_is_standby().unwrap());
    a.driver.prepare(&a_replica).await.unwrap();
    a.start(&a_replica).await;
    eventually!("A streaming from B", 20, {
        let h = a.health(&a_replica).await?;
        let r = &h.replication;
        if r.in_recovery && r.streaming {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    set(&mut cb, "after-switchover", "1").await.unwrap();
    wait_for_key(&a, "after-switchover", "1").await;
    wait_for_key(&a, "on-new-primary", "1").await;
    eventually!("B listing node-a", 20, {
        let h = b.health(&b_primary).await?;
        if h.replication.standbys.iter().any(|s| s.name == "node-a") {
            Ok(())
        } else {
            Err(format!("{:?}", h.replication.standbys))
        }
    });

    // A health check puts back a replica repointed by hand (by someone
    // with the agent's rights: the admin may not).
    let mut ca = a.agent().await;
    redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async::<()>(&mut ca)
        .await
        .unwrap();
    let role: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut ca)
        .await
        .unwrap();
    assert!(role.contains("role:master"), "{role}");
    eventually!("A following B again", 20, {
        let h = a.health(&a_replica).await?;
        if h.replication.in_recovery && h.replication.streaming {
            Ok(())
        } else {
            Err(format!("{:?}", h.replication))
        }
    });

    // A clone over existing data replaces it only when complete.
    a.stop().await;
    set(&mut cb, "before-reclone", "1").await.unwrap();
    b.driver.prepare(&b_primary).await.unwrap();
    a.driver
        .clone_data(&a_replica, &b.upstream(), &|_, _| {})
        .await
        .unwrap();
    assert!(!a.base().join("data.old").exists());
    assert!(a.driver.data_is_standby().unwrap());
    a.start(&a_replica).await;
    wait_for_key(&a, "before-reclone", "1").await;

    // --- Fence the primary B: sessions end, writes refused, also after a
    // restart; unfenced, writes work again.
    let mut session = b.admin().await;
    set(&mut session, "pre-fence", "1").await.unwrap();
    b.driver.set_fenced(&b_primary, true).await.unwrap();
    let ended = redis::cmd("PING").query_async::<String>(&mut session).await;
    assert!(ended.is_err(), "the open session must be ended: {ended:?}");
    let mut fresh = b.admin().await;
    let err = set(&mut fresh, "fenced", "1").await.unwrap_err();
    assert!(refused(&err, "NOREPLICAS"), "{err}");
    b.stop().await;
    b.driver.prepare(&b_primary).await.unwrap();
    b.start(&b_primary).await;
    let mut fresh = b.admin().await;
    let err = set(&mut fresh, "fenced-after-restart", "1")
        .await
        .unwrap_err();
    assert!(refused(&err, "NOREPLICAS"), "{err}");
    b.driver.set_fenced(&b_primary, false).await.unwrap();
    set(&mut fresh, "unfenced", "1").await.unwrap();
    wait_for_key(&a, "unfenced", "1").await;

    // --- Wipe: only the log is left, and the passwords until forgotten.
    a.stop().await;
    b.stop().await;
    for n in [&a, &b] {
        n.driver.wipe().await.unwrap();
        assert!(!n.driver.has_data());
        assert!(!n.driver.data_is_standby().unwrap());
        n.driver.forget_secrets().unwrap();
        let mut left: Vec<String> = std::fs::read_dir(n.base())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["server.log"], "{} after wipe", n.id);
    }
    println!(
        "redis driver scenario: {} ms (promotion {promote_ms} ms)",
        began.elapsed().as_millis()
    );
}

// ------------------------------------------------------------- backups

const OTHER_ADMIN_PASSWORD: &str = "another-admin-pass-0123456789";

fn other_secrets() -> Secrets {
    Secrets {
        admin_password: OTHER_ADMIN_PASSWORD.into(),
        replication_password: "another-repl-pass-0123456789".into(),
    }
}

/// This run's state directories (`n` of them), cleaned up when dropped.
fn dirs(n: usize) -> (Dirs, Vec<(PathBuf, u16)>) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test starts redis-server as the redis user: run it as root"
    );
    sweep_stale();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut taken = Vec::new();
    let mut out = Vec::new();
    for _ in 0..n {
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-backup{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let p = free_port(&taken);
        taken.push(p);
        out.push((d, p));
    }
    (Dirs(out.iter().map(|(d, _)| d.clone()).collect()), out)
}

/// A session on database `db` with `password` (as `admin`).
async fn session(port: u16, db: i64, password: &str) -> redis::RedisResult<MultiplexedConnection> {
    let settings = RedisConnectionInfo::default()
        .set_username("admin")
        .set_password(password)
        .set_db(db);
    redis_node::connect_with(port, settings).await
}

/// A new cluster's first node, running as a primary.
async fn new_primary(id: &'static str, dir: PathBuf, port: u16) -> Node {
    let mut n = Node::new(id, dir, port);
    let spec = n.primary(false, &[]);
    n.driver.save_secrets(&Node::secrets()).unwrap();
    n.driver.initialize().await.unwrap();
    n.driver.prepare(&spec).await.unwrap();
    n.start(&spec).await;
    n.driver.bootstrap(&spec, &Node::secrets()).await.unwrap();
    n.driver.converge_slots(&spec).await.unwrap();
    n
}

/// Writes the data set the tests back up: 100 strings, a hash and a list
/// in db 0, 5 strings in db 3.
async fn write_data(n: &Node) {
    let mut c = n.admin().await;
    for i in 0..100 {
        set(
            &mut c,
            &format!("k{i}"),
            &format!("v{i}-{}", "x".repeat(100)),
        )
        .await
        .unwrap();
    }
    redis::cmd("HSET")
        .arg("h")
        .arg("f1")
        .arg("one")
        .arg("f2")
        .arg("two")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    redis::cmd("RPUSH")
        .arg("l")
        .arg("a")
        .arg("b")
        .arg("c")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let mut c3 = session(n.port, 3, ADMIN_PASSWORD).await.unwrap();
    for i in 0..5 {
        set(&mut c3, &format!("three{i}"), "3").await.unwrap();
    }
}

/// Checks that `n` (admin password `password`) holds exactly what
/// [`write_data`] wrote.
async fn check_data(n: &Node, password: &str) {
    let mut c = session(n.port, 0, password).await.unwrap();
    let size: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(size, 102, "keys in db 0 of {}", n.id);
    for i in [0, 42, 99] {
        assert_eq!(
            get(&mut c, &format!("k{i}")).await.unwrap(),
            Some(format!("v{i}-{}", "x".repeat(100)))
        );
    }
    let h: Vec<String> = redis::cmd("HMGET")
        .arg("h")
        .arg("f1")
        .arg("f2")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(h, ["one", "two"]);
    let l: Vec<String> = redis::cmd("LRANGE")
        .arg("l")
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(l, ["a", "b", "c"]);
    let mut c3 = session(n.port, 3, password).await.unwrap();
    let size: u64 = redis::cmd("DBSIZE").query_async(&mut c3).await.unwrap();
    assert_eq!(size, 5, "keys in db 3 of {}", n.id);
}

/// Backs `n` up into memory.
fn backup(n: &Node, spec: &EngineSpec) -> (Vec<u8>, BackupInfo) {
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
    assert!(buf.starts_with(b"REDIS"), "not an RDB");
    let reports = reports.into_inner().unwrap();
    assert_eq!(
        reports.last().copied(),
        Some((buf.len() as u64, buf.len() as u64)),
        "the last progress report is the whole stream"
    );
    (buf, info)
}

/// Restores `stream` into the fresh node `n` and runs it as the agent runs
/// a primary, with the new cluster's secrets.
async fn restore_as_primary(n: &mut Node, stream: &[u8]) -> EngineSpec {
    n.driver.save_secrets(&other_secrets()).unwrap();
    assert!(!n.driver.has_data());
    let spec = n.primary(false, &[]);
    let began = Instant::now();
    tokio::task::block_in_place(|| n.driver.restore(&spec, &mut &stream[..], None))
        .unwrap_or_else(|e| panic!("restore into {}: {e:#}", n.id));
    eprintln!("restore into {}: {} ms", n.id, began.elapsed().as_millis());
    assert!(n.driver.has_data());
    assert!(!n.driver.data_is_standby().unwrap());
    assert!(!n.base().join("data.restore").exists());
    assert!(n.base().join("data/appendonlydir").is_dir());
    assert!(!n.base().join("data/dump.rdb").exists());
    n.driver.prepare(&spec).await.unwrap();
    n.start(&spec).await;
    n.driver.bootstrap(&spec, &other_secrets()).await.unwrap();
    n.driver.converge_slots(&spec).await.unwrap();
    let h = n.health(&spec).await.unwrap();
    assert!(!h.replication.in_recovery, "{:?}", h.replication);
    spec
}

/// The pids of the children of `pid` (a server's forks).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
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
/// primary that keeps it across a restart; verify counts it; a truncated
/// stream and a failing writer are errors that leave nothing running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_backup_restores_verifies_and_fails_cleanly() {
    let (_cleanup, d) = dirs(2);
    let a = new_primary("node-a", d[0].0.clone(), d[0].1).await;
    let a_spec = a.primary(false, &[]);
    write_data(&a).await;
    let (stream, info) = backup(&a, &a_spec);
    assert!(
        info.version.starts_with(|c: char| c.is_ascii_digit()),
        "{info:?}"
    );
    info.position.parse::<u64>().expect("an offset");
    assert!(info.position_time_ms > 0);
    let mut ca = a.admin().await;
    set(&mut ca, "late", "after the backup").await.unwrap();

    // Restored: exactly the data at backup time, a primary, writable, and
    // still there after a restart (from the append-only file).
    let mut b = Node::new("node-b", d[1].0.clone(), d[1].1);
    let b_spec = restore_as_primary(&mut b, &stream).await;
    check_data(&b, OTHER_ADMIN_PASSWORD).await;
    let mut cb = session(b.port, 0, OTHER_ADMIN_PASSWORD).await.unwrap();
    assert_eq!(get(&mut cb, "late").await.unwrap(), None);
    set(&mut cb, "new", "on the restored primary")
        .await
        .unwrap();
    assert!(
        session(b.port, 0, ADMIN_PASSWORD).await.is_err(),
        "the old cluster's password works on the restored node"
    );
    b.stop().await;
    b.start(&b_spec).await;
    let mut cb = session(b.port, 0, OTHER_ADMIN_PASSWORD).await.unwrap();
    assert_eq!(
        get(&mut cb, "new").await.unwrap().as_deref(),
        Some("on the restored primary")
    );
    redis::cmd("DEL")
        .arg("new")
        .query_async::<()>(&mut cb)
        .await
        .unwrap();
    check_data(&b, OTHER_ADMIN_PASSWORD).await;

    // Verify: the counts of the backup.
    let scratch = a.dir.join("verify");
    let began = Instant::now();
    let summary =
        tokio::task::block_in_place(|| a.driver.verify(&mut &stream[..], &scratch)).unwrap();
    eprintln!("verify: {summary} ({} ms)", began.elapsed().as_millis());
    assert!(
        summary.ends_with("loaded the RDB: 107 keys (db0: 102, db3: 5)"),
        "{summary}"
    );
    // The node's own server was not touched.
    assert_eq!(
        get(&mut ca, "late").await.unwrap().as_deref(),
        Some("after the backup")
    );

    // A truncated stream: a clear error.
    let err = tokio::task::block_in_place(|| {
        a.driver.verify(
            &mut &stream[..stream.len() - 100],
            &a.dir.join("verify-cut"),
        )
    })
    .expect_err("a truncated stream verified");
    let msg = format!("{err:#}");
    eprintln!("verify of a truncated stream: {msg}");
    assert!(msg.contains("could not load the RDB"), "{msg}");
    let err = tokio::task::block_in_place(|| {
        a.driver
            .verify(&mut &b"not an rdb"[..], &a.dir.join("verify-junk"))
    })
    .expect_err("junk verified");
    assert!(format!("{err:#}").contains("not an RDB file"), "{err:#}");

    // A writer that fails mid-stream (of a snapshot big enough to be
    // still streaming then): an error; the server's transfer fork is gone
    // soon after, and the server is fine.
    // Incompressible values: the RDB compresses repetitive ones to nothing.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pipe = redis::pipe();
    for i in 0..10_000 {
        let value: Vec<u8> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        pipe.cmd("SET").arg(format!("big{i}")).arg(value).ignore();
    }
    pipe.query_async::<()>(&mut ca).await.unwrap();
    let mut w = FailingWriter {
        taken: 0,
        limit: 1_000_000,
    };
    let err = tokio::task::block_in_place(|| a.driver.backup(&a_spec, &mut w, &|_, _| {}))
        .expect_err("a backup into a failing writer succeeded");
    let msg = format!("{err:#}");
    eprintln!("backup into a failing writer: {msg}");
    assert!(
        msg.contains("writing the backup stream") && msg.contains("the target went away"),
        "{msg}"
    );
    let pid = a.driver.find_running().unwrap();
    eventually!("the server's transfer fork ending", 10, {
        let left = children(pid);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("children {left:?}"))
        }
    });
    eventually!("the backup connection gone from the replica list", 10, {
        let h = a.health(&a_spec).await?;
        if h.replication.standbys.is_empty() {
            Ok(())
        } else {
            Err(format!("{:?}", h.replication.standbys))
        }
    });
    set(&mut ca, "after", "the failed backup").await.unwrap();
    // And a backup works again.
    let (again, _) = backup(&a, &a_spec);
    assert!(again.len() > 20_000_000, "{} bytes", again.len());
}

/// A replica's backup restores as a primary that follows nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_backup_restores_as_a_primary() {
    let (_cleanup, d) = dirs(3);
    let a = new_primary("node-a", d[0].0.clone(), d[0].1).await;
    write_data(&a).await;
    let mut b = Node::new("node-b", d[1].0.clone(), d[1].1);
    let b_spec = b.replica_of(&a);
    b.clone_and_start(&b_spec, &a).await;
    let mut ca = a.admin().await;
    set(&mut ca, "streamed", "after the clone").await.unwrap();
    wait_for_key(&b, "streamed", "after the clone").await;
    let offset = eventually!("B streaming from A", 20, {
        let h = b.health(&b_spec).await?;
        let r = &h.replication;
        if r.in_recovery && r.streaming {
            Ok(r.lsn)
        } else {
            Err(format!("{r:?}"))
        }
    });
    let (stream, info) = backup(&b, &b_spec);
    let at: u64 = info.position.parse().expect("an offset");
    assert!(
        at >= offset && at > 0,
        "the backup's offset {at} is before the replica's {offset}"
    );
    set(&mut ca, "late", "after the backup").await.unwrap();
    wait_for_key(&b, "late", "after the backup").await;

    let mut c = Node::new("node-c", d[2].0.clone(), d[2].1);
    let c_spec = restore_as_primary(&mut c, &stream).await;
    let mut cc = session(c.port, 0, OTHER_ADMIN_PASSWORD).await.unwrap();
    assert_eq!(
        get(&mut cc, "streamed").await.unwrap().as_deref(),
        Some("after the clone")
    );
    redis::cmd("DEL")
        .arg("streamed")
        .query_async::<()>(&mut cc)
        .await
        .unwrap();
    assert_eq!(get(&mut cc, "late").await.unwrap(), None);
    check_data(&c, OTHER_ADMIN_PASSWORD).await;
    set(&mut cc, "mine", "on the restored primary")
        .await
        .unwrap();
    // It does not follow A.
    set(&mut ca, "only-a", "1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&mut cc, "only-a").await.unwrap(), None);
    let h = c.health(&c_spec).await.unwrap();
    assert!(
        !h.replication.in_recovery && h.replication.upstream_host.is_empty(),
        "{:?}",
        h.replication
    );
}
