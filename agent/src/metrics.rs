//! Samples of the VM's resources for each heartbeat.

use corral_proto::pb::Metrics;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Instant;
use sysinfo::{Networks, System};

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
    networks: Option<Networks>,
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
        let networks = match Networks::new_with_refreshed_list() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("network counters unavailable: {e}");
                None
            }
        };
        Ok(Sampler {
            system,
            networks,
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
        if let Some(networks) = &mut self.networks {
            networks.refresh(true);
            for (name, data) in networks.iter() {
                if name != "lo" {
                    rx += data.received();
                    tx += data.transmitted();
                }
            }
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
}
