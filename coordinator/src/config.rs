//! The coordinator's configuration file (TOML, `--config`): alert rules
//! with their per-cluster overrides, and the notification channels.
//!
//! ```toml
//! [alerts]
//! evaluation_interval = "2s"   # how often rules are checked
//! repeat_interval = "4h"       # reminders while an alert holds
//!
//! [alerts.rules]               # defaults for every cluster
//! cpu_percent = 90
//! cpu_for = "5m"
//! disk_warning_percent = 85
//!
//! [alerts.cluster.orders]      # overrides for cluster "orders"
//! disk_warning_percent = 70
//!
//! [[notify.alertmanager]]
//! name = "am"
//! url = "http://alertmanager:9093"
//! ```
//!
//! Unknown keys are refused (a misspelt threshold must not silently keep
//! its default), and every error names the file and the key.

pub(crate) use crate::durations::duration;
pub use crate::durations::parse_duration;
use crate::notify::NotifyConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub notify: NotifyConfig,
    #[serde(default)]
    pub backup: BackupConfig,
    /// Rate limits for callers without a certificate (docs/limits.md).
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// How long audit rows, events and operation logs are kept.
    #[serde(default)]
    pub retention: crate::retention::RetentionConfig,
}

impl FileConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration file {}", path.display()))?;
        FileConfig::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<FileConfig> {
        let config: FileConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.alerts.validate()?;
        config.backup.validate()?;
        config.limits.validate()?;
        config.retention.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often the rules are evaluated.
    #[serde(deserialize_with = "duration")]
    pub evaluation_interval: Duration,
    /// How often a reminder goes out while an alert holds (0: never).
    #[serde(deserialize_with = "duration")]
    pub repeat_interval: Duration,
    /// How often firing alerts are re-sent to Alertmanager, which resolves
    /// an alert it has not heard of for its `resolve_timeout` (5 minutes by
    /// default).
    #[serde(deserialize_with = "duration")]
    pub alertmanager_refresh: Duration,
    /// The defaults of every cluster.
    pub rules: Rules,
    /// Per-cluster overrides of [`AlertsConfig::rules`].
    pub cluster: BTreeMap<String, RulesOverride>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            evaluation_interval: Duration::from_secs(2),
            repeat_interval: Duration::from_secs(4 * 3600),
            alertmanager_refresh: Duration::from_secs(60),
            rules: Rules::default(),
            cluster: BTreeMap::new(),
        }
    }
}

impl AlertsConfig {
    /// The rules of `cluster`: its overrides on top of the defaults.
    pub fn rules_for(&self, cluster: &str) -> Rules {
        match self.cluster.get(cluster) {
            Some(o) => o.apply(&self.rules),
            None => self.rules.clone(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.evaluation_interval < Duration::from_millis(100) {
            bail!("alerts.evaluation_interval must be at least 100ms");
        }
        if !self.alertmanager_refresh.is_zero()
            && self.alertmanager_refresh < Duration::from_secs(1)
        {
            bail!("alerts.alertmanager_refresh must be at least 1s");
        }
        self.rules.validate("alerts.rules")?;
        for (name, o) in &self.cluster {
            o.apply(&self.rules)
                .validate(&format!("alerts.cluster.{name}"))?;
        }
        Ok(())
    }
}

/// Thresholds of the alert rules. A percentage of 0 turns its rule off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// How long a node's heartbeats must be missing (beyond the three
    /// intervals that make it down) before `node_down` fires.
    #[serde(deserialize_with = "duration")]
    pub node_down_for: Duration,
    /// How long a node that is up must report its engine stopped or not
    /// answering before `engine_down` fires.
    #[serde(deserialize_with = "duration")]
    pub engine_down_for: Duration,
    pub cpu_percent: f64,
    #[serde(deserialize_with = "duration")]
    pub cpu_for: Duration,
    pub memory_percent: f64,
    #[serde(deserialize_with = "duration")]
    pub memory_for: Duration,
    pub disk_warning_percent: f64,
    pub disk_critical_percent: f64,
    /// A replica further behind than this many seconds (0: off).
    pub replication_lag_seconds: f64,
    #[serde(deserialize_with = "duration")]
    pub replication_lag_for: Duration,
    /// Certificates expiring within this many days.
    pub certificate_expiry_days: u32,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            node_down_for: Duration::ZERO,
            engine_down_for: Duration::from_secs(5),
            cpu_percent: 90.0,
            cpu_for: Duration::from_secs(5 * 60),
            memory_percent: 90.0,
            memory_for: Duration::from_secs(2 * 60),
            disk_warning_percent: 85.0,
            disk_critical_percent: 95.0,
            replication_lag_seconds: 30.0,
            replication_lag_for: Duration::from_secs(60),
            certificate_expiry_days: 30,
        }
    }
}

impl Rules {
    fn validate(&self, at: &str) -> Result<()> {
        for (key, v) in [
            ("cpu_percent", self.cpu_percent),
            ("memory_percent", self.memory_percent),
            ("disk_warning_percent", self.disk_warning_percent),
            ("disk_critical_percent", self.disk_critical_percent),
        ] {
            if !(0.0..=100.0).contains(&v) {
                bail!("{at}.{key} = {v}: a percentage from 0 (rule off) to 100");
            }
        }
        if self.replication_lag_seconds < 0.0 || !self.replication_lag_seconds.is_finite() {
            bail!("{at}.replication_lag_seconds must be 0 (off) or more");
        }
        if self.disk_critical_percent > 0.0
            && self.disk_warning_percent > 0.0
            && self.disk_warning_percent >= self.disk_critical_percent
        {
            bail!(
                "{at}: disk_warning_percent ({}) must be below disk_critical_percent ({})",
                self.disk_warning_percent,
                self.disk_critical_percent
            );
        }
        Ok(())
    }
}

/// [`Rules`] with every key optional: what a cluster overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesOverride {
    #[serde(deserialize_with = "opt_duration")]
    pub node_down_for: Option<Duration>,
    #[serde(deserialize_with = "opt_duration")]
    pub engine_down_for: Option<Duration>,
    pub cpu_percent: Option<f64>,
    #[serde(deserialize_with = "opt_duration")]
    pub cpu_for: Option<Duration>,
    pub memory_percent: Option<f64>,
    #[serde(deserialize_with = "opt_duration")]
    pub memory_for: Option<Duration>,
    pub disk_warning_percent: Option<f64>,
    pub disk_critical_percent: Option<f64>,
    pub replication_lag_seconds: Option<f64>,
    #[serde(deserialize_with = "opt_duration")]
    pub replication_lag_for: Option<Duration>,
    pub certificate_expiry_days: Option<u32>,
}

impl RulesOverride {
    pub fn apply(&self, base: &Rules) -> Rules {
        Rules {
            node_down_for: self.node_down_for.unwrap_or(base.node_down_for),
            engine_down_for: self.engine_down_for.unwrap_or(base.engine_down_for),
            cpu_percent: self.cpu_percent.unwrap_or(base.cpu_percent),
            cpu_for: self.cpu_for.unwrap_or(base.cpu_for),
            memory_percent: self.memory_percent.unwrap_or(base.memory_percent),
            memory_for: self.memory_for.unwrap_or(base.memory_for),
            disk_warning_percent: self
                .disk_warning_percent
                .unwrap_or(base.disk_warning_percent),
            disk_critical_percent: self
                .disk_critical_percent
                .unwrap_or(base.disk_critical_percent),
            replication_lag_seconds: self
                .replication_lag_seconds
                .unwrap_or(base.replication_lag_seconds),
            replication_lag_for: self.replication_lag_for.unwrap_or(base.replication_lag_for),
            certificate_expiry_days: self
                .certificate_expiry_days
                .unwrap_or(base.certificate_expiry_days),
        }
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = FileConfig::parse(
            r#"
            [alerts]
            repeat_interval = "30m"
            [alerts.rules]
            cpu_percent = 80
            cpu_for = "90s"
            [alerts.cluster.orders]
            disk_warning_percent = 70
            cpu_for = "10s"
            "#,
        )
        .unwrap();
        assert_eq!(c.alerts.repeat_interval, Duration::from_secs(1800));
        assert_eq!(c.alerts.evaluation_interval, Duration::from_secs(2));
        let d = c.alerts.rules_for("other");
        assert_eq!(d.cpu_percent, 80.0);
        assert_eq!(d.cpu_for, Duration::from_secs(90));
        assert_eq!(d.disk_warning_percent, 85.0);
        let o = c.alerts.rules_for("orders");
        assert_eq!(o.disk_warning_percent, 70.0);
        assert_eq!(o.cpu_for, Duration::from_secs(10));
        assert_eq!(o.cpu_percent, 80.0);
        assert_eq!(
            FileConfig::parse("").unwrap().alerts.rules,
            Rules::default()
        );
    }

    #[test]
    fn the_packaged_example_parses_and_shows_the_defaults() {
        let c =
            FileConfig::parse(include_str!("../../packaging/coordinator.toml.example")).unwrap();
        let d = AlertsConfig::default();
        assert_eq!(c.alerts.rules, d.rules);
        assert_eq!(c.alerts.evaluation_interval, d.evaluation_interval);
        assert_eq!(c.alerts.repeat_interval, d.repeat_interval);
        assert_eq!(c.alerts.alertmanager_refresh, d.alertmanager_refresh);
        let b = BackupConfig::default();
        assert_eq!(c.backup.final_backup_retain, b.final_backup_retain);
        assert_eq!(c.backup.missed_after, b.missed_after);
        assert_eq!(c.backup.key_file, b.key_file);
        let (l, r) = (
            crate::limits::LimitsConfig::default(),
            crate::retention::RetentionConfig::default(),
        );
        assert_eq!(format!("{:?}", c.limits), format!("{l:?}"));
        assert_eq!(format!("{:?}", c.retention), format!("{r:?}"));
    }

    #[test]
    fn mistakes_are_refused_naming_the_key() {
        let err = |t: &str| format!("{:#}", FileConfig::parse(t).unwrap_err());
        assert!(err("[alerts.rules]\ncpu_percnt = 5").contains("cpu_percnt"));
        assert!(err("[alerts.rules]\ncpu_percent = 150").contains("alerts.rules.cpu_percent"));
        assert!(err("[alerts.rules]\ncpu_for = \"5 minutes\"").contains("invalid duration"));
        let e = err("[alerts.cluster.c1]\ndisk_warning_percent = 97");
        assert!(
            e.contains("alerts.cluster.c1") && e.contains("below"),
            "{e}"
        );
        assert!(err("[alerts]\nevaluation_interval = \"1ms\"").contains("at least 100ms"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172800));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "5", "m", "5x", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

/// The `[backup]` section: the key, the final backup's life, and the
/// targets backups may be stored in.
///
/// ```toml
/// [backup]
/// key_file = "/var/lib/corral/backup.key"   # default: the state directory's
/// final_backup_retain = "15d"
///
/// [backup.targets.offsite]
/// kind = "s3"
/// endpoint = "https://s3.eu-west-1.amazonaws.com"
/// bucket = "corral-backups"
/// region = "eu-west-1"
/// prefix = "prod"
/// access_key_id_env = "CORRAL_S3_KEY_ID"        # or access_key_id = "..."
/// secret_access_key_env = "CORRAL_S3_SECRET"    # or secret_access_key = "..."
///
/// # Credentials of one cluster, handed only to its nodes (see
/// # docs/backups-isolation.md); require_cluster_credentials = true makes
/// # them mandatory for every cluster.
/// [backup.targets.offsite.clusters.orders]
/// access_key_id_env = "CORRAL_S3_ORDERS_KEY_ID"
/// secret_access_key_env = "CORRAL_S3_ORDERS_SECRET"
/// ```
///
/// A target named `local` (a directory on each node, under the agent's
/// state directory) exists unless the file defines its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// The 32-byte master key every cluster's backup key is derived from
    /// (created, 0600, at first start). Without it no backup can be read:
    /// keep a copy apart.
    pub key_file: Option<std::path::PathBuf>,
    /// How long the final backup of a deleted cluster is kept.
    #[serde(deserialize_with = "duration")]
    pub final_backup_retain: Duration,
    /// A scheduled backup that could not start within this long of its
    /// time (the cluster busy, the coordinator down) is recorded as missed
    /// and raises an alert.
    #[serde(deserialize_with = "duration")]
    pub missed_after: Duration,
    pub targets: BTreeMap<String, TargetConfig>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            key_file: None,
            final_backup_retain: Duration::from_secs(15 * 86400),
            missed_after: Duration::from_secs(3600),
            targets: BTreeMap::new(),
        }
    }
}

/// One place backups can be stored.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetConfig {
    /// "local" or "s3".
    pub kind: String,
    /// local: the directory on each node (default: the agent's state
    /// directory/backups).
    pub path: String,
    /// s3: the endpoint URL, bucket (which must exist), region and a key
    /// prefix.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    /// s3 credentials, given in the file or (better) named environment
    /// variables of the coordinator.
    pub access_key_id: String,
    pub access_key_id_env: String,
    pub secret_access_key: String,
    pub secret_access_key_env: String,
    /// Allow an http:// endpoint (a test server); refused otherwise.
    pub allow_http: bool,
    /// s3: credentials per cluster (`[backup.targets.NAME.clusters.CLUSTER]`),
    /// handed only to that cluster's nodes instead of the target's own.
    pub clusters: BTreeMap<String, ClusterCredentials>,
    /// s3: refuse to hand the target's own credentials to any node: every
    /// cluster backing up here needs its own section under `clusters`.
    pub require_cluster_credentials: bool,
}

/// Credentials stay out of debug output (and so out of logs).
impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &str| if v.is_empty() { "" } else { "<hidden>" };
        f.debug_struct("TargetConfig")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &hidden(&self.access_key_id))
            .field("access_key_id_env", &self.access_key_id_env)
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("secret_access_key_env", &self.secret_access_key_env)
            .field("allow_http", &self.allow_http)
            .field("clusters", &self.clusters.keys().collect::<Vec<_>>())
            .field(
                "require_cluster_credentials",
                &self.require_cluster_credentials,
            )
            .finish()
    }
}

/// The built-in target.
pub const LOCAL_TARGET: &str = "local";

impl BackupConfig {
    fn validate(&self) -> Result<()> {
        if self.final_backup_retain < Duration::from_secs(1) {
            bail!("backup.final_backup_retain must be at least 1s");
        }
        for (name, t) in &self.targets {
            corral_proto::names::validate("backup target", name)
                .map_err(|e| anyhow::anyhow!("backup.targets.{name}: {e}"))?;
            t.resolve(name)?;
            validate_clusters(name, t)?;
        }
        Ok(())
    }

    /// The target called `name`, credentials resolved, as agents get it.
    pub fn target(&self, name: &str) -> Result<corral_proto::pb::BackupTarget> {
        match self.targets.get(name) {
            Some(t) => t.resolve(name),
            None if name == LOCAL_TARGET => Ok(corral_proto::pb::BackupTarget {
                name: name.into(),
                kind: "local".into(),
                ..Default::default()
            }),
            None => {
                let mut names: Vec<&str> = self.targets.keys().map(String::as_str).collect();
                if !names.contains(&LOCAL_TARGET) {
                    names.push(LOCAL_TARGET);
                }
                bail!(
                    "no backup target named {name:?} (configured: {}); targets are defined \
                     under [backup.targets.NAME] in the coordinator's configuration file",
                    names.join(", ")
                )
            }
        }
    }
}

/// A credential given in the file (`value`) or in the environment
/// variable `env`, for the section `at`.
pub(crate) fn credential(at: &str, value: &str, env: &str, key: &str) -> Result<String> {
    match (value.is_empty(), env.is_empty()) {
        (false, true) => Ok(value.to_string()),
        (true, false) => std::env::var(env).map_err(|_| {
            anyhow::anyhow!(
                "{at}.{key}_env names {env}, which is not set in the coordinator's environment"
            )
        }),
        (false, false) => bail!("{at}: give {key} or {key}_env, not both"),
        (true, true) => {
            bail!("{at}: an s3 target needs {key} (or {key}_env naming an environment variable)")
        }
    }
}

impl TargetConfig {
    fn resolve(&self, name: &str) -> Result<corral_proto::pb::BackupTarget> {
        let at = format!("backup.targets.{name}");
        let shared_optional = self.require_cluster_credentials
            && [
                &self.access_key_id,
                &self.access_key_id_env,
                &self.secret_access_key,
                &self.secret_access_key_env,
            ]
            .iter()
            .all(|v| v.is_empty());
        let from_env = |value: &str, env: &str, key: &str| -> Result<String> {
            if shared_optional {
                return Ok(String::new());
            }
            credential(&at, value, env, key)
        };
        match self.kind.as_str() {
            "local" => {
                if !self.endpoint.is_empty() || !self.bucket.is_empty() {
                    bail!("{at}: a local target takes only `path`");
                }
                if !self.path.is_empty() && !self.path.starts_with('/') {
                    bail!(
                        "{at}.path = {:?}: an absolute directory on each node",
                        self.path
                    );
                }
                Ok(corral_proto::pb::BackupTarget {
                    name: name.into(),
                    kind: "local".into(),
                    path: self.path.clone(),
                    ..Default::default()
                })
            }
            "s3" => {
                if self.endpoint.is_empty() || self.bucket.is_empty() {
                    bail!("{at}: an s3 target needs endpoint and bucket");
                }
                if self.endpoint.starts_with("http://") && !self.allow_http {
                    bail!("{at}.endpoint is plain http://: use https, or set allow_http = true for a test server");
                }
                if !self.endpoint.starts_with("http://") && !self.endpoint.starts_with("https://") {
                    bail!(
                        "{at}.endpoint = {:?}: a URL starting with https://",
                        self.endpoint
                    );
                }
                Ok(corral_proto::pb::BackupTarget {
                    name: name.into(),
                    kind: "s3".into(),
                    path: self.prefix.trim_matches('/').to_string(),
                    endpoint: self.endpoint.clone(),
                    bucket: self.bucket.clone(),
                    region: if self.region.is_empty() {
                        "us-east-1".into()
                    } else {
                        self.region.clone()
                    },
                    access_key_id: from_env(
                        &self.access_key_id,
                        &self.access_key_id_env,
                        "access_key_id",
                    )?,
                    secret_access_key: from_env(
                        &self.secret_access_key,
                        &self.secret_access_key_env,
                        "secret_access_key",
                    )?,
                    allow_http: self.allow_http,
                    scope: String::new(),
                })
            }
            "" => bail!("{at}.kind is missing: \"local\" or \"s3\""),
            other => bail!("{at}.kind = {other:?}: \"local\" or \"s3\""),
        }
    }
}

/// `[backup.targets.NAME.clusters.CLUSTER]`.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterCredentials {
    pub access_key_id: String,
    pub access_key_id_env: String,
    pub secret_access_key: String,
    pub secret_access_key_env: String,
}

/// Credentials stay out of debug output (and so out of logs).
impl std::fmt::Debug for ClusterCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCredentials")
            .field("access_key_id_env", &self.access_key_id_env)
            .field("secret_access_key_env", &self.secret_access_key_env)
            .finish_non_exhaustive()
    }
}

impl ClusterCredentials {
    /// (access key id, secret) resolved, for the section `at`.
    pub(crate) fn resolve(&self, at: &str) -> Result<(String, String)> {
        Ok((
            credential(
                at,
                &self.access_key_id,
                &self.access_key_id_env,
                "access_key_id",
            )?,
            credential(
                at,
                &self.secret_access_key,
                &self.secret_access_key_env,
                "secret_access_key",
            )?,
        ))
    }
}

/// Checks a target's per-cluster sections (at start-up).
fn validate_clusters(name: &str, t: &TargetConfig) -> Result<()> {
    let at = format!("backup.targets.{name}");
    if t.kind != "s3" && (!t.clusters.is_empty() || t.require_cluster_credentials) {
        bail!("{at}: per-cluster credentials apply to s3 targets only");
    }
    for (cluster, c) in &t.clusters {
        corral_proto::names::validate("cluster", cluster)
            .map_err(|e| anyhow::anyhow!("{at}.clusters.{cluster}: {e}"))?;
        c.resolve(&format!("{at}.clusters.{cluster}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod backup_tests {
    use super::*;

    #[test]
    fn targets_are_checked_and_named_in_errors() {
        let c = FileConfig::parse(
            r#"
            [backup.targets.offsite]
            kind = "s3"
            endpoint = "http://10.0.0.1:9000"
            allow_http = true
            bucket = "b"
            access_key_id = "k"
            secret_access_key = "topsecret-value"
            "#,
        )
        .unwrap();
        let t = c.backup.target("offsite").unwrap();
        assert_eq!((t.kind.as_str(), t.region.as_str()), ("s3", "us-east-1"));
        assert_eq!(c.backup.target("local").unwrap().kind, "local");
        let e = c.backup.target("nope").unwrap_err().to_string();
        assert!(e.contains("offsite, local"), "{e}");
        let shown = format!("{c:?}");
        assert!(
            shown.contains("offsite") && !shown.contains("topsecret"),
            "{shown}"
        );
        for (text, want) in [
            ("[backup.targets.x]\nkind = \"s3\"\nendpoint = \"https://e\"\nbucket = \"b\"\naccess_key_id = \"k\"", "secret_access_key"),
            ("[backup.targets.x]\nkind = \"s3\"\nendpoint = \"http://e\"\nbucket = \"b\"\naccess_key_id = \"k\"\nsecret_access_key = \"s\"", "allow_http"),
            ("[backup.targets.x]\nkind = \"ftp\"", "backup.targets.x.kind"),
            ("[backup.targets.x]\nkind = \"s3\"\nendpoint = \"https://e\"\nbucket = \"b\"\naccess_key_id = \"k\"\nsecret_access_key_env = \"CORRAL_TEST_UNSET_VAR\"", "CORRAL_TEST_UNSET_VAR"),
            ("[backup]\nfinal_backup_retain = \"soon\"", "invalid duration"),
            ("[backup.targets.x]\nkind = \"local\"\npath = \"rel\"", "absolute"),
        ] {
            let e = format!("{:#}", FileConfig::parse(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
