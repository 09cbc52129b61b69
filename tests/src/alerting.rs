//! What alert tests run beside a lab: a real Alertmanager, a webhook
//! receiver, an endpoint that accepts connections and never answers, and
//! an independent OpenMetrics parser (the Python Prometheus client's).
//!
//! They listen on the lab's bridge address (10.231.K.254), which the
//! coordinator's namespace reaches and the test process too.

use crate::{http_get, sh};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";
/// Debian's Python, which has python3-prometheus-client (a `python3`
/// earlier on PATH may not).
const PYTHON: &str = "/usr/bin/python3";

/// A free TCP port on `ip`.
fn free_port(ip: &str) -> Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Alertmanager 0.25 from Debian, with a receiver that sends nothing.
pub struct Alertmanager {
    pub addr: String,
    child: Child,
}

impl Alertmanager {
    pub fn start(ip: &str, dir: &Path) -> Result<Alertmanager> {
        if !Path::new(ALERTMANAGER).exists() {
            bail!("{ALERTMANAGER} is missing: scripts/install-deps.sh installs prometheus-alertmanager");
        }
        let dir = dir.join("alertmanager");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n",
        )?;
        let addr = format!("{ip}:{}", free_port(ip)?);
        let child = Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("alertmanager.log"))?)
            .spawn()
            .context("starting alertmanager")?;
        let am = Alertmanager { addr, child };
        crate::wait_until(Duration::from_secs(20), "alertmanager to be ready", || {
            Ok(http_get(&am.addr, "/-/ready", Duration::from_secs(1)).is_ok())
        })?;
        Ok(am)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The active alerts named `name`.
    pub fn active(&self, name: &str) -> Result<Vec<serde_json::Value>> {
        let body = http_get(
            &self.addr,
            &format!("/api/v2/alerts?active=true&filter=alertname%3D%22{name}%22"),
            Duration::from_secs(5),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// An HTTP server answering 200 to every request and keeping them.
pub struct Receiver {
    pub addr: String,
    got: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    pub fn start(ip: &str) -> Result<Receiver> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?.to_string();
        let got = Arc::new(Mutex::new(Vec::new()));
        let keep = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let keep = keep.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &keep);
                });
            }
        });
        Ok(Receiver { addr, got })
    }

    pub fn requests(&self) -> Vec<Request> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn serve(mut s: TcpStream, keep: &Mutex<Vec<Request>>) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    loop {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? == 0 {
                return Ok(());
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let mut lines = head.lines();
        let path = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_string();
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)?;
        keep.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Request {
                path,
                headers,
                body,
            });
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
    }
}

/// Debian's aiosmtpd requiring STARTTLS (tests/scripts/smtp_server.py),
/// with a self-signed certificate for `ip`; each message it receives is
/// saved as JSON (subject, body, whether the session was TLS).
pub struct SmtpServer {
    pub ip: String,
    pub port: u16,
    /// The certificate to trust (`ca_file`).
    pub ca_file: PathBuf,
    out: PathBuf,
    child: Child,
}

impl SmtpServer {
    pub fn start(ip: &str, dir: &Path) -> Result<SmtpServer> {
        let dir = dir.join("smtp");
        let out = dir.join("mail");
        std::fs::create_dir_all(&out)?;
        let cert = rcgen::generate_simple_self_signed(vec![ip.to_string()])?;
        let ca_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&ca_file, cert.cert.pem())?;
        std::fs::write(&key_file, cert.signing_key.serialize_pem())?;
        let port = free_port(ip)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/smtp_server.py");
        let child = Command::new(PYTHON)
            .arg(&script)
            .arg(format!("--host={ip}"))
            .arg(format!("--port={port}"))
            .arg(format!("--cert={}", ca_file.display()))
            .arg(format!("--key={}", key_file.display()))
            .arg(format!("--out-dir={}", out.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("smtp.log"))?)
            .spawn()
            .context("starting tests/scripts/smtp_server.py (needs python3-aiosmtpd)")?;
        let server = SmtpServer {
            ip: ip.to_string(),
            port,
            ca_file,
            out,
            child,
        };
        crate::wait_until(Duration::from_secs(15), "the SMTP server to listen", || {
            Ok(TcpStream::connect((server.ip.as_str(), port)).is_ok())
        })?;
        Ok(server)
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "json"));
        files.sort();
        files
            .iter()
            .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Accepts connections and never answers (a hung endpoint); holds them.
pub struct BlackHole {
    pub addr: String,
}

impl BlackHole {
    pub fn start(ip: &str) -> Result<BlackHole> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?.to_string();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in listener.incoming().flatten() {
                held.push(s);
            }
        });
        Ok(BlackHole { addr })
    }
}

/// Parses OpenMetrics text with the Python Prometheus client's parser
/// (strict: `# EOF`, types, counter suffixes): {family: {"type": .., "samples":
/// [{"name", "labels", "value"}]}}.
pub fn parse_openmetrics(text: &str, scratch: &Path) -> Result<serde_json::Value> {
    let file: PathBuf = scratch.join(format!("metrics-{}.txt", std::process::id()));
    std::fs::write(&file, text)?;
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[f.name] = {"type": f.type, "samples": [
        {"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
print(json.dumps(out))
"#;
    let out = Command::new(PYTHON)
        .args(["-c", script, &file.to_string_lossy()])
        .output()
        .context("running the OpenMetrics parser (python3-prometheus-client)")?;
    if !out.status.success() {
        bail!(
            "the OpenMetrics parser refused the text: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).map_err(|e| anyhow!("parser output: {e}"))
}

/// Sends `signal` (e.g. `-STOP`) to `pids`.
pub fn signal(pids: &[i32], signal: &str) -> Result<()> {
    for p in pids {
        sh("kill", &[signal, &p.to_string()])?;
    }
    Ok(())
}

/// Waits up to `limit` for `f` to give Some.
pub fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
