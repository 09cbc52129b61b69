//! Where corralctl connects and with which certificate (`--config FILE`
//! and the CORRAL_* variables), and the one line an operator reads when a
//! call fails.

use anyhow::{anyhow, Context, Result};
use corral_proto::pki::{self, CertKey, COORDINATOR_DNS};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

/// The connection settings file written by `pki init`.
#[derive(serde::Deserialize, serde::Serialize, Default, Debug)]
pub(crate) struct ConnConfig {
    pub(super) coordinator: Option<String>,
    pub(super) ca: Option<PathBuf>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

impl ConnConfig {
    pub(super) fn load(path: Option<&Path>) -> Result<ConnConfig> {
        let default = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".config/corral/corralctl.toml"));
        let mut cfg = match (path, default) {
            (Some(p), _) => toml::from_str(&pki::read(p)?)
                .with_context(|| format!("parsing {}", p.display()))?,
            (None, Some(p)) if p.exists() => toml::from_str(&pki::read(&p)?)
                .with_context(|| format!("parsing {}", p.display()))?,
            _ => ConnConfig::default(),
        };
        if let Ok(v) = std::env::var("CORRAL_COORDINATOR") {
            cfg.coordinator = Some(v);
        }
        for (var, field) in [
            ("CORRAL_CA", &mut cfg.ca),
            ("CORRAL_CERT", &mut cfg.cert),
            ("CORRAL_KEY", &mut cfg.key),
        ] {
            if let Some(v) = std::env::var_os(var) {
                *field = Some(v.into());
            }
        }
        Ok(cfg)
    }

    fn missing(what: &str, var: &str) -> anyhow::Error {
        anyhow!(
            "no {what} configured: pass --config FILE (written by `corralctl pki init`), \
             or set {var}"
        )
    }

    pub(crate) fn address(&self) -> Result<String> {
        self.coordinator
            .clone()
            .ok_or_else(|| Self::missing("coordinator address", "CORRAL_COORDINATOR"))
    }

    pub(crate) fn ca_file(&self) -> Result<&Path> {
        self.ca
            .as_deref()
            .ok_or_else(|| Self::missing("CA certificate", "CORRAL_CA"))
    }

    /// The client certificate and key files.
    pub(crate) fn files(&self) -> Result<(PathBuf, PathBuf)> {
        Ok((
            self.cert
                .clone()
                .ok_or_else(|| Self::missing("client certificate", "CORRAL_CERT"))?,
            self.key
                .clone()
                .ok_or_else(|| Self::missing("client key", "CORRAL_KEY"))?,
        ))
    }

    pub(super) fn channel(&self) -> Result<(Channel, String)> {
        let addr = self.address()?;
        let ca = pki::read(self.ca_file()?)?;
        let (cert, key) = self.files()?;
        let me = CertKey {
            cert_pem: pki::read(&cert)?,
            key_pem: pki::read(&key)?,
        };
        let tls = corral_proto::tls::client_config(&ca, Some(&me), COORDINATOR_DNS);
        let ch = corral_proto::tls::channel(&addr, tls, Duration::from_secs(30))?;
        Ok((ch, addr))
    }
}

/// Turns a gRPC error into the one line the operator needs.
pub(super) fn rpc_error(addr: &str, s: tonic::Status) -> anyhow::Error {
    // Transport failures keep their cause in the source chain.
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(&s);
    while let Some(e) = source {
        causes.push(e.to_string());
        source = e.source();
    }
    causes.dedup();
    let cause = causes.join(": ");
    let transport = s.code() == tonic::Code::Cancelled
        || s.message().contains("transport")
        || s.message().contains("connect")
        || !causes.is_empty();
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled if transport => {
            let detail = if cause.is_empty() {
                s.message().to_string()
            } else {
                cause
            };
            // A refused client certificate shows up in many forms under TLS
            // 1.3 (an alert, a closed stream, a broken pipe): name both causes.
            let hint = if detail.contains("refused") || detail.contains("timed out") {
                "; check that the coordinator is running and reachable"
            } else {
                "; check that the coordinator is running there, and that this client's CA, certificate \
                 and key (--config, or CORRAL_CA/CORRAL_CERT/CORRAL_KEY) come from its `corralctl pki init`"
            };
            anyhow!("cannot reach the coordinator at {addr}: {detail}{hint}")
        }
        _ => anyhow!("{}", s.message()),
    }
}

/// The operator API client every command is given.
pub(super) type Api = corral_proto::pb::operator_client::OperatorClient<Channel>;
