//! `corralctl logs`: a node's engine and agent logs, streamed from its VM
//! through the coordinator.

use corral_tests::{bin, count_where, wait_until, Lab};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A name no earlier run wrote.
fn marker(what: &str) -> String {
    format!(
        "corral_log_marker_{what}_{}_{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// `corralctl -o json logs ARGS`: one object per line.
fn log_lines(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let mut full = vec!["--output", "json", "logs"];
    full.extend_from_slice(args);
    lab.ctl_ok(&full)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn find<'a>(lines: &'a [Value], text: &str) -> Option<&'a Value> {
    lines
        .iter()
        .find(|l| l["text"].as_str().is_some_and(|t| t.contains(text)))
}

/// Runs a statement that fails: PostgreSQL logs it as an ERROR with the
/// statement's text, which carries the marker.
fn fail_statement(lab: &Lab, uri: &str, marker: &str) {
    let err = lab.psql(uri, &format!("SELECT {marker}")).unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
}

#[test]
fn logs_of_engines_and_agents_stream_through_the_coordinator() {
    let lab = Lab::start(2).unwrap();
    lab.ctl_ok(&[
        "cluster", "create", "--name", "c1", "--engine", "postgres", "--node", "vm1",
    ])
    .unwrap();
    let uri = lab.uri("c1").unwrap();

    // The engine's log by default, its start-up line included, stamped.
    let text = lab.ctl_ok(&["logs", "c1", "vm1"]).unwrap();
    assert!(
        text.contains("database system is ready to accept connections"),
        "{text}"
    );
    let lines = log_lines(&lab, &["c1", "vm1", "--tail", "1000"]);
    let ready = find(&lines, "database system is ready to accept connections").unwrap();
    assert_eq!(ready["node"], "vm1");
    assert_eq!(ready["source"], "engine");
    assert!(ready["at"].as_str().unwrap().ends_with('Z'), "{ready}");

    // The agent's own log: its file, and the same lines through the API.
    let agent_log = lab.state_dir(1).join("log/agent.log");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(agent_log.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    let lines = log_lines(&lab, &["c1", "vm1", "--agent", "--tail", "1000"]);
    let started = find(&lines, "postgres started").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(started["source"], "agent");
    assert!(find(&lines, "agent starting").is_some(), "{lines:?}");
    // --tail counts lines.
    assert_eq!(
        log_lines(&lab, &["c1", "vm1", "--agent", "--tail", "3"]).len(),
        3
    );

    // --since: an old marker, then (6 s later) a fresh one. The window of
    // --since 4s starts after the old one whatever the timing; the fresh
    // one is inside it when the call came within 4 s of writing it, else
    // the round is tried again.
    let old = marker("old");
    fail_statement(&lab, &uri, &old);
    let old_at = wait_for_marker(&lab, &old);
    let long = log_lines(&lab, &["c1", "vm1", "--since", "1h"]);
    assert!(find(&long, &old).is_some(), "--since 1h lacks {old}");
    assert!(find(&long, "ready to accept connections").is_some());
    std::thread::sleep(Duration::from_millis(
        (6_000 - (now_ms() - old_at)).clamp(0, 6_000) as u64,
    ));
    let mut fresh_seen = false;
    for _ in 0..3 {
        let fresh = marker("fresh");
        fail_statement(&lab, &uri, &fresh);
        let fresh_at = wait_for_marker(&lab, &fresh);
        let asked = now_ms();
        let recent = log_lines(&lab, &["c1", "vm1", "--since", "4s"]);
        assert!(find(&recent, &old).is_none(), "--since 4s shows {old}");
        assert!(find(&recent, "ready to accept connections").is_none());
        for l in &recent {
            let at = l["at"].as_str().unwrap_or_else(|| panic!("{l}"));
            assert!(at >= rfc3339(asked - 4_000 - 1_000).as_str(), "{l}");
        }
        if asked - fresh_at < 3_500 {
            assert!(find(&recent, &fresh).is_some(), "--since 4s lacks {fresh}");
            fresh_seen = true;
            break;
        }
        eprintln!(
            "the machine is slow: {fresh} was {} ms old; again",
            asked - fresh_at
        );
    }
    assert!(
        fresh_seen,
        "no round was quick enough to check the fresh marker"
    );

    // --follow: a line written after it started arrives; Ctrl-C ends it
    // cleanly.
    let follow_marker = marker("follow");
    let mut follow = Command::new("ip")
        .args(["netns", "exec", &lab.ns("cli")])
        .arg(bin("corralctl"))
        .arg("--config")
        .arg(lab.pki_dir().join("corralctl.toml"))
        .args(["logs", "c1", "vm1", "--follow", "--tail", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The one line of --tail 1 shows the stream is open before the marker
    // is written.
    rx.recv_timeout(Duration::from_secs(15))
        .expect("the follow printed nothing");
    fail_statement(&lab, &uri, &follow_marker);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(&follow_marker) => break,
            Ok(_) => continue,
            Err(_) => panic!("--follow did not show {follow_marker}"),
        }
    }
    let sent = Command::new("kill")
        .args(["-INT", &follow.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = follow.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = follow.kill();
            panic!("corralctl logs --follow kept running after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "Ctrl-C ended the follow with {status}");
    // The agent noticed and stopped reading.
    wait_until(
        Duration::from_secs(5),
        "the agent to stop following",
        || Ok(std::fs::read_to_string(&agent_log)?.contains("stopped following")),
    )
    .unwrap();

    // A node that is not a member of the cluster, and one that does not
    // exist: the same clear answer, and nothing is streamed.
    for node in ["vm2", "vm9"] {
        let out = lab.ctl(&["logs", "c1", node]).unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("node {node} is not a member of cluster c1"))
                && err.contains("corralctl node list"),
            "{err}"
        );
    }
    let out = lab.ctl(&["logs", "nope", "vm1"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster named"));

    // A Redis node's log reads the same way, with Redis's own stamps.
    lab.create_engine_cluster("c2", "redis", "vm2", &[])
        .unwrap();
    let lines = log_lines(&lab, &["c2", "vm2", "--since", "1h"]);
    let ready = find(&lines, "Ready to accept connections").unwrap_or_else(|| panic!("{lines:?}"));
    assert!(ready["at"].as_str().is_some(), "{ready}");

    // Every read was audited.
    let audit = lab.ctl_json(&["audit", "list"]).unwrap();
    let reads = count_where(&audit["entries"], "action", "node.logs");
    assert!(reads >= 10, "{audit}");
}

/// Waits until `marker` shows in vm1's engine log; returns its time.
fn wait_for_marker(lab: &Lab, marker: &str) -> i64 {
    let mut at = 0;
    wait_until(
        Duration::from_secs(10),
        &format!("{marker} in the log"),
        || {
            let lines = log_lines(lab, &["c1", "vm1", "--tail", "50"]);
            Ok(match find(&lines, marker) {
                Some(l) => {
                    at = ms_of(l["at"].as_str().unwrap());
                    true
                }
                None => false,
            })
        },
    )
    .unwrap();
    at
}

/// `2026-11-26T01:32:42.123Z` (what `logs -o json` prints) and back, for
/// comparisons: the format sorts as text.
fn rfc3339(ms: i64) -> String {
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", ms as f64 / 1000.0),
            "+%Y-%m-%dT%H:%M:%S.%3NZ",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn ms_of(at: &str) -> i64 {
    let out = Command::new("date")
        .args(["-u", "-d", at, "+%s%3N"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
