//! `corralctl pki`: the offline commands that need the CA key on disk
//! (`init`, `issue-operator`); the online ones are in identity.rs.

use super::connection::ConnConfig;
use super::identity::PkiOnline;
use anyhow::{bail, Result};
use clap::Subcommand;
use corral_proto::identity::{Identity, Role};
use corral_proto::pki::{self, CertAuthority};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub(super) enum PkiCmd {
    /// Create the CA, the coordinator's certificate and a first admin operator.
    Init {
        /// Directory to write; must not already hold a CA.
        #[arg(long)]
        dir: PathBuf,
        /// Name of the first admin operator.
        #[arg(long, default_value = "admin")]
        admin: String,
        /// Coordinator address written into the generated corralctl.toml.
        #[arg(long, default_value = "127.0.0.1:7400")]
        coordinator: String,
        /// Extra DNS names for the coordinator's certificate.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Issue a certificate for another operator.
    IssueOperator {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        role: Role,
        /// Writes PREFIX.crt and PREFIX.key.
        #[arg(long)]
        out: PathBuf,
    },
    #[command(flatten)]
    Online(PkiOnline),
}

pub(super) fn offline(cmd: PkiCmd, json: bool) -> Result<()> {
    match cmd {
        PkiCmd::Init {
            dir,
            admin,
            coordinator,
            san,
        } => {
            if admin.is_empty() || admin.contains('/') {
                bail!("invalid admin name {admin:?}: use letters, digits and '-'");
            }
            let ca = CertAuthority::init_dir(&dir, &admin, &san)?;
            let abs = std::fs::canonicalize(&dir)?;
            let cfg = ConnConfig {
                coordinator: Some(coordinator),
                ca: Some(abs.join("ca.crt")),
                cert: Some(abs.join("admin.crt")),
                key: Some(abs.join("admin.key")),
            };
            pki::write_private(&abs.join("corralctl.toml"), &toml::to_string(&cfg)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "dir": abs, "ca_fingerprint": ca.fingerprint()? })
                );
            } else {
                println!(
                    "CA created in {} (fingerprint {})",
                    abs.display(),
                    ca.fingerprint()?
                );
                println!(
                    "corralctl settings: {}",
                    abs.join("corralctl.toml").display()
                );
                println!(
                    "next: corral-coordinator --pki-dir {} --state-dir DIR --listen ADDR",
                    abs.display()
                );
            }
            Ok(())
        }
        PkiCmd::Online(_) => unreachable!("online PKI commands need the coordinator"),
        PkiCmd::IssueOperator {
            dir,
            name,
            role,
            out,
        } => {
            if name.is_empty() || name.contains('/') {
                bail!("invalid operator name {name:?}: use letters, digits and '-'");
            }
            let ca = CertAuthority::load(&dir)?;
            let ck = ca.issue(
                &Identity::Operator {
                    role,
                    name: name.clone(),
                },
                &[],
            )?;
            let crt = out.with_extension("crt");
            let key = out.with_extension("key");
            pki::write_public(&crt, &ck.cert_pem)?;
            pki::write_private(&key, &ck.key_pem)?;
            println!(
                "operator {name} ({role}): {} {}",
                crt.display(),
                key.display()
            );
            Ok(())
        }
    }
}
