//! Redis's TLS: when the cluster requires TLS from its clients
//! (`EngineSpec::require_client_tls`) and the node has its certificate,
//! the engine port speaks TLS only (`port 0`, `tls-port <port>`): the
//! firewall's fence and lease gate cover one port, so no second, plaintext
//! or TLS, port is opened. Replication then runs over TLS too
//! (`tls-replication yes`): a replica verifies its primary's certificate
//! against the cluster's CA (Redis compares no host names). Clients need no
//! certificate of their own (`tls-auth-clients no`); they authenticate with
//! their password, inside TLS. The agent keeps using the Unix socket,
//! which TLS does not concern.
//!
//! Without the requirement the port stays plaintext, for clients and
//! replication alike (Redis cannot offer TLS and plaintext on one port).

use crate::engine::tls::TlsFiles;

/// The redis.conf lines for TLS, after everything else (later lines win);
/// `port` is the engine port, 0 for a temporary server (socket only, which
/// still replicates over TLS).
pub fn conf(files: Option<&TlsFiles>, port: u16, tls_only: bool) -> String {
    let (Some(f), true) = (files, tls_only) else {
        return String::new();
    };
    let q = |p: std::path::PathBuf| super::conf_quote(&p.to_string_lossy());
    let mut s = format!(
        "# TLS only, with the node's certificate from the cluster's CA.\n\
         port 0\n\
         tls-cert-file {}\n\
         tls-key-file {}\n\
         tls-ca-cert-file {}\n\
         tls-auth-clients no\n\
         tls-replication yes\n\
         tls-protocols \"TLSv1.2 TLSv1.3\"\n",
        q(f.cert()),
        q(f.key()),
        q(f.ca()),
    );
    if port != 0 {
        s.push_str(&format!("tls-port {port}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn tls_only_on_the_engine_port_when_required() {
        let f = TlsFiles::new(Path::new("/s/redis/tls"));
        let c = conf(Some(&f), 6379, true);
        for line in [
            "port 0",
            "tls-port 6379",
            "tls-replication yes",
            "tls-auth-clients no",
            "tls-ca-cert-file \"/s/redis/tls/ca.crt\"",
        ] {
            assert!(c.lines().any(|l| l == line), "{line} in {c}");
        }
        assert!(!conf(Some(&f), 0, true).contains("tls-port"));
        assert_eq!(conf(Some(&f), 6379, false), "");
        assert_eq!(conf(None, 6379, true), "");
    }
}
