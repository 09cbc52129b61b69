//! MariaDB's TLS against real servers: a replica streams over TLS verified
//! against the cluster's CA (and refuses an upstream another CA
//! certified), clients are offered TLS and, when the cluster requires it,
//! refused without it. Same harness and needs as mariadb.rs.

mod mariadb_node;

use corral_proto::pki::CertAuthority;
use mariadb_node::*;

/// A primary with a certificate from `ca`, with table t.
async fn tls_primary(id: &str, ca: &CertAuthority) -> (Node, EngineSpec) {
    let mut n = Node::new(id).with_tls(ca);
    let spec = n.make_primary().await;
    (n, spec)
}

/// A session over `n`'s socket as root (as the agent has).
async fn root(n: &Node) -> mysql_async::Conn {
    let socket = n.base().join("run/mariadbd.sock");
    let opts = mysql_async::OptsBuilder::default()
        .socket(Some(socket.to_string_lossy().into_owned()))
        .user(Some("root"));
    mysql_async::Conn::new(opts).await.unwrap()
}

/// SHOW SLAVE STATUS's `column` on `n`.
async fn slave_status(n: &Node, column: &str) -> String {
    let mut c = root(n).await;
    let row: Option<mysql_async::Row> = c.query_first("SHOW SLAVE STATUS").await.unwrap();
    row.and_then(|r| r.get_opt::<Option<String>, &str>(column))
        .and_then(|v| v.ok().flatten())
        .unwrap_or_default()
}

/// A TCP session as the admin, with TLS verified against `ca` or without.
async fn session(n: &Node, ca: Option<&std::path::Path>) -> Result<String, String> {
    let mut opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(n.port)
        .user(Some("admin"))
        .pass(Some(n.password.clone()))
        .prefer_socket(false);
    if let Some(ca) = ca {
        // The certificate names the node, not 127.0.0.1, and this
        // client (rustls) checks names: what is checked here is that the
        // session is encrypted; the verification, by the replicas.
        let ssl = mysql_async::SslOpts::default()
            .with_root_certs(vec![ca.to_path_buf().into()])
            .with_danger_accept_invalid_certs(true);
        opts = opts.ssl_opts(Some(ssl));
    }
    let mut c = mysql_async::Conn::new(opts)
        .await
        .map_err(|e| e.to_string())?;
    let row: Option<(String, String)> = c
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.map(|r| r.1).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_and_clients_use_tls_and_plaintext_is_refused_where_required() {
    let ca = CertAuthority::generate("tls").unwrap();
    let (mut a, mut a_spec) = tls_primary("tls-ma", &ca).await;
    a.insert(1, "before the clone").await.unwrap();

    let mut b = Node::new("tls-mb").with_tls(&ca);
    let b_spec = b.new_replica(&a).await;
    b.wait(&b_spec, "stream from A", |r| r.streaming).await;
    a.insert(2, "streamed").await.unwrap();
    b.wait_row(2).await;
    assert_eq!(slave_status(&b, "Master_SSL_Allowed").await, "Yes");
    // The replication account cannot connect without TLS, even with its
    // password.
    let plain = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(a.port)
        .user(Some("corral_replication"))
        .pass(Some(secrets().replication_password))
        .prefer_socket(false);
    let err = mysql_async::Conn::new(plain).await.unwrap_err().to_string();
    assert!(err.contains("Access denied"), "{err}");

    // Clients: TLS offered (verified against the CA), plaintext allowed...
    let ca_file = a.dir.join("client-ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let cipher = session(&a, Some(&ca_file)).await.unwrap();
    assert!(!cipher.is_empty(), "no TLS session");
    assert_eq!(session(&a, None).await.unwrap(), "");
    // ...until the cluster requires TLS (a restart applies it).
    a_spec.require_client_tls = true;
    a.driver.prepare(&a_spec).await.unwrap();
    a.stop().await;
    a.start(&a_spec).await;
    // (MariaDB 10.11 answers a plaintext login with "access denied".)
    let err = session(&a, None).await.unwrap_err();
    assert!(
        err.contains("Access denied") || err.contains("3159"),
        "{err}"
    );
    // The same account and password over TLS are served.
    assert!(!session(&a, Some(&ca_file)).await.unwrap().is_empty());
    // The replica reconnects over TLS and keeps streaming.
    root(&a)
        .await
        .query_drop("INSERT INTO app.t VALUES (3, 'after the restart')")
        .await
        .unwrap();
    b.wait_row(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_an_upstream_another_ca_certified() {
    let ours = CertAuthority::generate("ours").unwrap();
    let theirs = CertAuthority::generate("theirs").unwrap();
    let (a, _) = tls_primary("tls-mc", &theirs).await;
    a.insert(1, "x").await.unwrap();
    let b = Node::new("tls-md").with_tls(&ours);
    b.driver.save_secrets(&secrets()).unwrap();
    let b_spec = b.replica_spec(&a);
    let err = b
        .driver
        .clone_data(&b_spec, &a.upstream(), &|_, _| {})
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("TLS/SSL error"), "{err}");
    assert!(!b.driver.has_data());
}
