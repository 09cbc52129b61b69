//! Fencing a running server: ending its client sessions.

use super::{Admin, Mariadb};
use anyhow::{Context, Result};
use mysql_async::prelude::*;

impl Mariadb {
    /// Ends every client session but ours (replication and system threads
    /// stay). `dump_threads`: end only the binlog dump threads instead.
    pub(super) async fn kill_sessions(a: &mut Admin, dump_threads: bool) -> Result<usize> {
        let filter = if dump_threads {
            "COMMAND IN ('Binlog Dump', 'Binlog Dump GTID')"
        } else {
            "COMMAND NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon', 'Slave_IO', \
             'Slave_SQL', 'Slave_worker') AND USER NOT IN ('system user', 'event_scheduler')"
        };
        let ids: Vec<u64> = a
            .conn
            .query(format!(
                "SELECT ID FROM information_schema.PROCESSLIST \
                 WHERE ID <> CONNECTION_ID() AND {filter}"
            ))
            .await?;
        let mut ended = 0;
        for id in ids {
            match a.conn.query_drop(format!("KILL CONNECTION {id}")).await {
                Ok(()) => ended += 1,
                // Gone meanwhile (ER_NO_SUCH_THREAD).
                Err(mysql_async::Error::Server(e)) if e.code == 1094 => {}
                Err(e) => return Err(e).with_context(|| format!("KILL CONNECTION {id}")),
            }
        }
        Ok(ended)
    }
}
