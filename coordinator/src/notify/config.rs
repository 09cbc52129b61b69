//! The `[notify]` section: one entry per channel, validated when the
//! coordinator starts; secrets never appear in Debug output.

use anyhow::{bail, Context, Result};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Per-attempt limits when the channel's config has no `timeout`.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[notify]` section of the coordinator's config.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    #[serde(default)]
    pub alertmanager: Vec<AlertmanagerConfig>,
    #[serde(default)]
    pub webhook: Vec<WebhookConfig>,
    #[serde(default)]
    pub email: Vec<EmailConfig>,
    /// Backoff between attempts; tests shorten it.
    #[doc(hidden)]
    #[serde(skip)]
    pub retry: RetryPolicy,
}

/// `[[notify.alertmanager]]`: one Alertmanager (list every member of an
/// Alertmanager cluster as its own channel, as Prometheus does).
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    pub name: String,
    /// Base URL, e.g. `http://127.0.0.1:9093`; `/api/v2/alerts` is appended.
    pub url: String,
    /// Limit for one attempt, e.g. `"10s"` (the default).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `[[notify.webhook]]`: a signed JSON POST.
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    pub url: String,
    /// The HMAC key itself; prefer `secret_env`, which keeps it out of the
    /// config file.
    #[serde(default)]
    pub secret: Option<String>,
    /// Name of an environment variable holding the HMAC key.
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `[[notify.email]]`: mail through an SMTP relay.
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub name: String,
    pub smtp_host: String,
    #[serde(default = "default_smtp_port")]
    pub smtp_port: u16,
    /// STARTTLS, required (the connection fails if the server does not
    /// offer it). Turning it off needs `insecure_plaintext = true` too.
    #[serde(default = "default_true")]
    pub starttls: bool,
    #[serde(default)]
    pub insecure_plaintext: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    pub from: String,
    #[serde(default)]
    pub to: Vec<String>,
    /// An extra root CA (PEM) besides the built-in public roots, for a relay
    /// with a certificate from a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub timeout: Option<String>,
}

pub(super) fn default_smtp_port() -> u16 {
    587
}

pub(super) fn default_true() -> bool {
    true
}

/// Backoff between attempts at one delivery.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Wait after the first failed attempt; doubled after each further one.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// After this long of trying, the alert is dropped.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            give_up_after: Duration::from_secs(15 * 60),
        }
    }
}

// Debug of the configs: secrets never appear, nor passwords or query
// strings inside URLs.

impl fmt::Debug for AlertmanagerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertmanagerConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailConfig")
            .field("name", &self.name)
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("starttls", &self.starttls)
            .field("insecure_plaintext", &self.insecure_plaintext)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_env", &self.password_env)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A URL for logs: without a password in its user part and without its
/// query string (webhook URLs often carry a token there).
pub(super) fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("redacted"));
            }
            if u.query().is_some() {
                u.set_query(Some("redacted"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_string(),
    }
}

/// A secret loaded from the config or the environment. Its Debug says
/// nothing about it.
#[derive(Clone)]
pub(super) struct Secret(pub(super) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Parses `"500ms"`, `"10s"`, `"2m"`.
pub(super) fn parse_timeout(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

pub(super) fn timeout_of(what: &str, timeout: &Option<String>) -> Result<Duration> {
    match timeout {
        None => Ok(DEFAULT_TIMEOUT),
        Some(t) => parse_timeout(t).with_context(|| {
            format!("{what}: `timeout = {t:?}` is not a duration: write e.g. timeout = \"10s\" (units ms, s, m)")
        }),
    }
}

pub(super) fn http_url(what: &str, url: &str, example: &str) -> Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        anyhow::anyhow!(
            "{what}: `url = {:?}` is not a valid URL ({e}): write e.g. url = \"{example}\"",
            redact_url(url)
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        bail!(
            "{what}: `url = {:?}` must be an http:// or https:// URL with a host, e.g. url = \"{example}\"",
            redact_url(url)
        );
    }
    Ok(parsed)
}

/// A secret given either inline or through an environment variable.
pub(super) fn secret_from(
    what: &str,
    inline_key: &str,
    inline: &Option<String>,
    env_key: &str,
    env: &Option<String>,
) -> Result<Option<Secret>> {
    match (inline, env) {
        (Some(_), Some(_)) => {
            bail!("{what}: set either `{inline_key}` or `{env_key}`, not both")
        }
        (Some(s), None) if s.is_empty() => bail!("{what}: `{inline_key}` is empty"),
        (Some(s), None) => Ok(Some(Secret(s.clone()))),
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(Secret(v))),
            _ => bail!(
                "{what}: the environment variable {var} named by `{env_key}` is not set or is empty: \
                 set it in the coordinator's environment (e.g. a systemd EnvironmentFile=)"
            ),
        },
        (None, None) => Ok(None),
    }
}
