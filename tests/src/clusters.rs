//! Clusters in a lab: creating them, connection strings, psql, roles, health,
//! metrics, replication and operations.

use super::*;

impl Lab {
    /// `psql` from the client namespace; returns unaligned, tuples-only output.
    pub fn psql(&self, uri: &str, sql: &str) -> Result<String> {
        let out = self.in_ns(
            "cli",
            "psql",
            &["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", uri, "-c", sql],
        )?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `mariadb` from the client namespace to VM `vm` as the cluster's
    /// admin user (`creds`: `cluster credentials --output json`); the rows,
    /// tab-separated.
    pub fn mariadb(&self, creds: &serde_json::Value, vm: usize, sql: &str) -> Result<String> {
        let out = self.in_ns(
            "cli",
            "mariadb",
            &[
                "--batch",
                "--skip-column-names",
                "--connect-timeout=3",
                "-h",
                &self.vm_ip(vm),
                "-P",
                "3306",
                "-u",
                creds["user"].as_str().unwrap_or_default(),
                &format!("-p{}", creds["password"].as_str().unwrap_or_default()),
                creds["database"].as_str().unwrap_or_default(),
                "-e",
                sql,
            ],
        )?;
        if !out.status.success() {
            bail!(
                "mariadb on vm{vm}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `redis-cli ARGS` from the client namespace to VM `vm` as the
    /// cluster's admin user; its output, trimmed. redis-cli exits 0 on a
    /// server error, so an answer starting with an error code is an error.
    pub fn redis_cli(&self, creds: &serde_json::Value, vm: usize, args: &[&str]) -> Result<String> {
        let host = self.vm_ip(vm);
        let mut all = vec![
            "-h",
            &host,
            "-p",
            "6379",
            "--user",
            creds["user"].as_str().unwrap_or_default(),
            "--pass",
            creds["password"].as_str().unwrap_or_default(),
            "--no-auth-warning",
        ];
        all.extend_from_slice(args);
        let out = self.in_ns("cli", "redis-cli", &all)?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || text.starts_with("READONLY") || text.starts_with("ERR") {
            bail!(
                "redis-cli on vm{vm}: {text} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(text)
    }

    /// The connection URI of `cluster` (`corralctl cluster credentials`).
    pub fn uri(&self, cluster: &str) -> Result<String> {
        Ok(self
            .ctl_ok(&["cluster", "credentials", cluster])?
            .trim()
            .to_string())
    }

    /// Creates a PostgreSQL primary/replica cluster on `nodes` ("vm1,vm2",
    /// the first is the primary) with extra `cluster create` flags, waits
    /// for it, and returns `cluster credentials --output json`.
    pub fn create_replicated(
        &self,
        name: &str,
        nodes: &str,
        extra: &[&str],
    ) -> Result<serde_json::Value> {
        self.create_engine_cluster(name, "postgres", nodes, extra)
    }

    /// [`Lab::create_replicated`] for any engine.
    pub fn create_engine_cluster(
        &self,
        name: &str,
        engine: &str,
        nodes: &str,
        extra: &[&str],
    ) -> Result<serde_json::Value> {
        let mut args = vec![
            "cluster",
            "create",
            "--name",
            name,
            "--engine",
            engine,
            "--mode",
            "primary-replica",
            "--nodes",
            nodes,
        ];
        args.extend_from_slice(extra);
        self.ctl_ok(&args)?;
        self.ctl_json(&["cluster", "credentials", name])
    }

    /// A connection string for node `i` alone, with the credentials of
    /// `corralctl --output json cluster credentials`.
    /// The cluster's engine decides the scheme and port (from its own
    /// URI and port).
    pub fn node_uri(&self, creds: &serde_json::Value, i: usize) -> String {
        format!(
            "{}://{}:{}@{}:{}/{}",
            uri_scheme(creds),
            creds["user"].as_str().unwrap_or_default(),
            creds["password"].as_str().unwrap_or_default(),
            self.vm_ip(i),
            creds["port"].as_u64().unwrap_or(5432),
            creds["database"].as_str().unwrap_or_default()
        )
    }

    /// Node `node` of `cluster` as `cluster show --output json` shows it.
    pub fn cluster_node(&self, cluster: &str, node: &str) -> Result<serde_json::Value> {
        let c = self.ctl_json(&["cluster", "show", cluster])?;
        c["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["id"] == node))
            .cloned()
            .ok_or_else(|| anyhow!("{node} is not in {c}"))
    }

    /// Waits until `cluster show` names exactly one node of `cluster` with
    /// role `primary`, and returns its id. "Exactly one" because during a
    /// failover the store may briefly hold none, and must never hold two.
    pub fn wait_until_primary(&self, cluster: &str, timeout: Duration) -> Result<String> {
        let mut primary = String::new();
        wait_until(timeout, &format!("{cluster} to have one primary"), || {
            let c = self.ctl_json(&["cluster", "show", cluster])?;
            let primaries: Vec<&str> = c["nodes"]
                .as_array()
                .map(|ns| {
                    ns.iter()
                        .filter(|n| n["role"] == "primary")
                        .filter_map(|n| n["id"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            match primaries[..] {
                [one] => {
                    primary = one.to_string();
                    Ok(true)
                }
                _ => bail!("primaries: {primaries:?}"),
            }
        })?;
        Ok(primary)
    }

    /// `GET /<path>` on VM `i`'s health port, from the test process (the
    /// host reaches every VM): the status code, as HAProxy would see it.
    /// An error means no answer within 1 s (refused, cut off, hung), which
    /// HAProxy counts as a failed check too.
    pub fn health(&self, i: usize, path: &str) -> Result<u16> {
        http_status(
            &format!("{}:{HEALTH_PORT}", self.vm_ip(i)),
            path,
            Duration::from_secs(1),
        )
    }

    /// The coordinator's `/metrics` text, fetched from the test process.
    pub fn coordinator_metrics(&self) -> Result<String> {
        let addr = format!("10.231.{}.1:{COORDINATOR_HTTP_PORT}", self.k);
        http_get(&addr, "/metrics", Duration::from_secs(5))
    }

    /// Agent `i`'s `/metrics` text.
    pub fn agent_metrics(&self, i: usize) -> Result<String> {
        http_get(
            &format!("{}:{HEALTH_PORT}", self.vm_ip(i)),
            "/metrics",
            Duration::from_secs(5),
        )
    }

    /// Waits until the primary reports `node` of `cluster` streaming (or a
    /// sync standby) and less than 16 MiB behind: eligible for promotion.
    pub fn wait_streaming(&self, cluster: &str, node: &str) -> Result<()> {
        wait_until(
            Duration::from_secs(30),
            &format!("{node} to stream"),
            || {
                let n = self.cluster_node(cluster, node)?;
                let lag = n["lag_bytes"].as_i64().unwrap_or(-1);
                Ok(
                    matches!(n["replication"].as_str(), Some("streaming" | "sync"))
                        && (0..16 << 20).contains(&lag),
                )
            },
        )
    }

    /// Every row of `query` (one column) on node `i`.
    pub fn column_on(
        &self,
        creds: &serde_json::Value,
        i: usize,
        query: &str,
    ) -> Result<Vec<String>> {
        Ok(self
            .psql(&self.node_uri(creds, i), query)?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// The operation of `kind` on `cluster` (the latest), as JSON.
    pub fn operation(&self, cluster: &str, kind: &str) -> Result<serde_json::Value> {
        let ops = self.ctl_json(&["operation", "list", "--cluster", cluster])?;
        ops["operations"]
            .as_array()
            .and_then(|a| a.iter().rev().find(|o| o["kind"] == kind))
            .cloned()
            .ok_or_else(|| anyhow!("no {kind} operation on {cluster}: {ops}"))
    }

    /// The messages of an operation's log.
    pub fn operation_log(op: &serde_json::Value) -> Vec<String> {
        op["log"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["message"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}
