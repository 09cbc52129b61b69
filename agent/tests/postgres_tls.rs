//! PostgreSQL's TLS against real servers: replication is encrypted and
//! verified against the cluster's CA, a plaintext replication connection
//! is refused, clients are offered TLS and, when the cluster requires it,
//! refused without it. Clients are `psql`, as an application would
//! connect. Same harness and needs as postgres.rs.

mod pg_node;

use corral_agent::engine::postgres::REPLICATION_USER;
use corral_proto::pki::CertAuthority;
use pg_node::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Runs `sql` with psql over `conninfo`; stdout, or stderr on failure.
async fn psql(conninfo: &str, password: &str, sql: &str) -> Result<String, String> {
    let out = tokio::process::Command::new(bin_dir().join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            conninfo,
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .await
        .map_err(|e| format!("running psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A client's connection string to `node` as the admin.
fn client_conninfo(node: &Node, ssl: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=admin dbname=app {ssl}",
        node.port
    )
}

const SESSION_SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// Writes the CA certificate where a client reads it.
fn ca_file(ca: &CertAuthority, dir: &Path) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = dir.join(format!("client-ca-{n}.crt"));
    std::fs::write(&path, ca.cert_pem()).unwrap();
    format!("sslmode=verify-ca sslrootcert={}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_is_encrypted_and_plaintext_is_refused_where_required() {
    let ca = CertAuthority::generate("tls").unwrap();
    let mut a = Node::new("tls-a").with_tls(&ca);
    let mut spec_a = a.primary_spec(&["tls-b"], false);
    a.new_primary(&spec_a).await;
    a.sql("CREATE TABLE t (id int PRIMARY KEY)").await;

    let mut b = Node::new("tls-b").with_tls(&ca);
    let spec_b = b.new_replica(&a).await;
    b.wait(&spec_b, "stream", |r| r.streaming).await;

    // The replica's walsender on the primary runs over TLS.
    let walsender_ssl: bool = a
        .client("postgres")
        .await
        .query_one(
            "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
             WHERE r.application_name = 'tls-b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(walsender_ssl, "the replica streams in plaintext");

    // The replication role cannot connect without TLS, not even with its
    // password: neither to stream nor to a database (as pg_rewind does).
    let repl = |extra: &str| {
        format!(
            "host=127.0.0.1 port={} user={REPLICATION_USER} {extra} sslmode=disable",
            a.port
        )
    };
    let password = secrets().replication_password;
    for conninfo in [
        repl("replication=database dbname=postgres"),
        repl("dbname=postgres"),
    ] {
        let err = psql(&conninfo, &password, "IDENTIFY_SYSTEM")
            .await
            .unwrap_err();
        assert!(err.contains("pg_hba.conf rejects"), "{conninfo}: {err}");
    }

    // Clients are offered TLS, verified against the CA, and may still use
    // plaintext while the cluster does not require TLS.
    let admin = secrets().admin_password;
    let verified = ca_file(&ca, &a.dir);
    let tls = client_conninfo(&a, &verified);
    assert_eq!(psql(&tls, &admin, SESSION_SSL).await.unwrap(), "t");
    let plain = client_conninfo(&a, "sslmode=disable");
    assert_eq!(psql(&plain, &admin, SESSION_SSL).await.unwrap(), "f");

    // Required: plaintext clients are refused, TLS ones still served.
    spec_a.require_client_tls = true;
    a.driver.prepare(&spec_a).await.unwrap();
    let began = Instant::now();
    let err = loop {
        match psql(&plain, &admin, SESSION_SSL).await {
            Err(e) => break e,
            Ok(_) if began.elapsed() < WAIT => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(_) => panic!("a plaintext client is still served"),
        }
    };
    assert!(err.contains("pg_hba.conf rejects"), "{err}");
    assert_eq!(psql(&tls, &admin, SESSION_SSL).await.unwrap(), "t");
    // The replica never noticed.
    a.sql("INSERT INTO t VALUES (1)").await;
    let began = Instant::now();
    while b.ids().await != [1] {
        assert!(began.elapsed() < WAIT, "row 1 never reached the replica");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_an_upstream_another_ca_certified() {
    let ours = CertAuthority::generate("ours").unwrap();
    let theirs = CertAuthority::generate("theirs").unwrap();
    let mut a = Node::new("tls-c").with_tls(&theirs);
    let spec_a = a.primary_spec(&["tls-d"], false);
    a.new_primary(&spec_a).await;

    let b = Node::new("tls-d").with_tls(&ours);
    let spec_b = b.replica_spec(&a);
    b.driver.save_secrets(&secrets()).unwrap();
    let err = b
        .driver
        .clone_data(&spec_b, &a.upstream(), &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("certificate verify failed"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_prepare() {
    use corral_agent::engine::tls::TlsMaterial;
    let old = CertAuthority::generate("old").unwrap();
    let mut a = Node::new("tls-e").with_tls(&old);
    let spec = a.primary_spec(&[], false);
    a.new_primary(&spec).await;
    let admin = secrets().admin_password;
    let by_old = client_conninfo(&a, &ca_file(&old, &a.dir));
    assert_eq!(psql(&by_old, &admin, SESSION_SSL).await.unwrap(), "t");

    // A certificate the old CA did not sign, so the client tells them apart.
    let new = CertAuthority::generate("new").unwrap();
    let node = corral_proto::identity::Identity::Node(a.id.clone());
    let cert = new.issue(&node, &[]).unwrap();
    let tls = a.tls.clone().unwrap();
    tls.replace(TlsMaterial::new(&cert, new.cert_pem()));
    a.driver.prepare(&spec).await.unwrap();
    let by_new = client_conninfo(&a, &ca_file(&new, &a.dir));
    let began = Instant::now();
    while psql(&by_new, &admin, SESSION_SSL).await.as_deref() != Ok("t") {
        assert!(
            began.elapsed() < WAIT,
            "the renewed certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = psql(&by_old, &admin, SESSION_SSL).await.unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
}
