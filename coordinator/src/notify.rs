//! Notification channels: how an alert the alert engine decided to send
//! reaches people.
//!
//! Three kinds of channel, configured in the coordinator's `[notify]` section:
//!
//! - **Alertmanager** (API v2): on-call routing, silences and paging stay in
//!   the tool on-call engineers already use. Firing alerts are refreshed
//!   ([`Delivery::Refresh`]) so Alertmanager does not resolve them on its own.
//! - **Webhook**: a JSON POST signed with HMAC-SHA256, for chat bots and
//!   ticket systems.
//! - **Email** over SMTP, STARTTLS required unless explicitly waived.
//!
//! [`Notifier::send`] never blocks and never awaits: it appends to a bounded
//! queue per channel and returns. One tokio task per channel empties its
//! queue in order (a resolve never overtakes its firing), retrying a failed
//! delivery with exponential backoff for up to 15 minutes. A channel that is
//! down or black-holed only fills its own queue; when that is full the
//! oldest entry is dropped and counted, so memory stays bounded and the
//! freshest news wins.
//!
//! Nothing here is persisted: an alert still queued when the coordinator
//! stops is lost; the alert engine sends firing alerts again (reminders and
//! refreshes) after a restart.

use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// How many alerts a channel holds before it drops its oldest. Enough for
/// a long outage of the channel during an incident across a large fleet.
pub const QUEUE_CAPACITY: usize = 10_000;

/// Alertmanager takes many alerts in one POST; a queue that built up while
/// it was unreachable drains in a few requests.
const ALERTMANAGER_BATCH: usize = 64;

/// Per-attempt limits when the channel's config has no `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// What is sent

/// How urgent an alert is. Ordered: `Info < Warning < Critical`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Whether the condition still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

/// One alert as the alert engine hands it over.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alert {
    /// Rule name, e.g. `disk_usage_critical`; becomes the label `alertname`.
    pub name: String,
    /// Stable identity of this alert instance (rule + cluster + node).
    pub fingerprint: String,
    pub status: Status,
    pub severity: Severity,
    /// `cluster`, `node`, `engine`, `role` ...; the notifier adds
    /// `alertname` and `severity` for Alertmanager.
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub description: String,
    /// Unix milliseconds.
    pub starts_at_ms: i64,
    /// Set when resolved; for one-shot notices ("failover completed") the
    /// moment it is over.
    pub ends_at_ms: Option<i64>,
    /// 0 for the first notification, n for the n-th reminder while it holds.
    pub repeat: u32,
}

/// Why an alert is sent; decides which channels take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A change people must hear about: first firing, a scheduled reminder,
    /// or the resolve. All channels.
    Notify,
    /// Keep-alive of a still-firing alert so Alertmanager does not
    /// auto-resolve it (sent every minute or so). Alertmanager channels
    /// only; webhook and email ignore it.
    Refresh,
}

// ---------------------------------------------------------------------------
// Configuration

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

fn default_smtp_port() -> u16 {
    587
}

fn default_true() -> bool {
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
fn redact_url(url: &str) -> String {
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
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Parses `"500ms"`, `"10s"`, `"2m"`.
fn parse_timeout(s: &str) -> Option<Duration> {
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

fn timeout_of(what: &str, timeout: &Option<String>) -> Result<Duration> {
    match timeout {
        None => Ok(DEFAULT_TIMEOUT),
        Some(t) => parse_timeout(t).with_context(|| {
            format!("{what}: `timeout = {t:?}` is not a duration: write e.g. timeout = \"10s\" (units ms, s, m)")
        }),
    }
}

fn http_url(what: &str, url: &str, example: &str) -> Result<reqwest::Url> {
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
fn secret_from(
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

/// A channel whose config has been checked, ready to deliver.
enum Sender {
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
    fn kind(&self) -> &'static str {
        match self {
            Sender::Alertmanager { .. } => "alertmanager",
            Sender::Webhook { .. } => "webhook",
            Sender::Email { .. } => "email",
        }
    }

    /// How many queued alerts one attempt carries.
    fn batch(&self) -> usize {
        match self {
            Sender::Alertmanager { .. } => ALERTMANAGER_BATCH,
            _ => 1,
        }
    }
}

fn http_client(timeout: Duration) -> Result<reqwest::Client> {
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

fn alertmanager_sender(c: &AlertmanagerConfig) -> Result<Sender> {
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

fn webhook_sender(c: &WebhookConfig) -> Result<Sender> {
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

fn email_sender(c: &EmailConfig) -> Result<Sender> {
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

// ---------------------------------------------------------------------------
// The notifier

/// Where alerts go. Cheap to clone; every clone feeds the same channels.
/// When the last clone is dropped, the delivery tasks stop.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    channels: Vec<Arc<Channel>>,
    /// Dropped with the last Notifier: its receivers then see the channel
    /// closed, which tells the delivery tasks to stop.
    _stop: watch::Sender<()>,
}

/// What the caller and a channel's delivery task share.
struct Channel {
    name: String,
    kind: &'static str,
    /// Alertmanager channels also take refreshes.
    takes_refresh: bool,
    state: Mutex<ChannelState>,
    /// Wakes the delivery task when something is queued.
    wakeup: Notify,
}

#[derive(Default)]
struct ChannelState {
    queue: VecDeque<Arc<Alert>>,
    /// Alerts the task has taken and is delivering now.
    in_flight: usize,
    delivered: u64,
    failed_attempts: u64,
    dropped: u64,
    /// Set when the queue overflowed, cleared when it next runs empty: one
    /// warning per burst.
    overflowing: bool,
    last_error: Option<String>,
    last_success_ms: Option<i64>,
}

/// Per-channel figures for `/metrics` and `corralctl alerts channels`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelStats {
    pub name: String,
    /// `"alertmanager"`, `"webhook"` or `"email"`.
    pub kind: &'static str,
    /// Waiting in the queue plus being delivered now.
    pub queued: usize,
    /// Alerts delivered (an Alertmanager POST may carry several).
    pub delivered: u64,
    /// Attempts that failed, including those later retried successfully.
    pub failed_attempts: u64,
    /// Alerts given up on: queue overflow, refused by the receiver, or
    /// still failing after the retry period.
    pub dropped: u64,
    pub last_error: Option<String>,
    pub last_success_ms: Option<i64>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.inner
                    .channels
                    .iter()
                    .map(|c| format!("{} {:?}", c.kind, c.name)),
            )
            .finish()
    }
}

impl Notifier {
    /// Validates the config and spawns one delivery task per channel. Must
    /// be called inside a tokio runtime.
    pub fn start(config: &NotifyConfig) -> Result<Notifier> {
        // reqwest and lettre use rustls with the process-wide ring provider.
        corral_proto::tls::install_crypto_provider();

        let mut named: HashMap<String, &'static str> = HashMap::new();
        let mut senders: Vec<(String, Sender)> = Vec::new();
        let mut check_name = |kind: &'static str, name: &str| -> Result<()> {
            if name.trim().is_empty() {
                bail!("[[notify.{kind}]]: `name` is empty: give each channel a name, e.g. name = \"oncall\"");
            }
            if let Some(other) = named.insert(name.to_string(), kind) {
                bail!(
                    "[[notify.{kind}]] {name:?}: a [[notify.{other}]] channel has the same name: \
                     give each channel a unique `name`"
                );
            }
            Ok(())
        };
        for c in &config.alertmanager {
            check_name("alertmanager", &c.name)?;
            senders.push((c.name.clone(), alertmanager_sender(c)?));
        }
        for c in &config.webhook {
            check_name("webhook", &c.name)?;
            senders.push((c.name.clone(), webhook_sender(c)?));
        }
        for c in &config.email {
            check_name("email", &c.name)?;
            senders.push((c.name.clone(), email_sender(c)?));
        }

        let (stop, _) = watch::channel(());
        let mut channels = Vec::new();
        for (name, sender) in senders {
            let channel = Arc::new(Channel {
                name,
                kind: sender.kind(),
                takes_refresh: matches!(sender, Sender::Alertmanager { .. }),
                state: Mutex::new(ChannelState::default()),
                wakeup: Notify::new(),
            });
            tracing::info!(channel = %channel.name, kind = channel.kind, "notification channel started");
            tokio::spawn(run_channel(
                channel.clone(),
                sender,
                config.retry,
                stop.subscribe(),
            ));
            channels.push(channel);
        }
        Ok(Notifier {
            inner: Arc::new(Inner {
                channels,
                _stop: stop,
            }),
        })
    }

    /// Queues the alert for every channel that takes this delivery. Never
    /// blocks: a full queue drops its oldest entry.
    pub fn send(&self, alert: &Alert, delivery: Delivery) {
        if self.inner.channels.is_empty() {
            return;
        }
        let alert = Arc::new(alert.clone());
        for channel in &self.inner.channels {
            if delivery == Delivery::Refresh && !channel.takes_refresh {
                continue;
            }
            channel.push(alert.clone());
        }
    }

    /// Per-channel figures, in config order (Alertmanager, webhook, email).
    pub fn stats(&self) -> Vec<ChannelStats> {
        self.inner
            .channels
            .iter()
            .map(|c| {
                let s = c.state.lock().unwrap_or_else(|e| e.into_inner());
                ChannelStats {
                    name: c.name.clone(),
                    kind: c.kind,
                    queued: s.queue.len() + s.in_flight,
                    delivered: s.delivered,
                    failed_attempts: s.failed_attempts,
                    dropped: s.dropped,
                    last_error: s.last_error.clone(),
                    last_success_ms: s.last_success_ms,
                }
            })
            .collect()
    }
}

impl Channel {
    fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        // The state stays consistent even if a holder panicked: every
        // update is a single field write.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, alert: Arc<Alert>) {
        let burst_started = {
            let mut s = self.lock();
            let mut burst_started = false;
            if s.queue.len() >= QUEUE_CAPACITY {
                s.queue.pop_front();
                s.dropped += 1;
                burst_started = !s.overflowing;
                s.overflowing = true;
            }
            s.queue.push_back(alert);
            burst_started
        };
        if burst_started {
            tracing::warn!(
                channel = %self.name,
                kind = self.kind,
                capacity = QUEUE_CAPACITY,
                "notification queue full: dropping the oldest alerts until the channel catches up"
            );
        }
        self.wakeup.notify_one();
    }

    /// Takes up to `max` alerts off the queue, waiting for one; `None` once
    /// the notifier is gone.
    async fn next_batch(
        &self,
        max: usize,
        stop: &mut watch::Receiver<()>,
    ) -> Option<Vec<Arc<Alert>>> {
        loop {
            {
                let mut s = self.lock();
                if !s.queue.is_empty() {
                    let n = max.min(s.queue.len());
                    let batch: Vec<_> = s.queue.drain(..n).collect();
                    s.in_flight = batch.len();
                    return Some(batch);
                }
                s.overflowing = false;
            }
            tokio::select! {
                _ = self.wakeup.notified() => {}
                _ = stop.changed() => return None,
            }
        }
    }
}

/// Why one attempt failed.
struct Failure {
    /// The receiver refused the alert itself: retrying cannot help.
    permanent: bool,
    message: String,
}

impl Failure {
    fn retry(message: String) -> Failure {
        Failure {
            permanent: false,
            message,
        }
    }
}

/// A channel's delivery task: empties the queue in order, retrying each
/// batch until it is delivered, refused, or the retry period is over.
async fn run_channel(
    channel: Arc<Channel>,
    sender: Sender,
    retry: RetryPolicy,
    mut stop: watch::Receiver<()>,
) {
    while let Some(batch) = channel.next_batch(sender.batch(), &mut stop).await {
        let first_attempt = Instant::now();
        let mut backoff = retry.first_backoff;
        let mut failures = 0u64;
        loop {
            let result = sender.deliver(&channel.name, &batch).await;
            let failure = match result {
                Ok(()) => {
                    let mut s = channel.lock();
                    s.delivered += batch.len() as u64;
                    s.last_success_ms = Some(now_ms());
                    s.in_flight = 0;
                    drop(s);
                    if failures > 0 {
                        tracing::info!(channel = %channel.name, failed_attempts = failures, "notification delivered after retrying");
                    }
                    break;
                }
                Err(f) => f,
            };
            failures += 1;
            let give_up =
                failure.permanent || first_attempt.elapsed() + backoff > retry.give_up_after;
            {
                let mut s = channel.lock();
                s.failed_attempts += 1;
                s.last_error = Some(failure.message.clone());
                if give_up {
                    s.dropped += batch.len() as u64;
                    s.in_flight = 0;
                }
            }
            if failure.permanent {
                tracing::warn!(channel = %channel.name, kind = channel.kind, error = %failure.message, alerts = batch.len(), "notification refused by the receiver; not retrying");
                break;
            }
            if give_up {
                tracing::warn!(channel = %channel.name, kind = channel.kind, error = %failure.message, alerts = batch.len(), attempts = failures, "notification dropped: still failing after the retry period");
                break;
            }
            // Warn once per alert; further failures show in stats().
            if failures == 1 {
                tracing::warn!(channel = %channel.name, kind = channel.kind, error = %failure.message, "notification failed; retrying with backoff");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(retry.max_backoff);
        }
    }
}

impl Sender {
    async fn deliver(&self, channel: &str, batch: &[Arc<Alert>]) -> Result<(), Failure> {
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
async fn http_result(result: reqwest::Result<reqwest::Response>) -> Result<(), Failure> {
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
fn error_chain(e: &dyn std::error::Error) -> String {
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

// ---------------------------------------------------------------------------
// Payloads: pure functions of the alert.

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds as RFC 3339 in UTC, e.g. `2024-05-01T12:00:00.25Z`.
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// Alertmanager API v2 `postableAlerts`.
fn alertmanager_body(alerts: &[Arc<Alert>]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = alerts
        .iter()
        .map(|a| {
            let mut labels = a.labels.clone();
            labels.insert("alertname".into(), a.name.clone());
            labels.insert("severity".into(), a.severity.as_str().into());
            let mut v = serde_json::json!({
                "labels": labels,
                "annotations": {"summary": a.summary, "description": a.description},
                "startsAt": rfc3339(a.starts_at_ms),
            });
            // Without endsAt Alertmanager keeps a firing alert for its
            // resolve_timeout; refreshes keep it alive. A resolved alert (or
            // a one-shot notice) carries its end, and shows resolved.
            let ends = match a.status {
                Status::Resolved => Some(a.ends_at_ms.unwrap_or_else(now_ms)),
                Status::Firing => a.ends_at_ms,
            };
            if let Some(ends) = ends {
                v["endsAt"] = rfc3339(ends).into();
            }
            v
        })
        .collect();
    serde_json::Value::Array(list)
}

/// The webhook's JSON body (see README, "Notification channels").
fn webhook_body(alert: &Alert, sent_at_ms: i64) -> Vec<u8> {
    let body = serde_json::json!({
        "version": "1",
        "status": alert.status.as_str(),
        "alert": {
            "name": alert.name,
            "fingerprint": alert.fingerprint,
            "severity": alert.severity.as_str(),
            "labels": alert.labels,
            "summary": alert.summary,
            "description": alert.description,
            "starts_at": rfc3339(alert.starts_at_ms),
            "ends_at": alert.ends_at_ms.map(rfc3339),
            "repeat": alert.repeat,
        },
        "sent_at": rfc3339(sent_at_ms),
    });
    // Serializing a json! value cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
fn webhook_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `[FIRING critical] disk_usage_critical: cluster c1 node vm2 — <summary>`.
/// Reminders keep the subject, so mail clients thread them.
fn email_subject(alert: &Alert) -> String {
    let tag = match (alert.status, alert.ends_at_ms) {
        (Status::Resolved, _) => "RESOLVED".to_string(),
        // A one-shot notice: over as soon as it is sent.
        (Status::Firing, Some(_)) => format!("NOTICE {}", alert.severity.as_str()),
        (Status::Firing, None) => format!("FIRING {}", alert.severity.as_str()),
    };
    let mut s = format!("[{tag}] {}:", alert.name);
    for key in ["cluster", "node"] {
        if let Some(v) = alert.labels.get(key) {
            s.push_str(&format!(" {key} {v}"));
        }
    }
    if !alert.summary.is_empty() {
        s.push_str(" — ");
        s.push_str(&alert.summary);
    }
    s
}

fn email_body(alert: &Alert, channel: &str) -> String {
    let mut b = String::new();
    let state = match alert.status {
        Status::Firing if alert.ends_at_ms.is_some() => "NOTICE",
        Status::Firing => "FIRING",
        Status::Resolved => "RESOLVED",
    };
    b.push_str(&format!(
        "{state} ({}): {}\n\n",
        alert.severity.as_str(),
        alert.name
    ));
    if !alert.summary.is_empty() {
        b.push_str(&format!("{}\n\n", alert.summary));
    }
    if !alert.description.is_empty() {
        b.push_str(&format!("{}\n\n", alert.description));
    }
    b.push_str(&format!("Started:  {}\n", rfc3339(alert.starts_at_ms)));
    if let Some(end) = alert.ends_at_ms {
        b.push_str(&format!("Ended:    {}\n", rfc3339(end)));
    }
    if alert.repeat > 0 && alert.status == Status::Firing {
        b.push_str(&format!("Reminder: {} (still firing)\n", alert.repeat));
    }
    b.push_str("\nLabels:\n");
    for (k, v) in &alert.labels {
        b.push_str(&format!("  {k} = {v}\n"));
    }
    b.push_str(&format!("\nFingerprint: {}\n", alert.fingerprint));
    b.push_str(&format!(
        "\n-- \nSent by the Corral coordinator, notification channel {channel:?}.\n"
    ));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert() -> Alert {
        Alert {
            name: "disk_usage_critical".into(),
            fingerprint: "disk_usage_critical/c1/vm2".into(),
            status: Status::Firing,
            severity: Severity::Critical,
            labels: BTreeMap::from([
                ("cluster".to_string(), "c1".to_string()),
                ("node".to_string(), "vm2".to_string()),
                ("engine".to_string(), "postgres".to_string()),
            ]),
            summary: "disk 96% full".into(),
            description: "/var/lib/postgresql is 96% full (threshold 95%).".into(),
            starts_at_ms: 1_714_564_800_250,
            ends_at_ms: None,
            repeat: 0,
        }
    }

    fn parse(toml_text: &str) -> NotifyConfig {
        toml::from_str(toml_text).expect("test config parses")
    }

    /// Runs `start` inside a runtime and returns its error.
    fn start_err(toml_text: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        match Notifier::start(&parse(toml_text)) {
            Ok(_) => panic!("config was accepted:\n{toml_text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn config_errors_name_the_channel_and_the_fix() {
        let cases: &[(&str, &[&str])] = &[
            (
                r#"[[alertmanager]]
                   name = "am"
                   url = "127.0.0.1:9093""#,
                &[
                    "[[notify.alertmanager]] \"am\"",
                    "url",
                    "http://127.0.0.1:9093",
                ],
            ),
            (
                r#"[[alertmanager]]
                   name = "am"
                   url = "ftp://x""#,
                &["\"am\"", "http://"],
            ),
            (
                r#"[[alertmanager]]
                   name = "am"
                   url = "http://x"
                   timeout = "10 parsecs""#,
                &["\"am\"", "timeout", "\"10s\""],
            ),
            (
                r#"[[webhook]]
                   name = "hook"
                   url = "https://example.net/h""#,
                &["[[notify.webhook]] \"hook\"", "no secret", "secret_env ="],
            ),
            (
                r#"[[webhook]]
                   name = "hook"
                   url = "https://example.net/h"
                   secret_env = "CORRAL_TEST_SURELY_UNSET_VARIABLE""#,
                &[
                    "\"hook\"",
                    "CORRAL_TEST_SURELY_UNSET_VARIABLE",
                    "not set",
                    "environment",
                ],
            ),
            (
                r#"[[webhook]]
                   name = "hook"
                   url = "https://example.net/h"
                   secret = "a"
                   secret_env = "PATH""#,
                &["\"hook\"", "either `secret` or `secret_env`"],
            ),
            (
                r#"[[email]]
                   name = "mail"
                   smtp_host = "smtp.example.net"
                   from = "corral@example.net""#,
                &["[[notify.email]] \"mail\"", "`to` is empty", "to = ["],
            ),
            (
                r#"[[email]]
                   name = "mail"
                   smtp_host = "smtp.example.net"
                   from = "not an address"
                   to = ["a@example.net"]"#,
                &["\"mail\"", "`from", "from = "],
            ),
            (
                r#"[[email]]
                   name = "mail"
                   smtp_host = "smtp.example.net"
                   starttls = false
                   from = "corral@example.net"
                   to = ["a@example.net"]"#,
                &["\"mail\"", "clear text", "insecure_plaintext = true"],
            ),
            (
                r#"[[email]]
                   name = "mail"
                   smtp_host = "smtp.example.net"
                   username = "corral"
                   from = "corral@example.net"
                   to = ["a@example.net"]"#,
                &["\"mail\"", "without a password", "password_env"],
            ),
            (
                r#"[[email]]
                   name = "mail"
                   smtp_host = "smtp.example.net"
                   from = "corral@example.net"
                   to = ["a@example.net"]
                   ca_file = "/nonexistent/ca.pem""#,
                &["\"mail\"", "ca_file", "/nonexistent/ca.pem"],
            ),
            (
                r#"[[alertmanager]]
                   name = "x"
                   url = "http://127.0.0.1:9093"
                   [[webhook]]
                   name = "x"
                   url = "http://127.0.0.1:8080"
                   secret = "s""#,
                &["\"x\"", "same name", "unique `name`"],
            ),
        ];
        for (config, wanted) in cases {
            let err = start_err(config);
            for w in *wanted {
                assert!(
                    err.contains(w),
                    "error for\n{config}\nis {err:?}; lacks {w:?}"
                );
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<NotifyConfig>(
            "[[webhook]]\nname = \"h\"\nurl = \"http://x\"\nsecret = \"s\"\nsecrte = \"t\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("secrte"), "{err}");
    }

    #[test]
    fn secret_env_is_read_and_a_good_config_starts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        // PATH is set in any test environment; its value is the key.
        let cfg = parse(
            r#"[[alertmanager]]
               name = "am"
               url = "http://127.0.0.1:9093/"
               timeout = "3s"
               [[webhook]]
               name = "hook"
               url = "https://example.net/h?token=abc"
               secret_env = "PATH"
               [[email]]
               name = "mail"
               smtp_host = "smtp.example.net"
               username = "corral"
               password = "pw"
               from = "Corral <corral@example.net>"
               to = ["oncall@example.net", "dba@example.net"]"#,
        );
        let n = Notifier::start(&cfg).expect("config is valid");
        let kinds: Vec<_> = n.stats().iter().map(|s| (s.name.clone(), s.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("am".to_string(), "alertmanager"),
                ("hook".to_string(), "webhook"),
                ("mail".to_string(), "email")
            ]
        );
    }

    #[test]
    fn debug_output_hides_secrets() {
        let cfg = parse(
            r#"[[alertmanager]]
               name = "am"
               url = "http://admin:hunter2am@127.0.0.1:9093"
               [[webhook]]
               name = "hook"
               url = "https://example.net/h?token=tok3n"
               secret = "s3cr3t-webhook"
               [[email]]
               name = "mail"
               smtp_host = "smtp.example.net"
               username = "corral"
               password = "p4ssw0rd-mail"
               from = "corral@example.net"
               to = ["a@example.net"]"#,
        );
        let shown = format!("{cfg:?} {cfg:#?}");
        for secret in ["hunter2am", "tok3n", "s3cr3t-webhook", "p4ssw0rd-mail"] {
            assert!(!shown.contains(secret), "{secret} shows in {shown}");
        }
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("smtp.example.net"), "{shown}");
        assert_eq!(format!("{:?}", Secret("x".into())), "<redacted>");
    }

    #[test]
    fn alertmanager_payload() {
        let firing = Arc::new(alert());
        let mut resolved = alert();
        resolved.status = Status::Resolved;
        resolved.ends_at_ms = Some(1_714_565_100_000);
        let body = alertmanager_body(&[firing, Arc::new(resolved)]);
        assert_eq!(
            body,
            serde_json::json!([
                {
                    "labels": {"alertname": "disk_usage_critical", "severity": "critical",
                               "cluster": "c1", "node": "vm2", "engine": "postgres"},
                    "annotations": {"summary": "disk 96% full",
                                    "description": "/var/lib/postgresql is 96% full (threshold 95%)."},
                    "startsAt": "2024-05-01T12:00:00.25Z"
                },
                {
                    "labels": {"alertname": "disk_usage_critical", "severity": "critical",
                               "cluster": "c1", "node": "vm2", "engine": "postgres"},
                    "annotations": {"summary": "disk 96% full",
                                    "description": "/var/lib/postgresql is 96% full (threshold 95%)."},
                    "startsAt": "2024-05-01T12:00:00.25Z",
                    "endsAt": "2024-05-01T12:05:00Z"
                }
            ])
        );
    }

    #[test]
    fn webhook_payload_and_signature() {
        let mut a = alert();
        a.repeat = 2;
        let body = webhook_body(&a, 1_714_564_860_000);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "version": "1",
                "status": "firing",
                "alert": {
                    "name": "disk_usage_critical",
                    "fingerprint": "disk_usage_critical/c1/vm2",
                    "severity": "critical",
                    "labels": {"cluster": "c1", "node": "vm2", "engine": "postgres"},
                    "summary": "disk 96% full",
                    "description": "/var/lib/postgresql is 96% full (threshold 95%).",
                    "starts_at": "2024-05-01T12:00:00.25Z",
                    "ends_at": null,
                    "repeat": 2
                },
                "sent_at": "2024-05-01T12:01:00Z"
            })
        );
        // Known answer: printf '%s' '1700000000.{}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            webhook_signature("key", 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    #[test]
    fn email_subject_and_body() {
        let mut a = alert();
        assert_eq!(
            email_subject(&a),
            "[FIRING critical] disk_usage_critical: cluster c1 node vm2 — disk 96% full"
        );
        a.status = Status::Resolved;
        a.ends_at_ms = Some(1_714_565_100_000);
        assert_eq!(
            email_subject(&a),
            "[RESOLVED] disk_usage_critical: cluster c1 node vm2 — disk 96% full"
        );
        let body = email_body(&a, "mail");
        for want in [
            "RESOLVED (critical): disk_usage_critical",
            "disk 96% full",
            "/var/lib/postgresql is 96% full",
            "Started:  2024-05-01T12:00:00.25Z",
            "Ended:    2024-05-01T12:05:00Z",
            "  cluster = c1\n",
            "  node = vm2\n",
            "Fingerprint: disk_usage_critical/c1/vm2",
        ] {
            assert!(body.contains(want), "{want:?} not in\n{body}");
        }
        let notice = Alert {
            name: "failover_completed".into(),
            status: Status::Firing,
            severity: Severity::Info,
            labels: BTreeMap::from([("cluster".to_string(), "c1".to_string())]),
            summary: "vm3 is the new primary".into(),
            ends_at_ms: Some(1_714_565_100_000),
            ..alert()
        };
        assert_eq!(
            email_subject(&notice),
            "[NOTICE info] failover_completed: cluster c1 — vm3 is the new primary"
        );
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_timeout("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2m"), Some(Duration::from_secs(120)));
        for bad in ["", "10", "s", "0s", "1h", "-1s", "1.5s"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }
}
