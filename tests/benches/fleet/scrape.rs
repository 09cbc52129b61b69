//! Reading the coordinator: HTTP GETs, `/metrics` scrapes and samples, and
//! the warnings in its log.

use super::*;

/// The body of `GET path` (HTTP/1.0: no chunked encoding to undo).
pub(super) async fn get(http: &str, path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("a non-UTF-8 answer")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("an HTTP answer without a body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// `/metrics`, and how long it took.
pub(super) async fn scrape(http: &str) -> Result<(String, Duration)> {
    let began = Instant::now();
    let text = get(http, "/metrics").await?;
    Ok((text, began.elapsed()))
}

/// The value of the sample written exactly `key` (name and labels).
pub(super) fn value(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// WARN and ERROR lines of the coordinator's log, except the alerts the
/// bench means to fire.
pub(super) fn log_warnings(log: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(log)?;
    Ok(text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("alert firing"))
        .map(str::to_string)
        .collect())
}
