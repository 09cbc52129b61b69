//! Monitoring and alerts end to end: a real Alertmanager and a webhook
//! receiver get the coordinator's alerts; a disk filling up and an engine
//! that stops answering raise them and resolve them; `/metrics` parses
//! with an independent OpenMetrics parser; the metrics history survives a
//! restart; and a notification endpoint that hangs delays neither
//! heartbeats nor a failover.

use corral_tests::alerting::{
    parse_openmetrics, signal, wait_for, Alertmanager, BlackHole, Receiver, SmtpServer,
};
use corral_tests::{Lab, LabOptions};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::time::{Duration, Instant};

const SECRET: &str = "webhook-test-secret";

/// `corralctl -o json alerts list`: the firing alerts named `name`.
fn firing(lab: &Lab, name: &str) -> Vec<Value> {
    lab.ctl_json(&["alerts", "list"]).unwrap()["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["name"] == name)
        .collect()
}

/// The webhook deliveries of alert `name` with `status`; every request
/// received must carry a valid signature.
fn delivered(hook: &Receiver, name: &str, status: &str) -> Vec<Value> {
    let requests = hook.requests();
    for r in &requests {
        let ts = &r.headers["x-corral-timestamp"];
        let sig = r.headers["x-corral-signature"]
            .strip_prefix("sha256=")
            .and_then(|h| hex::decode(h).ok())
            .expect("a sha256= signature");
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&r.body);
        assert!(mac.verify_slice(&sig).is_ok(), "bad signature: {r:?}");
    }
    requests
        .iter()
        .map(|r| r.json())
        .filter(|j| j["alert"]["name"] == name && j["status"] == status)
        .collect()
}

/// Bytes to add to the filesystem of `dir` to reach `percent` used.
fn to_fill(dir: &std::path::Path, percent: f64) -> u64 {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    #[allow(clippy::unnecessary_cast)]
    let (frsize, blocks, free) = (
        st.fragment_size() as u64,
        st.blocks() as u64,
        st.blocks_free() as u64,
    );
    let total = blocks * frsize;
    let used = total - free * frsize;
    ((total as f64 * percent / 100.0) as u64).saturating_sub(used)
}

fn grow(file: &std::path::Path, by: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = by;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

fn config(am: &str, hook: &str, smtp: &SmtpServer) -> String {
    format!(
        r#"
[alerts]
evaluation_interval = "500ms"
alertmanager_refresh = "5s"
[alerts.rules]
engine_down_for = "2s"
[[notify.alertmanager]]
name = "am"
url = "{am}"
[[notify.webhook]]
name = "hook"
url = "{hook}"
secret = "{SECRET}"
[[notify.email]]
name = "mail"
smtp_host = "{}"
smtp_port = {}
ca_file = "{}"
from = "Corral <corral@example.net>"
to = ["oncall@example.net"]
"#,
        smtp.ip,
        smtp.port,
        smtp.ca_file.display()
    )
}

#[test]
fn alerts_reach_alertmanager_and_webhooks_and_metrics_parse() {
    let mut lab = Lab::start_with(LabOptions {
        vms: 1,
        small_disk: Some((1, 256)),
        ..Default::default()
    })
    .unwrap();
    let am = Alertmanager::start(&lab.host_ip(), lab.dir()).unwrap();
    let hook = Receiver::start(&lab.host_ip()).unwrap();
    let smtp = SmtpServer::start(&lab.host_ip(), lab.dir()).unwrap();
    lab.opts.coordinator_config = Some(config(
        &am.url(),
        &format!("http://{}/corral", hook.addr),
        &smtp,
    ));
    lab.stop_coordinator().unwrap();
    lab.start_coordinator().unwrap();
    lab.wait_node_state("vm1", "up", Duration::from_secs(20))
        .unwrap();
    lab.ctl_ok(&[
        "cluster", "create", "--name", "c1", "--engine", "postgres", "--node", "vm1",
    ])
    .unwrap();

    // "Notify you when the request is finished": the creation's notice,
    // signed.
    let done = wait_for(Duration::from_secs(20), "the creation's notice", || {
        Ok(delivered(&hook, "operation_completed", "firing")
            .into_iter()
            .next())
    })
    .unwrap();
    assert_eq!(done["alert"]["labels"]["cluster"], "c1");
    assert_eq!(done["alert"]["severity"], "info");
    assert!(
        done["alert"]["description"]
            .as_str()
            .unwrap()
            .contains("create_cluster"),
        "{done}"
    );

    // /metrics of the coordinator and of the agent parse, with the
    // documented names and labels.
    let families = parse_openmetrics(&lab.coordinator_metrics().unwrap(), lab.dir()).unwrap();
    for name in [
        "corral_node_up",
        "corral_node_heartbeat_age_seconds",
        "corral_node_cpu_usage_ratio",
        "corral_node_memory_used_bytes",
        "corral_node_memory_total_bytes",
        "corral_node_disk_used_bytes",
        "corral_node_disk_total_bytes",
        "corral_node_network_receive_bytes_per_second",
        "corral_node_network_transmit_bytes_per_second",
        "corral_node_load1",
        "corral_engine_up",
        "corral_engine_info",
        "corral_engine_restarts",
        "corral_engine_connections",
        "corral_cluster_info",
        "corral_coordinator_heartbeats",
        "corral_coordinator_heartbeat_errors",
        "corral_coordinator_operations",
        "corral_coordinator_failovers",
        "corral_coordinator_errors",
        "corral_coordinator_alert_evaluations",
        "corral_coordinator_notifications_delivered",
        "corral_alerts_firing",
    ] {
        assert!(families.get(name).is_some(), "{name} missing: {families}");
    }
    let up = &families["corral_node_up"]["samples"][0];
    assert_eq!(up["labels"]["cluster"], "c1");
    assert_eq!(up["labels"]["node"], "vm1");
    assert_eq!(up["labels"]["role"], "primary");
    assert_eq!(up["labels"]["engine"], "postgres");
    assert_eq!(up["value"], 1.0);
    assert_eq!(families["corral_coordinator_heartbeats"]["type"], "counter");
    assert_eq!(
        families["corral_coordinator_heartbeats"]["samples"][0]["name"],
        "corral_coordinator_heartbeats_total"
    );
    let ops = &families["corral_coordinator_operations"]["samples"];
    assert!(
        ops.as_array()
            .unwrap()
            .iter()
            .any(|s| s["labels"]["kind"] == "create_cluster"
                && s["labels"]["result"] == "succeeded"
                && s["value"] == 1.0),
        "{ops}"
    );
    let agent = parse_openmetrics(&lab.agent_metrics(1).unwrap(), lab.dir()).unwrap();
    let cpu = &agent["corral_node_cpu_usage_ratio"]["samples"][0];
    assert_eq!(cpu["labels"]["node"], "vm1");
    assert_eq!(cpu["labels"]["cluster"], "c1");
    assert!(
        agent["corral_agent_heartbeats"]["samples"][0]["value"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(agent["corral_engine_up"]["samples"][0]["value"], 1.0);

    // The disk fills: a warning at 85 %, critical at 95 % (the warning
    // resolves), and both resolve once the space is back.
    let fill = lab.state_dir(1).join("ballast");
    grow(&fill, to_fill(&lab.state_dir(1), 90.0));
    let warning = wait_for(
        Duration::from_secs(20),
        "disk_usage_warning in Alertmanager",
        || Ok(am.active("disk_usage_warning")?.into_iter().next()),
    )
    .unwrap();
    assert_eq!(warning["labels"]["severity"], "warning");
    assert_eq!(warning["labels"]["cluster"], "c1");
    assert_eq!(warning["labels"]["node"], "vm1");
    assert!(
        warning["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("disk of node vm1 is"),
        "{warning}"
    );
    assert_eq!(firing(&lab, "disk_usage_warning").len(), 1);
    // The on-call email, over STARTTLS.
    let mail = wait_for(Duration::from_secs(20), "the warning's email", || {
        Ok(smtp.messages().into_iter().find(|m| {
            m["subject"]
                .as_str()
                .is_some_and(|s| s.contains("disk_usage_warning"))
        }))
    })
    .unwrap();
    assert_eq!(mail["tls"], true, "{mail}");
    assert!(
        mail["subject"]
            .as_str()
            .unwrap()
            .starts_with("[FIRING warning] disk_usage_warning"),
        "{mail}"
    );
    assert!(
        mail["body"].as_str().unwrap().contains("node = vm1"),
        "{mail}"
    );
    assert_eq!(mail["rcpt_tos"][0], "oncall@example.net");
    // The history: a sample a second over the last minutes, the disk's climb
    // included; kept across a restart of the coordinator, which neither
    // forgets the firing alert nor fires it again.
    let before = lab
        .ctl_json(&["node", "metrics", "c1", "vm1", "--since", "10m"])
        .unwrap();
    let points = before["points"].as_array().unwrap().clone();
    assert!(points.len() >= 3, "{} points", points.len());
    let fullest = points
        .iter()
        .map(|p| {
            p["disk_used_bytes"].as_f64().unwrap_or(0.0)
                / p["disk_total_bytes"].as_f64().unwrap_or(1.0)
        })
        .fold(0.0, f64::max);
    assert!(fullest > 0.85, "the history shows the disk at {fullest}");
    let text = lab
        .ctl_ok(&["node", "metrics", "c1", "vm1", "--since", "10m"])
        .unwrap();
    assert!(text.contains("disk") && text.contains("cpu"), "{text}");
    let restarted_at = corral_proto::now_ms();
    lab.stop_coordinator().unwrap();
    lab.start_coordinator().unwrap();
    let after = lab
        .ctl_json(&["node", "metrics", "c1", "vm1", "--since", "10m"])
        .unwrap();
    let kept = after["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["at_ms"].as_i64().unwrap() < restarted_at)
        .count();
    assert!(
        kept + 2 >= points.len(),
        "kept {kept} of {} points",
        points.len()
    );

    grow(&fill, to_fill(&lab.state_dir(1), 96.5));
    wait_for(Duration::from_secs(20), "disk_usage_critical", || {
        Ok(am.active("disk_usage_critical")?.into_iter().next())
    })
    .unwrap();
    wait_for(Duration::from_secs(20), "the warning to resolve", || {
        Ok(am.active("disk_usage_warning")?.is_empty().then_some(()))
    })
    .unwrap();
    std::fs::remove_file(&fill).unwrap();
    wait_for(
        Duration::from_secs(20),
        "the disk alerts to resolve",
        || Ok(am.active("disk_usage_critical")?.is_empty().then_some(())),
    )
    .unwrap();
    assert!(firing(&lab, "disk_usage_critical").is_empty());

    // The engine stops answering (every PostgreSQL process stopped):
    // engine_down fires with the right labels, and resolves once it runs.
    let pids = lab.pids_in_vm(1, "postgres");
    assert!(!pids.is_empty());
    signal(&pids, "-STOP").unwrap();
    let down = wait_for(
        Duration::from_secs(30),
        "engine_down in Alertmanager",
        || Ok(am.active("engine_down")?.into_iter().next()),
    );
    signal(&pids, "-CONT").unwrap();
    let down = down.unwrap();
    assert_eq!(down["labels"]["severity"], "critical");
    assert_eq!(down["labels"]["cluster"], "c1");
    assert_eq!(down["labels"]["node"], "vm1");
    assert_eq!(down["labels"]["engine"], "postgres");
    wait_for(Duration::from_secs(30), "engine_down to resolve", || {
        Ok(am.active("engine_down")?.is_empty().then_some(()))
    })
    .unwrap();
    wait_for(Duration::from_secs(10), "the signed resolve", || {
        Ok((!delivered(&hook, "engine_down", "resolved").is_empty()).then_some(()))
    })
    .unwrap();
    assert_eq!(
        delivered(&hook, "engine_down", "firing").len(),
        1,
        "fires once"
    );

    // The alert history names what fired, what resolved and the notices.
    let history = lab
        .ctl_json(&["alerts", "history", "--cluster", "c1"])
        .unwrap();
    let rows = history["alerts"].as_array().unwrap();
    let state_of = |name: &str| {
        rows.iter()
            .filter(|a| a["name"] == name)
            .map(|a| a["state"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(state_of("disk_usage_warning"), ["resolved"]);
    assert_eq!(state_of("disk_usage_critical"), ["resolved"]);
    assert_eq!(state_of("engine_down"), ["resolved"]);
    assert!(state_of("operation_completed").contains(&"notice".to_string()));
    let channels = lab.ctl_json(&["alerts", "list"]).unwrap()["channels"].clone();
    assert_eq!(channels.as_array().unwrap().len(), 3, "{channels}");
}

#[test]
fn a_hung_notification_endpoint_delays_neither_heartbeats_nor_failover() {
    let mut lab = Lab::start(3).unwrap();
    let hole = BlackHole::start(&lab.host_ip()).unwrap();
    let (host, port) = hole.addr.split_once(':').unwrap();
    lab.opts.coordinator_config = Some(format!(
        r#"
[alerts]
evaluation_interval = "500ms"
[[notify.alertmanager]]
name = "am"
url = "http://{0}"
[[notify.webhook]]
name = "hook"
url = "http://{0}/corral"
secret = "s"
[[notify.email]]
name = "mail"
smtp_host = "{host}"
smtp_port = {port}
from = "corral@example.com"
to = ["oncall@example.com"]
"#,
        hole.addr
    ));
    lab.stop_coordinator().unwrap();
    lab.start_coordinator().unwrap();
    for i in 1..=3 {
        lab.wait_node_state(&format!("vm{i}"), "up", Duration::from_secs(20))
            .unwrap();
    }
    lab.create_replicated("c1", "vm1,vm2,vm3", &[]).unwrap();
    lab.wait_streaming("c1", "vm2").unwrap();
    lab.wait_streaming("c1", "vm3").unwrap();
    // Idle replicas that replayed everything are not "behind", however
    // long ago the last commit was (no replication_lag_high on an idle
    // cluster).
    std::thread::sleep(Duration::from_secs(4));
    let m = parse_openmetrics(&lab.coordinator_metrics().unwrap(), lab.dir()).unwrap();
    let lags = m["corral_engine_replication_lag_seconds"]["samples"].clone();
    assert_eq!(lags.as_array().unwrap().len(), 2, "{lags}");
    for s in lags.as_array().unwrap() {
        assert!(
            s["value"].as_f64().unwrap() < 1.0,
            "an idle replica lags: {lags}"
        );
    }

    // Every notification of the failover (node down, failover started and
    // completed, ...) goes to endpoints that accept and never answer.
    let killed = Instant::now();
    lab.kill_vm(1);
    let mut worst_age = 0f64;
    let new_primary = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no failover within 60 s"
        );
        for n in lab.ctl_json(&["node", "list"]).unwrap()["nodes"]
            .as_array()
            .unwrap()
        {
            if n["id"] != "vm1" {
                assert_eq!(n["state"], "up", "a surviving node was judged down: {n}");
            }
        }
        let c = lab.ctl_json(&["cluster", "show", "c1"]).unwrap();
        let primary = c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["role"] == "primary")
            .and_then(|n| n["id"].as_str())
            .unwrap_or_default()
            .to_string();
        let m = parse_openmetrics(&lab.coordinator_metrics().unwrap(), lab.dir()).unwrap();
        for s in m["corral_node_heartbeat_age_seconds"]["samples"]
            .as_array()
            .unwrap()
        {
            if s["labels"]["node"] != "vm1" {
                worst_age = worst_age.max(s["value"].as_f64().unwrap());
            }
        }
        if primary != "vm1" && !primary.is_empty() {
            break primary;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "failover to {new_primary} {:.1}s after the kill; oldest heartbeat of a surviving node seen: {worst_age:.2}s",
        killed.elapsed().as_secs_f64()
    );
    lab.wait_until_primary("c1", Duration::from_secs(30))
        .unwrap();
    // The channels really were stuck: attempts failed (timeouts) or are
    // still waiting, none delivered.
    let m = parse_openmetrics(&lab.coordinator_metrics().unwrap(), lab.dir()).unwrap();
    let sum = |family: &str| -> f64 {
        m[family]["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["value"].as_f64().unwrap())
            .sum()
    };
    assert_eq!(sum("corral_coordinator_notifications_delivered"), 0.0);
    assert!(
        sum("corral_coordinator_notification_queue_length")
            + sum("corral_coordinator_notification_failed_attempts")
            > 0.0,
        "the notifications went nowhere: {m}"
    );
    assert_eq!(sum("corral_coordinator_heartbeat_errors"), 0.0);
    // Heartbeats kept flowing the whole time (every 1 s; down after 3 s).
    assert!(
        worst_age < 3.0,
        "a surviving node's heartbeat aged {worst_age}s"
    );
}

#[test]
fn a_configuration_with_a_mistake_is_refused_naming_it() {
    let dir = std::env::temp_dir().join(format!("corral-config-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |text: &str| {
        let file = dir.join("coordinator.toml");
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(corral_tests::bin("corral-coordinator"))
            .args(["--check-config", "--config", &file.to_string_lossy()])
            .env_remove("CORRAL_WEBHOOK_SECRET")
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    for (text, says) in [
        ("[alerts.rules]\ncpu_percnt = 5\n", "cpu_percnt"),
        ("[alerts.rules]\ndisk_critical_percent = 101\n", "alerts.rules.disk_critical_percent"),
        ("[alerts.cluster.c1]\ncpu_for = \"ten minutes\"\n", "invalid duration"),
        (
            "[[notify.webhook]]\nname = \"hook\"\nurl = \"http://10.0.0.1/x\"\nsecret_env = \"CORRAL_WEBHOOK_SECRET\"\n",
            "CORRAL_WEBHOOK_SECRET",
        ),
        (
            "[[notify.email]]\nname = \"mail\"\nsmtp_host = \"smtp\"\nfrom = \"a@b.c\"\nto = []\n",
            "to",
        ),
    ] {
        let (ok, out) = check(text);
        assert!(!ok, "accepted:\n{text}");
        assert!(out.contains(says), "{text} -> {out}");
    }
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/coordinator.toml.example"
    );
    let (ok, out) = check(&std::fs::read_to_string(example).unwrap());
    assert!(ok, "{out}");
    assert!(out.contains("valid"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}
