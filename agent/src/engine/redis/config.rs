//! The configuration file and the credentials it carries: quoting, the
//! ACL users, the fencing minimums, rendering and reading it back.

use super::acl;
use super::settings::{FENCE_MIN_REPLICAS, REPLICATION_USER, SYNC_MAX_LAG};
use crate::engine::{EngineSpec, Upstream};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A redis.conf argument in double quotes, with the escapes Redis's
/// argument splitter (sdssplitargs) reads back byte for byte.
pub(super) fn conf_quote(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for b in v.bytes() {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s.push('"');
    s
}

/// The passwords as kept on disk (`secrets.json`).
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct StoredSecrets {
    pub(super) admin_password: String,
    pub(super) replication_password: String,
    /// The agent's own ACL user's (see acl.rs); made by the agent,
    /// absent from files written before it existed (then made at once).
    #[serde(default)]
    pub(super) agent_password: String,
}

/// The ACL users and their rules, in `ACL SETUSER` form (see acl.rs).
pub(super) fn acl_users(admin_user: &str, s: &StoredSecrets) -> Vec<(String, Vec<String>)> {
    acl::acl_users(
        admin_user,
        &s.admin_password,
        &s.replication_password,
        &s.agent_password,
    )
}

/// `min-replicas-to-write` and `min-replicas-max-lag` for a node.
pub(super) fn min_replicas(spec: &EngineSpec, fenced: bool) -> (u32, u32) {
    if fenced {
        (FENCE_MIN_REPLICAS, 1)
    } else if spec.role == "primary" && spec.sync && !spec.replicas.is_empty() {
        (1, SYNC_MAX_LAG)
    } else {
        (0, SYNC_MAX_LAG)
    }
}

/// Everything redis.conf is written from.
pub(super) struct ConfInput<'a> {
    /// TCP port; 0 for the clone's temporary server (socket only).
    pub(super) port: u16,
    /// The port announced to the primary (the real one, also when cloning).
    pub(super) announce_port: u16,
    pub(super) socket: &'a Path,
    pub(super) pidfile: &'a Path,
    pub(super) dir: &'a Path,
    pub(super) node_id: &'a str,
    pub(super) admin_user: &'a str,
    pub(super) secrets: &'a StoredSecrets,
    pub(super) upstream: Option<&'a Upstream>,
    pub(super) min_replicas: (u32, u32),
}

pub(super) fn render_conf(c: &ConfInput) -> String {
    let q = |p: &Path| conf_quote(&p.to_string_lossy());
    let mut s = format!(
        "# Written by corral-agent from the cluster's spec; edits here are overwritten.\n\
         # Every address (IPv6 too when the host has it); every user needs a password.\n\
         port {port}\n\
         bind * -::*\n\
         protected-mode yes\n\
         unixsocket {socket}\n\
         unixsocketperm 700\n\
         pidfile {pidfile}\n\
         dir {dir}\n\
         # The log goes to stdout, which the agent appends to server.log.\n\
         logfile \"\"\n\
         daemonize no\n\
         supervised no\n\
         # The config file in the process title: how the agent recognises its server.\n\
         proc-title-template \"{{title}} {{listen-addr}} {{server-mode}} {{config-file}}\"\n\
         # Durability: the append-only file, fsynced every second. No RDB\n\
         # schedule (full syncs and AOF rewrites write RDB files themselves).\n\
         appendonly yes\n\
         appendfsync everysec\n\
         save \"\"\n\
         # Replication. Without a zero delay every full sync waits 5 s for\n\
         # more replicas to share it.\n\
         repl-diskless-sync yes\n\
         repl-diskless-sync-delay 0\n\
         # Room for a replica to resume after a short break without a full sync.\n\
         repl-backlog-size 64mb\n\
         replica-read-only yes\n\
         # Announced as this replica's address: the primary lists it by node id.\n\
         replica-announce-ip {node}\n\
         replica-announce-port {announce}\n\
         # Writes need this many replicas acknowledging within the lag (0: off;\n\
         # {fence}: fenced, every write refused).\n\
         min-replicas-to-write {to_write}\n\
         min-replicas-max-lag {max_lag}\n",
        port = c.port,
        socket = q(c.socket),
        pidfile = q(c.pidfile),
        dir = q(c.dir),
        node = conf_quote(c.node_id),
        announce = c.announce_port,
        fence = FENCE_MIN_REPLICAS,
        to_write = c.min_replicas.0,
        max_lag = c.min_replicas.1,
    );
    s.push_str("# Users (rules as ACL SETUSER takes them).\n");
    for (user, rules) in acl_users(c.admin_user, c.secrets) {
        let rules: Vec<String> = rules.iter().map(|r| conf_quote(r)).collect();
        s.push_str(&format!("user {} {}\n", conf_quote(&user), rules.join(" ")));
    }
    s.push_str(&format!(
        "masteruser {}\nmasterauth {}\n",
        conf_quote(REPLICATION_USER),
        conf_quote(&c.secrets.replication_password)
    ));
    if let Some(up) = c.upstream {
        s.push_str(&format!("replicaof {} {}\n", conf_quote(&up.host), up.port));
    }
    s
}

/// The `min-replicas-to-write` and `min-replicas-max-lag` a redis.conf sets.
pub(super) fn conf_min_replicas(conf: &str) -> Option<(u32, u32)> {
    let get = |key: &str| {
        conf.lines().find_map(|l| {
            let (k, v) = l.trim().split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u32>().ok()).flatten()
        })
    };
    Some((get("min-replicas-to-write")?, get("min-replicas-max-lag")?))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::engine::redis) fn spec(role: &str) -> EngineSpec {
        EngineSpec {
            cluster: "cache".into(),
            engine: "redis".into(),
            role: role.into(),
            port: 6379,
            admin_user: "admin".into(),
            database: "defaultdb".into(),
            replicas: if role == "primary" {
                vec!["vm2".into()]
            } else {
                vec![]
            },
            sync: false,
            upstream: (role == "replica").then(|| Upstream {
                node: "vm1".into(),
                host: "10.0.0.1".into(),
                port: 6379,
            }),
            wal_archive: false,
            require_client_tls: false,
        }
    }

    fn secrets() -> StoredSecrets {
        StoredSecrets {
            admin_password: "admin \"pass\" \\ é".into(),
            replication_password: "repl-pass-0123456789".into(),
            agent_password: "agent-pass".into(),
        }
    }

    #[test]
    fn quoting_reads_back_byte_for_byte() {
        assert_eq!(conf_quote("a b"), "\"a b\"");
        assert_eq!(conf_quote("x\"y\\z"), "\"x\\\"y\\\\z\"");
        assert_eq!(conf_quote("é\n"), "\"\\xc3\\xa9\\n\"");
    }

    fn input<'a>(
        s: &'a StoredSecrets,
        up: Option<&'a Upstream>,
        admin: &'a str,
        min: (u32, u32),
    ) -> ConfInput<'a> {
        ConfInput {
            port: 6379,
            announce_port: 6379,
            socket: Path::new("/s/run/redis.sock"),
            pidfile: Path::new("/s/run/redis.pid"),
            dir: Path::new("/s/data"),
            node_id: "vm2",
            admin_user: admin,
            secrets: s,
            upstream: up,
            min_replicas: min,
        }
    }

    #[test]
    fn config_of_a_replica_and_a_primary() {
        let s = secrets();
        let up = spec("replica").upstream.unwrap();
        let conf = render_conf(&input(&s, Some(&up), "admin", (0, 10)));
        for line in [
            "port 6379",
            "bind * -::*",
            "unixsocket \"/s/run/redis.sock\"",
            "unixsocketperm 700",
            "appendonly yes",
            "appendfsync everysec",
            "repl-diskless-sync-delay 0",
            "replica-announce-ip \"vm2\"",
            "replicaof \"10.0.0.1\" 6379",
            "masteruser \"corral_replication\"",
            "masterauth \"repl-pass-0123456789\"",
            "user \"admin\" \"reset\" \"on\" \">admin \\\"pass\\\" \\\\ \\xc3\\xa9\" \"~*\" \"&*\" \"+@all\" \"-@admin\"",
            "user \"corral_agent\" \"reset\" \"on\" \">agent-pass\" \"~*\" \"&*\" \"+@all\"",
            "user \"corral_replication\" \"reset\" \"on\" \">repl-pass-0123456789\" \"+psync\" \"+replconf\" \"+ping\"",
        ] {
            assert!(conf.lines().any(|l| l == line), "missing {line:?} in\n{conf}");
        }
        assert_eq!(conf_min_replicas(&conf), Some((0, 10)));
        let conf = render_conf(&input(&s, None, "default", (1, 10)));
        assert!(!conf.contains("replicaof"));
        assert_eq!(conf.matches("user \"default\"").count(), 1, "{conf}");
        assert_eq!(conf_min_replicas(&conf), Some((1, 10)));
    }

    #[test]
    fn write_settings() {
        let mut p = spec("primary");
        assert_eq!(min_replicas(&p, false), (0, SYNC_MAX_LAG));
        p.sync = true;
        assert_eq!(min_replicas(&p, false), (1, SYNC_MAX_LAG));
        assert_eq!(min_replicas(&p, true), (FENCE_MIN_REPLICAS, 1));
        p.replicas.clear();
        assert_eq!(
            min_replicas(&p, false),
            (0, SYNC_MAX_LAG),
            "no replica to wait for"
        );
        assert_eq!(min_replicas(&spec("replica"), false).0, 0);
    }
}
