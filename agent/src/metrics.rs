//! Samples of the VM's resources for each heartbeat.

use corral_proto::pb::Metrics;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Instant;
use sysinfo::System;

/// What the agent's `/metrics` shows besides the engine's status: the last
/// sample sent with a heartbeat, and how heartbeats fare.
#[derive(Default)]
pub struct Telemetry {
    last: Mutex<Option<Metrics>>,
    pub heartbeats_ok: AtomicU64,
    pub heartbeats_failed: AtomicU64,
}

impl Telemetry {
    pub fn sampled(&self, m: Metrics) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(m);
    }

    pub fn last(&self) -> Option<Metrics> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps what rates need between samples: CPU times and network counters.
pub struct Sampler {
    system: System,
    /// Bytes received and sent on every interface but `lo` at the last
    /// sample (None where /proc/net/dev cannot be read).
    network: Option<(u64, u64)>,
    last: Instant,
    /// The filesystem reported as "disk" is the one holding this directory.
    data_dir: PathBuf,
}

impl Sampler {
    pub fn new(data_dir: PathBuf) -> anyhow::Result<Self> {
        let mut system =
            System::new().map_err(|e| anyhow::anyhow!("reading system information: {e}"))?;
        system.refresh_cpu_usage();
        system.refresh_memory();
        let network = match network_totals() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("network counters unavailable: {e}");
                None
            }
        };
        Ok(Sampler {
            system,
            network,
            last: Instant::now(),
            data_dir,
        })
    }

    /// A sample; rates and CPU % cover the time since the previous one.
    pub fn sample(&mut self) -> Metrics {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let elapsed = self.last.elapsed().as_secs_f64().max(0.001);
        self.last = Instant::now();
        let (mut rx, mut tx) = (0u64, 0u64);
        if let (Some(last), Ok(now)) = (self.network, network_totals()) {
            // A counter that went back (an interface gone) counts as 0.
            rx = now.0.saturating_sub(last.0);
            tx = now.1.saturating_sub(last.1);
            self.network = Some(now);
        }
        let (disk_used, disk_total) = disk_usage(&self.data_dir);
        let load = System::load_average().unwrap_or_default();
        Metrics {
            cpu_percent: self.system.global_cpu_usage() as f64,
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            disk_used_bytes: disk_used,
            disk_total_bytes: disk_total,
            net_rx_bytes_per_sec: rx as f64 / elapsed,
            net_tx_bytes_per_sec: tx as f64 / elapsed,
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
        }
    }
}

/// Bytes received and sent so far on every interface but `lo`, from one
/// read of /proc/net/dev (sysinfo reads two files per interface for the
/// same figures, a cost at every sample).
fn network_totals() -> std::io::Result<(u64, u64)> {
    Ok(parse_net_dev(&std::fs::read_to_string("/proc/net/dev")?))
}

/// /proc/net/dev: two header lines, then `name: rx_bytes rx_packets ...
/// (8 receive fields) tx_bytes ...`.
fn parse_net_dev(text: &str) -> (u64, u64) {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim() != "lo")
        .map(|(_, fields)| {
            let f: Vec<u64> = fields
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            (
                f.first().copied().unwrap_or(0),
                f.get(8).copied().unwrap_or(0),
            )
        })
        .fold((0, 0), |(rx, tx), (r, t)| (rx + r, tx + t))
}

/// Used and total bytes of the filesystem holding `dir` (or its nearest
/// existing ancestor); zeros if it cannot be read.
pub fn disk_usage(dir: &std::path::Path) -> (u64, u64) {
    let mut probe = Some(dir);
    while let Some(p) = probe {
        if let Ok(st) = nix::sys::statvfs::statvfs(p) {
            // The field types differ between libc targets; u64 holds them all.
            #[allow(clippy::unnecessary_cast)]
            let (frsize, blocks, bfree) = (
                st.fragment_size() as u64,
                st.blocks() as u64,
                st.blocks_free() as u64,
            );
            let total = blocks * frsize;
            let free = bfree * frsize;
            return (total.saturating_sub(free), total);
        }
        probe = p.parent();
    }
    (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_reports_this_machine() {
        let mut s = Sampler::new(std::env::temp_dir().join("does/not/exist/yet")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let m = s.sample();
        assert!(m.memory_total_bytes > 0 && m.memory_used_bytes <= m.memory_total_bytes);
        assert!(
            m.disk_total_bytes > 0 && m.disk_used_bytes <= m.disk_total_bytes,
            "{m:?}"
        );
        assert!((0.0..=100.0).contains(&m.cpu_percent), "{m:?}");
        assert!(m.load1 >= 0.0);
    }

    #[test]
    fn network_totals_leave_out_the_loopback() {
        let text = "Inter-|   Receive                            |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n    \
             lo:  999 9 0 0 0 0 0 0  999 9 0 0 0 0 0 0\n  \
             eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n  \
             eth1: 5 1 0 0 0 0 0 0 7 1 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(text), (1005, 2007));
        assert!(network_totals().is_ok());
    }
}
