//! PostgreSQL's TLS: the server's `ssl` settings, the pg_hba.conf rules
//! for TCP, and what a replica adds to its connection string.
//!
//! With the node's certificate installed (see [`super::super::tls`]):
//! - the server offers TLS to every client (`ssl = on`, TLS 1.2 at least);
//! - the replication role connects only over TLS (`hostssl`; a plaintext
//!   attempt by it, for streaming, cloning or pg_rewind, is rejected), and
//!   replicas verify the upstream's certificate against the cluster's CA
//!   (`sslmode=verify-ca`: the certificate names the node, not the address
//!   replicas connect to, so the host name is not compared);
//! - clients may use TLS, and must when the cluster requires it
//!   (`EngineSpec::require_client_tls`: plaintext is rejected).
//!
//! Without one (a driver made without certificates), `ssl = off` and every
//! TCP connection may be plaintext, as before.

use super::REPLICATION_USER;
use crate::engine::tls::TlsFiles;

/// The networks pg_hba.conf rules apply to: every IPv4 and IPv6 address
/// (the firewall decides who reaches the port at all).
const NETS: [&str; 2] = ["0.0.0.0/0", "::/0"];

/// The postgresql.conf lines for TLS.
pub fn ssl_conf(files: Option<&TlsFiles>, quote: impl Fn(&str) -> String) -> String {
    match files {
        None => "# TLS: no certificate on this node.\nssl = off\n".to_string(),
        Some(f) => format!(
            "# TLS with the node's certificate from the cluster's CA.\n\
             ssl = on\n\
             ssl_cert_file = {}\n\
             ssl_key_file = {}\n\
             ssl_min_protocol_version = 'TLSv1.2'\n",
            quote(&f.cert().to_string_lossy()),
            quote(&f.key().to_string_lossy()),
        ),
    }
}

/// pg_hba.conf's TCP rules of a server that is not fenced.
pub fn hba_tcp(tls: bool, require_client_tls: bool) -> String {
    let mut out = String::new();
    let mut rule = |line: String| {
        for net in NETS {
            out.push_str(&line.replace("NET", net));
            out.push('\n');
        }
    };
    if !tls {
        rule(format!(
            "host replication {REPLICATION_USER} NET scram-sha-256"
        ));
        rule("host all all NET scram-sha-256".into());
        return out;
    }
    // Plaintext first: what must use TLS is rejected before any rule
    // could accept it.
    rule("hostnossl replication all NET reject".into());
    rule(format!("hostnossl all {REPLICATION_USER} NET reject"));
    if require_client_tls {
        rule("hostnossl all all NET reject".into());
    }
    rule(format!(
        "hostssl replication {REPLICATION_USER} NET scram-sha-256"
    ));
    rule("host all all NET scram-sha-256".into());
    out
}

/// What a replica's (or pg_basebackup's, pg_rewind's) connection string to
/// its upstream adds: TLS, verified against the CA.
pub fn conninfo_tls(files: Option<&TlsFiles>) -> Vec<(&'static str, String)> {
    match files {
        None => vec![],
        Some(f) => vec![
            ("sslmode", "verify-ca".into()),
            ("sslrootcert", f.ca().to_string_lossy().into_owned()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The first rule of `hba` that matches a connection of this kind, as
    /// PostgreSQL picks it (the address column is always all addresses).
    fn first_match(hba: &str, ssl: bool, replication: bool, user: &str) -> String {
        for line in hba.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let kind_ok = match f[0] {
                "host" => true,
                "hostssl" => ssl,
                "hostnossl" => !ssl,
                _ => false,
            };
            let db_ok = if replication {
                f[1] == "replication"
            } else {
                f[1] == "all"
            };
            if kind_ok && db_ok && (f[2] == "all" || f[2] == user) {
                return f[4].to_string();
            }
        }
        "no rule".into()
    }

    #[test]
    fn replication_needs_tls_and_clients_only_when_required() {
        for required in [false, true] {
            let hba = hba_tcp(true, required);
            let r = REPLICATION_USER;
            assert_eq!(first_match(&hba, true, true, r), "scram-sha-256");
            assert_eq!(first_match(&hba, false, true, r), "reject");
            // pg_rewind connects to a database as the replication role.
            assert_eq!(first_match(&hba, false, false, r), "reject");
            assert_eq!(first_match(&hba, true, false, r), "scram-sha-256");
            assert_eq!(first_match(&hba, true, false, "admin"), "scram-sha-256");
            let plain_client = first_match(&hba, false, false, "admin");
            assert_eq!(plain_client == "reject", required, "{hba}");
        }
        // Without a certificate, plaintext as before.
        let hba = hba_tcp(false, true);
        assert_eq!(
            first_match(&hba, false, true, REPLICATION_USER),
            "scram-sha-256"
        );
        assert_eq!(first_match(&hba, false, false, "admin"), "scram-sha-256");
    }

    #[test]
    fn replicas_verify_the_upstream_against_the_ca() {
        let f = TlsFiles::new(Path::new("/s/postgres/tls"));
        assert_eq!(
            conninfo_tls(Some(&f)),
            vec![
                ("sslmode", "verify-ca".to_string()),
                ("sslrootcert", "/s/postgres/tls/ca.crt".to_string())
            ]
        );
        assert!(conninfo_tls(None).is_empty());
        let conf = ssl_conf(Some(&f), |s| format!("'{s}'"));
        assert!(conf.contains("ssl = on\n"), "{conf}");
        assert!(
            conf.contains("ssl_key_file = '/s/postgres/tls/server.key'"),
            "{conf}"
        );
        assert!(ssl_conf(None, |s| s.to_string()).contains("ssl = off"));
    }
}
