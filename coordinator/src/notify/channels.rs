//! The three kinds of channel (Alertmanager, webhook, email): building one
//! from its configuration and delivering one batch to it.

use super::config::{
    http_url, secret_from, timeout_of, AlertmanagerConfig, EmailConfig, Secret, WebhookConfig,
};
use super::format::{
    alertmanager_body, email_body, email_subject, webhook_body, webhook_signature,
};
use super::Alert;
use anyhow::{bail, Context, Result};
use corral_proto::now_ms;
use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::sync::Arc;
use std::time::Duration;

/// Alertmanager takes many alerts in one POST; a queue that built up while
/// it was unreachable drains in a few requests.
pub(super) const ALERTMANAGER_BATCH: usize = 64;

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel whose config has been checked, ready to deliver.
pub(super) enum Sender {
    Alertmanager {
        client: reqwest::Client,
        endpoint: reqwest::Url,
    },
    Webhook {
        client: reqwest::Client,
        url: reqwest::Url,
        secret: Secret,
    },
    Email {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
        to: Vec<Mailbox>,
        timeout: Duration,
    },
}

impl Sender {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Sender::Alertmanager { .. } => "alertmanager",
            Sender::Webhook { .. } => "webhook",
            Sender::Email { .. } => "email",
        }
    }

    /// How many queued alerts one attempt carries.
    pub(super) fn batch(&self) -> usize {
        match self {
            Sender::Alertmanager { .. } => ALERTMANAGER_BATCH,
            _ => 1,
        }
    }
}

pub(super) fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(timeout))
        .timeout(timeout)
        // A redirect would carry a signed payload somewhere else; the
        // config should name the final address.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("corral-coordinator/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")
}

pub(super) fn alertmanager_sender(c: &AlertmanagerConfig) -> Result<Sender> {
    let what = format!("[[notify.alertmanager]] {:?}", c.name);
    let base = http_url(&what, &c.url, "http://127.0.0.1:9093")?;
    let timeout = timeout_of(&what, &c.timeout)?;
    let endpoint = reqwest::Url::parse(&format!(
        "{}/api/v2/alerts",
        base.as_str().trim_end_matches('/')
    ))
    .with_context(|| format!("{what}: building the API URL"))?;
    Ok(Sender::Alertmanager {
        client: http_client(timeout)?,
        endpoint,
    })
}

pub(super) fn webhook_sender(c: &WebhookConfig) -> Result<Sender> {
    let what = format!("[[notify.webhook]] {:?}", c.name);
    let url = http_url(&what, &c.url, "https://hooks.example.net/corral")?;
    let timeout = timeout_of(&what, &c.timeout)?;
    let secret = secret_from(&what, "secret", &c.secret, "secret_env", &c.secret_env)?
        .with_context(|| {
            format!(
                "{what} has no secret to sign with: add secret_env = \"CORRAL_WEBHOOK_SECRET\" \
                 (an environment variable holding the key; e.g. `openssl rand -hex 32`) or secret = \"...\""
            )
        })?;
    Ok(Sender::Webhook {
        client: http_client(timeout)?,
        url,
        secret,
    })
}

pub(super) fn email_sender(c: &EmailConfig) -> Result<Sender> {
    let what = format!("[[notify.email]] {:?}", c.name);
    if c.smtp_host.trim().is_empty() {
        bail!("{what}: `smtp_host` is empty: name the SMTP relay, e.g. smtp_host = \"smtp.example.net\"");
    }
    let timeout = timeout_of(&what, &c.timeout)?;
    let from: Mailbox = c.from.parse().map_err(|e| {
        anyhow::anyhow!("{what}: `from = {:?}` is not an address ({e}): write e.g. from = \"Corral <corral@example.net>\"", c.from)
    })?;
    if c.to.is_empty() {
        bail!("{what}: `to` is empty: list at least one recipient, e.g. to = [\"oncall@example.net\"]");
    }
    let to = c
        .to
        .iter()
        .map(|t| {
            t.parse::<Mailbox>()
                .map_err(|e| anyhow::anyhow!("{what}: `to` entry {t:?} is not an address ({e})"))
        })
        .collect::<Result<Vec<_>>>()?;
    if !c.starttls && !c.insecure_plaintext {
        bail!(
            "{what}: `starttls = false` would send mail{} in clear text: keep starttls = true, \
             or also set insecure_plaintext = true if the relay really cannot do TLS",
            if c.username.is_some() {
                " and the password"
            } else {
                ""
            }
        );
    }
    if c.starttls && c.insecure_plaintext {
        bail!(
            "{what}: `insecure_plaintext = true` contradicts `starttls = true`: remove one of them"
        );
    }
    let password = secret_from(
        &what,
        "password",
        &c.password,
        "password_env",
        &c.password_env,
    )?;
    let credentials = match (&c.username, password) {
        (Some(u), Some(p)) => Some(Credentials::new(u.clone(), p.0)),
        (None, None) => None,
        (Some(_), None) => bail!(
            "{what}: `username` is set without a password: add password_env = \"CORRAL_SMTP_PASSWORD\" (or password = \"...\")"
        ),
        (None, Some(_)) => bail!("{what}: a password is set without `username`: add username = \"...\""),
    };
    if c.ca_file.is_some() && !c.starttls {
        bail!("{what}: `ca_file` is only used with STARTTLS, which is off");
    }

    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(c.smtp_host.clone())
        .port(c.smtp_port)
        .timeout(Some(timeout));
    if c.starttls {
        let mut tls = TlsParameters::builder(c.smtp_host.clone());
        if let Some(path) = &c.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("{what}: reading `ca_file` {}", path.display()))?;
            let cert = Certificate::from_pem(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "{what}: `ca_file` {} is not a PEM certificate: {e}",
                    path.display()
                )
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                bail!(
                    "{what}: `ca_file` {} holds no PEM certificate",
                    path.display()
                );
            }
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls
            .build_rustls()
            .map_err(|e| anyhow::anyhow!("{what}: setting up TLS: {e}"))?;
        builder = builder.tls(Tls::Required(tls));
    } else {
        builder = builder.tls(Tls::None);
    }
    if let Some(creds) = credentials {
        builder = builder.credentials(creds);
    }
    Ok(Sender::Email {
        transport: builder.build(),
        from,
        to,
        timeout,
    })
}

/// Why one attempt failed.
pub(super) struct Failure {
    /// The receiver refused the alert itself: retrying cannot help.
    pub(super) permanent: bool,
    pub(super) message: String,
}

impl Failure {
    fn retry(message: String) -> Failure {
        Failure {
            permanent: false,
            message,
        }
    }
}

impl Sender {
    pub(super) async fn deliver(&self, channel: &str, batch: &[Arc<Alert>]) -> Result<(), Failure> {
        match self {
            Sender::Alertmanager { client, endpoint } => {
                let body = alertmanager_body(batch);
                let body = serde_json::to_vec(&body).map_err(|e| Failure {
                    permanent: true,
                    message: format!("encoding JSON: {e}"),
                })?;
                let req = client
                    .post(endpoint.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                http_result(req.send().await).await
            }
            Sender::Webhook {
                client,
                url,
                secret,
            } => {
                // Stamped per attempt, so a retried delivery is not taken
                // for a replay by a receiver that checks the age.
                let now = now_ms();
                let body = webhook_body(&batch[0], now);
                let timestamp = now.div_euclid(1000);
                let signature = webhook_signature(&secret.0, timestamp, &body);
                let req = client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header("X-Corral-Timestamp", timestamp.to_string())
                    .header("X-Corral-Signature", signature)
                    .body(body);
                http_result(req.send().await).await
            }
            Sender::Email {
                transport,
                from,
                to,
                timeout,
            } => {
                let alert = &batch[0];
                let mut builder = Message::builder()
                    .from(from.clone())
                    .subject(email_subject(alert))
                    .header(ContentType::TEXT_PLAIN);
                for t in to {
                    builder = builder.to(t.clone());
                }
                let message = builder
                    .body(email_body(alert, channel))
                    .map_err(|e| Failure {
                        permanent: true,
                        message: format!("building the message: {e}"),
                    })?;
                match tokio::time::timeout(*timeout, transport.send(message)).await {
                    Err(_) => Err(Failure::retry(format!(
                        "SMTP exchange took longer than {timeout:?}"
                    ))),
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(Failure {
                        // 5xx: the relay refused this mail for good.
                        permanent: e.is_permanent(),
                        message: format!("SMTP: {}", error_chain(&e)),
                    }),
                }
            }
        }
    }
}

/// 2xx delivered; 408, 429 and 5xx retried; other answers (4xx, a
/// redirect) are permanent: the same request would be refused again.
pub(super) async fn http_result(result: reqwest::Result<reqwest::Response>) -> Result<(), Failure> {
    let resp = result.map_err(|e| Failure::retry(error_chain(&e.without_url())))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let retry = status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
    let text = resp.text().await.unwrap_or_default();
    let text: String = text.trim().chars().take(300).collect();
    Err(Failure {
        permanent: !retry,
        message: if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {text}")
        },
    })
}

/// An error and its causes on one line (reqwest's own Display says only
/// "error sending request").
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        // Some errors repeat their cause in their own message, some the
        // other way round: keep each piece once.
        if c.contains(&s) {
            s = c;
        } else if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}
