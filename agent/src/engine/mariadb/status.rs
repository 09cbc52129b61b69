//! What a running server reports: its replica status and one observation
//! of it, read over an administrative session.

use super::statements::{Column, Flavour, SemiSync};
use super::Admin;
use anyhow::{Context, Result};
use mysql_async::prelude::*;
use std::collections::BTreeMap;

// ---------------------------------------------------------------------------
// What a running server reports, and what to change: pure.
// ---------------------------------------------------------------------------

/// The replication threads as `SHOW SLAVE STATUS` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ReplicaStatus {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) user: String,
    pub(super) io_running: String,
    pub(super) sql_running: String,
    pub(super) received: String,
    pub(super) gtid_mode: String,
    pub(super) source_log_file: String,
    pub(super) last_io_errno: u32,
    pub(super) last_io_error: String,
    pub(super) last_sql_errno: u32,
    pub(super) last_sql_error: String,
    /// Seconds_Behind_Master (MySQL 8: _Source); empty (NULL) while the
    /// replica is not replicating.
    pub(super) seconds_behind: String,
    /// Master_SSL_Allowed (MySQL 8: Source_): "Yes" when replication was
    /// pointed over TLS.
    pub(super) ssl_allowed: String,
}

impl ReplicaStatus {
    pub(super) fn streaming(&self) -> bool {
        self.io_running == "Yes" && self.sql_running == "Yes"
    }
}

/// One look at a running server.
#[derive(Debug, Clone, Default)]
pub(super) struct Observed {
    pub(super) flavour: Flavour,
    pub(super) version: String,
    pub(super) binlog_pos: String,
    pub(super) applied_pos: String,
    pub(super) read_only: bool,
    pub(super) replica: Option<ReplicaStatus>,
    /// Primary: the replicas registered with it (their report_host).
    pub(super) replica_hosts: Vec<String>,
    pub(super) semi_source_enabled: bool,
    pub(super) semi_source_active: bool,
    pub(super) semi_clients: u64,
    pub(super) semi_wait_point: String,
    pub(super) semi_timeout: String,
    pub(super) semi_replica_enabled: bool,
    /// Threads_connected: client connections, the agent's own included.
    pub(super) connections: Option<u64>,
}

// ---------------------------------------------------------------------------
// Talking to servers.
// ---------------------------------------------------------------------------

pub(super) fn text(row: &mysql_async::Row, name: &str) -> String {
    match row.get_opt::<Option<String>, &str>(name) {
        Some(Ok(Some(s))) => s,
        _ => String::new(),
    }
}

pub(super) fn number<T: std::str::FromStr + Default>(row: &mysql_async::Row, name: &str) -> T {
    text(row, name).trim().parse().unwrap_or_default()
}

/// `SHOW GLOBAL VARIABLES|STATUS LIKE pattern`, names lower-cased.
pub(super) async fn show(
    conn: &mut mysql_async::Conn,
    what: &str,
) -> Result<BTreeMap<String, String>> {
    let rows: Vec<(String, String)> = conn.query(what).await?;
    Ok(rows
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect())
}

pub(super) async fn replica_status(a: &mut Admin) -> Result<Option<ReplicaStatus>> {
    let f = a.flavour;
    let row: Option<mysql_async::Row> = a
        .conn
        .query_first(f.replica_status())
        .await
        .with_context(|| f.replica_status())?;
    Ok(row.map(|row| ReplicaStatus {
        host: text(&row, f.column(Column::Host)),
        port: number(&row, f.column(Column::Port)),
        user: text(&row, f.column(Column::User)),
        io_running: text(&row, f.column(Column::IoRunning)),
        sql_running: text(&row, f.column(Column::SqlRunning)),
        received: text(&row, f.column(Column::Received)),
        gtid_mode: text(&row, f.column(Column::GtidMode)),
        source_log_file: text(&row, f.column(Column::SourceLogFile)),
        last_io_errno: number(&row, f.column(Column::LastIoErrno)),
        last_io_error: text(&row, f.column(Column::LastIoError)),
        last_sql_errno: number(&row, f.column(Column::LastSqlErrno)),
        last_sql_error: text(&row, f.column(Column::LastSqlError)),
        ssl_allowed: text(&row, f.column(Column::SslAllowed)),
        seconds_behind: ["Seconds_Behind_Master", "Seconds_Behind_Source"]
            .iter()
            .map(|c| text(&row, c))
            .find(|v| !v.is_empty())
            .unwrap_or_default(),
    }))
}

/// The figures of one observation (from the queries `observe` already
/// ran): connections, a replica's lag in seconds as the server measures
/// it (absent while it is not replicating), and the GTID sequence number
/// `lsn` of the replication report.
pub(super) fn engine_stats(o: &Observed, lsn: u64) -> BTreeMap<String, f64> {
    let mut stats = BTreeMap::new();
    if let Some(n) = o.connections {
        stats.insert("connections".to_string(), n as f64);
    }
    let behind = o
        .replica
        .as_ref()
        .and_then(|r| r.seconds_behind.trim().parse().ok());
    if let Some(s) = behind {
        stats.insert("lag_seconds".to_string(), s);
    }
    stats.insert("gtid_seq".to_string(), lsn as f64);
    stats
}

pub(super) async fn observe(a: &mut Admin) -> Result<Observed> {
    let f = a.flavour;
    let (binlog_pos, applied_pos): (Option<String>, Option<String>) = a
        .conn
        .query_first(f.positions_query())
        .await?
        .unwrap_or_default();
    let read_only: Option<i64> = a
        .conn
        .query_first(format!("SELECT @@{}", f.read_only_variable()))
        .await?;
    let replica = replica_status(a).await?;
    let hosts: Vec<mysql_async::Row> = a.conn.query(f.replica_hosts()).await?;
    let vars = show(&mut a.conn, "SHOW GLOBAL VARIABLES LIKE 'rpl_semi_sync%'").await?;
    let status = show(
        &mut a.conn,
        "SHOW GLOBAL STATUS WHERE Variable_name LIKE 'rpl_semi_sync%' \
         OR Variable_name = 'Threads_connected'",
    )
    .await?;
    let get = |m: &BTreeMap<String, String>, v: SemiSync| {
        m.get(&f.semi_sync(v).to_ascii_lowercase())
            .cloned()
            .unwrap_or_default()
    };
    Ok(Observed {
        flavour: f,
        version: a.version.clone(),
        binlog_pos: binlog_pos.unwrap_or_default(),
        applied_pos: applied_pos.unwrap_or_default(),
        read_only: read_only.unwrap_or(0) != 0,
        replica,
        replica_hosts: hosts
            .iter()
            .map(|r| text(r, "Host"))
            .filter(|h| !h.is_empty())
            .collect(),
        semi_source_enabled: get(&vars, SemiSync::SourceEnabled) == "ON",
        semi_source_active: get(&status, SemiSync::SourceStatus) == "ON",
        semi_clients: get(&status, SemiSync::SourceClients).parse().unwrap_or(0),
        semi_wait_point: get(&vars, SemiSync::SourceWaitPoint),
        semi_timeout: get(&vars, SemiSync::SourceTimeout),
        semi_replica_enabled: get(&vars, SemiSync::ReplicaEnabled) == "ON",
        connections: status.get("threads_connected").and_then(|v| v.parse().ok()),
    })
}
