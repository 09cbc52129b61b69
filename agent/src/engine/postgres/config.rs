//! The configuration: postgresql settings, the connection string to an
//! upstream and pg_hba.conf.

use super::fencing::FENCE_CONF;
use super::settings::{conf_quote, REPLICATION_USER, SLOT_WAL_KEEP};
use super::sql::{slot_name, synchronous_standby_names};
use super::{backup, tls, Postgres};
use crate::engine::{EngineSpec, Upstream};

impl Postgres {
    pub(super) fn config(&self, spec: &EngineSpec) -> String {
        let mut c = format!(
            "# Written by corral-agent from the cluster's spec; edits here are overwritten.\n\
             listen_addresses = '*'\n\
             port = {port}\n\
             unix_socket_directories = {socket}\n\
             unix_socket_permissions = 0700\n\
             password_encryption = 'scram-sha-256'\n\
             cluster_name = {cluster}\n\
             logging_collector = off\n\
             # Every line stamped to the millisecond, in UTC: `corralctl logs`\n\
             # reads these stamps (logs::stamp).\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             log_timezone = 'UTC'\n\
             log_connections = on\n\
             # Replication.\n\
             wal_level = replica\n\
             max_wal_senders = 16\n\
             max_replication_slots = 16\n\
             max_slot_wal_keep_size = '{slot_keep}'\n\
             wal_keep_size = '256MB'\n\
             wal_log_hints = on\n\
             hot_standby = on\n\
             hot_standby_feedback = on\n\
             wal_receiver_status_interval = 1s\n\
             # A standby whose upstream vanished retries (and first replays\n\
             # what it already received) after this, not the default 5 s:\n\
             # a switchover otherwise waits up to 5 s for the last record.\n\
             wal_retrieve_retry_interval = '250ms'\n\
             synchronous_standby_names = {sync}\n\
             # WAL archive (backups): always on, since turning it on needs a\n\
             # restart; what is archived depends on the spec (a reload).\n\
             archive_mode = on\n\
             archive_command = {archive}\n\
             # The fence (read-only while this primary holds no lease).\n\
             include_if_exists = '{fence}'\n\
             {ssl}",
            port = spec.port,
            socket = conf_quote(&self.socket_dir().to_string_lossy()),
            cluster = conf_quote(&spec.cluster),
            slot_keep = SLOT_WAL_KEEP,
            sync = conf_quote(&synchronous_standby_names(spec)),
            fence = FENCE_CONF,
            ssl = tls::ssl_conf(self.tls_files().as_ref(), conf_quote),
            archive = conf_quote(&if spec.wal_archive {
                backup::archive_command(&self.spool_dir())
            } else {
                "/bin/true".to_string()
            }),
        );
        if let Some(up) = &spec.upstream {
            c.push_str(&format!(
                "primary_conninfo = {}\nprimary_slot_name = {}\nrecovery_target_timeline = 'latest'\n",
                conf_quote(&self.conninfo(up, &self.node_id, "replication")),
                conf_quote(&slot_name(&self.node_id)),
            ));
        }
        c
    }

    /// A libpq connection string to `up` as the replication role.
    pub(super) fn conninfo(&self, up: &Upstream, application_name: &str, dbname: &str) -> String {
        let kv =
            |k: &str, v: &str| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        [
            kv("host", &up.host),
            kv("port", &up.port.to_string()),
            kv("user", REPLICATION_USER),
            kv("passfile", &self.pgpass_path().to_string_lossy()),
            kv("application_name", application_name),
            kv("dbname", dbname),
            kv("connect_timeout", "5"),
            kv("keepalives_idle", "5"),
            kv("keepalives_interval", "2"),
            kv("keepalives_count", "3"),
        ]
        .into_iter()
        .chain(
            tls::conninfo_tls(self.tls_files().as_ref())
                .into_iter()
                .map(|(k, v)| kv(k, &v)),
        )
        .collect::<Vec<_>>()
        .join(" ")
    }

    /// pg_hba.conf. Fenced (a primary without a lease), every TCP
    /// connection is rejected, clients and replicas alike: unlike
    /// `default_transaction_read_only`, which any session may turn off for
    /// itself, no session can undo that (it cannot even start). Only the
    /// agent's socket stays open.
    pub(super) fn hba(&self, fenced: bool, spec: &EngineSpec) -> String {
        let tcp = if fenced {
            "# Fenced: this primary holds no lease. No TCP client or replica is\n\
             # accepted until it holds one again.\n\
             host all all 0.0.0.0/0 reject\n\
             host all all ::/0 reject\n\
             host replication all 0.0.0.0/0 reject\n\
             host replication all ::/0 reject\n"
                .to_string()
        } else {
            tls::hba_tcp(self.tls_files().is_some(), spec.require_client_tls)
        };
        format!(
            "# Written by corral-agent; edits here are overwritten.\n\
             # The socket directory is 0700: only postgres and the agent reach it.\n\
             local all all trust\n\
             local replication all trust\n\
             {tcp}"
        )
    }
}
