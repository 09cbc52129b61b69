//! A bare HTTP/1.0 client for health endpoints and metrics pages.

use super::*;

/// A bare HTTP/1.0 `GET` returning the status code: enough for a health
/// endpoint, without an HTTP client crate. HTTP/1.0 because HAProxy's
/// `option httpchk` sends the same, so an endpoint that answers this answers
/// HAProxy. `timeout` bounds the connect and each read and write.
pub fn http_status(addr: &str, path: &str, timeout: Duration) -> Result<u16> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&sock, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let path = path.trim_start_matches('/');
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    // The status line is all we need; stop reading once it is in.
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the answer of {addr}/{path}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    match line.split_whitespace().collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/") => code
            .parse()
            .with_context(|| format!("status line {line:?} from {addr}/{path}")),
        _ => bail!("no HTTP status line from {addr}/{path}: {line:?}"),
    }
}

/// `GET /<path>` on `addr`: the body of a 200 answer.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&sock, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let path = path.trim_start_matches('/');
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .with_context(|| format!("reading the answer of {addr}/{path}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP answer from {addr}/{path}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{addr}/{path}: {status}: {body}");
    }
    Ok(body.to_string())
}
