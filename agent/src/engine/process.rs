//! The engine's process as the supervisor watches it: a child the agent
//! started, or one a previous agent left running and this one adopted.

use std::time::Duration;

/// A running engine process: our child, or one adopted from a previous agent.
pub enum Process {
    Child(tokio::process::Child),
    Adopted(u32),
}

impl Process {
    pub fn pid(&self) -> u32 {
        match self {
            Process::Child(c) => c.id().unwrap_or(0),
            Process::Adopted(pid) => *pid,
        }
    }

    /// Resolves when the process has exited, with a description of how.
    pub(super) async fn exited(&mut self) -> String {
        match self {
            Process::Child(c) => match c.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => format!("could not be waited for: {e}"),
            },
            Process::Adopted(pid) => {
                let pid = *pid;
                while process_alive(pid) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                "exited (adopted process; exit status unknown)".into()
            }
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown");
            format!("was killed by signal {sig} ({name})")
        }
        _ => "exited".into(),
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn liveness_of_processes() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!process_alive(pid), "a zombie is not alive");
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
