//! The administrative connection and the changes made to a running server:
//! fencing minimums, TLS, users, following an upstream, converging.

use super::acl::AGENT_USER;
use super::config::{acl_users, conf_min_replicas, min_replicas, StoredSecrets};
use super::connection::{broken, cmd, connect};
use super::info::Info;
use super::settings::{COMMAND_TIMEOUT, REPLICATION_USER};
use super::Redis;
use crate::engine::{EngineSpec, Upstream};
use ::redis::aio::MultiplexedConnection;
use anyhow::{anyhow, bail, Context, Result};

impl Redis {
    /// The cached administrative connection, opened when there is none.
    pub(super) async fn admin(&self) -> Result<MultiplexedConnection> {
        let mut slot = tokio::time::timeout(COMMAND_TIMEOUT, self.conn.lock())
            .await
            .map_err(|_| anyhow!("the admin connection is busy (another command hangs)"))?;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let secrets = self.load_secrets()?;
        let socket = self.socket_path();
        let c = match connect(&socket, AGENT_USER, &secrets.agent_password).await {
            Ok(c) => c,
            // A server started before the agent had its own user: as
            // `default`, once, to create it.
            Err(first) => {
                let mut legacy = connect(&socket, "default", &secrets.admin_password)
                    .await
                    .map_err(|_| first)?;
                let rules = acl_users("default", &secrets).swap_remove(0).1;
                cmd("ACL")
                    .arg("SETUSER")
                    .arg(AGENT_USER)
                    .arg(&rules)
                    .query_async::<()>(&mut legacy)
                    .await
                    .context("creating the agent's ACL user")?;
                connect(&socket, AGENT_USER, &secrets.agent_password).await?
            }
        };
        *slot = Some(c.clone());
        Ok(c)
    }

    pub(super) async fn forget_conn(&self) {
        *self.conn.lock().await = None;
    }

    /// Runs `command` over the admin connection; a broken connection is
    /// dropped, to be reopened by the next command.
    pub(super) async fn run<T: ::redis::FromRedisValue>(
        &self,
        command: &::redis::Cmd,
    ) -> Result<T> {
        let mut c = self.admin().await?;
        match tokio::time::timeout(COMMAND_TIMEOUT, command.query_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if broken(&e) {
                    self.forget_conn().await;
                }
                Err(e.into())
            }
            Err(_) => {
                self.forget_conn().await;
                bail!("no answer within {}s", COMMAND_TIMEOUT.as_secs())
            }
        }
    }

    pub(super) async fn info(&self, sections: &[&str]) -> Result<Info> {
        let mut c = cmd("INFO");
        for s in sections {
            c.arg(*s);
        }
        let text: String = self.run(&c).await.context("INFO")?;
        Ok(Info::parse(&text))
    }

    /// Sets the write settings on the running server.
    pub(super) async fn set_min_replicas(&self, (to_write, max_lag): (u32, u32)) -> Result<()> {
        self.run::<()>(
            cmd("CONFIG")
                .arg("SET")
                .arg("min-replicas-to-write")
                .arg(to_write)
                .arg("min-replicas-max-lag")
                .arg(max_lag),
        )
        .await
        .context("CONFIG SET min-replicas-to-write")
    }

    /// Has a running TLS server read its (renewed) certificate files again:
    /// setting a file, even to the same path, reloads it. Best effort: a
    /// server without TLS gets it at its next start.
    pub(super) async fn reload_tls(&self, spec: &EngineSpec) {
        let Some(f) = self.tls_files().filter(|_| spec.require_client_tls) else {
            return;
        };
        let mut c = cmd("CONFIG");
        c.arg("SET");
        for (k, v) in [
            ("tls-cert-file", f.cert()),
            ("tls-key-file", f.key()),
            ("tls-ca-cert-file", f.ca()),
        ] {
            c.arg(k).arg(v.to_string_lossy().as_ref());
        }
        if let Err(e) = self.run::<()>(&c).await {
            tracing::warn!("reloading the TLS certificate: {e:#}");
        }
    }

    /// The ACL users as redis.conf declares them, on the running server.
    pub(super) async fn set_users(&self, admin_user: &str, secrets: &StoredSecrets) -> Result<()> {
        for (user, rules) in acl_users(admin_user, secrets) {
            self.run::<()>(cmd("ACL").arg("SETUSER").arg(&user).arg(&rules))
                .await
                .with_context(|| format!("ACL SETUSER {user}"))?;
        }
        Ok(())
    }

    /// Makes the running server follow `up` (credentials first).
    pub(super) async fn follow(&self, up: &Upstream, secrets: &StoredSecrets) -> Result<()> {
        self.set_masterauth(secrets).await?;
        self.run::<()>(cmd("REPLICAOF").arg(&up.host).arg(up.port))
            .await
            .with_context(|| format!("REPLICAOF {} {}", up.host, up.port))
    }

    /// The credentials the server uses to replicate from a primary.
    async fn set_masterauth(&self, secrets: &StoredSecrets) -> Result<()> {
        self.run::<()>(
            cmd("CONFIG")
                .arg("SET")
                .arg("masteruser")
                .arg(REPLICATION_USER)
                .arg("masterauth")
                .arg(&secrets.replication_password),
        )
        .await
        .context("CONFIG SET masterauth")
    }

    /// Brings the running server to what redis.conf says: users, write
    /// settings, the upstream it follows. Never `REPLICAOF NO ONE`: only
    /// [`Driver::promote`] does that. The caller holds `role_lock`.
    pub(super) async fn apply_live(&self, spec: &EngineSpec) -> Result<()> {
        let secrets = self.load_secrets()?;
        self.set_users(&spec.admin_user, &secrets).await?;
        self.set_min_replicas(min_replicas(spec, self.fenced()))
            .await?;
        if let Some(up) = self.upstream()? {
            let info = self.info(&["replication"]).await?;
            if !info.follows(&up) {
                tracing::info!(host = %up.host, port = up.port, "following {}", up.node);
                self.follow(&up, &secrets).await?;
            }
        } else {
            self.set_masterauth(&secrets).await?;
        }
        Ok(())
    }

    /// Check's convergence: the running server follows the marker's
    /// upstream and has redis.conf's write settings. Skipped while a step
    /// holds `role_lock` (it is changing exactly these).
    pub(super) async fn converge(&self, info: &Info, running_min: (u32, u32)) -> Result<()> {
        let Ok(_guard) = self.role_lock.try_lock() else {
            return Ok(());
        };
        let up = self.upstream()?;
        if let Some(up) = &up {
            if !info.follows(up) {
                // Read again under the lock: a promotion may have ended
                // between the caller's INFO and here (then the marker is
                // gone and nothing is done).
                let now = self.info(&["replication"]).await?;
                if !now.follows(up) {
                    tracing::warn!(
                        role = now.get("role").unwrap_or("?"),
                        master = now.get("master_host").unwrap_or("none"),
                        "the server does not follow {} ({}:{}) as configured; repointing it",
                        up.node,
                        up.host,
                        up.port
                    );
                    self.follow(up, &self.load_secrets()?).await?;
                }
            }
        }
        let conf = std::fs::read_to_string(self.conf_path()).unwrap_or_default();
        if let Some(want) = conf_min_replicas(&conf) {
            if want != running_min {
                tracing::warn!(
                    running = ?running_min,
                    configured = ?want,
                    "min-replicas-to-write differs from redis.conf; setting it"
                );
                self.set_min_replicas(want).await?;
            }
        }
        Ok(())
    }
}
