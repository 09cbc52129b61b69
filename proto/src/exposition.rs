//! Metrics in the OpenMetrics text format (which Prometheus scrapes), for
//! the agent's and the coordinator's `/metrics`.
//!
//! Every family is computed at scrape time from what the process already
//! holds (the fleet, counters), so there is nothing to register up front:
//! an [`Exposition`] collects families and prometheus-client encodes them
//! (escaping, `_total` suffixes, `# EOF`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::pb;

/// The Content-Type of [`Exposition::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

#[derive(Debug)]
pub struct Family {
    name: String,
    help: String,
    counter: bool,
    samples: Vec<(Labels, f64)>,
}

impl Family {
    /// Adds a sample with these labels (keys are Prometheus names; values
    /// may hold anything).
    pub fn add(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Family {
        self.samples.push((
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), escape(v)))
                .collect(),
            value,
        ));
        self
    }
}

/// prometheus-client 0.24 writes label values as they are; the text
/// format wants backslash, double quote and newline escaped (the version
/// is pinned in Cargo.toml so that a release that escapes them itself
/// cannot double them unnoticed: the test below would fail).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Families of one scrape.
#[derive(Debug, Default)]
pub struct Exposition(Vec<Family>);

impl Exposition {
    /// A gauge family; `name` carries its unit (`_bytes`, `_seconds`,
    /// `_percent`).
    pub fn gauge(&mut self, name: &str, help: &str) -> &mut Family {
        self.family(name, help, false)
    }

    /// A counter family; `name` without the `_total` the encoding adds.
    pub fn counter(&mut self, name: &str, help: &str) -> &mut Family {
        self.family(name, help, true)
    }

    fn family(&mut self, name: &str, help: &str, counter: bool) -> &mut Family {
        self.0.push(Family {
            name: name.to_string(),
            help: help.to_string(),
            counter,
            samples: Vec::new(),
        });
        let last = self.0.len() - 1;
        &mut self.0[last]
    }

    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Families(self.0)));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = if f.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut family = encoder.encode_descriptor(&f.name, &f.help, None, kind)?;
            match f.samples.as_slice() {
                // A single sample without labels is written without braces.
                [(labels, value)] if labels.is_empty() => put(f.counter, *value, family)?,
                samples => {
                    for (labels, value) in samples {
                        put(f.counter, *value, family.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One node's series: its labels (cluster, node, role, engine) and what it
/// last reported.
pub struct NodeSeries<'a> {
    pub labels: [(&'static str, &'a str); 4],
    pub metrics: Option<&'a pb::Metrics>,
    pub engine: Option<&'a pb::EngineStatus>,
}

/// The node (`corral_node_*`) and engine (`corral_engine_*`) families, the
/// same on the agent's `/metrics` (its own node) and the coordinator's
/// (every node).
pub fn node_and_engine(e: &mut Exposition, rows: &[NodeSeries]) {
    node_gauges(e, rows);
    let engine_rows = engine_rows(rows);
    engine_state(e, &engine_rows);
    engine_stats(e, &engine_rows);
}

/// The node's own gauges (CPU, memory, disk, network, load) for rows with metrics.
fn node_gauges(e: &mut Exposition, rows: &[NodeSeries]) {
    type Get = fn(&pb::Metrics) -> f64;
    let gauges: [(&str, &str, Get); 10] = [
        ("corral_node_cpu_usage_ratio", "CPU in use, 0 to 1.", |m| {
            m.cpu_percent / 100.0
        }),
        ("corral_node_memory_used_bytes", "Memory in use.", |m| {
            m.memory_used_bytes as f64
        }),
        ("corral_node_memory_total_bytes", "Memory installed.", |m| {
            m.memory_total_bytes as f64
        }),
        (
            "corral_node_disk_used_bytes",
            "Used space of the filesystem holding the engine's data.",
            |m| m.disk_used_bytes as f64,
        ),
        (
            "corral_node_disk_total_bytes",
            "Size of the filesystem holding the engine's data.",
            |m| m.disk_total_bytes as f64,
        ),
        (
            "corral_node_network_receive_bytes_per_second",
            "Bytes received per second over the last heartbeat interval (all interfaces but lo).",
            |m| m.net_rx_bytes_per_sec,
        ),
        (
            "corral_node_network_transmit_bytes_per_second",
            "Bytes sent per second over the last heartbeat interval (all interfaces but lo).",
            |m| m.net_tx_bytes_per_sec,
        ),
        ("corral_node_load1", "Load average over 1 minute.", |m| {
            m.load1
        }),
        ("corral_node_load5", "Load average over 5 minutes.", |m| {
            m.load5
        }),
        ("corral_node_load15", "Load average over 15 minutes.", |m| {
            m.load15
        }),
    ];
    for (name, help, get) in gauges {
        let f = e.gauge(name, help);
        for r in rows {
            if let Some(m) = r.metrics {
                f.add(&r.labels, get(m));
            }
        }
    }
}

/// The rows whose agent reports an engine in some state.
fn engine_rows<'a, 'b>(
    rows: &'a [NodeSeries<'b>],
) -> Vec<(&'a NodeSeries<'b>, &'b pb::EngineStatus)> {
    let engine_rows: Vec<(&NodeSeries, &pb::EngineStatus)> = rows
        .iter()
        .filter_map(|r| {
            r.engine
                .filter(|s| !s.engine.is_empty() && s.state != pb::EngineState::None as i32)
                .map(|s| (r, s))
        })
        .collect();
    engine_rows
}

/// Whether each engine is up, what it says it is, and how often it was restarted.
fn engine_state(e: &mut Exposition, engine_rows: &[(&NodeSeries, &pb::EngineStatus)]) {
    let f = e.gauge(
        "corral_engine_up",
        "1 while the engine runs and answers its health query.",
    );
    for (r, s) in engine_rows {
        let up = s.state == pb::EngineState::Running as i32 && s.healthy;
        f.add(&r.labels, if up { 1.0 } else { 0.0 });
    }
    let f = e.gauge(
        "corral_engine_info",
        "The engine's version and the role it reports itself (1).",
    );
    for (r, s) in engine_rows {
        let state = pb::EngineState::try_from(s.state).map_or("unknown", pb::EngineState::label);
        let mut labels = r.labels.to_vec();
        labels.extend([
            ("version", s.version.as_str()),
            ("reported_role", s.role.as_str()),
            ("state", state),
        ]);
        f.add(&labels, 1.0);
    }
    let f = e.counter(
        "corral_engine_restarts",
        "Times the agent's supervisor restarted the engine since the agent started.",
    );
    for (r, s) in engine_rows {
        f.add(&r.labels, s.restarts as f64);
    }
}

/// The engine-specific statistics, one gauge per known key, for the engines reporting it.
fn engine_stats(e: &mut Exposition, engine_rows: &[(&NodeSeries, &pb::EngineStatus)]) {
    let stats: [(&str, &str, &str); 6] = [
        (
            "connections",
            "corral_engine_connections",
            "Client connections open.",
        ),
        (
            "lag_seconds",
            "corral_engine_replication_lag_seconds",
            "How far a replica's replay is behind its primary.",
        ),
        (
            "used_memory_bytes",
            "corral_engine_memory_used_bytes",
            "Memory the engine reports in use (Redis).",
        ),
        ("keys", "corral_engine_keys", "Keys stored (Redis)."),
        (
            "repl_offset_bytes",
            "corral_engine_replication_offset_bytes",
            "Replication offset (Redis).",
        ),
        (
            "gtid_seq",
            "corral_engine_gtid_sequence",
            "Sequence number of the last GTID (MariaDB).",
        ),
    ];
    for (key, name, help) in stats {
        let f = e.gauge(name, help);
        for (r, s) in engine_rows {
            if let Some(v) = s.stats.get(key) {
                f.add(&r.labels, *v);
            }
        }
    }
}

fn put(counter: bool, value: f64, sample: MetricEncoder) -> Result<(), std::fmt::Error> {
    if counter {
        ConstCounter::new(value).encode(sample)
    } else {
        ConstGauge::new(value).encode(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_and_counters_render_as_openmetrics() {
        let mut e = Exposition::default();
        e.gauge("corral_node_cpu_percent", "CPU in use.")
            .add(&[("node", "vm1"), ("cluster", "c\"1\\\n")], 12.5)
            .add(&[("node", "vm2"), ("cluster", "c1")], 0.0);
        e.counter("corral_coordinator_heartbeats", "Heartbeats received.")
            .add(&[], 42.0);
        let text = e.render();
        assert!(
            text.contains("# TYPE corral_node_cpu_percent gauge"),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_node_cpu_percent{node="vm1",cluster="c\"1\\\n"} 12.5"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE corral_coordinator_heartbeats counter"),
            "{text}"
        );
        assert!(
            text.contains("\ncorral_coordinator_heartbeats_total 42.0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
