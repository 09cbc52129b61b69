//! `corralctl logs`: a node's engine or agent log relayed from its VM,
//! printed as it arrives (plain lines or JSON), until the stream ends,
//! Ctrl-C or a closed stdout.

use super::connection::Api;
use super::output::parse_duration;
use anyhow::{Context, Result};
use corral_proto::pb::{self};
use std::time::Duration;

// The arguments of `corralctl logs` (its help is the variant's, in mod.rs).
#[derive(clap::Args, Debug)]
pub(super) struct LogsArgs {
    cluster: String,
    node: String,
    /// The engine's server log (the default).
    #[arg(long, conflicts_with = "agent")]
    engine: bool,
    /// The agent's own log instead.
    #[arg(long)]
    agent: bool,
    /// Only lines written in this last while: 30s, 10m, 2h, 1d.
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    /// The last N lines (of those since --since, if given).
    #[arg(long)]
    tail: Option<u32>,
    /// Keep printing new lines as they are written.
    #[arg(long, short = 'f')]
    follow: bool,
}

pub(super) async fn run(api: &mut Api, args: LogsArgs, json: bool) -> Result<()> {
    let LogsArgs {
        cluster,
        node,
        engine: _,
        agent,
        since,
        tail,
        follow,
    } = args;
    let source = if agent {
        pb::LogSource::Agent
    } else {
        pb::LogSource::Engine
    };
    let since_ms = match since {
        Some(d) => corral_proto::now_ms()
            .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .max(1),
        None => 0,
    };
    let stream = api
        .logs(pb::LogsRequest {
            cluster,
            node: node.clone(),
            source: source as i32,
            since_ms,
            tail: tail.unwrap_or(0),
            follow,
        })
        .await?
        .into_inner();
    let source = if agent { "agent" } else { "engine" };
    print_logs(stream, &node, source, json).await?;
    Ok(())
}

/// Prints log chunks as they arrive, each flushed at once; ends at the end
/// of the stream, on Ctrl-C (a follow's normal end) or when stdout is
/// closed (`| head`).
pub(super) async fn print_logs(
    mut stream: tonic::Streaming<pb::LogLines>,
    node: &str,
    source: &str,
    json: bool,
) -> Result<()> {
    use std::io::Write;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let chunk = tokio::select! {
            chunk = stream.message() => chunk?,
            _ = &mut ctrl_c => None,
        };
        let Some(chunk) = chunk else { break };
        let mut write = || -> std::io::Result<()> {
            for line in &chunk.lines {
                if json {
                    let at = (line.at_ms > 0).then(|| rfc3339_ms(line.at_ms));
                    let v = serde_json::json!({
                        "at": at,
                        "node": node,
                        "source": source,
                        "text": line.text,
                    });
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(out, "{}", line.text)?;
                }
            }
            out.flush()
        };
        match write() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
    Ok(())
}

/// Unix milliseconds as RFC 3339 UTC, e.g. `2026-11-26T01:32:42.123Z`.
pub(super) fn rfc3339_ms(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod log_tests {
    #[test]
    fn log_times_print_as_rfc3339() {
        assert_eq!(
            super::rfc3339_ms(1_795_656_762_123),
            "2026-11-26T01:32:42.123Z"
        );
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    }
}
