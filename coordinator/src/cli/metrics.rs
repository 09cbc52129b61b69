//! `corralctl node metrics` drawn in a terminal: one sparkline per figure
//! with min, average, max and the last value.

use corral_proto::pb;

/// A node's history as one sparkline per figure, `width` columns wide
/// (each column averages the points it covers), with min, average, max
/// and the last value.
pub fn render_metrics(m: &pb::NodeMetrics, width: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some((first, last)) = m.points.first().zip(m.points.last()) else {
        let _ = writeln!(
            out,
            "no figures recorded for node {} in this window (nodes report every second)",
            m.node
        );
        return out;
    };
    let res = if m.resolution_ms == 0 {
        "every second".to_string()
    } else {
        format!("{}-minute averages", m.resolution_ms / 60_000)
    };
    let _ = writeln!(
        out,
        "node {} of cluster {}: {} points from {} to {} ({res})",
        m.node,
        m.cluster,
        m.points.len(),
        clock(first.at_ms),
        clock(last.at_ms)
    );
    type Get = fn(&pb::MetricsPoint) -> f64;
    type Fmt = fn(f64) -> String;
    fn pct(used: f64, total: f64) -> f64 {
        if total > 0.0 {
            used * 100.0 / total
        } else {
            0.0
        }
    }
    // Percentages are drawn on 0-100, the rest on 0-max.
    let series: [(&str, Get, Fmt, Option<f64>); 8] = [
        (
            "cpu",
            |p| p.cpu_percent,
            |v| format!("{v:.0}%"),
            Some(100.0),
        ),
        (
            "memory",
            |p| pct(p.memory_used_bytes, p.memory_total_bytes),
            |v| format!("{v:.0}%"),
            Some(100.0),
        ),
        (
            "disk",
            |p| pct(p.disk_used_bytes, p.disk_total_bytes),
            |v| format!("{v:.1}%"),
            Some(100.0),
        ),
        ("net rx", |p| p.net_rx_bytes_per_sec, rate, None),
        ("net tx", |p| p.net_tx_bytes_per_sec, rate, None),
        ("load1", |p| p.load1, |v| format!("{v:.2}"), None),
        (
            "connections",
            |p| p.connections,
            |v| format!("{v:.0}"),
            None,
        ),
        ("lag", |p| p.lag_seconds, |v| format!("{v:.1}s"), None),
    ];
    for (name, get, fmt, top) in series {
        let values: Vec<f64> = m.points.iter().map(get).collect();
        let (min, max) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        let avg = values.iter().sum::<f64>() / values.len() as f64;
        let _ = writeln!(
            out,
            "{name:<12} {}  min {} avg {} max {} last {}",
            sparkline(&values, width, top),
            fmt(min),
            fmt(avg),
            fmt(max),
            fmt(*values.last().unwrap_or(&0.0))
        );
    }
    out
}

pub(super) fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}MB/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}kB/s", v / 1e3)
    } else {
        format!("{v:.0}B/s")
    }
}

pub(super) fn clock(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(|t| {
            format!(
                "{}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| ms.to_string())
}

/// Values as block characters on a scale from 0 to `top` (default: the
/// largest value); at most `width` columns.
pub fn sparkline(values: &[f64], width: usize, top: Option<f64>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() || width == 0 {
        return String::new();
    }
    let cols = values.len().min(width);
    let avg: Vec<f64> = (0..cols)
        .map(|c| {
            let (a, b) = (c * values.len() / cols, (c + 1) * values.len() / cols);
            values[a..b.max(a + 1)].iter().sum::<f64>() / (b.max(a + 1) - a) as f64
        })
        .collect();
    let lo = 0f64;
    let hi = top.unwrap_or_else(|| avg.iter().cloned().fold(0f64, f64::max));
    avg.iter()
        .map(|v| {
            if hi <= lo {
                BARS[0]
            } else {
                BARS[(((v - lo) / (hi - lo)) * 7.0).round().clamp(0.0, 7.0) as usize]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use corral_proto::pb;

    #[test]
    fn sparklines() {
        use super::sparkline;
        assert_eq!(sparkline(&[0.0, 50.0, 100.0], 60, Some(100.0)), "▁▅█");
        assert_eq!(sparkline(&[0.0, 50.0, 100.0], 60, Some(200.0)), "▁▃▅");
        assert_eq!(sparkline(&[3.0, 3.0], 60, None), "██");
        assert_eq!(sparkline(&[0.0, 0.0], 60, None), "▁▁");
        assert_eq!(sparkline(&[], 60, None), "");
        // 120 points in 60 columns: pairs averaged.
        let v: Vec<f64> = (0..120).map(|i| if i < 60 { 0.0 } else { 10.0 }).collect();
        let line = sparkline(&v, 60, None);
        assert_eq!(line.chars().count(), 60);
        assert!(line.starts_with('▁') && line.ends_with('█'));
    }

    #[test]
    fn metrics_render() {
        let p = |at_ms, cpu| pb::MetricsPoint {
            at_ms,
            cpu_percent: cpu,
            memory_used_bytes: 1.0,
            memory_total_bytes: 4.0,
            ..Default::default()
        };
        let m = pb::NodeMetrics {
            cluster: "c1".into(),
            node: "vm1".into(),
            resolution_ms: 0,
            points: vec![p(0, 10.0), p(1000, 30.0)],
        };
        let text = super::render_metrics(&m, 60);
        assert!(text.contains("2 points"), "{text}");
        assert!(
            text.contains("cpu          ▂▃  min 10% avg 20% max 30% last 30%"),
            "{text}"
        );
        assert!(text.contains("memory       ▃▃  min 25%"), "{text}");
        let empty = pb::NodeMetrics {
            points: vec![],
            ..m
        };
        assert!(super::render_metrics(&empty, 60).contains("no figures"));
    }
}
