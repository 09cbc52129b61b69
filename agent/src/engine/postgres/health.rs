//! The health check of a running server.

use crate::engine::Health;
use anyhow::{anyhow, bail, Context, Result};
use corral_proto::pb;
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow};

/// The four statements of a health check, sent as one simple query: one
/// round trip, nothing to prepare (it runs with every heartbeat, four times
/// a second). Each answers a result set: the server's state; the standby's
/// WAL receiver (a standby only); the primary's standbys (a primary only);
/// figures for the history.
const HEALTH: &str = "\
    SELECT current_setting('server_version'), pg_is_in_recovery(), \
      (CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0') \
            ELSE pg_current_wal_lsn() END - '0/0')::bigint, \
      (coalesce(pg_last_wal_receive_lsn(), '0/0') - '0/0')::bigint, \
      (CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint()) \
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END), \
      (SELECT system_identifier FROM pg_control_system())::text, \
      current_setting('synchronous_standby_names'); \
    SELECT status, coalesce(sender_host, ''), coalesce((latest_end_lsn - '0/0')::bigint, 0) \
      FROM pg_stat_wal_receiver WHERE pg_is_in_recovery(); \
    SELECT application_name, coalesce(state, ''), \
      coalesce((sent_lsn - '0/0')::bigint, 0), coalesce((flush_lsn - '0/0')::bigint, 0), \
      coalesce((replay_lsn - '0/0')::bigint, 0), \
      coalesce((extract(epoch FROM replay_lag) * 1000)::bigint, 0), coalesce(sync_state, '') \
      FROM pg_stat_replication WHERE NOT pg_is_in_recovery() \
      AND application_name NOT LIKE '%-clone' AND application_name NOT LIKE '%-rewind' \
      AND application_name NOT LIKE '%-backup'; \
    SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::float8, \
      CASE WHEN NOT pg_is_in_recovery() THEN NULL \
        WHEN pg_last_wal_receive_lsn() IS NOT NULL \
          AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0::float8 \
        ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)::float8 \
      END";

/// One health check: version and replication state.
pub(super) async fn health(client: &tokio_postgres::Client) -> Result<Health> {
    let answer = client.simple_query(HEALTH).await?;
    // The rows of each statement, in order.
    let mut sets: Vec<Vec<SimpleQueryRow>> = vec![Vec::new()];
    for m in answer {
        match m {
            SimpleQueryMessage::Row(r) => {
                if let Some(set) = sets.last_mut() {
                    set.push(r);
                }
            }
            SimpleQueryMessage::CommandComplete(_) => sets.push(Vec::new()),
            _ => {}
        }
    }
    let [server, receiver, standbys, figures, ..] = sets.as_slice() else {
        bail!(
            "the health query answered {} result sets, not 4",
            sets.len() - 1
        );
    };
    let row = server
        .first()
        .context("the health query answered no server row")?;
    let in_recovery = text(row, 1)? == "t";
    let mut r = pb::Replication {
        in_recovery,
        lsn: number(row, 2)?,
        receive_lsn: number(row, 3)?,
        timeline: number(row, 4)?,
        system_identifier: text(row, 5)?.to_string(),
        synchronous_standby_names: text(row, 6)?.to_string(),
        ..Default::default()
    };
    if let Some(w) = receiver.first() {
        r.streaming = text(w, 0)? == "streaming";
        r.upstream_host = text(w, 1)?.to_string();
        r.upstream_lsn = number(w, 2)?;
    }
    r.standbys = standbys
        .iter()
        .map(|w| {
            Ok(pb::Standby {
                name: text(w, 0)?.to_string(),
                state: text(w, 1)?.to_string(),
                sent_lsn: number(w, 2)?,
                flush_lsn: number(w, 3)?,
                replay_lsn: number(w, 4)?,
                replay_lag_ms: number(w, 5)?,
                sync_state: text(w, 6)?.to_string(),
            })
        })
        .collect::<Result<_>>()?;
    let figures = figures
        .first()
        .context("the health query answered no figures")?;
    let mut stats = std::collections::BTreeMap::new();
    stats.insert("connections".into(), number(figures, 0)?);
    if let Some(lag) = figures.try_get(1)? {
        // Time since the last replayed commit, while something received
        // waits to be replayed; 0 once everything received is replayed
        // (otherwise an idle primary would make every replica look ever
        // further behind, and raise replication-lag alerts).
        let lag: f64 = lag.parse().context("an unreadable lag")?;
        stats.insert("lag_seconds".into(), lag.max(0.0));
    }
    Ok(Health {
        version: text(row, 0)?.to_string(),
        replication: r,
        stats,
    })
}

/// Column `i` of a row as text; NULL is an error (the query coalesces).
fn text(row: &SimpleQueryRow, i: usize) -> Result<&str> {
    row.try_get(i)?
        .with_context(|| format!("the health query answered NULL in column {i}"))
}

/// Column `i` of a row as a number (LSNs are non-negative bigints).
fn number<T: std::str::FromStr>(row: &SimpleQueryRow, i: usize) -> Result<T> {
    let v = text(row, i)?;
    v.parse()
        .map_err(|_| anyhow!("the health query answered {v:?} in column {i}, not a number"))
}
