//! CPU time and memory of a process from /proc, for the benchmarks.

/// Clock ticks per second (USER_HZ; 100 on every Linux this runs on, but ask).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The numeric fields of /proc/PID/stat after the command name: index 0
/// is the state, 11 utime, 12 stime, 13 cutime, 14 cstime.
fn stat_fields(pid: i32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    let rest = stat.rsplit_once(')').expect("a stat line").1;
    rest.split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect()
}

/// utime + stime of `pid`, in ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let f = stat_fields(pid);
    f[11] + f[12]
}

/// utime + stime of `pid` and of the children it has waited for (the
/// `nft` runs of an agent), in ticks.
pub fn cpu_ticks_with_children(pid: i32) -> u64 {
    let f = stat_fields(pid);
    f[11] + f[12] + f[13] + f[14]
}

/// A `kB` field of /proc/PID/status (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
