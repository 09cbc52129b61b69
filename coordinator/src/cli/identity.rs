//! `corralctl node forget` and the online `corralctl pki` commands: revoke,
//! renew, list. They call the coordinator's Identities service; `pki init`
//! and `pki issue-operator` stay offline (see [`crate::cli`]).

use super::connection::ConnConfig;
use super::output::{print_json, table_of};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use corral_proto::identity::Identity;
use corral_proto::pb::{self, identities_client::IdentitiesClient};
use corral_proto::pki::{self, CertKey, COORDINATOR_DNS};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// The node to deregister; it must serve no cluster.
    pub node: String,
    /// Repeat the node's id.
    #[arg(long)]
    pub confirm: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PkiOnline {
    /// Revoke a node or operator certificate: refused on every call from now
    /// on, also over connections already open (admin; asks the coordinator).
    Revoke {
        /// The certificate file (PEM).
        #[arg(long, value_name = "FILE", group = "what")]
        cert: Option<PathBuf>,
        /// The certificate's SHA-256 fingerprint, as `pki list` shows it.
        #[arg(long, group = "what")]
        fingerprint: Option<String>,
        /// Every certificate of this operator the coordinator knows.
        #[arg(long, value_name = "NAME", group = "what")]
        operator: Option<String>,
        /// Recorded with the revocation and shown to whoever tries it.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Renew this client's own operator certificate (same name and role, a
    /// new key); the current one is revoked once the new one is in use.
    Renew {
        /// Write PREFIX.crt and PREFIX.key instead of replacing the
        /// configured certificate and key (kept as *.prev meanwhile).
        #[arg(long, value_name = "PREFIX")]
        out: Option<PathBuf>,
    },
    /// The certificates the coordinator knows: nodes' current and renewed
    /// ones, operator certificates, revoked ones (admin).
    List,
}

fn client(channel: &Channel) -> IdentitiesClient<Channel> {
    IdentitiesClient::new(channel.clone())
}

fn short(fp: &str) -> String {
    format!("{}…", &fp[..fp.len().min(16)])
}

fn when(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    crate::revocation::rfc3339(ms)
}

pub async fn forget(channel: Channel, a: ForgetArgs, json: bool) -> Result<()> {
    let r = client(&channel)
        .forget_node(pb::ForgetNodeRequest {
            node: a.node.clone(),
            confirm: a.confirm.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if json {
        return print_json(&r);
    }
    println!("node {} forgotten", a.node);
    for c in &r.revoked {
        println!("  certificate {} revoked", short(&c.fingerprint));
    }
    println!(
        "to enroll this VM again: `corralctl token create`, then start its agent with a state \
         directory holding no node.json and --join-file FILE"
    );
    Ok(())
}

pub(crate) async fn pki(
    channel: Channel,
    cmd: PkiOnline,
    conn: &ConnConfig,
    json: bool,
) -> Result<()> {
    match cmd {
        PkiOnline::Revoke {
            cert,
            fingerprint,
            operator,
            reason,
        } => {
            let mut req = pb::RevokeCertificateRequest {
                fingerprint: fingerprint.unwrap_or_default(),
                operator: operator.unwrap_or_default(),
                reason: reason.unwrap_or_default(),
                ..Default::default()
            };
            if let Some(path) = cert {
                req.certificate_pem = pki::read(&path)?;
            }
            if req.certificate_pem.is_empty()
                && req.fingerprint.is_empty()
                && req.operator.is_empty()
            {
                bail!("name the certificate to revoke: --cert FILE, --fingerprint FP or --operator NAME");
            }
            let r = client(&channel).revoke_certificate(req).await?.into_inner();
            if json {
                return print_json(&r);
            }
            for c in &r.revoked {
                println!(
                    "revoked certificate {} ({}): {}",
                    short(&c.fingerprint),
                    if c.subject.is_empty() {
                        "unknown subject"
                    } else {
                        &c.subject
                    },
                    c.reason
                );
            }
            Ok(())
        }
        PkiOnline::Renew { out } => renew(channel, out, conn, json).await,
        PkiOnline::List => {
            let r = client(&channel)
                .list_certificates(pb::ListCertificatesRequest {})
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            let rows = r.certificates.iter().map(|c| {
                vec![
                    c.fingerprint.clone(),
                    c.subject.clone(),
                    c.state.clone(),
                    when(c.not_after_ms),
                    when(c.revoked_at_ms),
                    c.revoked_by.clone(),
                    c.reason.clone(),
                ]
            });
            println!(
                "{}",
                table_of(
                    &[
                        "FINGERPRINT",
                        "SUBJECT",
                        "STATE",
                        "EXPIRES",
                        "REVOKED",
                        "BY",
                        "REASON",
                    ],
                    rows
                )
            );
            Ok(())
        }
    }
}

/// `pki renew`: a new key and CSR, signed by the coordinator over the
/// current certificate; written out (the previous pair kept as *.prev when
/// replaced in place); then used once, so the coordinator switches to it
/// (and revokes the old one) now rather than at some later call.
async fn renew(
    channel: Channel,
    out: Option<PathBuf>,
    conn: &ConnConfig,
    json: bool,
) -> Result<()> {
    let (cert_now, key_now) = conn.files()?;
    let identity = pki::identity_pem(&pki::read(&cert_now)?)
        .with_context(|| format!("reading {}", cert_now.display()))?;
    if !matches!(identity, Identity::Operator { .. }) {
        bail!(
            "{} is not an operator certificate ({identity}); node certificates are renewed by \
             their agents",
            cert_now.display()
        );
    }
    let (csr_pem, key_pem) = pki::new_csr_for(&identity)?;
    let r = client(&channel)
        .renew_operator_certificate(pb::RenewCertificateRequest { csr_pem })
        .await?
        .into_inner();
    let new = CertKey {
        cert_pem: r.certificate_pem,
        key_pem,
    };
    let (cert_out, key_out) = match &out {
        Some(prefix) => (prefix.with_extension("crt"), prefix.with_extension("key")),
        None => {
            keep_previous(&cert_now, false)?;
            keep_previous(&key_now, true)?;
            (cert_now.clone(), key_now.clone())
        }
    };
    pki::write_private(&key_out, &new.key_pem)?;
    pki::write_public(&cert_out, &new.cert_pem)?;
    let ca = pki::read(conn.ca_file()?)?;
    let tls = corral_proto::tls::client_config(&ca, Some(&new), COORDINATOR_DNS);
    let ch = corral_proto::tls::channel(&conn.address()?, tls, Duration::from_secs(30))?;
    let me = pb::operator_client::OperatorClient::new(ch)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(|s| {
            anyhow!(
                "the renewed certificate was written to {} but the coordinator refused it: {}",
                cert_out.display(),
                s.message()
            )
        })?
        .into_inner();
    if json {
        return print_json(&serde_json::json!({
            "name": me.name,
            "role": me.role,
            "certificate": cert_out,
            "key": key_out,
            "not_after_ms": r.not_after_ms,
        }));
    }
    println!(
        "renewed: operator {} ({}), valid until {}: {} {}",
        me.name,
        me.role,
        when(r.not_after_ms),
        cert_out.display(),
        key_out.display()
    );
    println!("the previous certificate is now revoked");
    Ok(())
}

/// Copies `path` to `path.prev`, so a crash between writing the new key
/// and the new certificate leaves a matching pair to go back to.
fn keep_previous(path: &Path, private: bool) -> Result<()> {
    let text = pki::read(path)?;
    let mut prev = path.as_os_str().to_owned();
    prev.push(".prev");
    let prev = PathBuf::from(prev);
    if private {
        pki::write_private(&prev, &text)
    } else {
        pki::write_public(&prev, &text)
    }
}
