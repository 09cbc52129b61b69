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
