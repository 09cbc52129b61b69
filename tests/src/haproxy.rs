//! HAProxy in the client namespace, routing to whichever node the agents'
//! health endpoints call primary: the way an application that cannot use a
//! multi-host connection string finds the primary after a failover.
//!
//! The configuration is the one `docs/haproxy.cfg` recommends for
//! production ([`render`] produces both, and a unit test keeps them the
//! same), so the failover tests exercise exactly what operators deploy:
//!
//! - `listen primary` (port 5000) sends every connection to the server whose
//!   agent answers `GET /primary` with 200: only a primary holding a valid
//!   lease does, so at most one server is up there, and none while a
//!   failover is deciding;
//! - `listen replicas` (port 5001) balances over servers answering
//!   `GET /replica` with 200 (streaming, within the lag limit);
//! - checks every 200 ms, down after 2 failures, up after 1 success, so a
//!   failover is seen within about half a second;
//! - `on-marked-down shutdown-sessions` ends the sessions of a server marked
//!   down: clients of a demoted primary get an error and reconnect to the
//!   new one instead of writing into a node that can no longer commit;
//! - client and server timeouts of 30 minutes, because database sessions
//!   are long-lived and mostly idle (HAProxy would otherwise cut them).

use crate::{stop_child, wait_until, Lab, HEALTH_PORT, ROOT};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Duration;

/// Where Debian's `haproxy` package installs the binary.
pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// Connections here reach the primary.
pub const PRIMARY_PORT: u16 = 5000;
/// Connections here reach a replica.
pub const REPLICAS_PORT: u16 = 5001;
/// The port PostgreSQL listens on in every VM.
pub const POSTGRES_PORT: u16 = 5432;

/// HAProxy's configuration for lab `k` with VMs `vms` as servers (named
/// `vmI`, as their node ids), listening on the client namespace's address.
/// Its stats socket is `haproxy.sock` in the lab directory (see
/// [`Lab::haproxy_servers`]).
pub fn config(k: u32, vms: &[usize], engine_port: u16) -> String {
    let servers: Vec<(String, String)> = vms
        .iter()
        .map(|i| (format!("vm{i}"), format!("10.231.{k}.{}", 10 + i)))
        .collect();
    render(
        &format!("10.231.{k}.100"),
        &servers,
        &format!("{ROOT}/lab-{k}/haproxy.sock"),
        engine_port,
    )
}

/// The configuration itself: listening on `bind` (an address, or `*` for
/// all), routing to `servers` (name, address) by their health endpoints on
/// [`HEALTH_PORT`], with an admin stats socket at `stats_socket`; the
/// servers' engines listen on `engine_port`.
pub fn render(
    bind: &str,
    servers: &[(String, String)],
    stats_socket: &str,
    engine_port: u16,
) -> String {
    let mut out = format!(
        "global
    stats socket {stats_socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 300ms
    retries 2
    option redispatch 1
    timeout client 30m
    timeout server 30m
    timeout check 500ms
    default-server inter 200ms downinter 100ms fall 2 rise 1 on-marked-down shutdown-sessions port {HEALTH_PORT}
"
    );
    for (name, port, path, balance) in [
        ("primary", PRIMARY_PORT, "/primary", None),
        ("replicas", REPLICAS_PORT, "/replica", Some("roundrobin")),
    ] {
        out.push_str(&format!("\nlisten {name}\n    bind {bind}:{port}\n"));
        if let Some(b) = balance {
            out.push_str(&format!("    balance {b}\n"));
        }
        out.push_str(&format!(
            "    option httpchk GET {path}\n    http-check expect status 200\n"
        ));
        for (server, addr) in servers {
            out.push_str(&format!("    server {server} {addr}:{engine_port} check\n"));
        }
    }
    out
}

/// One server line of HAProxy's `show stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    /// `primary` or `replicas`.
    pub proxy: String,
    /// `vmI`.
    pub server: String,
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/1` (coming up), `MAINT`...
    pub status: String,
    /// The last check's outcome: `L7OK`, `L7STS` (wrong status code),
    /// `L4CON` (refused), `L4TOUT`, ...; `INI` before the first check.
    pub check_status: String,
}

impl Lab {
    /// Writes `haproxy.cfg` in the lab directory for VMs `vms` and runs
    /// HAProxy in the foreground (`-db`) in the client namespace, logging to
    /// `haproxy.log` (server up/down transitions appear there, and in the
    /// failure report). Replaces a HAProxy this lab already runs. Returns
    /// the primary frontend's `host:port` once HAProxy listens on it and has
    /// checked every server once.
    pub fn start_haproxy(&mut self, vms: &[usize]) -> Result<String> {
        self.start_haproxy_port(vms, POSTGRES_PORT)
    }

    /// [`Lab::start_haproxy`] for engines listening on `engine_port`.
    pub fn start_haproxy_port(&mut self, vms: &[usize], engine_port: u16) -> Result<String> {
        self.stop_haproxy()?;
        let cfg = self.dir().join("haproxy.cfg");
        std::fs::write(&cfg, config(self.k, vms, engine_port))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let cfg = cfg.to_string_lossy().into_owned();
        // A configuration error is clearer from `-c` than from a child that
        // exits at once.
        let check = self.in_ns("cli", HAPROXY, &["-c", "-f", &cfg])?;
        if !check.status.success() {
            bail!(
                "haproxy -c -f {cfg} refused the configuration:\n{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let mut child = self.spawn_in(
            "cli",
            Path::new(HAPROXY),
            &["-db".to_string(), "-f".to_string(), cfg],
            "haproxy.log",
        )?;
        let addr = format!("10.231.{}.100:{PRIMARY_PORT}", self.k);
        let listening = wait_until(
            Duration::from_secs(10),
            &format!("haproxy to listen on {addr}"),
            || {
                if let Some(status) = child.try_wait()? {
                    let log =
                        std::fs::read_to_string(self.dir().join("haproxy.log")).unwrap_or_default();
                    bail!("haproxy exited ({status}):\n{log}");
                }
                let ss = self.in_ns("cli", "ss", &["-Hltn"])?;
                Ok(String::from_utf8_lossy(&ss.stdout).contains(&addr))
            },
        );
        // Tracked even if it failed to listen, so Drop kills it.
        self.haproxy = Some(child);
        listening?;
        // HAProxy 2.6 counts a server up until its first check (it has no
        // `init-state`): a client connecting in that window could land on a
        // replica. Return only once every server has been checked.
        wait_until(
            Duration::from_secs(10),
            "haproxy to check every server once",
            || {
                let servers = self.haproxy_servers()?;
                Ok(!servers.is_empty() && servers.iter().all(|s| s.check_status != "INI"))
            },
        )?;
        Ok(addr)
    }

    /// Stops this lab's HAProxy (SIGTERM, then SIGKILL after 10 s), if any.
    pub fn stop_haproxy(&mut self) -> Result<()> {
        if let Some(mut c) = self.haproxy.take() {
            stop_child(&mut c)?;
        }
        Ok(())
    }

    /// A connection string through HAProxy's primary frontend, with the
    /// credentials of `corralctl --output json cluster credentials`.
    pub fn haproxy_uri(&self, creds: &serde_json::Value) -> String {
        self.haproxy_uri_port(creds, PRIMARY_PORT)
    }

    /// A connection string through HAProxy's replicas frontend.
    pub fn haproxy_replicas_uri(&self, creds: &serde_json::Value) -> String {
        self.haproxy_uri_port(creds, REPLICAS_PORT)
    }

    fn haproxy_uri_port(&self, creds: &serde_json::Value, port: u16) -> String {
        format!(
            "{}://{}:{}@10.231.{}.100:{port}/{}",
            crate::uri_scheme(creds),
            creds["user"].as_str().unwrap_or_default(),
            creds["password"].as_str().unwrap_or_default(),
            self.k,
            creds["database"].as_str().unwrap_or_default()
        )
    }

    /// Every server's status as HAProxy sees it, from `show stat` on its
    /// stats socket: what a test waits on to know HAProxy noticed a
    /// failover (for example `primary`/`vm2` going `UP`).
    pub fn haproxy_servers(&self) -> Result<Vec<ServerStatus>> {
        use std::io::{Read, Write};
        let path = self.dir().join("haproxy.sock");
        let mut sock = std::os::unix::net::UnixStream::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.write_all(b"show stat\n")?;
        let mut csv = String::new();
        sock.read_to_string(&mut csv)?;
        parse_show_stat(&csv)
    }

    /// The status of `server` in `proxy` (`"primary"` or `"replicas"`).
    pub fn haproxy_server_status(&self, proxy: &str, server: &str) -> Result<String> {
        self.haproxy_servers()?
            .into_iter()
            .find(|s| s.proxy == proxy && s.server == server)
            .map(|s| s.status)
            .with_context(|| format!("haproxy has no server {proxy}/{server}"))
    }
}

/// Server rows of `show stat` CSV (the `# pxname,svname,...` header names
/// the columns; FRONTEND and BACKEND rows are aggregates, left out).
fn parse_show_stat(csv: &str) -> Result<Vec<ServerStatus>> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .with_context(|| format!("show stat printed no header: {csv:?}"))?;
    let column = |name: &str| {
        header
            .split(',')
            .position(|c| c == name)
            .with_context(|| format!("show stat has no {name} column"))
    };
    let (px, sv, st) = (column("pxname")?, column("svname")?, column("status")?);
    let chk = column("check_status")?;
    Ok(lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > st.max(chk) && !matches!(f[sv], "FRONTEND" | "BACKEND"))
        .map(|f| ServerStatus {
            proxy: f[px].to_string(),
            server: f[sv].to_string(),
            status: f[st].to_string(),
            // "* " marks a check in progress.
            check_status: f[chk].trim_start_matches("* ").to_string(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration lines of a file: comments and blank lines dropped,
    /// whitespace normalised.
    fn directives(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| l.split('#').next().unwrap_or_default())
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// docs/haproxy.cfg is what the tests run, with production addresses:
    /// if one changes, so must the other.
    #[test]
    fn docs_example_is_the_tested_configuration() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/haproxy.cfg");
        let docs = std::fs::read_to_string(&path).unwrap();
        let servers: Vec<(String, String)> = (1..=3)
            .map(|i| (format!("db-{i}"), format!("10.0.0.{}", 10 + i)))
            .collect();
        let tested = render("*", &servers, "/run/haproxy/admin.sock", POSTGRES_PORT);
        assert_eq!(directives(&docs), directives(&tested), "{}", path.display());
    }

    #[test]
    fn lab_config_routes_to_the_named_vms() {
        let c = config(7, &[1, 3], POSTGRES_PORT);
        assert!(c.contains("bind 10.231.7.100:5000"), "{c}");
        assert!(c.contains("bind 10.231.7.100:5001"), "{c}");
        assert!(c.contains("server vm1 10.231.7.11:5432 check"), "{c}");
        assert!(c.contains("server vm3 10.231.7.13:5432 check"), "{c}");
        assert!(!c.contains("vm2"), "{c}");
        assert!(c.contains("stats socket /tmp/corral-tests/lab-7/haproxy.sock"));
    }

    #[test]
    fn show_stat_server_rows() {
        let csv = "# pxname,svname,qcur,status,weight,check_status\n\
                   primary,FRONTEND,,OPEN,,\n\
                   primary,vm1,0,UP,1,L7OK\n\
                   primary,vm2,0,DOWN,1,* L7STS\n\
                   replicas,vm1,0,UP 1/2,1,INI\n\
                   primary,BACKEND,0,UP,1,\n\n";
        let rows = parse_show_stat(csv).unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (
                    r.proxy.as_str(),
                    r.server.as_str(),
                    r.status.as_str(),
                    r.check_status.as_str()
                ))
                .collect::<Vec<_>>(),
            [
                ("primary", "vm1", "UP", "L7OK"),
                ("primary", "vm2", "DOWN", "L7STS"),
                ("replicas", "vm1", "UP 1/2", "INI")
            ]
        );
    }
}
