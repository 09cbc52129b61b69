//! The health check of a running server.

use super::connection::broken;
use super::info::{replication_from_info, stats_from_info, Info};
use super::settings::COMMAND_TIMEOUT;
use super::Redis;
use crate::engine::Health;
use anyhow::{bail, Context, Result};

impl Redis {
    /// One health check: INFO and the running write settings.
    pub(super) async fn health(&self) -> Result<Health> {
        let mut c = self.admin().await?;
        let answer = tokio::time::timeout(
            COMMAND_TIMEOUT,
            ::redis::pipe()
                .cmd("INFO")
                .arg("server")
                .arg("replication")
                .arg("persistence")
                .arg("clients")
                .arg("memory")
                .arg("keyspace")
                .cmd("CONFIG")
                .arg("GET")
                .arg("min-replicas-to-write")
                .cmd("CONFIG")
                .arg("GET")
                .arg("min-replicas-max-lag")
                .query_async::<(String, Vec<String>, Vec<String>)>(&mut c),
        )
        .await;
        let (text, to_write, max_lag) = match answer {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                if broken(&e) {
                    self.forget_conn().await;
                }
                return Err(e).context("health query");
            }
            Err(_) => {
                self.forget_conn().await;
                bail!(
                    "health query timed out after {}s",
                    COMMAND_TIMEOUT.as_secs()
                )
            }
        };
        let info = Info::parse(&text);
        if info.get("loading") == Some("1") {
            bail!(
                "loading its data set ({}% done)",
                info.get("loading_loaded_perc").unwrap_or("?")
            );
        }
        let setting = |v: &[String]| v.get(1).and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let running_min = (setting(&to_write), setting(&max_lag));
        if let Err(e) = self.converge(&info, running_min).await {
            tracing::warn!("converging the running server to its configuration: {e:#}");
        }
        Ok(Health {
            version: info.version(),
            replication: replication_from_info(&info, u64::from(running_min.0)),
            stats: stats_from_info(&info),
        })
    }
}
