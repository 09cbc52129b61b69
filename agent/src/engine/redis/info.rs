//! What `INFO` reports: parsing it into standbys, statistics and the
//! replication report.

use super::*;

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
