//! Fencing: the read-only include file, the running port, ending client
//! sessions.

use super::Postgres;
use anyhow::{anyhow, Context, Result};
use std::time::Duration;

/// The file (in the data directory, included by corral.conf) that makes a
/// fenced primary read-only.
pub(super) const FENCE_CONF: &str = "corral-fence.conf";

impl Postgres {
    /// The port of the running server, from postmaster.pid (fourth line).
    pub(super) fn running_port(&self) -> Option<u16> {
        let pidfile = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        pidfile.lines().nth(3)?.trim().parse().ok()
    }

    /// Terminates every client session (not the agent's own) and every
    /// walsender. A fenced primary's walsenders can reach no standby (the
    /// firewall drops their packets): left alone they would hold up a later
    /// fast shutdown, which waits for them to send their last WAL, for
    /// `wal_sender_timeout` (a minute).
    pub(super) async fn end_client_sessions(&self, port: u16) -> Result<()> {
        // Bounded: a hung server must not hold the fence (or anything
        // waiting for the connection) up.
        tokio::time::timeout(Duration::from_secs(3), self.end_client_sessions_now(port))
            .await
            .map_err(|_| anyhow!("the server did not answer within 3 s"))?
    }

    pub(super) async fn end_client_sessions_now(&self, port: u16) -> Result<()> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = Some(self.connect_port(port).await?);
        }
        let Some(c) = conn.as_ref() else {
            return Ok(());
        };
        let ended = c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE (backend_type = 'client backend' AND pid <> pg_backend_pid() \
                        AND application_name <> 'corral-agent') \
                    OR backend_type = 'walsender'",
                &[],
            )
            .await;
        match ended {
            Ok(r) => {
                tracing::info!(
                    sessions = r.get::<_, i64>(0),
                    "fenced: client sessions and walsenders ended"
                );
                Ok(())
            }
            Err(e) => {
                *conn = None;
                Err(e).context("ending client sessions")
            }
        }
    }
}
