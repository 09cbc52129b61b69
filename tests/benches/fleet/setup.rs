//! Setting the bench up: free ports, the CA and a store prepared with the
//! fleet's clusters, and the coordinator started on it.

use super::*;

pub(super) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(super) fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// A CA (`corralctl pki init`), then the store as it stands once
/// `clusters` clusters of three run: each node enrolled (its certificate's
/// fingerprint and expiry recorded, as enrollment does), assigned, and its
/// agent's address known.
/// Returns the nodes and the CA certificate.
pub(super) fn prepare(dir: &Path, grpc: &str, clusters: usize) -> Result<(Vec<Node>, String)> {
    let pki_dir = dir.join("pki");
    sh(
        &bin("corralctl").to_string_lossy(),
        &[
            "pki",
            "init",
            "--dir",
            &pki_dir.to_string_lossy(),
            "--coordinator",
            grpc,
        ],
    )?;
    let ca = CertAuthority::load(&pki_dir)?;
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    let secrets = SecretBox::load_or_create(&state.join("secret.key"))?;
    let store = Store::open(&state.join("corral.db"))?;
    let mut nodes = Vec::with_capacity(clusters * 3);
    let now = corral_proto::now_ms();
    store.tx(|tx| {
        for c in 0..clusters {
            let name = format!("fleet-{c:03}");
            store::insert_cluster(
                tx,
                &ClusterRow {
                    name: name.clone(),
                    engine: "postgres".into(),
                    mode: "primary-replica".into(),
                    state: "running".into(),
                    port: 5432,
                    database: "defaultdb".into(),
                    admin_user: "admin".into(),
                    admin_password_enc: secrets.seal(&corral_proto::random_password(32)?)?,
                    created_at_ms: now,
                    sync: false,
                    termination_protection: false,
                    replication_password_enc: Some(
                        secrets.seal(&corral_proto::random_password(32)?)?,
                    ),
                    term: 1,
                    auto_failover: true,
                    lease_ms: LEASE_MS,
                    heartbeat_ms: HEARTBEAT.as_millis() as u32,
                    prev_lease_ms: 0,
                    lease_changed_at_ms: 0,
                    allowlist_version: 0,
                },
            )?;
            let ids: Vec<String> = (1..=3).map(|i| format!("{name}-{i}")).collect();
            for (i, id) in ids.iter().enumerate() {
                let (csr, key_pem) = pki::new_csr(id)?;
                let cert_pem = ca.sign_node_csr(&csr, id)?;
                store::insert_node(
                    tx,
                    id,
                    &pki::fingerprint_pem(&cert_pem)?,
                    pki::not_after_ms(&cert_pem)?,
                )?;
                let role = if i == 0 { "primary" } else { "replica" };
                store::assign_node(tx, id, &name, role)?;
                let index = nodes.len();
                let address = format!("10.77.{}.{}:7401", index / 250, index % 250 + 1);
                // As a previous run of the coordinator recorded it: the
                // bench starts like a restart under an established fleet,
                // not like 1,000 first heartbeats after enrollment (each
                // of which writes its address).
                store::set_node_address(tx, id, &address)?;
                nodes.push(Node {
                    cluster: name.clone(),
                    role,
                    primary: ids[0].clone(),
                    others: ids.iter().filter(|o| *o != id).cloned().collect(),
                    address,
                    cert: CertKey { cert_pem, key_pem },
                    // One node in 50, across clusters and roles.
                    hot: (index % 50 == 7).then_some(if index % 100 == 7 {
                        Hot::Critical
                    } else {
                        Hot::Warning
                    }),
                    index,
                });
            }
        }
        Ok(())
    })?;
    Ok((nodes, ca.cert_pem().to_string()))
}

pub(super) fn start_coordinator(dir: &Path, grpc: &str, http: &str) -> Result<Child> {
    // The default rules; an empty file keeps /etc/corral/coordinator.toml
    // out of the bench.
    let config = dir.join("coordinator.toml");
    std::fs::write(&config, "")?;
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let program = bin("corral-coordinator");
    Command::new(&program)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--pki-dir")
        .arg(dir.join("pki"))
        .args(["--listen", grpc, "--http-listen", http, "--config"])
        .arg(&config)
        .env("CORRAL_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Waits until the coordinator answers `/healthz`.
pub(super) async fn wait_ready(http: &str, child: &mut Child) -> Result<()> {
    let began = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the coordinator exited: {status}");
        }
        if let Ok(Ok(body)) =
            tokio::time::timeout(Duration::from_secs(1), get(http, "/healthz")).await
        {
            if body.starts_with("ok") {
                return Ok(());
            }
        }
        if began.elapsed() > Duration::from_secs(20) {
            bail!("the coordinator did not answer /healthz on {http} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
