//! The health check of a running server.

use crate::engine::Health;
use anyhow::Result;
use corral_proto::pb;

/// One health check: version and replication state.
pub(super) async fn health(client: &tokio_postgres::Client) -> Result<Health> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), pg_is_in_recovery(), \
             (CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0') \
                   ELSE pg_current_wal_lsn() END - '0/0')::bigint, \
             (coalesce(pg_last_wal_receive_lsn(), '0/0') - '0/0')::bigint, \
             (CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint()) \
                   ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END), \
             (SELECT system_identifier FROM pg_control_system())::text, \
             current_setting('synchronous_standby_names')",
            &[],
        )
        .await?;
    let in_recovery: bool = row.get(1);
    let mut r = pb::Replication {
        in_recovery,
        lsn: row.get::<_, i64>(2) as u64,
        receive_lsn: row.get::<_, i64>(3) as u64,
        timeline: row.get::<_, i32>(4) as u32,
        system_identifier: row.get(5),
        synchronous_standby_names: row.get(6),
        ..Default::default()
    };
    if in_recovery {
        if let Some(w) = client
            .query_opt(
                "SELECT status, coalesce(sender_host, ''), \
                 coalesce((latest_end_lsn - '0/0')::bigint, 0) FROM pg_stat_wal_receiver",
                &[],
            )
            .await?
        {
            r.streaming = w.get::<_, String>(0) == "streaming";
            r.upstream_host = w.get(1);
            r.upstream_lsn = w.get::<_, i64>(2) as u64;
        }
    } else {
        let rows = client
            .query(
                "SELECT application_name, coalesce(state, ''), \
                 coalesce((sent_lsn - '0/0')::bigint, 0), coalesce((flush_lsn - '0/0')::bigint, 0), \
                 coalesce((replay_lsn - '0/0')::bigint, 0), \
                 coalesce((extract(epoch FROM replay_lag) * 1000)::bigint, 0), coalesce(sync_state, '') \
                 FROM pg_stat_replication WHERE application_name NOT LIKE '%-clone' \
                 AND application_name NOT LIKE '%-rewind' AND application_name NOT LIKE '%-backup'",
                &[],
            )
            .await?;
        r.standbys = rows
            .iter()
            .map(|w| pb::Standby {
                name: w.get(0),
                state: w.get(1),
                sent_lsn: w.get::<_, i64>(2) as u64,
                flush_lsn: w.get::<_, i64>(3) as u64,
                replay_lsn: w.get::<_, i64>(4) as u64,
                replay_lag_ms: w.get::<_, i64>(5) as u64,
                sync_state: w.get(6),
            })
            .collect();
    }
    let mut stats = std::collections::BTreeMap::new();
    let figures = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::float8, \
             CASE WHEN NOT pg_is_in_recovery() THEN NULL \
               WHEN pg_last_wal_receive_lsn() IS NOT NULL \
                 AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0::float8 \
               ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)::float8 \
             END",
            &[],
        )
        .await?;
    stats.insert("connections".into(), figures.get::<_, f64>(0));
    if let Some(lag) = figures.get::<_, Option<f64>>(1) {
        // Time since the last replayed commit, while something received
        // waits to be replayed; 0 once everything received is replayed
        // (otherwise an idle primary would make every replica look ever
        // further behind, and raise replication-lag alerts).
        stats.insert("lag_seconds".into(), lag.max(0.0));
    }
    Ok(Health {
        version: row.get(0),
        replication: r,
        stats,
    })
}
