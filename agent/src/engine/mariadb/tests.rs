//! Unit tests of the MariaDB driver's pure parts: quoting, GTIDs, flavours,
//! the binary-log scan, the configuration and the replication plan.

use super::*;

fn g(domain: u32, server: u32, seq: u64) -> Gtid {
    Gtid {
        domain,
        server,
        seq,
    }
}

#[test]
fn gtid_lists_parse() {
    assert_eq!(parse_gtid_list("").unwrap(), vec![]);
    assert_eq!(parse_gtid_list("  ").unwrap(), vec![]);
    assert_eq!(parse_gtid_list("0-1-100").unwrap(), vec![g(0, 1, 100)]);
    assert_eq!(
        parse_gtid_list("0-1-100,1-2-5").unwrap(),
        vec![g(0, 1, 100), g(1, 2, 5)]
    );
    assert_eq!(
        parse_gtid_list("1-2-5, 0-4294967295-18446744073709551615\n").unwrap(),
        vec![g(1, 2, 5), g(0, u32::MAX, u64::MAX)]
    );
    for bad in ["0-1", "a-1-2", "0-1-x", "0-1-2-3", "0--1-2"] {
        assert!(parse_gtid_list(bad).is_err(), "{bad} should not parse");
    }
    assert_eq!(format_gtids(&[g(0, 1, 100), g(1, 2, 5)]), "0-1-100,1-2-5");
}

#[test]
fn domain_zero_sequence() {
    assert_eq!(domain0_seq(""), 0);
    assert_eq!(domain0_seq("0-1-100,1-2-5"), 100);
    assert_eq!(domain0_seq("1-2-5,0-3-7"), 7);
    assert_eq!(domain0_seq("1-2-5"), 0);
    assert_eq!(domain0_seq("garbage"), 0);
    assert_eq!(
        last_in_domain(&[g(0, 1, 4), g(0, 2, 9)], 0),
        Some(g(0, 2, 9))
    );
}

#[test]
fn mysql_gtid_sets_count_transactions() {
    assert_eq!(gtid_set_count(""), 0);
    assert_eq!(
        gtid_set_count("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5"),
        5
    );
    assert_eq!(
        gtid_set_count(
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7,\n4e11fa47-71ca-11e1-9e33-c80aa9429562:1-3"
        ),
        9
    );
    // MySQL 8.3 tags.
    assert_eq!(
        gtid_set_count("3e11fa47-71ca-11e1-9e33-c80aa9429562:tag:1-2"),
        2
    );
}

#[test]
fn containment_of_a_former_primary() {
    let up = vec![g(0, 1, 10)];
    assert_eq!(containment(&[], &up), Containment::Contained);
    assert_eq!(containment(&[g(0, 1, 10)], &up), Containment::Contained);
    // Ahead of the upstream: ours only.
    assert_eq!(
        containment(&[g(0, 1, 11)], &up),
        Containment::Diverged(vec![g(0, 1, 11)])
    );
    // Same number, another server: a different transaction.
    assert_eq!(
        containment(&[g(0, 2, 10)], &up),
        Containment::Diverged(vec![g(0, 2, 10)])
    );
    // A domain the upstream never saw.
    assert_eq!(
        containment(&[g(0, 1, 10), g(1, 3, 1)], &up),
        Containment::Diverged(vec![g(1, 3, 1)])
    );
    // Behind: only the upstream's binlog can tell.
    assert_eq!(
        containment(&[g(0, 2, 7)], &up),
        Containment::Unknown(vec![g(0, 2, 7)])
    );
    assert_eq!(
        containment(&[g(0, 2, 7)], &[]),
        Containment::Diverged(vec![g(0, 2, 7)])
    );
}

#[test]
fn server_ids_are_stable_and_never_zero() {
    assert_eq!(server_id("vm1"), server_id("vm1"));
    assert_ne!(server_id("vm1"), server_id("vm2"));
    assert_ne!(server_id(""), 0);
}

#[test]
fn quoting() {
    assert_eq!(sql_string("plain"), "'plain'");
    assert_eq!(sql_string("it's"), "'it\\'s'");
    assert_eq!(sql_string("back\\slash"), "'back\\\\slash'");
    assert_eq!(sql_string("a\\'b"), "'a\\\\\\'b'");
    assert_eq!(sql_string("nul\0nl\ncr\r"), "'nul\\0nl\\ncr\\r'");
    assert_eq!(quote_ident("we`ird"), "`we``ird`");
    assert_eq!(account_name("admin", "%"), "'admin'@'%'");
}

#[test]
fn flavour_from_version() {
    assert_eq!(
        Flavour::detect("10.11.6-MariaDB-0+deb12u1-log"),
        Flavour::Mariadb
    );
    assert_eq!(Flavour::detect("5.5.5-10.11.6-MariaDB"), Flavour::Mariadb);
    assert_eq!(Flavour::detect("8.0.36"), Flavour::Mysql);
    assert_eq!(Flavour::detect("8.0.36-0ubuntu0.22.04.1"), Flavour::Mysql);
}

#[test]
fn change_source_statements() {
    let pw = "p'a\\ss";
    assert_eq!(
        Flavour::Mariadb.change_source("10.0.0.1", 3306, REPLICATION_USER, pw, None),
        "CHANGE MASTER TO MASTER_HOST='10.0.0.1', MASTER_PORT=3306, \
         MASTER_USER='corral_replication', MASTER_PASSWORD='p\\'a\\\\ss', \
         MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1"
    );
    assert_eq!(
        Flavour::Mysql.change_source("fd00::1", 3307, REPLICATION_USER, pw, None),
        "CHANGE REPLICATION SOURCE TO SOURCE_HOST='fd00::1', SOURCE_PORT=3307, \
         SOURCE_USER='corral_replication', SOURCE_PASSWORD='p\\'a\\\\ss', \
         SOURCE_AUTO_POSITION=1, SOURCE_CONNECT_RETRY=1, GET_SOURCE_PUBLIC_KEY=1"
    );
}

#[test]
fn replication_commands_by_flavour() {
    let m = Flavour::Mariadb;
    let y = Flavour::Mysql;
    assert_eq!(m.start_replica(), "START SLAVE");
    assert_eq!(y.start_replica(), "START REPLICA");
    assert_eq!(m.stop_replica(), "STOP SLAVE");
    assert_eq!(y.stop_replica(), "STOP REPLICA");
    assert_eq!(m.stop_replica_io(), "STOP SLAVE IO_THREAD");
    assert_eq!(y.start_replica_io(), "START REPLICA IO_THREAD");
    assert_eq!(m.reset_replica_all(), "RESET SLAVE ALL");
    assert_eq!(y.reset_replica_all(), "RESET REPLICA ALL");
    assert_eq!(m.replica_status(), "SHOW SLAVE STATUS");
    assert_eq!(y.replica_status(), "SHOW REPLICA STATUS");
    assert_eq!(m.replica_hosts(), "SHOW SLAVE HOSTS");
    assert_eq!(y.replica_hosts(), "SHOW REPLICAS");
    assert_eq!(m.shutdown(), "SHUTDOWN WAIT FOR ALL SLAVES");
    assert_eq!(y.shutdown(), "SHUTDOWN");
    assert_eq!(m.column(Column::IoRunning), "Slave_IO_Running");
    assert_eq!(y.column(Column::IoRunning), "Replica_IO_Running");
    assert_eq!(m.column(Column::Received), "Gtid_IO_Pos");
    assert_eq!(y.column(Column::Received), "Retrieved_Gtid_Set");
    assert_eq!(m.column(Column::Host), "Master_Host");
    assert_eq!(y.column(Column::Host), "Source_Host");
    assert!(m.uses_gtid("Slave_Pos") && !m.uses_gtid("No"));
    assert!(y.uses_gtid("1") && !y.uses_gtid("0"));
    assert_eq!(
        m.wait_applied("0-1-5", 60),
        "SELECT MASTER_GTID_WAIT('0-1-5', 60)"
    );
    assert_eq!(
        y.wait_applied("u:1-5", 60),
        "SELECT WAIT_FOR_EXECUTED_GTID_SET('u:1-5', 60)"
    );
    assert_eq!(m.position("0-1-5,1-1-9"), 5);
    assert_eq!(y.position("u:1-5,v:1-2"), 7);
}

#[test]
fn read_only_by_flavour() {
    assert_eq!(Flavour::Mariadb.read_only_variable(), "read_only");
    assert_eq!(Flavour::Mysql.read_only_variable(), "super_read_only");
    assert_eq!(
        Flavour::Mariadb.set_read_only(true),
        "SET GLOBAL read_only = ON"
    );
    assert_eq!(
        Flavour::Mariadb.set_read_only(false),
        "SET GLOBAL read_only = OFF"
    );
    assert_eq!(
        Flavour::Mysql.set_read_only(true),
        "SET GLOBAL super_read_only = ON"
    );
    assert_eq!(
        Flavour::Mysql.set_read_only(false),
        "SET GLOBAL super_read_only = OFF, GLOBAL read_only = OFF"
    );
}

#[test]
fn semi_sync_names_by_flavour() {
    use SemiSync::*;
    let m = Flavour::Mariadb;
    let y = Flavour::Mysql;
    assert_eq!(
        m.set_semi_sync(SourceEnabled, "ON"),
        "SET GLOBAL rpl_semi_sync_master_enabled = ON"
    );
    assert_eq!(
        y.set_semi_sync(SourceEnabled, "ON"),
        "SET GLOBAL rpl_semi_sync_source_enabled = ON"
    );
    assert_eq!(
        m.semi_sync(SourceWaitPoint),
        "rpl_semi_sync_master_wait_point"
    );
    assert_eq!(y.semi_sync(SourceTimeout), "rpl_semi_sync_source_timeout");
    assert_eq!(m.semi_sync(ReplicaEnabled), "rpl_semi_sync_slave_enabled");
    assert_eq!(y.semi_sync(ReplicaEnabled), "rpl_semi_sync_replica_enabled");
    assert_eq!(m.semi_sync(SourceClients), "Rpl_semi_sync_master_clients");
    assert_eq!(y.semi_sync(SourceStatus), "Rpl_semi_sync_source_status");
}

#[test]
fn account_statements_by_flavour() {
    let acct = account_name("admin", "%");
    assert_eq!(
        Flavour::Mariadb.user_statements(&acct, &Credential::NativeHash("*ABC")),
        vec![
            "CREATE USER IF NOT EXISTS 'admin'@'%' IDENTIFIED BY PASSWORD '*ABC'",
            "ALTER USER 'admin'@'%' IDENTIFIED BY PASSWORD '*ABC'",
        ]
    );
    assert_eq!(
        Flavour::Mysql.user_statements(&acct, &Credential::Plain("o'k\\")),
        vec![
            "CREATE USER IF NOT EXISTS 'admin'@'%' IDENTIFIED BY 'o\\'k\\\\'",
            "ALTER USER 'admin'@'%' IDENTIFIED BY 'o\\'k\\\\'",
        ]
    );
    assert_eq!(
        Flavour::Mariadb.admin_grants(&acct),
        vec![
            "GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%' WITH GRANT OPTION",
            "REVOKE READ_ONLY ADMIN ON *.* FROM 'admin'@'%'",
        ]
    );
    assert_eq!(
        Flavour::Mysql.admin_grants(&acct),
        vec!["GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%' WITH GRANT OPTION"]
    );
    assert!(Flavour::Mariadb
        .replication_grants(&acct)
        .contains("REPLICATION SLAVE, BINLOG MONITOR"));
    assert!(Flavour::Mysql
        .replication_grants(&acct)
        .contains("REPLICATION SLAVE, REPLICATION CLIENT"));
}

#[test]
fn dump_positions() {
    let end = "-- SET GLOBAL gtid_slave_pos='0-1-9';\n/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE */;\n";
    assert_eq!(dump_position(end).as_deref(), Some("0-1-9"));
    assert_eq!(
        dump_position("-- SET GLOBAL gtid_slave_pos='';\n").as_deref(),
        Some("")
    );
    assert_eq!(dump_position("-- Dump completed\n"), None);
    assert_eq!(dump_position("-- SET GLOBAL gtid_slave_pos='0-1-x';"), None);
    assert_eq!(dump_position("-- SET GLOBAL gtid_slave_pos='0-1-9"), None);
}

fn spec(role: &str) -> EngineSpec {
    EngineSpec {
        cluster: "orders".into(),
        engine: "mariadb".into(),
        role: role.into(),
        port: 3306,
        admin_user: "admin".into(),
        database: "app".into(),
        replicas: vec![],
        sync: false,
        upstream: (role == "replica").then(|| Upstream {
            node: "vm1".into(),
            host: "10.0.0.1".into(),
            port: 3306,
        }),
        wal_archive: false,
        require_client_tls: false,
    }
}

fn following(host: &str) -> ReplicaStatus {
    ReplicaStatus {
        host: host.into(),
        port: 3306,
        user: REPLICATION_USER.into(),
        io_running: "Yes".into(),
        sql_running: "Yes".into(),
        received: "0-1-12".into(),
        gtid_mode: "Slave_Pos".into(),
        ..Default::default()
    }
}

#[test]
fn stats_come_from_the_observation() {
    let replica = Observed {
        connections: Some(4),
        replica: Some(ReplicaStatus {
            seconds_behind: "2".into(),
            ..following("10.0.0.1")
        }),
        ..Default::default()
    };
    let s = engine_stats(&replica, 12);
    assert_eq!(s["connections"], 4.0);
    assert_eq!(s["lag_seconds"], 2.0);
    assert_eq!(s["gtid_seq"], 12.0);
    // Not replicating (NULL), or a primary: no lag figure.
    let stopped = Observed {
        replica: Some(following("10.0.0.1")),
        ..Default::default()
    };
    assert!(!engine_stats(&stopped, 0).contains_key("lag_seconds"));
    assert!(!engine_stats(&Observed::default(), 0).contains_key("connections"));
}

#[test]
fn replicas_converge_to_their_upstream() {
    let up = spec("replica").upstream.unwrap();
    let fresh = Observed {
        read_only: true,
        ..Default::default()
    };
    assert_eq!(
        plan(&fresh, &spec("replica"), true, false),
        vec![Action::Follow(up.clone())]
    );
    let streaming = Observed {
        read_only: true,
        replica: Some(following("10.0.0.1")),
        ..Default::default()
    };
    assert_eq!(plan(&streaming, &spec("replica"), true, false), vec![]);
    let elsewhere = Observed {
        replica: Some(following("10.0.0.9")),
        ..streaming.clone()
    };
    assert_eq!(
        plan(&elsewhere, &spec("replica"), true, false),
        vec![Action::Follow(up.clone())]
    );
    let mut stopped = streaming.clone();
    stopped.replica.as_mut().unwrap().io_running = "No".into();
    stopped.replica.as_mut().unwrap().sql_running = "No".into();
    stopped.read_only = false;
    assert_eq!(
        plan(&stopped, &spec("replica"), true, false),
        vec![Action::StartReplication, Action::SetReadOnly(true)]
    );
    let mut broken = streaming.clone();
    broken.replica.as_mut().unwrap().sql_running = "No".into();
    broken.replica.as_mut().unwrap().last_sql_errno = 1062;
    assert_eq!(plan(&broken, &spec("replica"), true, false), vec![]);
    // Connecting is not stopped.
    let mut connecting = streaming.clone();
    connecting.replica.as_mut().unwrap().io_running = "Connecting".into();
    assert_eq!(plan(&connecting, &spec("replica"), true, false), vec![]);
}

#[test]
fn primaries_follow_nobody_and_the_fence() {
    let replicating = Observed {
        read_only: true,
        replica: Some(following("10.0.0.1")),
        ..Default::default()
    };
    assert_eq!(
        plan(&replicating, &spec("primary"), false, false),
        vec![Action::ForgetUpstream, Action::SetReadOnly(false)]
    );
    let writable = Observed::default();
    assert_eq!(plan(&writable, &spec("primary"), false, false), vec![]);
    assert_eq!(
        plan(&writable, &spec("primary"), false, true),
        vec![Action::SetReadOnly(true)]
    );
}

#[test]
fn role_and_marker_must_agree() {
    // Promotion under way (primary spec, replica data): left alone.
    let replicating = Observed {
        read_only: true,
        replica: Some(following("10.0.0.1")),
        ..Default::default()
    };
    assert_eq!(plan(&replicating, &spec("primary"), true, false), vec![]);
    // A former primary not yet rejoined: left alone.
    assert_eq!(
        plan(&Observed::default(), &spec("replica"), false, false),
        vec![]
    );
}

#[test]
fn reports() {
    let replica = Observed {
        binlog_pos: "0-1-10".into(),
        applied_pos: "0-1-11".into(),
        read_only: true,
        replica: Some(following("10.0.0.1")),
        ..Default::default()
    };
    let r = replication_report(&replica, true);
    assert!(r.in_recovery && r.streaming);
    assert_eq!((r.lsn, r.receive_lsn, r.upstream_lsn), (11, 12, 12));
    assert_eq!(r.upstream_host, "10.0.0.1");
    assert!(r.standbys.is_empty());
    assert_eq!((r.timeline, r.system_identifier.as_str()), (0, ""));

    let primary = Observed {
        binlog_pos: "0-1-20".into(),
        applied_pos: "0-2-3".into(),
        replica_hosts: vec!["vm2".into(), "vm3".into()],
        semi_source_enabled: true,
        semi_source_active: true,
        semi_clients: 2,
        ..Default::default()
    };
    let r = replication_report(&primary, false);
    assert!(!r.in_recovery);
    assert_eq!(r.lsn, 20);
    assert_eq!(r.synchronous_standby_names, "semi-sync");
    let names: Vec<_> = r.standbys.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["vm2", "vm3"]);
    assert!(r
        .standbys
        .iter()
        .all(|s| s.state == "streaming" && s.sync_state == "quorum"));
    let one_async = Observed {
        semi_clients: 1,
        ..primary.clone()
    };
    assert!(replication_report(&one_async, false)
        .standbys
        .iter()
        .all(|s| s.sync_state == "potential"));
    let plain = Observed {
        semi_source_enabled: false,
        ..primary
    };
    let r = replication_report(&plain, false);
    assert_eq!(r.synchronous_standby_names, "");
    assert!(r.standbys.iter().all(|s| s.sync_state == "async"));
}

#[test]
fn config_by_role() {
    let (d, s, p, f) = (
        Path::new("/s/mariadb/data"),
        Path::new("/s/mariadb/run/mariadbd.sock"),
        Path::new("/s/mariadb/run/mariadbd.pid"),
        Path::new("/s/mariadb/fence.cnf"),
    );
    let c = |read_only, semi, temp| {
        render_config(&ServerConfig {
            datadir: d,
            tmpdir: Path::new("/s/mariadb/tmp"),
            socket: s,
            pid_file: p,
            port: 3307,
            server_id: 42,
            report_host: "vm2",
            read_only,
            semi_sync_master: semi,
            temp,
            fence: f,
        })
    };
    let replica = c(true, false, false);
    for line in [
        "[mariadbd]",
        "datadir = /s/mariadb/data",
        "tmpdir = /s/mariadb/tmp",
        "socket = /s/mariadb/run/mariadbd.sock",
        "port = 3307",
        "bind_address = *",
        "server_id = 42",
        "report_host = vm2",
        "log_bin = binlog",
        "log_slave_updates = ON",
        "binlog_format = ROW",
        "gtid_strict_mode = ON",
        "gtid_domain_id = 0",
        "skip_slave_start = ON",
        "read_only = ON",
        "rpl_semi_sync_master_enabled = OFF",
        "rpl_semi_sync_slave_enabled = ON",
        "sync_binlog = 1",
        "innodb_flush_log_at_trx_commit = 1",
        "innodb_buffer_pool_size = 128M",
        "!include /s/mariadb/fence.cnf",
    ] {
        assert!(
            replica.lines().any(|l| l == line),
            "{line:?} missing from:\n{replica}"
        );
    }
    // The fence comes last: it overrides read_only.
    assert!(replica
        .trim_end()
        .ends_with("!include /s/mariadb/fence.cnf"));
    let primary = c(false, true, false);
    assert!(primary.lines().any(|l| l == "read_only = OFF"));
    assert!(primary
        .lines()
        .any(|l| l == "rpl_semi_sync_master_enabled = ON"));
    assert!(primary
        .lines()
        .any(|l| l == "rpl_semi_sync_master_wait_point = AFTER_SYNC"));
    let temp = c(false, true, true);
    assert!(temp.lines().any(|l| l == "skip_networking = ON"));
    assert!(!temp.contains("bind_address"));
    assert!(!temp.contains("!include"));
    assert!(!temp.contains("report_host"));
    assert!(temp
        .lines()
        .any(|l| l == "rpl_semi_sync_slave_enabled = OFF"));
    assert!(temp
        .lines()
        .any(|l| l == "rpl_semi_sync_master_enabled = OFF"));
}

#[test]
fn semi_sync_needs_a_primary_with_replicas() {
    let mut s = spec("primary");
    s.sync = true;
    assert!(!wants_semi_sync(&s));
    s.replicas = vec!["vm2".into()];
    assert!(wants_semi_sync(&s));
    s.role = "replica".into();
    assert!(!wants_semi_sync(&s));
}

#[test]
fn cnf_paths_need_no_quoting() {
    assert!(check_cnf_path(Path::new("/var/lib/corral-agent/mariadb")).is_ok());
    for bad in ["/a b", "/a#b", "/a\"b", "/a\\b", "/a;b"] {
        assert!(check_cnf_path(Path::new(bad)).is_err(), "{bad}");
    }
}

/// One binlog event: header (19 bytes) + body.
fn event(kind: u8, server: u32, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = 19 + body.len() as u32;
    let mut e = Vec::new();
    e.extend_from_slice(&0u32.to_le_bytes());
    e.push(kind);
    e.extend_from_slice(&server.to_le_bytes());
    e.extend_from_slice(&len.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e.extend_from_slice(body);
    e
}

fn gtid_event(server: u32, domain: u32, seq: u64) -> Vec<u8> {
    let mut b = seq.to_le_bytes().to_vec();
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&[0u8; 7]);
    event(GTID_EVENT, server, 0, &b)
}

fn gtid_list(gtids: &[Gtid]) -> Vec<u8> {
    let mut b = (gtids.len() as u32).to_le_bytes().to_vec();
    for g in gtids {
        b.extend_from_slice(&g.domain.to_le_bytes());
        b.extend_from_slice(&g.server.to_le_bytes());
        b.extend_from_slice(&g.seq.to_le_bytes());
    }
    b.extend_from_slice(&[1, 2, 3, 4]); // checksum
    event(GTID_LIST_EVENT, 1, 0, &b)
}

fn binlog(in_use: bool, events: &[Vec<u8>]) -> Vec<u8> {
    let mut f = b"\xfebin".to_vec();
    f.extend(event(
        FORMAT_DESCRIPTION_EVENT,
        1,
        if in_use { LOG_EVENT_BINLOG_IN_USE_F } else { 0 },
        &[0u8; 40],
    ));
    for e in events {
        f.extend_from_slice(e);
    }
    f
}

#[test]
fn binlog_tails() {
    let scan = |b: Vec<u8>| scan_binlog(std::io::Cursor::new(b)).unwrap();
    // Only the state at the start of the file: the list's last per domain.
    let t = scan(binlog(
        false,
        &[gtid_list(&[g(0, 2, 7), g(0, 1, 9), g(1, 5, 3)])],
    ));
    assert_eq!(t.gtids, vec![g(0, 1, 9), g(1, 5, 3)]);
    assert!(t.closed_cleanly);
    // Transactions after it, with other events between.
    let t = scan(binlog(
        true,
        &[
            gtid_list(&[g(0, 1, 9)]),
            gtid_event(1, 0, 10),
            event(2, 1, 0, b"BEGIN"),
            gtid_event(3, 0, 11),
            event(16, 3, 0, &[0u8; 12]),
        ],
    ));
    assert_eq!(t.gtids, vec![g(0, 3, 11)]);
    assert!(!t.closed_cleanly);
    // A crash mid-event: the incomplete one does not count.
    let mut b = binlog(true, &[gtid_list(&[]), gtid_event(1, 0, 1)]);
    let partial = gtid_event(1, 0, 2);
    b.extend_from_slice(&partial[..25]);
    let t = scan(b);
    assert_eq!(t.gtids, vec![g(0, 1, 1)]);
    // Empty and foreign files.
    assert_eq!(scan(binlog(false, &[])).gtids, vec![]);
    assert!(scan_binlog(std::io::Cursor::new(b"hello".to_vec())).is_err());
}
