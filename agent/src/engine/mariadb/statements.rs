//! SQL text: quoting, and the statements that differ between MariaDB and
//! MySQL 8 ([`Flavour`]).

use super::*;

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
    /// mariadb_tls.rs).
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
