//! What every agent test harness needs: scratch directories named
//! `<prefix><pid>-...`, swept once the run
//! that made them is gone, and free local ports.

use std::path::Path;

/// Removes the directories of `parent` named `<prefix><pid>-...` whose
/// process is gone (not this one), after `clean` has stopped what ran from
/// them.
pub fn sweep_stale(parent: &Path, prefix: &str, clean: impl Fn(&Path)) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            clean(&e.path());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A port nothing listens on now on 127.0.0.1.
#[allow(dead_code)] // not every harness asks for one
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
