//! SQL text: quoting, and the statements that differ between MariaDB and
//! MySQL 8 ([`Flavour`]).

use super::gtid::{domain0_seq, gtid_set_count};
use std::path::Path;

// ---------------------------------------------------------------------------
// SQL text: quoting, GTIDs, and the statements that differ by flavour.
// ---------------------------------------------------------------------------

/// A single-quoted SQL string literal. The agent's sessions never run with
/// NO_BACKSLASH_ESCAPES (see [`AGENT_SQL_MODE`]), so backslashes escape.
pub fn sql_string(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\'' => s.push_str("\\'"),
            '\0' => s.push_str("\\0"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\x1a' => s.push_str("\\Z"),
            c => s.push(c),
        }
    }
    s.push('\'');
    s
}

/// A back-quoted identifier.
pub fn quote_ident(v: &str) -> String {
    format!("`{}`", v.replace('`', "``"))
}

/// `'user'@'host'`.
pub fn account_name(user: &str, host: &str) -> String {
    format!("{}@{}", sql_string(user), sql_string(host))
}

/// The server dialect: MariaDB, or MySQL 8 where its statements differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavour {
    #[default]
    Mariadb,
    Mysql,
}

/// A column of `SHOW SLAVE STATUS` / `SHOW REPLICA STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Host,
    Port,
    User,
    IoRunning,
    SqlRunning,
    /// The last transaction received.
    Received,
    /// Whether the position is a GTID one.
    GtidMode,
    /// The upstream's binary log file being read.
    SourceLogFile,
    LastIoErrno,
    LastIoError,
    LastSqlErrno,
    LastSqlError,
    SslAllowed,
}

/// A semi-synchronous replication variable (lower case) or status (capitalised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SemiSync {
    SourceEnabled,
    SourceWaitPoint,
    SourceTimeout,
    ReplicaEnabled,
    SourceClients,
    SourceStatus,
}

/// How a user authenticates, as a statement gives it.
pub enum Credential<'a> {
    /// MariaDB's mysql_native_password hash (`*` and 40 hex digits): the
    /// password itself never reaches the server or its binary log.
    NativeHash(&'a str),
    Plain(&'a str),
}

impl Flavour {
    pub fn detect(version: &str) -> Flavour {
        if version.to_ascii_lowercase().contains("mariadb") {
            Flavour::Mariadb
        } else {
            Flavour::Mysql
        }
    }

    /// Points replication at `host:port` by GTID, retrying every second.
    /// Over TLS, verified against the CA in `ca`, when given (see
    /// tls.rs).
    pub fn change_source(
        self,
        host: &str,
        port: u16,
        user: &str,
        password: &str,
        ca: Option<&Path>,
    ) -> String {
        let (h, u, p) = (sql_string(host), sql_string(user), sql_string(password));
        let ca = ca.map(|c| sql_string(&c.to_string_lossy()));
        match (self, ca) {
            (Flavour::Mariadb, None) => format!(
                "CHANGE MASTER TO MASTER_HOST={h}, MASTER_PORT={port}, MASTER_USER={u}, \
                 MASTER_PASSWORD={p}, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1"
            ),
            (Flavour::Mariadb, Some(ca)) => format!(
                "CHANGE MASTER TO MASTER_HOST={h}, MASTER_PORT={port}, MASTER_USER={u}, \
                 MASTER_PASSWORD={p}, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1, \
                 MASTER_SSL=1, MASTER_SSL_CA={ca}, MASTER_SSL_VERIFY_SERVER_CERT=0"
            ),
            (Flavour::Mysql, None) => format!(
                "CHANGE REPLICATION SOURCE TO SOURCE_HOST={h}, SOURCE_PORT={port}, SOURCE_USER={u}, \
                 SOURCE_PASSWORD={p}, SOURCE_AUTO_POSITION=1, SOURCE_CONNECT_RETRY=1, \
                 GET_SOURCE_PUBLIC_KEY=1"
            ),
            (Flavour::Mysql, Some(ca)) => format!(
                "CHANGE REPLICATION SOURCE TO SOURCE_HOST={h}, SOURCE_PORT={port}, SOURCE_USER={u}, \
                 SOURCE_PASSWORD={p}, SOURCE_AUTO_POSITION=1, SOURCE_CONNECT_RETRY=1, \
                 SOURCE_SSL=1, SOURCE_SSL_CA={ca}, SOURCE_SSL_VERIFY_SERVER_CERT=0"
            ),
        }
    }

    pub fn start_replica(self) -> &'static str {
        match self {
            Flavour::Mariadb => "START SLAVE",
            Flavour::Mysql => "START REPLICA",
        }
    }

    pub fn stop_replica(self) -> &'static str {
        match self {
            Flavour::Mariadb => "STOP SLAVE",
            Flavour::Mysql => "STOP REPLICA",
        }
    }

    pub fn stop_replica_io(self) -> &'static str {
        match self {
            Flavour::Mariadb => "STOP SLAVE IO_THREAD",
            Flavour::Mysql => "STOP REPLICA IO_THREAD",
        }
    }

    pub fn start_replica_io(self) -> &'static str {
        match self {
            Flavour::Mariadb => "START SLAVE IO_THREAD",
            Flavour::Mysql => "START REPLICA IO_THREAD",
        }
    }

    pub fn reset_replica_all(self) -> &'static str {
        match self {
            Flavour::Mariadb => "RESET SLAVE ALL",
            Flavour::Mysql => "RESET REPLICA ALL",
        }
    }

    pub fn replica_status(self) -> &'static str {
        match self {
            Flavour::Mariadb => "SHOW SLAVE STATUS",
            Flavour::Mysql => "SHOW REPLICA STATUS",
        }
    }

    /// Lists the replicas registered with this server (column `Host`).
    pub fn replica_hosts(self) -> &'static str {
        match self {
            Flavour::Mariadb => "SHOW SLAVE HOSTS",
            Flavour::Mysql => "SHOW REPLICAS",
        }
    }

    /// The variable that stops writes from everyone but replication.
    /// MariaDB's `read_only` binds every account without READ_ONLY ADMIN
    /// (the admin user's is revoked); MySQL's binds SUPER only with
    /// `super_read_only`.
    pub fn read_only_variable(self) -> &'static str {
        match self {
            Flavour::Mariadb => "read_only",
            Flavour::Mysql => "super_read_only",
        }
    }

    pub fn set_read_only(self, on: bool) -> String {
        match (self, on) {
            (Flavour::Mariadb, true) => "SET GLOBAL read_only = ON".into(),
            (Flavour::Mariadb, false) => "SET GLOBAL read_only = OFF".into(),
            // super_read_only=ON implies read_only=ON.
            (Flavour::Mysql, true) => "SET GLOBAL super_read_only = ON".into(),
            (Flavour::Mysql, false) => {
                "SET GLOBAL super_read_only = OFF, GLOBAL read_only = OFF".into()
            }
        }
    }

    pub fn column(self, c: Column) -> &'static str {
        use Column::*;
        match (self, c) {
            (Flavour::Mariadb, Host) => "Master_Host",
            (Flavour::Mariadb, Port) => "Master_Port",
            (Flavour::Mariadb, User) => "Master_User",
            (Flavour::Mariadb, IoRunning) => "Slave_IO_Running",
            (Flavour::Mariadb, SqlRunning) => "Slave_SQL_Running",
            (Flavour::Mariadb, Received) => "Gtid_IO_Pos",
            (Flavour::Mariadb, GtidMode) => "Using_Gtid",
            (Flavour::Mariadb, SourceLogFile) => "Master_Log_File",
            (Flavour::Mysql, Host) => "Source_Host",
            (Flavour::Mysql, Port) => "Source_Port",
            (Flavour::Mysql, User) => "Source_User",
            (Flavour::Mysql, IoRunning) => "Replica_IO_Running",
            (Flavour::Mysql, SqlRunning) => "Replica_SQL_Running",
            (Flavour::Mysql, Received) => "Retrieved_Gtid_Set",
            (Flavour::Mysql, GtidMode) => "Auto_Position",
            (Flavour::Mysql, SourceLogFile) => "Source_Log_File",
            (Flavour::Mariadb, SslAllowed) => "Master_SSL_Allowed",
            (Flavour::Mysql, SslAllowed) => "Source_SSL_Allowed",
            (_, LastIoErrno) => "Last_IO_Errno",
            (_, LastIoError) => "Last_IO_Error",
            (_, LastSqlErrno) => "Last_SQL_Errno",
            (_, LastSqlError) => "Last_SQL_Error",
        }
    }

    /// Whether the GtidMode column says replication positions by GTID.
    pub fn uses_gtid(self, value: &str) -> bool {
        match self {
            Flavour::Mariadb => value.eq_ignore_ascii_case("Slave_Pos"),
            Flavour::Mysql => value.trim() == "1",
        }
    }

    pub fn semi_sync(self, v: SemiSync) -> &'static str {
        use SemiSync::*;
        match (self, v) {
            (Flavour::Mariadb, SourceEnabled) => "rpl_semi_sync_master_enabled",
            (Flavour::Mariadb, SourceWaitPoint) => "rpl_semi_sync_master_wait_point",
            (Flavour::Mariadb, SourceTimeout) => "rpl_semi_sync_master_timeout",
            (Flavour::Mariadb, ReplicaEnabled) => "rpl_semi_sync_slave_enabled",
            (Flavour::Mariadb, SourceClients) => "Rpl_semi_sync_master_clients",
            (Flavour::Mariadb, SourceStatus) => "Rpl_semi_sync_master_status",
            (Flavour::Mysql, SourceEnabled) => "rpl_semi_sync_source_enabled",
            (Flavour::Mysql, SourceWaitPoint) => "rpl_semi_sync_source_wait_point",
            (Flavour::Mysql, SourceTimeout) => "rpl_semi_sync_source_timeout",
            (Flavour::Mysql, ReplicaEnabled) => "rpl_semi_sync_replica_enabled",
            (Flavour::Mysql, SourceClients) => "Rpl_semi_sync_source_clients",
            (Flavour::Mysql, SourceStatus) => "Rpl_semi_sync_source_status",
        }
    }

    /// `SET GLOBAL <semi-sync variable> = value`.
    pub fn set_semi_sync(self, v: SemiSync, value: &str) -> String {
        format!("SET GLOBAL {} = {value}", self.semi_sync(v))
    }

    /// A clean shutdown that first sends every connected replica the
    /// binary log it has not received (MariaDB; MySQL has no such wait).
    pub fn shutdown(self) -> &'static str {
        match self {
            Flavour::Mariadb => "SHUTDOWN WAIT FOR ALL SLAVES",
            Flavour::Mysql => "SHUTDOWN",
        }
    }

    /// (what this server has written, what it applied as a replica).
    pub fn positions_query(self) -> &'static str {
        match self {
            Flavour::Mariadb => "SELECT @@gtid_binlog_pos, @@gtid_slave_pos",
            Flavour::Mysql => "SELECT @@gtid_executed, @@gtid_executed",
        }
    }

    /// A position as the u64 reported upward.
    pub fn position(self, text: &str) -> u64 {
        match self {
            Flavour::Mariadb => domain0_seq(text),
            Flavour::Mysql => gtid_set_count(text),
        }
    }

    /// Waits (up to `secs`) until a replica applied `pos`; 0 when it has.
    pub fn wait_applied(self, pos: &str, secs: u32) -> String {
        match self {
            Flavour::Mariadb => format!("SELECT MASTER_GTID_WAIT({}, {secs})", sql_string(pos)),
            Flavour::Mysql => {
                format!(
                    "SELECT WAIT_FOR_EXECUTED_GTID_SET({}, {secs})",
                    sql_string(pos)
                )
            }
        }
    }

    /// Creates `account` if missing, then sets its password.
    pub fn user_statements(self, account: &str, cred: &Credential) -> Vec<String> {
        let ident = match cred {
            Credential::NativeHash(h) => format!("IDENTIFIED BY PASSWORD {}", sql_string(h)),
            Credential::Plain(p) => format!("IDENTIFIED BY {}", sql_string(p)),
        };
        vec![
            format!("CREATE USER IF NOT EXISTS {account} {ident}"),
            format!("ALTER USER {account} {ident}"),
        ]
    }

    /// The cluster's admin: every privilege, except (MariaDB) writing on a
    /// read-only server, so the fence and a replica's read_only bind it.
    pub fn admin_grants(self, account: &str) -> Vec<String> {
        let mut v = vec![format!(
            "GRANT ALL PRIVILEGES ON *.* TO {account} WITH GRANT OPTION"
        )];
        if self == Flavour::Mariadb {
            v.push(format!("REVOKE READ_ONLY ADMIN ON *.* FROM {account}"));
        }
        v
    }

    /// Streaming, and what a logical clone (mariadb-dump) needs.
    pub fn replication_grants(self, account: &str) -> String {
        let privs = match self {
            Flavour::Mariadb => {
                "REPLICATION SLAVE, BINLOG MONITOR, SELECT, SHOW VIEW, TRIGGER, EVENT, \
                 LOCK TABLES, RELOAD, EXECUTE"
            }
            Flavour::Mysql => {
                "REPLICATION SLAVE, REPLICATION CLIENT, SELECT, SHOW VIEW, TRIGGER, EVENT, \
                 LOCK TABLES, RELOAD, EXECUTE, PROCESS"
            }
        };
        format!("GRANT {privs} ON *.* TO {account}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::mariadb::settings::REPLICATION_USER;

    #[test]
    fn quoting() {
        assert_eq!(sql_string("plain"), "'plain'");
        assert_eq!(sql_string("it's"), "'it\\'s'");
        assert_eq!(sql_string("back\\slash"), "'back\\\\slash'");
        assert_eq!(sql_string("a\\'b"), "'a\\\\\\'b'");
        assert_eq!(sql_string("nul\0nl\ncr\r"), "'nul\\0nl\\ncr\\r'");
        assert_eq!(quote_ident("we`ird"), "`we``ird`");
        assert_eq!(account_name("admin", "%"), "'admin'@'%'");
    }

    #[test]
    fn flavour_from_version() {
        assert_eq!(
            Flavour::detect("10.11.6-MariaDB-0+deb12u1-log"),
            Flavour::Mariadb
        );
        assert_eq!(Flavour::detect("5.5.5-10.11.6-MariaDB"), Flavour::Mariadb);
        assert_eq!(Flavour::detect("8.0.36"), Flavour::Mysql);
        assert_eq!(Flavour::detect("8.0.36-0ubuntu0.22.04.1"), Flavour::Mysql);
    }

    #[test]
    fn change_source_statements() {
        let pw = "p'a\\ss";
        assert_eq!(
            Flavour::Mariadb.change_source("10.0.0.1", 3306, REPLICATION_USER, pw, None),
            "CHANGE MASTER TO MASTER_HOST='10.0.0.1', MASTER_PORT=3306, \
             MASTER_USER='corral_replication', MASTER_PASSWORD='p\\'a\\\\ss', \
             MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1"
        );
        assert_eq!(
            Flavour::Mysql.change_source("fd00::1", 3307, REPLICATION_USER, pw, None),
            "CHANGE REPLICATION SOURCE TO SOURCE_HOST='fd00::1', SOURCE_PORT=3307, \
             SOURCE_USER='corral_replication', SOURCE_PASSWORD='p\\'a\\\\ss', \
             SOURCE_AUTO_POSITION=1, SOURCE_CONNECT_RETRY=1, GET_SOURCE_PUBLIC_KEY=1"
        );
    }

    #[test]
    fn replication_commands_by_flavour() {
        let m = Flavour::Mariadb;
        let y = Flavour::Mysql;
        assert_eq!(m.start_replica(), "START SLAVE");
        assert_eq!(y.start_replica(), "START REPLICA");
        assert_eq!(m.stop_replica(), "STOP SLAVE");
        assert_eq!(y.stop_replica(), "STOP REPLICA");
        assert_eq!(m.stop_replica_io(), "STOP SLAVE IO_THREAD");
        assert_eq!(y.start_replica_io(), "START REPLICA IO_THREAD");
        assert_eq!(m.reset_replica_all(), "RESET SLAVE ALL");
        assert_eq!(y.reset_replica_all(), "RESET REPLICA ALL");
        assert_eq!(m.replica_status(), "SHOW SLAVE STATUS");
        assert_eq!(y.replica_status(), "SHOW REPLICA STATUS");
        assert_eq!(m.replica_hosts(), "SHOW SLAVE HOSTS");
        assert_eq!(y.replica_hosts(), "SHOW REPLICAS");
        assert_eq!(m.shutdown(), "SHUTDOWN WAIT FOR ALL SLAVES");
        assert_eq!(y.shutdown(), "SHUTDOWN");
        assert_eq!(m.column(Column::IoRunning), "Slave_IO_Running");
        assert_eq!(y.column(Column::IoRunning), "Replica_IO_Running");
        assert_eq!(m.column(Column::Received), "Gtid_IO_Pos");
        assert_eq!(y.column(Column::Received), "Retrieved_Gtid_Set");
        assert_eq!(m.column(Column::Host), "Master_Host");
        assert_eq!(y.column(Column::Host), "Source_Host");
        assert!(m.uses_gtid("Slave_Pos") && !m.uses_gtid("No"));
        assert!(y.uses_gtid("1") && !y.uses_gtid("0"));
        assert_eq!(
            m.wait_applied("0-1-5", 60),
            "SELECT MASTER_GTID_WAIT('0-1-5', 60)"
        );
        assert_eq!(
            y.wait_applied("u:1-5", 60),
            "SELECT WAIT_FOR_EXECUTED_GTID_SET('u:1-5', 60)"
        );
        assert_eq!(m.position("0-1-5,1-1-9"), 5);
        assert_eq!(y.position("u:1-5,v:1-2"), 7);
    }

    #[test]
    fn read_only_by_flavour() {
        assert_eq!(Flavour::Mariadb.read_only_variable(), "read_only");
        assert_eq!(Flavour::Mysql.read_only_variable(), "super_read_only");
        assert_eq!(
            Flavour::Mariadb.set_read_only(true),
            "SET GLOBAL read_only = ON"
        );
        assert_eq!(
            Flavour::Mariadb.set_read_only(false),
            "SET GLOBAL read_only = OFF"
        );
        assert_eq!(
            Flavour::Mysql.set_read_only(true),
            "SET GLOBAL super_read_only = ON"
        );
        assert_eq!(
            Flavour::Mysql.set_read_only(false),
            "SET GLOBAL super_read_only = OFF, GLOBAL read_only = OFF"
        );
    }

    #[test]
    fn semi_sync_names_by_flavour() {
        use SemiSync::*;
        let m = Flavour::Mariadb;
        let y = Flavour::Mysql;
        assert_eq!(
            m.set_semi_sync(SourceEnabled, "ON"),
            "SET GLOBAL rpl_semi_sync_master_enabled = ON"
        );
        assert_eq!(
            y.set_semi_sync(SourceEnabled, "ON"),
            "SET GLOBAL rpl_semi_sync_source_enabled = ON"
        );
        assert_eq!(
            m.semi_sync(SourceWaitPoint),
            "rpl_semi_sync_master_wait_point"
        );
        assert_eq!(y.semi_sync(SourceTimeout), "rpl_semi_sync_source_timeout");
        assert_eq!(m.semi_sync(ReplicaEnabled), "rpl_semi_sync_slave_enabled");
        assert_eq!(y.semi_sync(ReplicaEnabled), "rpl_semi_sync_replica_enabled");
        assert_eq!(m.semi_sync(SourceClients), "Rpl_semi_sync_master_clients");
        assert_eq!(y.semi_sync(SourceStatus), "Rpl_semi_sync_source_status");
    }

    #[test]
    fn account_statements_by_flavour() {
        let acct = account_name("admin", "%");
        assert_eq!(
            Flavour::Mariadb.user_statements(&acct, &Credential::NativeHash("*ABC")),
            vec![
                "CREATE USER IF NOT EXISTS 'admin'@'%' IDENTIFIED BY PASSWORD '*ABC'",
                "ALTER USER 'admin'@'%' IDENTIFIED BY PASSWORD '*ABC'",
            ]
        );
        assert_eq!(
            Flavour::Mysql.user_statements(&acct, &Credential::Plain("o'k\\")),
            vec![
                "CREATE USER IF NOT EXISTS 'admin'@'%' IDENTIFIED BY 'o\\'k\\\\'",
                "ALTER USER 'admin'@'%' IDENTIFIED BY 'o\\'k\\\\'",
            ]
        );
        assert_eq!(
            Flavour::Mariadb.admin_grants(&acct),
            vec![
                "GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%' WITH GRANT OPTION",
                "REVOKE READ_ONLY ADMIN ON *.* FROM 'admin'@'%'",
            ]
        );
        assert_eq!(
            Flavour::Mysql.admin_grants(&acct),
            vec!["GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%' WITH GRANT OPTION"]
        );
        assert!(Flavour::Mariadb
            .replication_grants(&acct)
            .contains("REPLICATION SLAVE, BINLOG MONITOR"));
        assert!(Flavour::Mysql
            .replication_grants(&acct)
            .contains("REPLICATION SLAVE, REPLICATION CLIENT"));
    }
}
