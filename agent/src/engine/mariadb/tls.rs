//! MariaDB's TLS: the server's certificate settings and what a replica
//! adds when it points replication at its upstream.
//!
//! With the node's certificate installed (see [`crate::engine::tls`]) the
//! server offers TLS (`ssl_cert`, `ssl_key`, `ssl_ca`), and replicas
//! connect with `MASTER_SSL=1` and `MASTER_SSL_CA`: the server's own
//! replication client then verifies the upstream's certificate chain
//! against the cluster's CA. The host name is not compared
//! (`MASTER_SSL_VERIFY_SERVER_CERT=0`): the certificate names the node,
//! not the address replicas connect to. MySQL 8's replica asks for the
//! source's RSA key (`GET_SOURCE_PUBLIC_KEY`) only without TLS; with it
//! the password travels inside the TLS session.
//!
//! `require_client_tls` sets `require_secure_transport`: TCP clients
//! without TLS are refused (the agent's socket is not affected).

use crate::engine::tls::TlsFiles;

/// The my.cnf lines for TLS (a section of their own, after everything).
pub fn server_conf(files: Option<&TlsFiles>, require_client_tls: bool) -> String {
    let Some(f) = files else {
        return String::new();
    };
    format!(
        "# TLS with the node's certificate from the cluster's CA.\n\
         [mariadbd]\n\
         ssl_cert = {}\n\
         ssl_key = {}\n\
         ssl_ca = {}\n\
         tls_version = TLSv1.2,TLSv1.3\n\
         require_secure_transport = {}\n",
        f.cert().display(),
        f.key().display(),
        f.ca().display(),
        if require_client_tls { "ON" } else { "OFF" },
    )
}

/// The replication account: TLS only when the node has a certificate
/// (every replica then connects over TLS), so a plaintext attempt with the
/// password is refused.
pub fn replication_require(account: &str, tls: bool) -> String {
    format!(
        "ALTER USER {account} REQUIRE {}",
        if tls { "SSL" } else { "NONE" }
    )
}

/// TLS for the agent's own sessions with an upstream (clone size, rejoin
/// checks). Encrypted, but the certificate is not verified: this client
/// (rustls) insists on host names, and the certificate names the node, not
/// the address. The password is not exposed by it (MariaDB's native
/// authentication is a challenge and response); the replication streams
/// and the dump do verify the chain.
pub fn client_opts(ca: &std::path::Path) -> mysql_async::SslOpts {
    mysql_async::SslOpts::default()
        .with_root_certs(vec![ca.to_path_buf().into()])
        .with_danger_accept_invalid_certs(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn server_settings() {
        let f = TlsFiles::new(Path::new("/s/mariadb/tls"));
        let conf = server_conf(Some(&f), false);
        assert!(
            conf.contains("ssl_cert = /s/mariadb/tls/server.crt\n"),
            "{conf}"
        );
        assert!(conf.contains("ssl_ca = /s/mariadb/tls/ca.crt\n"), "{conf}");
        assert!(conf.contains("require_secure_transport = OFF"), "{conf}");
        assert!(server_conf(Some(&f), true).contains("require_secure_transport = ON"));
        assert_eq!(server_conf(None, true), "");
    }
}
