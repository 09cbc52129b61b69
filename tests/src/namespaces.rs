//! A lab's namespaces, bridge, mounts and pid file: teardown, and the sweep of
//! labs whose owning process is gone.

use super::*;

pub(crate) fn pid_file(k: u32) -> PathBuf {
    Path::new(ROOT).join("labs").join(format!("{k}.pid"))
}

pub(crate) fn ns_names(k: u32) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        let prefix = format!("crl{k}-");
        for line in list.lines() {
            if let Some(name) = line.split_whitespace().next() {
                if name.starts_with(&prefix) {
                    out.push(name.to_string());
                }
            }
        }
    }
    out
}

pub(crate) fn kill_ns_processes(ns: &str) {
    for _ in 0..20 {
        let pids = sh("ip", &["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            unsafe_kill(pid, 9);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn unsafe_kill(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Removes every trace of lab `k`: processes in its namespaces, the
/// namespaces, veths, the pid file and, last, the bridge: the bridge is the
/// lab's lock, so nothing of the next owner of `k` is touched.
pub fn teardown(k: u32) {
    for ns in ns_names(k) {
        kill_ns_processes(&ns);
        let _ = sh("ip", &["netns", "del", &ns]);
    }
    unmount_under(&format!("{ROOT}/lab-{k}/"));
    if let Ok(links) = sh("ip", &["-o", "link", "show"]) {
        let prefix = format!("crl{k}h");
        for line in links.lines() {
            if let Some(name) = line
                .split(':')
                .nth(1)
                .map(|s| s.trim().split('@').next().unwrap_or(""))
            {
                if name.starts_with(&prefix) {
                    let _ = sh("ip", &["link", "del", name]);
                }
            }
        }
    }
    let _ = std::fs::remove_file(pid_file(k));
    let _ = sh("ip", &["link", "del", &format!("crlb{k}")]);
}

/// Mounts a tmpfs of `mib` MiB on `dir` (under a lab's directory, its
/// teardown unmounts it).
pub fn mount_tmpfs(dir: &Path, mib: u64) -> Result<()> {
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0755"),
            "tmpfs",
            &dir.to_string_lossy(),
        ],
    )?;
    Ok(())
}

/// Unmounts the filesystems mounted under `dir` (LabOptions::small_disk).
pub(crate) fn unmount_under(dir: &str) {
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if m.starts_with(dir) {
                let _ = sh("umount", &["-l", m]);
            }
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Lab bridges and their interface indexes.
fn lab_bridges() -> Vec<(u32, String)> {
    let Ok(links) = sh("ip", &["-o", "link", "show", "type", "bridge"]) else {
        return Vec::new();
    };
    links
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(':');
            let index = parts.next()?.trim().to_string();
            let k = parts.next()?.trim().strip_prefix("crlb")?.parse().ok()?;
            Some((k, index))
        })
        .collect()
}

/// Tears down every lab whose owning process is gone.
pub fn sweep_stale() {
    for (k, index) in lab_bridges() {
        let owner = std::fs::read_to_string(pid_file(k))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let stale = match owner {
            Some(pid) => !pid_alive(pid),
            // A lab being created (or torn down) has its bridge without a
            // pid file for a moment: stale only if the very same bridge
            // still has none a while later.
            None => {
                std::thread::sleep(Duration::from_millis(500));
                !pid_file(k).exists() && lab_bridges().contains(&(k, index))
            }
        };
        if stale {
            eprintln!("sweeping stale lab {k}");
            teardown(k);
        }
    }
}
