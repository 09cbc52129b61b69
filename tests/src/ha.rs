//! Helpers shared by the failover suites (`failover.rs`, `chaos.rs`,
//! `busy.rs`) and the failover benchmark: a three-node cluster behind
//! HAProxy with the writer's and the checker's tables, and the waits and
//! reads their assertions need.

use crate::checker::WriteChecker;
use crate::client::with_client;
use crate::writer::Writer;
use crate::{wait_until, Lab};
use anyhow::{anyhow, Result};
use serde_json::Value;
use std::time::Duration;

/// The writer's table and the checker's.
pub const WRITES: &str = "w";
pub const PROBES: &str = "probe";

/// Creates cluster `name` on vm1 (primary), vm2 and vm3 with extra
/// `cluster create` flags, the writer's and checker's tables, and HAProxy
/// routing to its primary; returns the credentials.
pub fn cluster(lab: &mut Lab, name: &str, extra: &[&str]) -> Result<Value> {
    cluster_of(lab, name, "postgres", extra)
}

/// [`cluster`] of any engine (Redis needs no tables: the writer and the
/// checker push onto lists).
pub fn cluster_of(lab: &mut Lab, name: &str, engine: &str, extra: &[&str]) -> Result<Value> {
    let creds = lab.create_engine_cluster(name, engine, "vm1,vm2,vm3", extra)?;
    let tables: &[String] = match crate::uri_scheme(&creds) {
        "redis" => &[],
        "mysql" => &[
            format!("CREATE TABLE {WRITES} (id bigint PRIMARY KEY, at datetime(6) NOT NULL)"),
            format!("CREATE TABLE {PROBES} (node varchar(64) NOT NULL, at datetime(6) NOT NULL)"),
        ],
        _ => &[
            format!("CREATE TABLE {WRITES} (id bigint PRIMARY KEY, at timestamptz NOT NULL)"),
            format!("CREATE TABLE {PROBES} (node text NOT NULL, at timestamptz NOT NULL)"),
        ],
    };
    with_client(&lab.node_uri(&creds, 1), async |c| {
        for t in tables {
            c.execute(t).await?;
        }
        Ok(())
    })?;
    for vm in ["vm2", "vm3"] {
        lab.wait_streaming(name, vm)?;
    }
    let port = creds["port"]
        .as_u64()
        .ok_or_else(|| anyhow!("no port in {creds}"))?;
    lab.start_haproxy_port(&[1, 2, 3], port as u16)?;
    let through = lab.haproxy_uri(&creds);
    let ping = if crate::uri_scheme(&creds) == "redis" {
        "PING"
    } else {
        "SELECT 1"
    };
    wait_until(
        Duration::from_secs(15),
        "HAProxy to route to the primary",
        || Ok(with_client(&through, async |c| c.execute(ping).await).is_ok()),
    )?;
    Ok(creds)
}

/// A writer inserting every 20 ms through HAProxy.
pub fn writer(lab: &Lab, creds: &Value) -> Writer {
    Writer::start(&lab.haproxy_uri(creds), WRITES, Duration::from_millis(20))
}

/// A checker probing every node directly from the host.
pub fn checker(lab: &Lab, creds: &Value, vms: usize) -> WriteChecker {
    WriteChecker::start(
        (1..=vms)
            .map(|i| (format!("vm{i}"), lab.node_uri(creds, i)))
            .collect(),
        PROBES,
    )
}

/// A checker probing VM `i` from inside it, over loopback.
pub fn local_checker(lab: &Lab, creds: &Value, i: usize) -> WriteChecker {
    let uri = lab
        .node_uri(creds, i)
        .replace(&format!("@{}:", lab.vm_ip(i)), "@127.0.0.1:");
    WriteChecker::start_in(
        Some(lab.ns(&format!("vm{i}"))),
        vec![(format!("vm{i}"), uri)],
        PROBES,
    )
}

/// Ids in the writer's table on node `i`, sorted (any engine).
pub fn ids_on(lab: &Lab, creds: &Value, i: usize) -> Result<Vec<i64>> {
    with_client(&lab.node_uri(creds, i), async |c| c.ids(WRITES).await)
}

/// "vm2" -> 2.
pub fn vm_index(id: &str) -> usize {
    id.trim_start_matches("vm").parse().unwrap_or(0)
}

/// Waits until the writer has had `n` more acknowledgements than now.
pub fn wait_acks(w: &Writer, n: usize, timeout: Duration) -> Result<()> {
    let start = w.report().acked.len();
    wait_until(timeout, &format!("{n} more acknowledged writes"), || {
        Ok(w.report().acked.len() >= start + n)
    })
    .map_err(|e| anyhow!("{e:#}; writer's last error: {}", w.report().last_error))
}

/// (kind, node, at_ms, message) of every event recorded for `cluster`.
pub fn events(lab: &Lab, cluster: &str) -> Result<Vec<(String, String, i64, String)>> {
    let v = lab.ctl_json(&["event", "list", "--cluster", cluster, "--limit", "5000"])?;
    Ok(v["events"]
        .as_array()
        .ok_or_else(|| anyhow!("no events in {v}"))?
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["node"].as_str().unwrap_or_default().to_string(),
                e["at_ms"].as_i64().unwrap_or_default(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Operations of `kind` on `cluster`.
pub fn operations(lab: &Lab, cluster: &str, kind: &str) -> Result<Vec<Value>> {
    let ops = lab.ctl_json(&["operation", "list", "--cluster", cluster])?;
    Ok(ops["operations"]
        .as_array()
        .map(|a| a.iter().filter(|o| o["kind"] == kind).cloned().collect())
        .unwrap_or_default())
}

/// Waits until `cluster` has one primary other than `not` and returns it.
pub fn wait_new_primary(lab: &Lab, cluster: &str, not: &str, timeout: Duration) -> Result<String> {
    let mut new = String::new();
    wait_until(timeout, &format!("a primary other than {not}"), || {
        new = lab.wait_until_primary(cluster, Duration::from_secs(2))?;
        Ok(new != not)
    })?;
    Ok(new)
}

/// Waits until `cluster` has one primary, writable, and every other node
/// streams from it; returns the primary.
pub fn wait_settled(lab: &Lab, cluster: &str, vms: usize, timeout: Duration) -> Result<String> {
    let mut primary = String::new();
    wait_until(timeout, &format!("{cluster} to settle"), || {
        primary = lab.wait_until_primary(cluster, Duration::from_secs(5))?;
        let p = vm_index(&primary);
        if lab.health(p, "/primary")? != 200 {
            return Ok(false);
        }
        for i in (1..=vms).filter(|i| *i != p) {
            let n = lab.cluster_node(cluster, &format!("vm{i}"))?;
            let lag = n["lag_bytes"].as_i64().unwrap_or(-1);
            if !matches!(n["replication"].as_str(), Some("streaming" | "sync"))
                || !(0..16 << 20).contains(&lag)
            {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    Ok(primary)
}

/// Waits up to `timeout` until each of vm1..=vm`vms` holds every id in
/// `acked` (sync mode: no acknowledged write may be lost); the error names
/// the node and the ids it lacks.
pub fn wait_every_node_holds(
    lab: &Lab,
    creds: &Value,
    vms: usize,
    acked: &[i64],
    timeout: Duration,
) -> Result<()> {
    for i in 1..=vms {
        let waited = wait_until(
            timeout,
            &format!("vm{i} to hold every acknowledged write"),
            || Ok(missing_on(lab, creds, i, acked)?.is_empty()),
        );
        if let Err(e) = waited {
            let missing = missing_on(lab, creds, i, acked).unwrap_or_default();
            return Err(anyhow!(
                "{e:#}: {} acknowledged writes missing on vm{i}: {missing:?}",
                missing.len()
            ));
        }
    }
    Ok(())
}

/// Acknowledged ids missing on node `i` (sync mode: must be none).
pub fn missing_on(lab: &Lab, creds: &Value, i: usize, acked: &[i64]) -> Result<Vec<i64>> {
    let have = ids_on(lab, creds, i)?;
    Ok(acked
        .iter()
        .filter(|id| have.binary_search(id).is_err())
        .copied()
        .collect())
}

/// What [`hold_steady`] saw.
pub struct Steady {
    pub writes: usize,
    /// The writer's longest pause between two acknowledged writes.
    pub longest_pause: Duration,
}

/// Keeps `cluster` (primary vm1, replicas vm2 and vm3, the default timing)
/// under a writer for `secs` while `condition` (a load, slow links) lasts,
/// checking every 10 s that the term has not moved; then asserts no
/// failover, no fence and no lease revocation happened, vm1 is still the
/// primary, and nothing acknowledged is missing from it. `what` names the
/// condition in messages.
pub fn hold_steady(lab: &Lab, creds: &Value, cluster: &str, secs: u64, what: &str) -> Steady {
    let c = lab.ctl_json(&["cluster", "show", cluster]).unwrap();
    assert_eq!(c["profile"], "lan", "not the default timing: {c}");
    let writer = writer(lab, creds);
    wait_acks(&writer, 20, Duration::from_secs(30)).unwrap();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let began = std::time::Instant::now();
    writer.take_longest_gap();
    while began.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(10));
        let c = lab.ctl_json(&["cluster", "show", cluster]).unwrap();
        assert_eq!(
            c["term"],
            1,
            "a failover with {what} after {:?}: {c}",
            began.elapsed()
        );
    }
    let longest_pause = writer.take_longest_gap();
    let report = writer.finish();
    let fences: Vec<_> = events(lab, cluster)
        .unwrap()
        .into_iter()
        .filter(|e| e.2 > started && matches!(e.0.as_str(), "fenced" | "lease_revoked"))
        .collect();
    eprintln!(
        "{secs} s of {what}: {} writes acknowledged, the writer's longest pause {} ms, {} fences, \
         {} failovers",
        report.acked.len(),
        longest_pause.as_millis(),
        fences.len(),
        operations(lab, cluster, "failover").unwrap().len()
    );
    assert!(operations(lab, cluster, "failover").unwrap().is_empty());
    assert!(
        fences.is_empty(),
        "the primary lost its lease with {what}: {fences:?}"
    );
    assert_eq!(
        wait_settled(lab, cluster, 3, Duration::from_secs(60)).unwrap(),
        "vm1"
    );
    let missing = missing_on(lab, creds, 1, &report.acked).unwrap();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing: {missing:?}"
    );
    Steady {
        writes: report.acked.len(),
        longest_pause,
    }
}
