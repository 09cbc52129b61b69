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
//! Where each part lives: [`alert`] (what is sent), [`config`] (the
//! `[notify]` section), [`channels`] (each kind's delivery), [`format`] (the
//! payloads); this file holds the [`Notifier`] and its queues.
//!
//! Nothing here is persisted: an alert still queued when the coordinator
//! stops is lost; the alert engine sends firing alerts again (reminders and
//! refreshes) after a restart.

mod alert;
mod channels;
mod config;
mod format;

pub use alert::{Alert, Delivery, Severity, Status};
pub use config::{AlertmanagerConfig, EmailConfig, NotifyConfig, RetryPolicy, WebhookConfig};

use anyhow::{bail, Result};
use channels::{alertmanager_sender, email_sender, webhook_sender, Sender};
use corral_proto::now_ms;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{watch, Notify};

/// How many alerts a channel holds before it drops its oldest. Enough for
/// a long outage of the channel during an incident across a large fleet.
pub const QUEUE_CAPACITY: usize = 10_000;

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

#[cfg(test)]
mod tests;
