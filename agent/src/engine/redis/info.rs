//! What `INFO` reports: parsing it into standbys, statistics and the
//! replication report.

use crate::engine::Upstream;
use corral_proto::pb;

/// `INFO` output: its `key:value` lines, in order.
pub(super) struct Info(pub(super) Vec<(String, String)>);

impl Info {
    pub(super) fn parse(text: &str) -> Info {
        Info(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A counter; negative values (`-1`: unknown) read as None.
    pub(super) fn num(&self, key: &str) -> Option<u64> {
        self.get(key)?
            .parse::<i64>()
            .ok()
            .and_then(|v| u64::try_from(v).ok())
    }

    pub(super) fn is_replica(&self) -> bool {
        self.get("role") == Some("slave")
    }

    /// Whether the server follows `up`.
    pub(super) fn follows(&self, up: &Upstream) -> bool {
        self.is_replica()
            && self.get("master_host") == Some(up.host.as_str())
            && self.num("master_port") == Some(u64::from(up.port))
    }

    pub(super) fn version(&self) -> String {
        self.get("valkey_version")
            .or_else(|| self.get("redis_version"))
            .unwrap_or("unknown")
            .to_string()
    }
}

/// A primary's view of one replica, from an `INFO replication` line such as
/// `slave0:ip=vm2,port=6379,state=online,offset=1234,lag=0`.
pub(super) fn parse_standby(line: &str, master_offset: u64) -> Option<pb::Standby> {
    let fields: Vec<(&str, &str)> = line.split(',').filter_map(|f| f.split_once('=')).collect();
    let get = |k: &str| fields.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let ip = get("ip")?;
    let port = get("port").unwrap_or("0");
    let offset: u64 = get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    let lag_s: u64 = get("lag").and_then(|v| v.parse().ok()).unwrap_or(0);
    let name = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(_)) => format!("[{ip}]:{port}"),
        Ok(_) => format!("{ip}:{port}"),
        // Our replicas announce their node id.
        Err(_) => ip.to_string(),
    };
    let state = match get("state").unwrap_or("") {
        "online" => "streaming",
        "wait_bgsave" => "startup",
        "send_bulk" => "catchup",
        other => other,
    };
    Some(pb::Standby {
        name,
        state: state.to_string(),
        // Redis knows each replica's acknowledged offset only.
        sent_lsn: offset,
        flush_lsn: offset,
        replay_lsn: offset,
        // `lag` counts seconds since the replica's last acknowledgement
        // (sent every second): a replica that has everything is not late.
        replay_lag_ms: if offset >= master_offset {
            0
        } else {
            lag_s * 1000
        },
        sync_state: "async".into(),
    })
}

/// The figures `EngineStatus.stats` carries for Redis: connected clients,
/// memory used, keys (every database), the replication offset, and on a
/// replica the seconds since it last heard from its primary (Redis has no
/// replay lag: it applies what it receives).
pub(super) fn stats_from_info(info: &Info) -> std::collections::BTreeMap<String, f64> {
    let mut stats = std::collections::BTreeMap::new();
    let num = |k: &str| info.get(k).and_then(|v| v.parse::<f64>().ok());
    if let Some(n) = num("connected_clients") {
        stats.insert("connections".to_string(), n);
    }
    if let Some(n) = num("used_memory") {
        stats.insert("used_memory_bytes".to_string(), n);
    }
    let keys: f64 = (0..16)
        .filter_map(|db| info.get(&format!("db{db}")))
        .filter_map(|v| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix("keys="))
                .and_then(|n| n.parse::<f64>().ok())
        })
        .sum();
    stats.insert("keys".to_string(), keys);
    let offset = if info.get("role") == Some("slave") {
        num("slave_repl_offset")
    } else {
        num("master_repl_offset")
    };
    if let Some(n) = offset {
        stats.insert("repl_offset_bytes".to_string(), n);
    }
    if let Some(n) = num("master_last_io_seconds_ago").filter(|n| *n >= 0.0) {
        stats.insert("lag_seconds".to_string(), n);
    }
    stats
}

/// The replication state from `INFO replication` and the running
/// `min-replicas-to-write`.
pub(super) fn replication_from_info(info: &Info, min_replicas_to_write: u64) -> pb::Replication {
    let master_offset = info.num("master_repl_offset").unwrap_or(0);
    let mut r = pb::Replication {
        in_recovery: info.is_replica(),
        system_identifier: info.get("master_replid").unwrap_or("").to_string(),
        timeline: 0,
        synchronous_standby_names: if min_replicas_to_write > 0 {
            format!("min-replicas-to-write {min_replicas_to_write}")
        } else {
            String::new()
        },
        ..Default::default()
    };
    if r.in_recovery {
        let processed = info.num("slave_repl_offset").unwrap_or(master_offset);
        let read = info.num("slave_read_repl_offset").unwrap_or(processed);
        r.lsn = processed;
        r.receive_lsn = read;
        // What the primary had sent as far as this replica knows.
        r.upstream_lsn = read;
        r.streaming = info.get("master_link_status") == Some("up");
        r.upstream_host = info.get("master_host").unwrap_or("").to_string();
    } else {
        r.lsn = master_offset;
        r.standbys = info
            .0
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix("slave")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .filter_map(|(_, v)| parse_standby(v, master_offset))
            .collect();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::super::config::tests::spec;
    use super::*;

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
}
