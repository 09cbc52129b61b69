//! `corralctl cluster credentials`: the admin connection string, over TLS
//! verified against the cluster's CA.
//!
//! The coordinator's string names the CA certificate `corral-ca.crt`;
//! corralctl names its own copy instead (the CA it verifies the
//! coordinator with signs the engines' certificates too), as an absolute
//! path, so the string works from any directory of this machine. When the
//! coordinator's CA is not the one corralctl holds (a copied configuration
//! of another installation), the string keeps `corral-ca.crt` and
//! corralctl says where to save the CA (`ca_pem` of `--output json`).

use super::connection::ConnConfig;
use super::output::print_json;
use anyhow::Result;
use corral_proto::pb::{self, operator_client::OperatorClient};
use corral_proto::pki;
use tonic::transport::Channel;

pub(crate) async fn show(
    channel: Channel,
    name: &str,
    conn: &ConnConfig,
    json: bool,
) -> Result<()> {
    let mut c = OperatorClient::new(channel)
        .get_credentials(pb::GetCredentialsRequest { name: name.into() })
        .await?
        .into_inner();
    match ca_path(conn, &c.ca_pem) {
        Some(path) => c.uri = crate::engines::with_ca_file(&c.uri, &path),
        None if !c.ca_pem.is_empty() => eprintln!(
            "note: save the cluster's CA certificate (ca_pem of --output json) as {} \
             where the client runs",
            crate::engines::CA_FILE
        ),
        None => {}
    }
    if json {
        print_json(&c)
    } else {
        println!("{}", c.uri);
        Ok(())
    }
}

/// The absolute path of corralctl's CA file, if it holds `ca_pem`.
fn ca_path(conn: &ConnConfig, ca_pem: &str) -> Option<String> {
    let file = conn.ca_file().ok()?;
    let ours = pki::read(file).ok()?;
    if ours.trim() != ca_pem.trim() || ca_pem.trim().is_empty() {
        return None;
    }
    let abs = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    Some(abs.to_string_lossy().into_owned())
}
