//! Encrypted database traffic end to end, in namespaces: the connection
//! string `corralctl cluster credentials` prints uses TLS verified against
//! the cluster's CA, and a replica streams over TLS.

use corral_tests::{wait_until, Lab};
use std::time::Duration;

#[test]
fn the_printed_postgres_connection_string_and_replication_use_tls() {
    let lab = Lab::start(2).unwrap();
    let creds = lab.create_replicated("secure", "vm1,vm2", &[]).unwrap();
    let uri = creds["uri"].as_str().unwrap().to_string();
    assert!(uri.contains("sslmode=verify-ca"), "{uri}");
    assert!(!uri.contains("corral-ca.crt"), "corralctl's CA file: {uri}");
    assert!(creds["ca_pem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    // The printed string, as is, from the client's namespace.
    let ssl = lab
        .psql(
            &uri,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .unwrap();
    assert_eq!(ssl, "t");
    // A CA that did not sign the servers' certificates is refused.
    let other = lab.dir().join("other-ca.crt");
    let ca = corral_proto::pki::CertAuthority::generate("other").unwrap();
    std::fs::write(&other, ca.cert_pem()).unwrap();
    let start = uri.find("sslrootcert=").unwrap() + "sslrootcert=".len();
    let end = uri[start..].find('&').map_or(uri.len(), |e| start + e);
    let forged = format!("{}{}{}", &uri[..start], other.display(), &uri[end..]);
    let err = lab.psql(&forged, "SELECT 1").unwrap_err().to_string();
    assert!(err.contains("certificate verify failed"), "{err}");

    // The replica's walsender on the primary runs over TLS.
    let q = "SELECT count(*) FILTER (WHERE s.ssl) || '/' || count(*) \
             FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)";
    wait_until(Duration::from_secs(60), "the replica streams", || {
        Ok(lab.psql(&uri, q)? == "1/1")
    })
    .unwrap();
}

#[test]
fn a_cluster_that_requires_tls_refuses_plaintext_clients() {
    let lab = Lab::start(1).unwrap();
    lab.ctl_ok(&[
        "cluster",
        "create",
        "--name",
        "strict",
        "--engine",
        "postgres",
        "--node",
        "vm1",
        "--require-tls",
    ])
    .unwrap();
    let uri = lab.uri("strict").unwrap();
    let q = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert_eq!(lab.psql(&uri, q).unwrap(), "t");
    let start = uri.find("sslmode=").unwrap() + "sslmode=".len();
    let end = uri[start..].find('&').map_or(uri.len(), |e| start + e);
    let plain = format!("{}disable{}", &uri[..start], &uri[end..]);
    let err = lab.psql(&plain, q).unwrap_err().to_string();
    assert!(err.contains("pg_hba.conf rejects"), "{err}");
}
