//! Notification channels against real servers: Debian's Alertmanager, an
//! HTTP receiver in this file, aiosmtpd requiring STARTTLS, and endpoints
//! that are down or never answer. Every server is started by its test on a
//! free 127.0.0.1 port and killed by a Drop guard, even when the test fails.

use corral_coordinator::notify::{
    Alert, ChannelStats, Delivery, Notifier, NotifyConfig, RetryPolicy, Severity, Status,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------
// Helpers

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "corral-notify-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed when the test ends, passed or failed.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` until it returns `Some`, or panics after `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        give_up_after: Duration::from_secs(20),
    }
}

fn config(toml_text: &str) -> NotifyConfig {
    let mut cfg: NotifyConfig = toml::from_str(toml_text).expect("test config parses");
    cfg.retry = fast_retry();
    cfg
}

fn alert(name: &str) -> Alert {
    Alert {
        name: name.to_string(),
        fingerprint: format!("{name}/c1/vm2"),
        status: Status::Firing,
        severity: Severity::Critical,
        labels: BTreeMap::from([
            ("cluster".to_string(), "c1".to_string()),
            ("node".to_string(), "vm2".to_string()),
            ("engine".to_string(), "postgres".to_string()),
        ]),
        summary: "disk 96% full".to_string(),
        description: "/var/lib/postgresql is 96% full (threshold 95%).".to_string(),
        starts_at_ms: now_ms() - 60_000,
        ends_at_ms: None,
        repeat: 0,
    }
}

fn resolved(mut a: Alert) -> Alert {
    a.status = Status::Resolved;
    a.ends_at_ms = Some(now_ms());
    a
}

fn stats_of(n: &Notifier, name: &str) -> ChannelStats {
    n.stats()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no channel {name}"))
}

fn setup() {
    corral_proto::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("corral_coordinator=debug")
        .try_init();
}

// ---------------------------------------------------------------------------
// Alertmanager

struct Alertmanager {
    url: String,
    _proc: Proc,
    _dir: TempDir,
}

impl Alertmanager {
    async fn start() -> Alertmanager {
        let bin = "/usr/bin/prometheus-alertmanager";
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: scripts/install-deps.sh installs it (apt-get install prometheus-alertmanager)"
        );
        let dir = TempDir::new("am");
        let config = dir.0.join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n",
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.0.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("alertmanager.log")).unwrap())
            .spawn()
            .expect("starting alertmanager");
        let am = Alertmanager {
            url: format!("http://127.0.0.1:{port}"),
            _proc: Proc(child),
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let ready = format!("{}/-/ready", am.url);
        wait_for("alertmanager to be ready", Duration::from_secs(15), || {
            let req = client.get(&ready).send();
            async move { req.await.ok().filter(|r| r.status().is_success()) }
        })
        .await;
        am
    }

    async fn alerts(&self, query: &str) -> Vec<serde_json::Value> {
        let mut url = reqwest::Url::parse(&format!("{}/api/v2/alerts", self.url)).unwrap();
        url.query_pairs_mut()
            .append_pair("active", "true")
            .append_pair("filter", query);
        let resp = reqwest::get(url).await.expect("GET /api/v2/alerts");
        assert!(resp.status().is_success(), "{:?}", resp.status());
        serde_json::from_slice(&resp.bytes().await.unwrap()).expect("alerts JSON")
    }
}

#[tokio::test]
async fn alertmanager_shows_the_alert_and_its_resolve() {
    setup();
    let am = Alertmanager::start().await;
    let notifier = Notifier::start(&config(&format!(
        "[[alertmanager]]\nname = \"am\"\nurl = \"{}\"\n",
        am.url
    )))
    .unwrap();

    let firing = alert("disk_usage_critical_am_test");
    notifier.send(&firing, Delivery::Notify);
    let filter = "alertname=\"disk_usage_critical_am_test\"";
    let shown = wait_for("the alert in Alertmanager", Duration::from_secs(10), || {
        let f = am.alerts(filter);
        async move { f.await.into_iter().next() }
    })
    .await;
    println!("alertmanager shows: {shown:#}");
    let labels = &shown["labels"];
    assert_eq!(labels["alertname"], "disk_usage_critical_am_test");
    assert_eq!(labels["severity"], "critical");
    assert_eq!(labels["cluster"], "c1");
    assert_eq!(labels["node"], "vm2");
    assert_eq!(labels["engine"], "postgres");
    assert_eq!(shown["annotations"]["summary"], "disk 96% full");
    assert_eq!(
        shown["annotations"]["description"],
        "/var/lib/postgresql is 96% full (threshold 95%)."
    );
    assert_eq!(shown["status"]["state"], "active");

    // A refresh is accepted too (same alert, Alertmanager merges it).
    notifier.send(&firing, Delivery::Refresh);
    notifier.send(&resolved(firing), Delivery::Notify);
    wait_for("the alert to resolve", Duration::from_secs(10), || {
        let f = am.alerts(filter);
        async move { f.await.is_empty().then_some(()) }
    })
    .await;
    // The task counts once Alertmanager has answered, which may be just
    // after the GET above saw the change.
    let s = wait_for("the count", Duration::from_secs(5), || {
        let s = stats_of(&notifier, "am");
        async move { (s.delivered == 3).then_some(s) }
    })
    .await;
    println!("{s:?}");
    assert_eq!(s.failed_attempts, 0);
    assert_eq!(s.dropped, 0);
    assert!(s.last_success_ms.is_some());
}

// ---------------------------------------------------------------------------
// An HTTP receiver for webhooks

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Answers each request with the next status of `script` (then the last
/// one forever) and records it.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(script: &[u16]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let script = script.to_vec();
        let record = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let Some(req) = read_request(&mut sock).await else {
                    continue;
                };
                let n = {
                    let mut g = record.lock().unwrap();
                    g.push(req);
                    g.len()
                };
                let status = script[(n - 1).min(script.len() - 1)];
                let reply = format!(
                    "HTTP/1.1 {status} Scripted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = sock.write_all(reply.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        Receiver { url, got, task }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

async fn read_request(sock: &mut TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: BTreeMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Received {
        headers,
        body: buf[head_end..head_end + len].to_vec(),
    })
}

/// The receiver's side of the recipe in docs/monitoring.md: HMAC-SHA256 over
/// "<timestamp>.<body>", compared in constant time, and a fresh timestamp.
fn verify_signature(secret: &str, r: &Received, body: &[u8]) -> bool {
    let Some(ts) = r.headers.get("x-corral-timestamp") else {
        return false;
    };
    let Some(sig) = r.headers.get("x-corral-signature") else {
        return false;
    };
    let Some(sig) = sig
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    let Ok(ts_secs) = ts.parse::<i64>() else {
        return false;
    };
    if (now_ms() / 1000 - ts_secs).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

fn webhook_config(name: &str, url: &str, secret: &str) -> String {
    format!("[[webhook]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret = \"{secret}\"\n")
}

#[tokio::test]
async fn webhook_gets_signed_json_and_is_retried_after_errors() {
    setup();
    let secret = "test-webhook-secret";
    let receiver = Receiver::start(&[500, 500, 200]).await;
    let notifier =
        Notifier::start(&config(&webhook_config("hook", &receiver.url, secret))).unwrap();

    let mut a = alert("replication_lag_high");
    a.repeat = 1;
    notifier.send(&a, Delivery::Notify);
    // Refreshes are for Alertmanager only: the webhook never sees this one.
    notifier.send(&alert("refresh_only"), Delivery::Refresh);

    let s = wait_for(
        "delivery on the third attempt",
        Duration::from_secs(10),
        || {
            let s = stats_of(&notifier, "hook");
            async move { (s.delivered == 1).then_some(s) }
        },
    )
    .await;
    println!("{s:?}");
    assert_eq!(s.failed_attempts, 2);
    assert_eq!(s.dropped, 0);
    assert_eq!(s.queued, 0);
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("500"),
        "{s:?}"
    );

    let got = receiver.received();
    assert_eq!(got.len(), 3, "two refused attempts and the delivered one");
    for r in &got {
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(verify_signature(secret, r, &r.body), "bad signature: {r:?}");
        assert!(!verify_signature("another-secret", r, &r.body));
    }
    let last = &got[2];
    // The check can fail: one changed byte in the body, and it does.
    let tampered = String::from_utf8(last.body.clone())
        .unwrap()
        .replace("\"critical\"", "\"warning\"");
    assert_ne!(tampered.as_bytes(), &last.body[..]);
    assert!(!verify_signature(secret, last, tampered.as_bytes()));

    let v: serde_json::Value = serde_json::from_slice(&last.body).unwrap();
    println!("webhook body: {v:#}");
    assert_eq!(v["version"], "1");
    assert_eq!(v["status"], "firing");
    assert_eq!(v["alert"]["name"], "replication_lag_high");
    assert_eq!(v["alert"]["fingerprint"], "replication_lag_high/c1/vm2");
    assert_eq!(v["alert"]["severity"], "critical");
    assert_eq!(v["alert"]["labels"]["cluster"], "c1");
    assert_eq!(v["alert"]["labels"]["node"], "vm2");
    assert_eq!(v["alert"]["summary"], "disk 96% full");
    assert_eq!(v["alert"]["repeat"], 1);
    assert!(v["alert"]["ends_at"].is_null());
    assert!(v["alert"]["starts_at"].as_str().unwrap().ends_with('Z'));
    assert!(v["sent_at"].as_str().unwrap().ends_with('Z'));

    // The resolve follows, in order, and is signed the same way.
    notifier.send(&resolved(a), Delivery::Notify);
    wait_for("the resolve", Duration::from_secs(10), || {
        let n = receiver.received().len();
        async move { (n == 4).then_some(()) }
    })
    .await;
    let r = &receiver.received()[3];
    assert!(verify_signature(secret, r, &r.body));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["status"], "resolved");
    assert!(v["alert"]["ends_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        receiver.received().len(),
        4,
        "the refresh never reached the webhook"
    );
}

#[tokio::test]
async fn webhook_refusal_is_not_retried() {
    setup();
    let receiver = Receiver::start(&[400]).await;
    let notifier = Notifier::start(&config(&webhook_config("hook", &receiver.url, "k"))).unwrap();
    notifier.send(&alert("bad_request"), Delivery::Notify);
    let s = wait_for("the refusal", Duration::from_secs(10), || {
        let s = stats_of(&notifier, "hook");
        async move { (s.dropped == 1).then_some(s) }
    })
    .await;
    // Several backoff periods later, still one attempt.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(receiver.received().len(), 1);
    let s2 = stats_of(&notifier, "hook");
    assert_eq!(
        (s2.failed_attempts, s2.delivered, s2.dropped),
        (1, 0, 1),
        "{s:?}"
    );
    assert!(s2.last_error.unwrap().contains("400"));
}

// ---------------------------------------------------------------------------
// Email

struct SmtpServer {
    port: u16,
    ca_file: PathBuf,
    out: PathBuf,
    _proc: Proc,
    _dir: TempDir,
}

impl SmtpServer {
    async fn start(user: &str, password: &str) -> SmtpServer {
        let python = "/usr/bin/python3";
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scripts/smtp_server.py");
        let dir = TempDir::new("smtp");
        let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let cert_file = dir.0.join("cert.pem");
        let key_file = dir.0.join("key.pem");
        std::fs::write(&cert_file, key.cert.pem()).unwrap();
        std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
        let out = dir.0.join("mail");
        std::fs::create_dir(&out).unwrap();
        let port = free_port();
        let child = Command::new(python)
            .arg(&script)
            .arg(format!("--port={port}"))
            .arg(format!("--cert={}", cert_file.display()))
            .arg(format!("--key={}", key_file.display()))
            .arg(format!("--out-dir={}", out.display()))
            .arg(format!("--user={user}"))
            .arg(format!("--password={password}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("smtp.log")).unwrap())
            .spawn()
            .expect(
                "starting /usr/bin/python3 tests/scripts/smtp_server.py (needs python3-aiosmtpd)",
            );
        let server = SmtpServer {
            port,
            ca_file: cert_file,
            out,
            _proc: Proc(child),
            _dir: dir,
        };
        wait_for(
            "the SMTP server to listen",
            Duration::from_secs(15),
            || async move { TcpStream::connect(("127.0.0.1", port)).await.ok() },
        )
        .await;
        server
    }

    fn messages(&self) -> Vec<serde_json::Value> {
        let mut files: Vec<_> = std::fs::read_dir(&self.out)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    }

    fn config(&self, name: &str, extra: &str) -> String {
        format!(
            "[[email]]\nname = \"{name}\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\n\
             from = \"Corral <corral@example.net>\"\nto = [\"oncall@example.net\"]\n{extra}\n",
            self.port
        )
    }
}

#[tokio::test]
async fn email_arrives_over_starttls() {
    setup();
    let smtp = SmtpServer::start("corral", "mail-password").await;
    let cfg = smtp.config(
        "mail",
        &format!(
            "username = \"corral\"\npassword = \"mail-password\"\nca_file = \"{}\"",
            smtp.ca_file.display()
        ),
    );
    let notifier = Notifier::start(&config(&cfg)).unwrap();
    notifier.send(&alert("disk_usage_critical"), Delivery::Notify);
    notifier.send(&alert("refresh_only"), Delivery::Refresh);
    let mail = wait_for("the email", Duration::from_secs(15), || {
        let m = smtp.messages();
        async move { m.into_iter().next() }
    })
    .await;
    println!("received: {mail:#}");
    assert_eq!(mail["tls"], true, "the message came over STARTTLS");
    assert_eq!(mail["authenticated"], true);
    assert_eq!(mail["mail_from"], "corral@example.net");
    assert_eq!(mail["rcpt_tos"], serde_json::json!(["oncall@example.net"]));
    assert_eq!(
        mail["subject"],
        "[FIRING critical] disk_usage_critical: cluster c1 node vm2 — disk 96% full"
    );
    let body = mail["body"].as_str().unwrap();
    for want in [
        "FIRING (critical): disk_usage_critical",
        "/var/lib/postgresql is 96% full (threshold 95%).",
        "  cluster = c1",
        "  node = vm2",
        "  engine = postgres",
        "Started:  ",
    ] {
        assert!(body.contains(want), "{want:?} not in\n{body}");
    }
    let s = wait_for("the count", Duration::from_secs(5), || {
        let s = stats_of(&notifier, "mail");
        async move { (s.delivered == 1).then_some(s) }
    })
    .await;
    assert_eq!(s.failed_attempts, 0, "{s:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(smtp.messages().len(), 1, "refreshes are not mailed");
}

#[tokio::test]
async fn email_without_tls_is_refused_by_config_and_by_the_server() {
    setup();
    let smtp = SmtpServer::start("corral", "mail-password").await;

    // Plain text needs an explicit waiver.
    let err = Notifier::start(&config(&smtp.config("plain", "starttls = false"))).unwrap_err();
    let err = format!("{err:#}");
    println!("{err}");
    assert!(err.contains("[[notify.email]] \"plain\""), "{err}");
    assert!(err.contains("insecure_plaintext = true"), "{err}");

    // With the waiver the coordinator tries, and this server (which
    // requires STARTTLS) refuses: nothing arrives.
    let notifier = Notifier::start(&config(
        &smtp.config("plain", "starttls = false\ninsecure_plaintext = true"),
    ))
    .unwrap();
    notifier.send(&alert("disk_usage_critical"), Delivery::Notify);
    let s = wait_for("the refusal", Duration::from_secs(10), || {
        let s = stats_of(&notifier, "plain");
        async move { (s.failed_attempts >= 1).then_some(s) }
    })
    .await;
    println!("{s:?}");
    assert_eq!(s.delivered, 0);
    assert!(
        s.last_error.as_deref().unwrap_or("").contains("STARTTLS"),
        "{s:?}"
    );
    assert!(smtp.messages().is_empty());

    // A wrong CA: the certificate check fails, nothing is sent in clear.
    let other_ca = TempDir::new("ca");
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let other_file = other_ca.0.join("ca.pem");
    std::fs::write(&other_file, other.cert.pem()).unwrap();
    let notifier = Notifier::start(&config(&smtp.config(
        "wrongca",
        &format!(
            "username = \"corral\"\npassword = \"mail-password\"\nca_file = \"{}\"",
            other_file.display()
        ),
    )))
    .unwrap();
    notifier.send(&alert("disk_usage_critical"), Delivery::Notify);
    let s = wait_for("the TLS failure", Duration::from_secs(10), || {
        let s = stats_of(&notifier, "wrongca");
        async move { (s.failed_attempts >= 1).then_some(s) }
    })
    .await;
    println!("{s:?}");
    assert_eq!(s.delivered, 0);
    assert!(smtp.messages().is_empty());
}

// ---------------------------------------------------------------------------
// A channel that is down never delays the caller or the other channels

#[tokio::test]
async fn a_dead_channel_delays_nothing() {
    setup();
    // Accepts connections and never answers.
    let black_hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let black_hole_url = format!("http://{}/hook", black_hole.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = black_hole.accept().await {
            held.push(sock);
        }
    });
    // Nothing listens here.
    let down_url = format!("http://127.0.0.1:{}", free_port());
    let healthy = Receiver::start(&[200]).await;

    let cfg = format!(
        "[[alertmanager]]\nname = \"down\"\nurl = \"{down_url}\"\n{}{}",
        webhook_config("stuck", &black_hole_url, "k"),
        webhook_config("healthy", &healthy.url, "k"),
    );
    let notifier = Notifier::start(&config(&cfg)).unwrap();

    let n = corral_coordinator::notify::QUEUE_CAPACITY + 500;
    let first = Instant::now();
    notifier.send(&alert("first"), Delivery::Notify);
    println!("first send took {:?}", first.elapsed());
    wait_for(
        "the healthy channel's first alert",
        Duration::from_secs(5),
        || {
            let got = healthy.received().len();
            async move { (got >= 1).then_some(()) }
        },
    )
    .await;
    println!(
        "healthy channel had it {:?} after the send",
        first.elapsed()
    );

    let started = Instant::now();
    for i in 0..n {
        notifier.send(&alert(&format!("bulk_{i}")), Delivery::Notify);
    }
    println!("{n} sends took {:?}", started.elapsed());

    for s in notifier.stats() {
        println!("{s:?}");
    }
    for name in ["stuck", "down"] {
        let s = stats_of(&notifier, name);
        // The queue plus at most one batch in flight.
        assert!(
            s.queued <= corral_coordinator::notify::QUEUE_CAPACITY + 64,
            "{s:?}"
        );
        assert!(s.dropped > 0, "the full queue dropped its oldest: {s:?}");
        assert_eq!(s.delivered, 0);
    }
    wait_for(
        "the down channel's first failure",
        Duration::from_secs(5),
        || {
            let s = stats_of(&notifier, "down");
            async move { (s.failed_attempts >= 1).then_some(()) }
        },
    )
    .await;
    // The healthy channel keeps delivering while the others are stuck.
    wait_for(
        "the healthy channel to keep up",
        Duration::from_secs(5),
        || {
            let got = healthy.received().len();
            async move { (got >= 100).then_some(()) }
        },
    )
    .await;
    holder.abort();
}
