//! Redis's ACL users: who may do what.
//!
//! - `default` and the spec's admin user, with the admin password: every
//!   command an application needs (`+@all`), but none of the `@admin`
//!   category: no `REPLICAOF`/`SLAVEOF`, `CONFIG`, `ACL` (beyond `WHOAMI`
//!   and the like), `DEBUG`, `SHUTDOWN`, `FAILOVER`, `CLIENT KILL|PAUSE`,
//!   `MONITOR`, `SYNC`/`PSYNC`, `MODULE`. A database admin can therefore
//!   not repoint a replica, make it writable, lift the fence
//!   (`min-replicas-to-write`) or change the users.
//! - `corral_agent`, with a password the agent makes itself (kept in
//!   `secrets.json`, never sent anywhere): every right. Only the agent uses
//!   it, over the Unix socket (which only redis and root reach).
//! - `corral_replication`, with the replication password: `PSYNC`,
//!   `REPLCONF` and `PING`, which is what replicas need.
//!
//! Every rule list starts with `reset`, so applying them again converges a
//! user changed by hand.

use super::REPLICATION_USER;
use anyhow::Result;

/// The ACL user the agent administers the server as.
pub const AGENT_USER: &str = "corral_agent";

/// What `default` and the admin user may run.
const CLIENT_RULES: &[&str] = &["~*", "&*", "+@all", "-@admin"];

/// A new password for [`AGENT_USER`]: 32 random bytes, hex.
pub fn new_agent_password() -> Result<String> {
    let mut b = [0u8; 32];
    corral_proto::os_random(&mut b)?;
    Ok(hex::encode(b))
}

/// The ACL users and their rules, in `ACL SETUSER` form.
pub fn acl_users(
    admin_user: &str,
    admin_password: &str,
    replication_password: &str,
    agent_password: &str,
) -> Vec<(String, Vec<String>)> {
    let user = |pw: &str, rules: &[&str]| -> Vec<String> {
        ["reset", "on", &format!(">{pw}")]
            .iter()
            .map(|s| s.to_string())
            .chain(rules.iter().map(|s| s.to_string()))
            .collect()
    };
    let mut users = vec![(
        AGENT_USER.to_string(),
        user(agent_password, &["~*", "&*", "+@all"]),
    )];
    users.push(("default".into(), user(admin_password, CLIENT_RULES)));
    if ![AGENT_USER, "default", REPLICATION_USER].contains(&admin_user) {
        users.push((admin_user.into(), user(admin_password, CLIENT_RULES)));
    }
    users.push((
        REPLICATION_USER.into(),
        user(replication_password, &["+psync", "+replconf", "+ping"]),
    ));
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    /// secrets.json written before the agent had its own user: the first
    /// read makes the agent's password and keeps it.
    #[test]
    fn an_old_secrets_file_gets_an_agent_password_once() {
        let dir = std::env::temp_dir().join(format!("corral-redis-acl-{}", std::process::id()));
        let driver = super::super::Redis::new(&dir, "vm1");
        let base = dir.join("redis");
        std::fs::create_dir_all(&base).unwrap();
        let path = base.join("secrets.json");
        std::fs::write(
            &path,
            r#"{"admin_password":"a","replication_password":"r"}"#,
        )
        .unwrap();
        let first = driver.load_secrets().unwrap();
        assert_eq!(first.agent_password.len(), 64);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains(&first.agent_password));
        assert_eq!(
            driver.load_secrets().unwrap().agent_password,
            first.agent_password
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_the_agent_has_admin_commands() {
        let users = acl_users("admin", "a", "r", "g");
        let names: Vec<&str> = users.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(names, [AGENT_USER, "default", "admin", REPLICATION_USER]);
        for (user, rules) in &users {
            assert_eq!(rules[..2], ["reset", "on"], "{user}");
            let admin = !rules.contains(&"-@admin".to_string());
            let all = rules.contains(&"+@all".to_string());
            assert_eq!(admin && all, user == AGENT_USER, "{user}: {rules:?}");
        }
        assert!(users[0].1.contains(&">g".to_string()));
        // An admin user named like Corral's own users gets no second entry.
        for name in [AGENT_USER, "default", REPLICATION_USER] {
            assert_eq!(acl_users(name, "a", "r", "g").len(), 3, "{name}");
        }
        assert_eq!(new_agent_password().unwrap().len(), 64);
        assert_ne!(new_agent_password().unwrap(), new_agent_password().unwrap());
    }
}
