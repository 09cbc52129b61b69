//! Renewal of the node certificate before it expires, without enrolling
//! again.
//!
//! When a third of the certificate's lifetime is left, the agent makes a
//! new key and asks the coordinator (over mutual TLS with its current
//! certificate) to sign a CSR for it. The new certificate is written to disk
//! first ([`crate::enroll::store_renewed`]: never a moment without a valid
//! identity on disk), and only then used ([`Credentials::replace`]): the
//! coordinator revokes the old certificate as soon as it sees the new one,
//! so an agent that used a certificate it had not kept would be locked out
//! after a restart.
//!
//! A refused or failed renewal is retried, more often as expiry nears; an
//! expired certificate cannot be renewed (the coordinator's TLS refuses it),
//! the node must then be forgotten and enrolled again.

use crate::credentials::Credentials;
use corral_proto::pb;
use corral_proto::pki::{self, CertKey};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// When to renew a certificate valid from `not_before_ms` to
/// `not_after_ms`: once a third of its lifetime is left.
pub fn renew_at(not_before_ms: i64, not_after_ms: i64) -> i64 {
    not_after_ms - (not_after_ms - not_before_ms).max(0) / 3
}

/// How long to wait after a failed renewal, `left_ms` before expiry: a
/// tenth of what is left, between 1 s and 5 min (so a 30-day certificate
/// is tried many times before it expires, a test one every second).
pub fn retry_after(left_ms: i64) -> Duration {
    Duration::from_millis((left_ms / 10).clamp(1_000, 300_000) as u64)
}

/// Longest sleep before looking at the clock again: the wall clock may
/// jump (suspend, NTP), and certificate times are wall-clock times.
const MAX_NAP: Duration = Duration::from_secs(60);

/// Runs for the agent's life.
pub async fn run(creds: Arc<Credentials>, state_dir: PathBuf) {
    let mut failing = false;
    loop {
        let (cert, _) = creds.cert();
        let (not_before, not_after) = match pki::validity_ms(&cert.cert_pem) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("reading the node certificate's validity: {e:#}; not renewing it");
                return;
            }
        };
        let now = corral_proto::now_ms();
        let due = renew_at(not_before, not_after);
        if now < due {
            let wait = Duration::from_millis((due - now) as u64).min(MAX_NAP);
            tokio::time::sleep(wait).await;
            continue;
        }
        match renew_once(&creds, &state_dir).await {
            Ok(until) => {
                failing = false;
                tracing::info!(
                    valid_until = %chrono_ms(until),
                    "node certificate renewed; now using the new one"
                );
            }
            Err(e) => {
                let left = not_after - now;
                // The first failure is a warning; once expired, an error.
                if left <= 0 {
                    tracing::error!(
                        "the node certificate has expired and could not be renewed: {e:#}. \
                         Forget this node (`corralctl node forget`) and enroll it again with a \
                         new join token"
                    );
                } else if !failing {
                    tracing::warn!(
                        "renewing the node certificate ({}s before it expires): {e:#}; retrying",
                        left / 1000
                    );
                }
                failing = true;
                tokio::time::sleep(retry_after(left)).await;
            }
        }
    }
}

/// One renewal: new key, CSR, signed certificate, kept, then used.
async fn renew_once(creds: &Credentials, state_dir: &std::path::Path) -> anyhow::Result<i64> {
    let (csr_pem, key_pem) = pki::new_csr(&creds.node_id)?;
    let answer = tokio::time::timeout(
        Duration::from_secs(15),
        creds
            .upcalls()
            .renew_certificate(pb::RenewCertificateRequest { csr_pem }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the coordinator did not answer within 15 s"))?
    .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
    .into_inner();
    let cert = CertKey {
        cert_pem: answer.certificate_pem,
        key_pem,
    };
    // What the coordinator signed must be this node, with our new key.
    match pki::identity_pem(&cert.cert_pem)? {
        corral_proto::identity::Identity::Node(id) if id == creds.node_id => {}
        other => anyhow::bail!("the coordinator returned a certificate for {other}"),
    }
    corral_proto::certs::LiveCert::new(&cert)?;
    crate::enroll::store_renewed(state_dir, &cert)?;
    creds.replace(cert.clone())?;
    pki::not_after_ms(&cert.cert_pem)
}

fn chrono_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_when_a_third_of_the_lifetime_is_left() {
        let day = 86_400_000;
        // A 30-day certificate (backdated by an hour) at 20 days.
        let (from, to) = (-3_600_000, 30 * day);
        let at = renew_at(from, to);
        assert!(at > 19 * day && at < 20 * day + 3_600_000, "{at}");
        // A 20 s test certificate backdated by 2 s: at 12.7 s of its life.
        assert_eq!(renew_at(-2_000, 20_000), 20_000 - 22_000 / 3);
        // A certificate whose times are upside down is due at once.
        assert_eq!(renew_at(10, 5), 5);
    }

    #[test]
    fn retries_come_sooner_as_expiry_nears() {
        assert_eq!(retry_after(10 * 86_400_000), Duration::from_secs(300));
        assert_eq!(retry_after(100_000), Duration::from_secs(10));
        assert_eq!(retry_after(5_000), Duration::from_secs(1));
        assert_eq!(retry_after(-1), Duration::from_secs(1));
    }
}
