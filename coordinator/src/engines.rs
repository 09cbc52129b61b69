//! What the coordinator needs to know of each engine: names, default port,
//! connection strings, and how replication positions compare.
//!
//! Positions are u64 in every engine, reported by the agents: PostgreSQL's
//! are WAL byte positions (LSNs); MariaDB's are GTID sequence numbers of
//! the cluster's replication domain 0 (strict GTID mode makes them
//! increase across the whole cluster, so they compare like LSNs, but count
//! transactions, not bytes); Redis's are replication offsets (bytes of
//! the replication stream).

/// The engines this build can run. `mysql` is MariaDB's driver speaking
/// MySQL 8's syntax where it differs (the agent detects the server);
/// `valkey` and `keydb` are the Redis driver running the server binary the
/// agent is configured with (`--redis-server`).
pub const ENGINES: &[&str] = &["postgres", "mariadb", "mysql", "redis", "valkey", "keydb"];

/// The family an engine name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Postgres,
    Mysql,
    Redis,
}

pub fn family(engine: &str) -> Family {
    match engine {
        "mariadb" | "mysql" => Family::Mysql,
        "redis" | "valkey" | "keydb" => Family::Redis,
        _ => Family::Postgres,
    }
}

/// The port a new cluster's engine listens on.
pub fn default_port(engine: &str) -> u16 {
    match family(engine) {
        Family::Postgres => 5432,
        Family::Mysql => 3306,
        Family::Redis => 6379,
    }
}

/// The database a new cluster's admin user gets: named for the SQL
/// engines, Redis's database 0.
pub fn default_database(engine: &str) -> &'static str {
    match family(engine) {
        Family::Postgres | Family::Mysql => "defaultdb",
        Family::Redis => "0",
    }
}

/// What a position counts, for messages.
pub fn position_unit(engine: &str) -> &'static str {
    match family(engine) {
        Family::Postgres | Family::Redis => "bytes",
        Family::Mysql => "transactions",
    }
}

/// Async mode: the most an automatic failover may leave behind, in the
/// engine's position unit (1 MiB of WAL; 1,000 transactions).
pub fn failover_max_lag(engine: &str) -> u64 {
    match family(engine) {
        Family::Postgres | Family::Redis => 1 << 20,
        Family::Mysql => 1_000,
    }
}

/// Whether a replica that replayed up to `replayed` holds every write of a
/// primary stopped at `stopped`. PostgreSQL reports the shutdown
/// checkpoint's position, a record written after the last commit, which a
/// replica replays too: it must be passed. MariaDB reports the last
/// transaction's sequence number, Redis its replication offset: reaching
/// it is enough.
pub fn caught_up(engine: &str, replayed: u64, stopped: u64) -> bool {
    match family(engine) {
        Family::Postgres => replayed > stopped,
        Family::Mysql | Family::Redis => replayed >= stopped,
    }
}

/// How a replica is cloned, for operation logs (`slot`: the replica's
/// replication slot, PostgreSQL only).
pub fn clone_method(engine: &str, slot: &str) -> String {
    match family(engine) {
        Family::Postgres => format!("pg_basebackup through slot {slot}"),
        Family::Mysql => "a consistent mariadb-dump at a known GTID position".into(),
        Family::Redis => "a full synchronisation from the primary (REPLICAOF)".into(),
    }
}

/// How a former primary rejoins, for operation logs.
pub fn rejoin_method(engine: &str) -> &'static str {
    match family(engine) {
        Family::Postgres => "pg_rewind, else a fresh clone",
        Family::Mysql => "by GTID after a check for errant transactions, else a fresh clone",
        Family::Redis => "REPLICAOF: a partial or full resynchronisation",
    }
}

/// What a clean stop of the primary does, for operation logs.
pub fn clean_stop(engine: &str) -> &'static str {
    match family(engine) {
        Family::Postgres => "fast shutdown: sessions end, the last WAL is sent to the replicas",
        Family::Mysql => "sessions end, the replicas receive the last binlog events",
        Family::Redis => "clients disconnected, the replicas receive the last writes",
    }
}

/// The CA certificate's file name in the connection strings the
/// coordinator hands out; `corralctl cluster credentials` puts the path of
/// its own copy of the CA (the same CA) in its place ([`with_ca_file`]).
pub const CA_FILE: &str = "corral-ca.crt";

/// A connection URI for the admin user: every host, primary first. For
/// PostgreSQL, libpq's multi-host form with target_session_attrs so
/// clients find the primary, over TLS verified against the cluster's CA
/// (`verify-ca`: the server certificates name the nodes, not the addresses
/// clients use); MySQL clients take one host, the primary, also over TLS
/// (`ssl-mode=VERIFY_CA`). Redis stays `redis://` (its TLS is a cluster
/// choice, see docs/database-tls.md).
pub fn uri(engine: &str, user: &str, password: &str, hosts: &[String], database: &str) -> String {
    uri_for(engine, user, password, hosts, database, false)
}

/// [`uri`] of a cluster that requires TLS (`cluster create --require-tls`):
/// the same for PostgreSQL and MySQL (always TLS), `rediss://` for Redis,
/// whose port then speaks TLS only.
pub fn uri_for(
    engine: &str,
    user: &str,
    password: &str,
    hosts: &[String],
    database: &str,
    require_tls: bool,
) -> String {
    let user = encode(user);
    let password = encode(password);
    let tls = format!("sslmode=verify-ca&sslrootcert={CA_FILE}");
    match family(engine) {
        Family::Postgres if hosts.len() > 1 => format!(
            "postgresql://{user}:{password}@{}/{database}?target_session_attrs=read-write&{tls}",
            hosts.join(",")
        ),
        Family::Postgres => format!(
            "postgresql://{user}:{password}@{}/{database}?{tls}",
            hosts.first().map(String::as_str).unwrap_or("")
        ),
        // MySQL's URI form (MySQL Shell, X DevAPI): verified against the CA,
        // not the name, as for PostgreSQL.
        Family::Mysql => format!(
            "mysql://{user}:{password}@{}/{database}?ssl-mode=VERIFY_CA&ssl-ca={CA_FILE}",
            hosts.first().map(String::as_str).unwrap_or("")
        ),
        // Redis has numbered databases, not named ones.
        Family::Redis => format!(
            "{}://{user}:{password}@{}/{database}",
            if require_tls { "rediss" } else { "redis" },
            hosts.first().map(String::as_str).unwrap_or("")
        ),
    }
}

/// `uri` with the CA certificate at `path` in place of [`CA_FILE`].
pub fn with_ca_file(uri: &str, path: &str) -> String {
    let encoded: String = path.split('/').map(encode).collect::<Vec<_>>().join("/");
    uri.replace(&format!("={CA_FILE}"), &format!("={encoded}"))
}

/// Percent-encodes what a URI's user or password may not hold as is.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_ports_and_limits() {
        assert_eq!(default_port("postgres"), 5432);
        assert_eq!(default_port("mariadb"), 3306);
        assert_eq!(default_port("mysql"), 3306);
        assert_eq!(default_port("valkey"), 6379);
        assert_eq!(failover_max_lag("postgres"), 1 << 20);
        assert_eq!(position_unit("mariadb"), "transactions");
    }

    #[test]
    fn caught_up_passes_a_checkpoint_but_reaches_a_transaction() {
        assert!(!caught_up("postgres", 100, 100));
        assert!(caught_up("postgres", 101, 100));
        assert!(caught_up("mariadb", 100, 100));
        assert!(!caught_up("mariadb", 99, 100));
        assert!(caught_up("redis", 100, 100));
    }

    #[test]
    fn uris() {
        let hosts = vec!["10.0.0.1:5432".to_string(), "[fd31::2]:5432".to_string()];
        assert_eq!(
            uri("postgres", "admin", "pw", &hosts, "defaultdb"),
            "postgresql://admin:pw@10.0.0.1:5432,[fd31::2]:5432/defaultdb?target_session_attrs=read-write\
             &sslmode=verify-ca&sslrootcert=corral-ca.crt"
        );
        assert_eq!(
            uri("postgres", "admin", "pw", &hosts[..1], "defaultdb"),
            "postgresql://admin:pw@10.0.0.1:5432/defaultdb?sslmode=verify-ca&sslrootcert=corral-ca.crt"
        );
        assert_eq!(
            with_ca_file(&uri("postgres", "a", "p", &hosts[..1], "d"), "/etc/corral ca/ca.crt"),
            "postgresql://a:p@10.0.0.1:5432/d?sslmode=verify-ca&sslrootcert=/etc/corral%20ca/ca.crt"
        );
        assert_eq!(
            uri("mariadb", "admin", "p@ss/w:rd", &hosts, "defaultdb"),
            "mysql://admin:p%40ss%2Fw%3Ard@10.0.0.1:5432/defaultdb?ssl-mode=VERIFY_CA&ssl-ca=corral-ca.crt"
        );
        assert_eq!(
            with_ca_file(&uri("mysql", "a", "p", &hosts[..1], "d"), "/c/ca.crt"),
            "mysql://a:p@10.0.0.1:5432/d?ssl-mode=VERIFY_CA&ssl-ca=/c/ca.crt"
        );
        assert_eq!(
            uri_for("redis", "a", "p", &hosts[..1], "0", true),
            "rediss://a:p@10.0.0.1:5432/0"
        );
        assert!(uri("redis", "a", "p", &hosts[..1], "0").starts_with("redis://"));
    }
}
