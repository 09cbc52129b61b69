//! Unit tests of the Redis driver's pure parts: INFO parsing, standbys,
//! quoting and the configuration file.

#[test]
fn stats_from_info_reads_clients_memory_keys_and_offsets() {
    let primary = Info::parse(
        "# Clients\r\nconnected_clients:3\r\n# Memory\r\nused_memory:1048576\r\n\
         # Replication\r\nrole:master\r\nmaster_repl_offset:4242\r\n\
         # Keyspace\r\ndb0:keys=10,expires=0,avg_ttl=0\r\ndb3:keys=5,expires=1,avg_ttl=9\r\n",
    );
    let s = stats_from_info(&primary);
    assert_eq!(s["connections"], 3.0);
    assert_eq!(s["used_memory_bytes"], 1048576.0);
    assert_eq!(s["keys"], 15.0);
    assert_eq!(s["repl_offset_bytes"], 4242.0);
    assert!(!s.contains_key("lag_seconds"));
    let replica = Info::parse(
        "role:slave\r\nslave_repl_offset:4000\r\nmaster_repl_offset:4242\r\n\
         master_last_io_seconds_ago:1\r\n",
    );
    let s = stats_from_info(&replica);
    assert_eq!(s["repl_offset_bytes"], 4000.0);
    assert_eq!(s["lag_seconds"], 1.0);
    assert_eq!(s["keys"], 0.0);
}
use super::*;

const PRIMARY_INFO: &str = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n\r\n\
    # Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
    slave0:ip=vm-b,port=17002,state=online,offset=52,lag=1\r\n\
    slave1:ip=10.0.0.9,port=6379,state=wait_bgsave,offset=0,lag=0\r\n\
    master_failover_state:no-failover\r\n\
    master_replid:88878f1d5c6430e8d9ca04e7eae5bcfd39160e7e\r\n\
    master_replid2:0000000000000000000000000000000000000000\r\n\
    master_repl_offset:80\r\nsecond_repl_offset:-1\r\n\
    slave_lagging:1\r\n\
    # Persistence\r\nloading:0\r\n";

const REPLICA_INFO: &str = "# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n\
    master_port:6379\r\nmaster_link_status:up\r\nmaster_last_io_seconds_ago:1\r\n\
    master_sync_in_progress:0\r\nslave_read_repl_offset:60\r\nslave_repl_offset:52\r\n\
    slave_priority:100\r\nslave_read_only:1\r\nreplica_announced:1\r\nconnected_slaves:0\r\n\
    master_replid:88878f1d5c6430e8d9ca04e7eae5bcfd39160e7e\r\nmaster_repl_offset:52\r\n";

fn spec(role: &str) -> EngineSpec {
    EngineSpec {
        cluster: "cache".into(),
        engine: "redis".into(),
        role: role.into(),
        port: 6379,
        admin_user: "admin".into(),
        database: "defaultdb".into(),
        replicas: if role == "primary" {
            vec!["vm2".into()]
        } else {
            vec![]
        },
        sync: false,
        upstream: (role == "replica").then(|| Upstream {
            node: "vm1".into(),
            host: "10.0.0.1".into(),
            port: 6379,
        }),
        wal_archive: false,
        require_client_tls: false,
    }
}

fn secrets() -> StoredSecrets {
    StoredSecrets {
        admin_password: "admin \"pass\" \\ é".into(),
        replication_password: "repl-pass-0123456789".into(),
        agent_password: "agent-pass".into(),
    }
}

#[test]
fn primary_info_gives_position_and_standbys() {
    let info = Info::parse(PRIMARY_INFO);
    assert_eq!(info.version(), "7.0.15");
    let r = replication_from_info(&info, 1);
    assert!(!r.in_recovery);
    assert_eq!(r.lsn, 80);
    assert_eq!(
        r.system_identifier,
        "88878f1d5c6430e8d9ca04e7eae5bcfd39160e7e"
    );
    assert_eq!(r.synchronous_standby_names, "min-replicas-to-write 1");
    assert_eq!(r.standbys.len(), 2, "slave_lagging is not a replica line");
    let b = &r.standbys[0];
    assert_eq!(b.name, "vm-b", "named by the node id it announces");
    assert_eq!(b.state, "streaming");
    assert_eq!(b.replay_lsn, 52);
    assert_eq!(b.replay_lag_ms, 1000);
    assert_eq!(b.sync_state, "async");
    let other = &r.standbys[1];
    assert_eq!(other.name, "10.0.0.9:6379", "a replica announcing no name");
    assert_eq!(other.state, "startup");
}

#[test]
fn replica_info_gives_its_offsets_and_upstream() {
    let info = Info::parse(REPLICA_INFO);
    let r = replication_from_info(&info, 0);
    assert!(r.in_recovery);
    assert!(r.streaming);
    assert_eq!(r.lsn, 52);
    assert_eq!(r.receive_lsn, 60);
    assert_eq!(r.upstream_lsn, 60);
    assert_eq!(r.upstream_host, "10.0.0.1");
    assert_eq!(r.synchronous_standby_names, "");
    assert!(r.standbys.is_empty());
    let up = spec("replica").upstream.unwrap();
    assert!(info.follows(&up));
    assert!(!info.follows(&Upstream {
        port: 6380,
        ..up.clone()
    }));
    assert!(!Info::parse(PRIMARY_INFO).follows(&up));
    let down = Info::parse(&REPLICA_INFO.replace("link_status:up", "link_status:down"));
    assert!(!replication_from_info(&down, 0).streaming);
}

#[test]
fn standby_lines() {
    let s = parse_standby("ip=::1,port=7000,state=send_bulk,offset=5,lag=0", 10).unwrap();
    assert_eq!(s.name, "[::1]:7000");
    assert_eq!(s.state, "catchup");
    let s = parse_standby("ip=vm3,port=7000,state=online,offset=10,lag=3", 10).unwrap();
    assert_eq!(s.replay_lag_ms, 0, "caught up: no lag whatever the ack age");
    assert!(parse_standby("garbage", 0).is_none());
}

#[test]
fn quoting_reads_back_byte_for_byte() {
    assert_eq!(conf_quote("a b"), "\"a b\"");
    assert_eq!(conf_quote("x\"y\\z"), "\"x\\\"y\\\\z\"");
    assert_eq!(conf_quote("é\n"), "\"\\xc3\\xa9\\n\"");
}

fn input<'a>(
    s: &'a StoredSecrets,
    up: Option<&'a Upstream>,
    admin: &'a str,
    min: (u32, u32),
) -> ConfInput<'a> {
    ConfInput {
        port: 6379,
        announce_port: 6379,
        socket: Path::new("/s/run/redis.sock"),
        pidfile: Path::new("/s/run/redis.pid"),
        dir: Path::new("/s/data"),
        node_id: "vm2",
        admin_user: admin,
        secrets: s,
        upstream: up,
        min_replicas: min,
    }
}

#[test]
fn config_of_a_replica_and_a_primary() {
    let s = secrets();
    let up = spec("replica").upstream.unwrap();
    let conf = render_conf(&input(&s, Some(&up), "admin", (0, 10)));
    for line in [
        "port 6379",
        "bind * -::*",
        "unixsocket \"/s/run/redis.sock\"",
        "unixsocketperm 700",
        "appendonly yes",
        "appendfsync everysec",
        "repl-diskless-sync-delay 0",
        "replica-announce-ip \"vm2\"",
        "replicaof \"10.0.0.1\" 6379",
        "masteruser \"corral_replication\"",
        "masterauth \"repl-pass-0123456789\"",
        "user \"admin\" \"reset\" \"on\" \">admin \\\"pass\\\" \\\\ \\xc3\\xa9\" \"~*\" \"&*\" \"+@all\" \"-@admin\"",
        "user \"corral_agent\" \"reset\" \"on\" \">agent-pass\" \"~*\" \"&*\" \"+@all\"",
        "user \"corral_replication\" \"reset\" \"on\" \">repl-pass-0123456789\" \"+psync\" \"+replconf\" \"+ping\"",
    ] {
        assert!(conf.lines().any(|l| l == line), "missing {line:?} in\n{conf}");
    }
    assert_eq!(conf_min_replicas(&conf), Some((0, 10)));
    let conf = render_conf(&input(&s, None, "default", (1, 10)));
    assert!(!conf.contains("replicaof"));
    assert_eq!(conf.matches("user \"default\"").count(), 1, "{conf}");
    assert_eq!(conf_min_replicas(&conf), Some((1, 10)));
}

#[test]
fn write_settings() {
    let mut p = spec("primary");
    assert_eq!(min_replicas(&p, false), (0, SYNC_MAX_LAG));
    p.sync = true;
    assert_eq!(min_replicas(&p, false), (1, SYNC_MAX_LAG));
    assert_eq!(min_replicas(&p, true), (FENCE_MIN_REPLICAS, 1));
    p.replicas.clear();
    assert_eq!(
        min_replicas(&p, false),
        (0, SYNC_MAX_LAG),
        "no replica to wait for"
    );
    assert_eq!(min_replicas(&spec("replica"), false).0, 0);
}
