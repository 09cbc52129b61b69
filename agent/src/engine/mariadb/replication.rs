//! Replication: the report of an observation, the plan that brings a server
//! to its spec, converging to it, and probing an upstream before a rejoin.

use super::config::wants_semi_sync;
use super::settings::{REPLICATION_USER, RESTART_REPLICATION_EVERY, SEMI_SYNC_TIMEOUT_MS};
use super::statements::{sql_string, SemiSync};
use super::status::{observe, replica_status, Observed};
use super::{Admin, Mariadb};
use crate::engine::{EngineSpec, Upstream};
use anyhow::{anyhow, Context, Result};
use corral_proto::pb;
use mysql_async::prelude::*;
use std::time::{Duration, Instant};

/// The replication report of one observation; `standby`: the data is
/// marked a replica's.
pub(super) fn replication_report(o: &Observed, standby: bool) -> pb::Replication {
    let f = o.flavour;
    let written = f.position(&o.binlog_pos);
    let in_recovery = standby || o.replica.is_some();
    let mut r = pb::Replication {
        in_recovery,
        synchronous_standby_names: if o.semi_source_enabled {
            "semi-sync".into()
        } else {
            String::new()
        },
        ..Default::default()
    };
    if in_recovery {
        // Everything applied is in the binary log too (log_slave_updates),
        // and a former primary's own writes are only there.
        r.lsn = written.max(f.position(&o.applied_pos));
        if let Some(s) = &o.replica {
            r.receive_lsn = f.position(&s.received).max(r.lsn);
            r.streaming = s.streaming();
            r.upstream_host = s.host.clone();
            // MariaDB tells a replica nothing of its primary's position
            // beyond what it sent: what was received is a lower bound.
            r.upstream_lsn = r.receive_lsn;
        } else {
            r.receive_lsn = r.lsn;
        }
    } else {
        r.lsn = written;
        let sync_state = if !o.semi_source_enabled {
            "async"
        } else if o.semi_source_active && o.semi_clients >= o.replica_hosts.len() as u64 {
            // Any one acknowledgement releases a commit: ANY 1 of them.
            "quorum"
        } else {
            "potential"
        };
        r.standbys = o
            .replica_hosts
            .iter()
            .map(|h| pb::Standby {
                name: h.clone(),
                state: "streaming".into(),
                sync_state: sync_state.into(),
                // MariaDB keeps no per-replica positions on the primary.
                ..Default::default()
            })
            .collect();
    }
    r
}

/// A change that brings a running server to its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Stop replication, point it at the upstream, start it.
    Follow(Upstream),
    /// Replication is set up but not running.
    StartReplication,
    /// A primary follows nobody.
    ForgetUpstream,
    SetReadOnly(bool),
}

/// What to change so the server matches `spec`. Only when the data's marker
/// (`standby`) agrees with the spec's role: a replica whose promotion is
/// under way, or a primary not yet rejoined, is left alone.
pub(super) fn plan(o: &Observed, spec: &EngineSpec, standby: bool, fenced: bool) -> Vec<Action> {
    let mut actions = Vec::new();
    match (spec.role.as_str(), standby, &spec.upstream) {
        ("replica", true, Some(up)) => {
            let pointed = o.replica.as_ref().is_some_and(|s| {
                s.host == up.host
                    && s.port == up.port
                    && s.user == REPLICATION_USER
                    && o.flavour.uses_gtid(&s.gtid_mode)
            });
            if !pointed {
                actions.push(Action::Follow(up.clone()));
            } else if let Some(s) = &o.replica {
                let stopped = s.io_running == "No" || s.sql_running == "No";
                // An SQL error means the data disagrees with the stream:
                // restarting does not help, a rejoin or resync does.
                if stopped && s.last_sql_errno == 0 {
                    actions.push(Action::StartReplication);
                }
            }
            if !o.read_only {
                actions.push(Action::SetReadOnly(true));
            }
        }
        ("primary", false, _) => {
            if o.replica.is_some() {
                actions.push(Action::ForgetUpstream);
            }
            if o.read_only != fenced {
                actions.push(Action::SetReadOnly(fenced));
            }
        }
        _ => {}
    }
    actions
}

impl Mariadb {
    /// Brings the running server to `spec` (see [`plan`]); returns what it saw.
    pub(super) async fn converge(&self, a: &mut Admin, spec: &EngineSpec) -> Result<Observed> {
        let o = observe(a).await?;
        let mut actions = plan(&o, spec, self.standby(), self.fenced());
        // Pointed without TLS (before this node had a certificate): again,
        // over TLS.
        if let (Some(up), Some(r)) = (&spec.upstream, &o.replica) {
            let follows = actions.iter().any(|a| matches!(a, Action::Follow(_)));
            if self.tls_files().is_some() && r.ssl_allowed != "Yes" && !follows && self.standby() {
                actions.insert(0, Action::Follow(up.clone()));
            }
        }
        if actions.is_empty() {
            return Ok(o);
        }
        let f = a.flavour;
        for action in &actions {
            match action {
                Action::Follow(up) => {
                    let password = self.replication_password()?;
                    a.conn.query_drop(f.stop_replica()).await?;
                    a.conn
                        .query_drop(self.point_at(f, up, &password))
                        .await
                        .context("pointing replication at the upstream")?;
                    a.conn.query_drop(f.start_replica()).await?;
                    tracing::info!(upstream = %up.node, host = %up.host, port = up.port, "replication pointed at the upstream and started");
                }
                Action::StartReplication => {
                    let status = o.replica.clone().unwrap_or_default();
                    if status.last_io_errno != 0 {
                        let mut last = self
                            .restarted_replication
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if last.is_some_and(|t| t.elapsed() < RESTART_REPLICATION_EVERY) {
                            continue;
                        }
                        *last = Some(Instant::now());
                        tracing::warn!(
                            "replication stopped on an error ({}: {}); restarting it",
                            status.last_io_errno,
                            status.last_io_error
                        );
                    }
                    a.conn.query_drop(f.start_replica()).await?;
                }
                Action::ForgetUpstream => {
                    a.conn.query_drop(f.stop_replica()).await?;
                    a.conn.query_drop(f.reset_replica_all()).await?;
                    tracing::info!("a primary follows nobody: replication configuration removed");
                }
                Action::SetReadOnly(on) => {
                    a.conn.query_drop(f.set_read_only(*on)).await?;
                }
            }
        }
        observe(a).await
    }

    /// Semi-synchronous replication as `spec` wants it; returns whether the
    /// replica side was just turned on (its I/O thread must reconnect).
    pub(super) async fn apply_semi_sync(&self, a: &mut Admin, spec: &EngineSpec) -> Result<bool> {
        let f = a.flavour;
        let o = observe(a).await?;
        if wants_semi_sync(spec) {
            if !o.semi_wait_point.eq_ignore_ascii_case("AFTER_SYNC") {
                a.conn
                    .query_drop(f.set_semi_sync(SemiSync::SourceWaitPoint, "AFTER_SYNC"))
                    .await?;
            }
            if o.semi_timeout != SEMI_SYNC_TIMEOUT_MS.to_string() {
                a.conn
                    .query_drop(
                        f.set_semi_sync(SemiSync::SourceTimeout, &SEMI_SYNC_TIMEOUT_MS.to_string()),
                    )
                    .await?;
            }
            if !o.semi_source_enabled {
                a.conn
                    .query_drop(f.set_semi_sync(SemiSync::SourceEnabled, "ON"))
                    .await?;
                tracing::info!("semi-synchronous replication on: each commit waits for a replica");
            }
        } else if o.semi_source_enabled {
            a.conn
                .query_drop(f.set_semi_sync(SemiSync::SourceEnabled, "OFF"))
                .await?;
            tracing::info!("semi-synchronous replication off");
        }
        if !o.semi_replica_enabled {
            a.conn
                .query_drop(f.set_semi_sync(SemiSync::ReplicaEnabled, "ON"))
                .await?;
            return Ok(true);
        }
        Ok(false)
    }
}

impl Mariadb {
    /// Asks the upstream to stream its binary log from `pos` exactly as a
    /// replica at that position does (strict mode), through the temporary
    /// server's own replication: None when it serves it, else its refusal
    /// (it lacks one of our GTIDs, or purged them). Nothing received is
    /// applied; the relay log is discarded.
    pub(super) async fn upstream_refuses(
        &self,
        a: &mut Admin,
        up: &Upstream,
        password: &str,
        pos: &str,
    ) -> Result<Option<String>> {
        let f = a.flavour;
        a.conn.query_drop(f.reset_replica_all()).await?;
        a.conn
            .query_drop(format!("SET GLOBAL gtid_slave_pos = {}", sql_string(pos)))
            .await?;
        a.conn.query_drop(self.point_at(f, up, password)).await?;
        a.conn.query_drop(f.start_replica_io()).await?;
        let began = Instant::now();
        let verdict = loop {
            let s = replica_status(a).await?.unwrap_or_default();
            // ER_MASTER_FATAL_ERROR_READING_BINLOG: it cannot serve that position.
            if s.last_io_errno == 1236 {
                break Ok(Some(s.last_io_error));
            }
            // The upstream names its binary log file only once it accepted
            // the position (its first event, a rotate, carries the name).
            if s.last_io_errno == 0 && !s.source_log_file.is_empty() {
                break Ok(None);
            }
            if began.elapsed() > Duration::from_secs(15) {
                break Err(anyhow!(
                    "could not ask {} ({}:{}) for its binary log within 15 s (last error {}: {})",
                    up.node,
                    up.host,
                    up.port,
                    s.last_io_errno,
                    s.last_io_error
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        a.conn.query_drop(f.stop_replica()).await?;
        a.conn.query_drop(f.reset_replica_all()).await?;
        verdict
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::engine::mariadb::status::{engine_stats, ReplicaStatus};

    pub(in crate::engine::mariadb) fn spec(role: &str) -> EngineSpec {
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
}
