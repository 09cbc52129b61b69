//! Redis's TLS against real servers: with TLS required, the engine port
//! speaks TLS only (a plaintext client is refused), clients authenticate
//! inside TLS, and a replica is cloned and streams over TLS. Same harness
//! and needs as redis.rs.

#[macro_use]
mod redis_node;

use corral_proto::pki::CertAuthority;
use redis_node::*;

/// A session over TLS as the admin. (The certificate names the node, not
/// 127.0.0.1, and this client checks names: what is checked here is that
/// the port speaks TLS; the verification is the replicas'.)
async fn tls_admin(port: u16) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(format!("rediss://127.0.0.1:{port}/#insecure"))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    redis::cmd("AUTH")
        .arg("admin")
        .arg(ADMIN_PASSWORD)
        .query_async::<()>(&mut c)
        .await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_port_serves_clients_and_replicas_over_tls() {
    sweep_stale();
    let dirs: Vec<PathBuf> = (11..=12)
        .map(|n| std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id())))
        .collect();
    let _cleanup = Dirs(dirs.clone());
    let ca = CertAuthority::generate("tls").unwrap();
    let (pa, pb) = (free_port(&[]), 0);
    let pb = free_port(&[pa, pb]);
    let mut a = Node::new("node-ta", dirs[0].clone(), pa).with_tls(&ca);
    let mut b = Node::new("node-tb", dirs[1].clone(), pb).with_tls(&ca);

    let mut spec_a = a.primary(false, &["node-tb"]);
    spec_a.require_client_tls = true;
    a.driver.save_secrets(&Node::secrets()).unwrap();
    a.driver.initialize().await.unwrap();
    a.driver.prepare(&spec_a).await.unwrap();
    a.start(&spec_a).await;
    a.driver.bootstrap(&spec_a, &Node::secrets()).await.unwrap();

    // Plaintext is refused on the port; TLS is served.
    assert!(connect(pa, Some("admin"), Some(ADMIN_PASSWORD))
        .await
        .is_err());
    let mut ca_session = tls_admin(pa).await.unwrap();
    set(&mut ca_session, "k", "before the clone").await.unwrap();

    // A replica cloned and streaming over TLS.
    let mut spec_b = b.replica_of(&a);
    spec_b.require_client_tls = true;
    b.clone_and_start(&spec_b, &a).await;
    eventually!("B streaming from A", 20, {
        let h = b.health(&spec_b).await?;
        if h.replication.streaming {
            Ok(())
        } else {
            Err(format!("{:?}", h.replication))
        }
    });
    set(&mut ca_session, "k2", "streamed").await.unwrap();
    let mut cb = tls_admin(pb).await.unwrap();
    eventually!("k2 on B", 20, {
        match get(&mut cb, "k2").await? {
            Some(v) if v == "streamed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(
        get(&mut cb, "k").await.unwrap().as_deref(),
        Some("before the clone")
    );
    assert!(connect(pb, Some("admin"), Some(ADMIN_PASSWORD))
        .await
        .is_err());
}

/// A session verifying the server's certificate against `ca`, by name.
async fn verified(port: u16, ca: &CertAuthority) -> redis::RedisResult<()> {
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.cert_pem().as_bytes().to_vec()),
    };
    let client = redis::Client::build_with_tls(format!("rediss://localhost:{port}/"), certs)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    redis::cmd("PING")
        .query_async::<()>(&mut c)
        .await
        .or_else(|e| {
            // Not logged in yet: the TLS session itself is what counts.
            if e.code() == Some("NOAUTH") {
                Ok(())
            } else {
                Err(e)
            }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_prepare() {
    use corral_agent::engine::tls::TlsMaterial;
    sweep_stale();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-13", std::process::id()));
    let _cleanup = Dirs(vec![dir.clone()]);
    let (old, new) = (
        CertAuthority::generate("old").unwrap(),
        CertAuthority::generate("new").unwrap(),
    );
    let port = free_port(&[]);
    let mut a = Node::new("node-tc", dir, port).with_tls(&old);
    let mut spec = a.primary(false, &[]);
    spec.require_client_tls = true;
    a.driver.save_secrets(&Node::secrets()).unwrap();
    a.driver.initialize().await.unwrap();
    a.driver.prepare(&spec).await.unwrap();
    a.start(&spec).await;
    verified(port, &old).await.unwrap();
    assert!(verified(port, &new).await.is_err());

    let node = corral_proto::identity::Identity::Node(a.id.to_string());
    let cert = new.issue(&node, &["localhost".into()]).unwrap();
    let tls = a.tls.clone().unwrap();
    tls.replace(TlsMaterial::new(&cert, new.cert_pem()));
    a.driver.prepare(&spec).await.unwrap();
    eventually!("the renewed certificate served", 20, {
        verified(port, &new).await.map_err(|e| e.to_string())
    });
    assert!(verified(port, &old).await.is_err());
}
