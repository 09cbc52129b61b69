//! The PostgreSQL driver against real servers, driven as the agent drives
//! it: the fence, and backups: backup, restore (to the end of the backup,
//! and to a point in time from the WAL archive), verify, and a backup whose
//! writer fails.
//!
//! Each node is a `Postgres` driver with a state directory of its own,
//! `/tmp/corral-pgbk-test-<pid>-<n>`, and a server on a free port. A node's
//! servers (the engine, and a recovery server of a restore or a verify)
//! are stopped and its directory removed when the node is dropped, panic or
//! not; a run that was killed leaves directories whose pid is gone, and the
//! next run sweeps them (servers included). With `CORRAL_TEST_KEEP=1` the
//! directories (server logs) stay until then.
//! Needs root (servers run as the `postgres` user) and PostgreSQL 15 in
//! /usr/lib/postgresql/15/bin (or `CORRAL_PG_BIN`).

mod pg_node;

use pg_node::*;
use std::time::{Duration, Instant};

fn check_info(info: &BackupInfo, before_ms: i64) {
    assert!(
        info.version.starts_with("15."),
        "version {:?}",
        info.version
    );
    let (hi, lo) = info
        .position
        .split_once('/')
        .expect("an LSN like 0/3000138");
    assert!(u64::from_str_radix(hi, 16).is_ok() && u64::from_str_radix(lo, 16).is_ok());
    assert!(info.position != "0/0");
    let now = corral_proto::now_ms();
    assert!(
        info.position_time_ms >= before_ms && info.position_time_ms <= now,
        "{info:?}"
    );
}

/// Checks that `node`'s data is an ordinary primary's: no signal files and
/// no recovery or streaming settings in any configuration file.
async fn assert_plain_primary(node: &Node, source_timeline: u32, spec: &EngineSpec) {
    let data = node.driver.data_dir();
    for f in ["recovery.signal", "standby.signal", "backup_label"] {
        assert!(!data.join(f).exists(), "{f} left in {}", data.display());
    }
    for f in ["postgresql.conf", "postgresql.auto.conf", "corral.conf"] {
        let text = std::fs::read_to_string(data.join(f)).unwrap();
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            for key in [
                "restore_command",
                "recovery_target",
                "primary_conninfo",
                "primary_slot_name",
            ] {
                assert!(!line.starts_with(key), "{f} still says {line:?}");
            }
        }
    }
    assert_eq!(node.setting("restore_command").await, "");
    assert_eq!(node.setting("primary_conninfo").await, "");
    assert_eq!(node.setting("archive_mode").await, "on");
    let r = node.wait(spec, "run as a primary", |_| true).await;
    assert!(!r.in_recovery, "{} is still in recovery", node.id);
    assert!(
        r.timeline > source_timeline,
        "restored on timeline {}, the source was on {source_timeline}",
        r.timeline
    );
    assert!(!node.driver.data_is_standby().unwrap());
}

/// Backup of a primary; the restore holds exactly the data of backup time,
/// runs as a primary on a new timeline and carries no recovery settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_backup_restores_as_a_primary_on_a_new_timeline() {
    let mut a = Node::new("vm-a");
    let spec_a = a.primary_spec(&[], false);
    a.new_primary(&spec_a).await;
    a.sql(
        "CREATE TABLE t (id int PRIMARY KEY, note text); \
           INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 500) g",
    )
    .await;
    let source = a.wait(&spec_a, "answer", |_| true).await;
    // Without a WAL archive, finished segments are discarded.
    assert_eq!(a.setting("archive_command").await, "/bin/true");
    let began = corral_proto::now_ms();
    let (stream, info) = a.backup(&spec_a);
    check_info(&info, began);
    // A backup is a tar: "ustar" at offset 257 of its first header.
    assert_eq!(&stream[257..262], b"ustar");
    // The backup's walsender is not reported as a standby.
    assert!(a
        .wait(&spec_a, "answer", |_| true)
        .await
        .standbys
        .is_empty());
    a.sql("INSERT INTO t VALUES (1000, 'after the backup')")
        .await;

    let mut c = Node::new("vm-c");
    let spec_c = c.primary_spec(&[], false);
    c.driver.save_secrets(&secrets()).unwrap();
    assert!(!c.driver.has_data());
    // An empty data directory is restored into, like an absent one.
    std::fs::create_dir_all(c.driver.data_dir()).unwrap();
    c.restore(&spec_c, &stream, None);
    assert!(c.driver.has_data());
    c.driver.prepare(&spec_c).await.unwrap();
    c.start(&spec_c).await;
    c.driver.bootstrap(&spec_c, &secrets()).await.unwrap();
    assert_eq!(c.ids().await, (1..=500).collect::<Vec<_>>());
    assert_plain_primary(&c, source.timeline, &spec_c).await;
    // It takes writes.
    c.sql("INSERT INTO t VALUES (2000, 'restored')").await;
    // A restore never goes into data that is there.
    let mut input = &stream[..];
    let err = tokio::task::block_in_place(|| c.driver.restore(&spec_c, &mut input, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("running"), "{err}");
}

/// A backup taken from a replica (cloned as the agent clones) restores
/// into a primary that does not follow anybody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_backup_restores() {
    let mut a = Node::new("vm-a");
    let spec_a = a.primary_spec(&["vm-b"], false);
    a.new_primary(&spec_a).await;
    a.sql(
        "CREATE TABLE t (id int PRIMARY KEY, note text); \
           INSERT INTO t SELECT g, 'x' FROM generate_series(1, 50) g",
    )
    .await;

    let mut b = Node::new("vm-b");
    let spec_b = b.new_replica(&a).await;
    a.sql("INSERT INTO t VALUES (51, 'streamed')").await;
    let began = Instant::now();
    while b.ids().await.len() != 51 {
        assert!(began.elapsed() < WAIT, "row 51 never reached the replica");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = b.wait(&spec_b, "stream", |r| r.streaming).await;
    assert!(r.in_recovery);

    let t0 = corral_proto::now_ms();
    let (stream, info) = b.backup(&spec_b);
    check_info(&info, t0);
    // The replica still streams afterwards.
    b.wait(&spec_b, "stream", |r| r.streaming && r.in_recovery)
        .await;

    let mut c = Node::new("vm-c");
    let spec_c = c.primary_spec(&[], false);
    c.driver.save_secrets(&secrets()).unwrap();
    c.restore(&spec_c, &stream, None);
    c.driver.prepare(&spec_c).await.unwrap();
    c.start(&spec_c).await;
    assert_eq!(c.ids().await, (1..=51).collect::<Vec<_>>());
    assert_plain_primary(&c, r.timeline, &spec_c).await;
    c.sql("INSERT INTO t VALUES (52, 'writable')").await;
    // The restored node did not become anybody's standby: the primary
    // serves only b.
    let ra = a.wait(&spec_a, "answer", |_| true).await;
    assert!(ra.standbys.iter().all(|s| s.name == "vm-b"), "{ra:?}");
}

/// Point-in-time recovery from the WAL archive's segments: to a time
/// between two commits, and (refused) beyond the archived WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_recovery_from_the_wal_archive() {
    let mut a = Node::new("vm-a");
    let spec_a = a.primary_spec(&[], true);
    a.new_primary(&spec_a).await;
    let spool = a.driver.wal_spool().unwrap();
    assert!(spool.is_dir());
    let command = a.setting("archive_command").await;
    assert!(command.contains(&*spool.to_string_lossy()), "{command}");
    a.sql("CREATE TABLE t (id int PRIMARY KEY, note text)")
        .await;
    let (stream, _) = a.backup(&spec_a);
    a.sql("INSERT INTO t VALUES (1, 'A')").await;
    let target = corral_proto::now_ms();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.sql("INSERT INTO t VALUES (2, 'B')").await;
    let segment = a.driver.switch_wal(&spec_a).await.unwrap();
    assert_eq!(segment.len(), 24, "{segment}");
    assert!(segment.chars().all(|c| c.is_ascii_hexdigit()), "{segment}");
    // Nothing written since: the same (last closed) segment, or a later one
    // when the server wrote something meanwhile.
    let again = a.driver.switch_wal(&spec_a).await.unwrap();
    assert!(again >= segment, "{again} < {segment}");
    let began = Instant::now();
    while !spool.join(&segment).exists() {
        assert!(
            began.elapsed() < WAIT,
            "{segment} was not archived into {}\n{}",
            spool.display(),
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the agent would have uploaded and fetched back.
    let wal_dir = a.dir.join("fetched-wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    let mut copied = 0;
    for e in std::fs::read_dir(&spool).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".part"), "a partial copy is left: {name}");
        std::fs::copy(e.path(), wal_dir.join(&name)).unwrap();
        copied += 1;
    }
    assert!(copied >= 2, "only {copied} segments archived");

    let mut c = Node::new("vm-c");
    let spec_c = c.primary_spec(&[], false);
    c.driver.save_secrets(&secrets()).unwrap();
    c.restore(
        &spec_c,
        &stream,
        Some(&Recovery {
            to_time_ms: target,
            wal_dir: wal_dir.clone(),
        }),
    );
    c.driver.prepare(&spec_c).await.unwrap();
    c.start(&spec_c).await;
    assert_eq!(c.ids().await, vec![1], "exactly A, recovered to its time");
    assert_plain_primary(&c, 1, &spec_c).await;

    // Beyond the archived WAL: refused, and nothing left behind.
    let d = Node::new("vm-d");
    let spec_d = d.primary_spec(&[], false);
    d.driver.save_secrets(&secrets()).unwrap();
    let mut input = &stream[..];
    let recovery = Recovery {
        to_time_ms: corral_proto::now_ms() + 3_600_000,
        wal_dir,
    };
    let err =
        tokio::task::block_in_place(|| d.driver.restore(&spec_d, &mut input, Some(&recovery)))
            .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("no WAL up to that time"), "{msg}");
    assert!(!d.driver.has_data());
    assert!(processes_mentioning(&d.dir.to_string_lossy()).is_empty());
}

/// Verify recovers the backup beside the running engine and counts what
/// it holds; a truncated stream fails clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_counts_tables_and_refuses_a_truncated_stream() {
    let mut a = Node::new("vm-a");
    let spec_a = a.primary_spec(&[], false);
    a.new_primary(&spec_a).await;
    a.sql(
        "CREATE TABLE t1 (id int); CREATE TABLE t2 (id int); CREATE TABLE t3 (id int); \
           CREATE SCHEMA s; CREATE TABLE s.t4 (id int); CREATE VIEW v AS SELECT 1",
    )
    .await;
    a.client("postgres")
        .await
        .batch_execute("CREATE TABLE in_postgres (id int)")
        .await
        .unwrap();
    let pid = a.driver.find_running().unwrap();
    let (stream, _) = a.backup(&spec_a);

    let scratch = a.dir.join("verify");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut input = &stream[..];
    let summary = tokio::task::block_in_place(|| a.driver.verify(&mut input, &scratch))
        .unwrap_or_else(|e| panic!("verify: {e:#}"));
    assert!(
        summary.starts_with("PostgreSQL 15.") && summary.ends_with(": 4 databases, 5 tables"),
        "{summary}"
    );
    assert!(
        processes_mentioning(&scratch.to_string_lossy()).is_empty(),
        "the recovery server is stopped"
    );
    // The running engine was not touched.
    assert_eq!(a.driver.find_running(), Some(pid));
    a.wait(&spec_a, "answer", |r| !r.in_recovery).await;

    // Cut inside a file, and cut between two of the tar's files.
    for (i, cut) in [stream.len() / 2 + 100, stream.len() / 2 / 512 * 512]
        .into_iter()
        .enumerate()
    {
        let scratch = a.dir.join(format!("verify-truncated-{i}"));
        std::fs::create_dir_all(&scratch).unwrap();
        let mut input = &stream[..cut];
        let err =
            tokio::task::block_in_place(|| a.driver.verify(&mut input, &scratch)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
        assert!(processes_mentioning(&scratch.to_string_lossy()).is_empty());
    }
}

/// A writer that fails after `left` bytes.
struct Failing {
    left: usize,
}

impl std::io::Write for Failing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("the target is gone"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A backup whose target fails ends with an error and stops pg_basebackup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_writer_stops_the_backup() {
    let mut a = Node::new("vm-a");
    let spec_a = a.primary_spec(&[], false);
    a.new_primary(&spec_a).await;
    a.sql(
        "CREATE TABLE t (id int PRIMARY KEY, note text); \
           INSERT INTO t SELECT g, repeat('y', 500) FROM generate_series(1, 20000) g",
    )
    .await;
    let mut out = Failing { left: 1 << 20 };
    let err =
        tokio::task::block_in_place(|| a.driver.backup(&spec_a, &mut out, &|_, _| {})).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("writing the backup stream failed") && msg.contains("the target is gone"),
        "{msg}"
    );
    let socket = a.driver.socket_dir();
    let tools: Vec<i32> = processes_mentioning(&socket.to_string_lossy())
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "pg_basebackup")
        })
        .collect();
    assert!(tools.is_empty(), "pg_basebackup left running: {tools:?}");
    // Its walsender goes too, and the next backup works.
    let client = a.client("postgres").await;
    let began = Instant::now();
    loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            break;
        }
        assert!(began.elapsed() < WAIT, "the backup's walsender stays");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stream, _) = a.backup(&spec_a);
    assert!(stream.len() > 1 << 20);
}

/// A TCP session as the cluster's admin, as a client would open one.
async fn tcp_client(node: &Node) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(node.port)
        .user("admin")
        .password(secrets().admin_password)
        .dbname("app")
        .connect_timeout(Duration::from_secs(5))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_primary_accepts_no_session_that_could_undo_the_fence() {
    let mut node = Node::new("pgf1");
    let spec = node.primary_spec(&["pgf2"], false);
    node.new_primary(&spec).await;
    let before = tcp_client(&node).await.unwrap();
    before
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    node.driver.set_fenced(&spec, true).await.unwrap();
    // The session opened before the fence was ended, and no new one can
    // start, so none can `SET default_transaction_read_only = off`.
    assert!(
        before
            .batch_execute("INSERT INTO t VALUES (2)")
            .await
            .is_err(),
        "a session from before the fence still writes"
    );
    let refused = tcp_client(&node).await.map(|_| ()).unwrap_err();
    assert!(
        format!("{refused:?}").contains("pg_hba.conf rejects connection"),
        "{refused:?}"
    );
    // The agent's own sessions (the socket) are read-only by default.
    let agent = node.client("app").await;
    let e = agent
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("read-only"), "{e:?}");
    // prepare (at every agent start and configure) keeps the fence.
    node.driver.prepare(&spec).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tcp_client(&node).await.is_err(), "prepare lifted the fence");

    node.driver.set_fenced(&spec, false).await.unwrap();
    let began = Instant::now();
    let after = loop {
        match tcp_client(&node).await {
            Ok(c) => break c,
            Err(e) if began.elapsed() > WAIT => panic!("still refused: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    after
        .batch_execute("INSERT INTO t VALUES (4)")
        .await
        .unwrap();
    assert_eq!(node.ids().await, [1, 4]);
}
