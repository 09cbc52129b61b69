//! A ConfigureEngine request from the coordinator, checked: every problem
//! is named before anything on the node changes.

use super::contract::{EngineSpec, Secrets, Upstream};
use corral_proto::pb;

/// Engines this agent can run (`mysql`: the MariaDB driver, which speaks
/// MySQL 8's syntax where it differs; `valkey` and `keydb`: the Redis
/// driver with the agent's `--redis-server`).
pub const SUPPORTED_ENGINES: &[&str] =
    &["postgres", "mariadb", "mysql", "redis", "valkey", "keydb"];

pub const ROLES: &[&str] = &["primary", "replica"];

/// A ConfigureEngine request, checked.
pub struct Request {
    pub spec: EngineSpec,
    pub secrets: Secrets,
    pub initialize: bool,
    pub resync_id: String,
    /// The cluster's term (0: not given) and timing (0: keep).
    pub term: u64,
    pub lease_ms: u32,
    pub heartbeat_ms: u32,
    /// With `initialize`: fill the data from this backup.
    pub restore: Option<pb::RestoreSource>,
    /// Where to archive WAL as primary (see [`crate::backup::wal`]).
    pub wal_archive: Option<pb::WalArchive>,
}

impl EngineSpec {
    /// Checks a request from the coordinator; every problem is named.
    pub fn from_request(req: &pb::ConfigureEngineRequest) -> Result<Request, String> {
        corral_proto::names::validate("cluster", &req.cluster)?;
        if !SUPPORTED_ENGINES.contains(&req.engine.as_str()) {
            return Err(format!(
                "engine {:?} is not supported by this agent (supported: {})",
                req.engine,
                SUPPORTED_ENGINES.join(", ")
            ));
        }
        if !ROLES.contains(&req.role.as_str()) {
            return Err(format!(
                "role {:?} is not supported (supported: {})",
                req.role,
                ROLES.join(", ")
            ));
        }
        let port = valid_port(req.port)?;
        sql_identifier("admin user", &req.admin_user)?;
        if matches!(req.engine.as_str(), "redis" | "valkey" | "keydb") {
            // Redis numbers its databases.
            if req.database.parse::<u8>().is_err() {
                return Err(format!(
                    "invalid database {:?} for redis: a database number such as 0",
                    req.database
                ));
            }
        } else {
            sql_identifier("database", &req.database)?;
        }
        if req.admin_password.len() < 16 {
            return Err("admin password is missing or shorter than 16 characters".into());
        }
        if req.replication_password.len() < 16 {
            return Err("replication password is missing or shorter than 16 characters".into());
        }
        for r in &req.replicas {
            corral_proto::names::validate("replica node", r)?;
        }
        let upstream = match (&req.upstream, req.role.as_str()) {
            (Some(u), "replica") => {
                corral_proto::names::validate("upstream node", &u.node)?;
                let host: std::net::IpAddr = u
                    .host
                    .parse()
                    .map_err(|_| format!("upstream host {:?} is not an IP address", u.host))?;
                Some(Upstream {
                    node: u.node.clone(),
                    host: host.to_string(),
                    port: valid_port(u.port)?,
                })
            }
            (None, "replica") => return Err("a replica needs an upstream to stream from".into()),
            (Some(_), _) => return Err("only a replica has an upstream".into()),
            (None, _) => None,
        };
        if req.role == "replica" && (req.initialize || !req.replicas.is_empty() || req.sync) {
            return Err("initialize, replicas and sync apply to a primary only".into());
        }
        if req.restore.is_some() && !req.initialize {
            return Err(
                "a restore applies to a new cluster's first node only (with initialize)".into(),
            );
        }
        if let Some(w) = &req.wal_archive {
            if w.key.len() != 32 || w.prefix.is_empty() || w.target.is_none() {
                return Err("a WAL archive needs a target, a prefix and a 32-byte key".into());
            }
            if let Some(t) = &w.target {
                crate::backup::scope::check_own(t, &req.cluster, &w.prefix)
                    .map_err(|e| format!("the WAL archive: {e:#}"))?;
            }
        }
        if req.role == "primary" && !req.resync_id.is_empty() {
            return Err("a primary cannot be resynced; promote another node first".into());
        }
        Ok(Request {
            spec: EngineSpec {
                cluster: req.cluster.clone(),
                engine: req.engine.clone(),
                role: req.role.clone(),
                port,
                admin_user: req.admin_user.clone(),
                database: req.database.clone(),
                replicas: req.replicas.clone(),
                sync: req.sync,
                upstream,
                wal_archive: req.wal_archive.is_some(),
                require_client_tls: req.require_client_tls,
            },
            secrets: Secrets {
                admin_password: req.admin_password.clone(),
                replication_password: req.replication_password.clone(),
            },
            initialize: req.initialize,
            resync_id: req.resync_id.clone(),
            term: req.term,
            lease_ms: req.lease_duration_ms,
            heartbeat_ms: req.heartbeat_interval_ms,
            restore: req.restore.clone(),
            wal_archive: req.wal_archive.clone(),
        })
    }
}

fn valid_port(p: u32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p >= 1024)
        .ok_or_else(|| format!("port {p} is outside 1024..=65535"))
}

/// A name safe to splice into SQL as a quoted identifier: lowercase letters,
/// digits and `_`, starting with a letter, at most 63 bytes.
pub fn sql_identifier(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.starts_with(|c: char| c.is_ascii_lowercase())
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {v:?}: use lowercase letters, digits and '_', starting with a letter"
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn request() -> pb::ConfigureEngineRequest {
        pb::ConfigureEngineRequest {
            cluster: "orders".into(),
            engine: "postgres".into(),
            role: "primary".into(),
            port: 5432,
            admin_user: "admin".into(),
            admin_password: "x".repeat(32),
            database: "defaultdb".into(),
            replication_password: "y".repeat(32),
            replicas: vec!["vm2".into()],
            ..Default::default()
        }
    }

    pub(crate) fn replica() -> pb::ConfigureEngineRequest {
        pb::ConfigureEngineRequest {
            role: "replica".into(),
            replicas: vec![],
            upstream: Some(pb::Upstream {
                node: "vm1".into(),
                host: "10.0.0.1".into(),
                port: 5432,
            }),
            ..request()
        }
    }

    #[test]
    fn accepts_valid_requests() {
        let r = EngineSpec::from_request(&request()).unwrap();
        assert_eq!(r.spec.port, 5432);
        assert_eq!(r.spec.replicas, ["vm2"]);
        let r = EngineSpec::from_request(&replica()).unwrap();
        assert_eq!(r.spec.upstream.unwrap().host, "10.0.0.1");
    }

    #[test]
    fn names_what_is_wrong() {
        type Mutation = Box<dyn Fn(&mut pb::ConfigureEngineRequest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|r| r.engine = "oracle".into()),
                "engine \"oracle\" is not supported",
            ),
            (Box::new(|r| r.role = "standby".into()), "role \"standby\""),
            (
                Box::new(|r| r.role = "replica".into()),
                "a replica needs an upstream",
            ),
            (
                Box::new(|r| r.replication_password = "short".into()),
                "replication password",
            ),
            (
                Box::new(|r| r.replicas = vec!["Bad".into()]),
                "invalid replica node name",
            ),
            (
                Box::new(|r| r.resync_id = "op-1".into()),
                "a primary cannot be resynced",
            ),
            (
                Box::new(|r| {
                    *r = replica();
                    r.upstream.as_mut().unwrap().host = "db.example".into();
                }),
                "is not an IP address",
            ),
            (
                Box::new(|r| {
                    *r = replica();
                    r.initialize = true;
                }),
                "apply to a primary only",
            ),
            (Box::new(|r| r.port = 80), "port 80"),
            (Box::new(|r| r.port = 70000), "port 70000"),
            (
                Box::new(|r| r.admin_user = "a\"; drop".into()),
                "invalid admin user",
            ),
            (Box::new(|r| r.database = "".into()), "invalid database"),
            (
                Box::new(|r| r.admin_password = "short".into()),
                "admin password",
            ),
            (
                Box::new(|r| r.cluster = "Bad_Name".into()),
                "invalid cluster name",
            ),
        ];
        for (mutate, expected) in cases {
            let mut r = request();
            mutate(&mut r);
            let Err(err) = EngineSpec::from_request(&r) else {
                panic!("accepted a request that should mention {expected}");
            };
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }
}
