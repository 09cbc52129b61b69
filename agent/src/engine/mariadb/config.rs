//! The server's configuration file, rendered from the spec.

use super::settings::{BINLOG, SEMI_SYNC_TIMEOUT_MS};
use crate::engine::EngineSpec;
use std::path::Path;

// ---------------------------------------------------------------------------
// The configuration file.
// ---------------------------------------------------------------------------

/// What my.cnf (or a temporary server's configuration) is written from.
pub(super) struct ServerConfig<'a> {
    pub(super) datadir: &'a Path,
    pub(super) tmpdir: &'a Path,
    pub(super) socket: &'a Path,
    pub(super) pid_file: &'a Path,
    pub(super) port: u16,
    pub(super) server_id: u32,
    pub(super) report_host: &'a str,
    /// Read-only from the start: a replica, or data not yet promoted.
    pub(super) read_only: bool,
    /// Commits wait for one replica's acknowledgement.
    pub(super) semi_sync_master: bool,
    /// A temporary server (clone, rejoin): no network, no fence.
    pub(super) temp: bool,
    pub(super) fence: &'a Path,
}

pub(super) fn render_config(c: &ServerConfig) -> String {
    let on = |b: bool| if b { "ON" } else { "OFF" };
    let mut s = format!(
        "# Written by corral-agent from the cluster's spec; edits here are overwritten.\n\
         # The server reads this file alone (--defaults-file): nothing from /etc/mysql.\n\
         [mariadbd]\n\
         datadir = {datadir}\n\
         tmpdir = {tmpdir}\n\
         socket = {socket}\n\
         pid_file = {pid}\n\
         port = {port}\n",
        datadir = c.datadir.display(),
        tmpdir = c.tmpdir.display(),
        socket = c.socket.display(),
        pid = c.pid_file.display(),
        port = c.port,
    );
    if c.temp {
        s.push_str("skip_networking = ON\n");
    } else {
        s.push_str("# Every address, IPv4 and IPv6.\nbind_address = *\n");
    }
    s.push_str(&format!(
        "skip_name_resolve = ON\n\
         character_set_server = utf8mb4\n\
         collation_server = utf8mb4_general_ci\n\
         max_allowed_packet = 64M\n\
         # Durability: a commit is on disk, in the engine and in the binary log.\n\
         innodb_buffer_pool_size = 128M\n\
         innodb_flush_log_at_trx_commit = 1\n\
         sync_binlog = 1\n\
         # Replication by GTID, domain 0 only, strictly increasing sequence numbers:\n\
         # positions compare across the whole cluster.\n\
         server_id = {server_id}\n\
         log_bin = {BINLOG}\n\
         log_bin_index = {BINLOG}.index\n\
         relay_log = relay-bin\n\
         relay_log_index = relay-bin.index\n\
         relay_log_recovery = ON\n\
         log_slave_updates = ON\n\
         binlog_format = ROW\n\
         gtid_strict_mode = ON\n\
         gtid_domain_id = 0\n\
         binlog_expire_logs_seconds = 604800\n\
         max_binlog_size = 256M\n\
         # The agent starts replication once it has pointed it at the right upstream.\n\
         skip_slave_start = ON\n\
         slave_net_timeout = 10\n\
         read_only = {read_only}\n\
         # Semi-synchronous replication: a replica acknowledges what it received;\n\
         # a primary in synchronous mode waits for one acknowledgement, forever.\n\
         rpl_semi_sync_slave_enabled = {semi_replica}\n\
         rpl_semi_sync_master_enabled = {semi}\n\
         rpl_semi_sync_master_wait_point = AFTER_SYNC\n\
         rpl_semi_sync_master_timeout = {SEMI_SYNC_TIMEOUT_MS}\n\
         rpl_semi_sync_master_wait_no_slave = ON\n",
        server_id = c.server_id,
        read_only = on(c.read_only),
        // A temporary server's replication (rejoin's check) must not
        // acknowledge what it then throws away.
        semi_replica = on(!c.temp),
        semi = on(c.semi_sync_master && !c.temp),
    ));
    if !c.temp {
        // How the upstream names this replica (SHOW SLAVE HOSTS); a
        // temporary server stays anonymous.
        s.push_str(&format!("report_host = {}\n", c.report_host));
        s.push_str(&format!(
            "# The fence (read_only while this primary holds no lease); skipped when absent.\n\
             !include {}\n",
            c.fence.display()
        ));
    }
    s
}

/// Whether a spec's primary waits for a replica at each commit.
pub(super) fn wants_semi_sync(spec: &EngineSpec) -> bool {
    spec.role == "primary" && spec.sync && !spec.replicas.is_empty()
}

#[cfg(test)]
mod tests {
    use super::super::replication::tests::spec;
    use super::*;
    use crate::engine::mariadb::settings::check_cnf_path;

    #[test]
    fn config_by_role() {
        let (d, s, p, f) = (
            Path::new("/s/mariadb/data"),
            Path::new("/s/mariadb/run/mariadbd.sock"),
            Path::new("/s/mariadb/run/mariadbd.pid"),
            Path::new("/s/mariadb/fence.cnf"),
        );
        let c = |read_only, semi, temp| {
            render_config(&ServerConfig {
                datadir: d,
                tmpdir: Path::new("/s/mariadb/tmp"),
                socket: s,
                pid_file: p,
                port: 3307,
                server_id: 42,
                report_host: "vm2",
                read_only,
                semi_sync_master: semi,
                temp,
                fence: f,
            })
        };
        let replica = c(true, false, false);
        for line in [
            "[mariadbd]",
            "datadir = /s/mariadb/data",
            "tmpdir = /s/mariadb/tmp",
            "socket = /s/mariadb/run/mariadbd.sock",
            "port = 3307",
            "bind_address = *",
            "server_id = 42",
            "report_host = vm2",
            "log_bin = binlog",
            "log_slave_updates = ON",
            "binlog_format = ROW",
            "gtid_strict_mode = ON",
            "gtid_domain_id = 0",
            "skip_slave_start = ON",
            "read_only = ON",
            "rpl_semi_sync_master_enabled = OFF",
            "rpl_semi_sync_slave_enabled = ON",
            "sync_binlog = 1",
            "innodb_flush_log_at_trx_commit = 1",
            "innodb_buffer_pool_size = 128M",
            "!include /s/mariadb/fence.cnf",
        ] {
            assert!(
                replica.lines().any(|l| l == line),
                "{line:?} missing from:\n{replica}"
            );
        }
        // The fence comes last: it overrides read_only.
        assert!(replica
            .trim_end()
            .ends_with("!include /s/mariadb/fence.cnf"));
        let primary = c(false, true, false);
        assert!(primary.lines().any(|l| l == "read_only = OFF"));
        assert!(primary
            .lines()
            .any(|l| l == "rpl_semi_sync_master_enabled = ON"));
        assert!(primary
            .lines()
            .any(|l| l == "rpl_semi_sync_master_wait_point = AFTER_SYNC"));
        let temp = c(false, true, true);
        assert!(temp.lines().any(|l| l == "skip_networking = ON"));
        assert!(!temp.contains("bind_address"));
        assert!(!temp.contains("!include"));
        assert!(!temp.contains("report_host"));
        assert!(temp
            .lines()
            .any(|l| l == "rpl_semi_sync_slave_enabled = OFF"));
        assert!(temp
            .lines()
            .any(|l| l == "rpl_semi_sync_master_enabled = OFF"));
    }

    #[test]
    fn semi_sync_needs_a_primary_with_replicas() {
        let mut s = spec("primary");
        s.sync = true;
        assert!(!wants_semi_sync(&s));
        s.replicas = vec!["vm2".into()];
        assert!(wants_semi_sync(&s));
        s.role = "replica".into();
        assert!(!wants_semi_sync(&s));
    }

    #[test]
    fn cnf_paths_need_no_quoting() {
        assert!(check_cnf_path(Path::new("/var/lib/corral-agent/mariadb")).is_ok());
        for bad in ["/a b", "/a#b", "/a\"b", "/a\\b", "/a;b"] {
            assert!(check_cnf_path(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
