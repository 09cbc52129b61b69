//! The lab's processes: starting, stopping, killing and signalling the
//! coordinator and the agents in their namespaces.

use super::*;

impl Lab {
    pub fn start_coordinator(&mut self) -> Result<()> {
        self.start_coordinator_env(&[])
    }

    /// Starts the coordinator with extra environment (e.g. the test-only
    /// `CORRAL_FAILPOINTS`).
    pub fn start_coordinator_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        if let Some(config) = &self.opts.coordinator_config {
            std::fs::write(self.dir.join("coordinator.toml"), config)?;
        }
        let args = [
            "--state-dir".to_string(),
            self.dir.join("coordinator").to_string_lossy().into_owned(),
            "--pki-dir".into(),
            self.pki_dir().to_string_lossy().into_owned(),
            "--listen".into(),
            self.ctl_addr(),
            "--http-listen".into(),
            format!("0.0.0.0:{COORDINATOR_HTTP_PORT}"),
        ]
        .into_iter()
        .chain(
            self.opts
                .coordinator_config
                .as_ref()
                .map(|_| {
                    [
                        "--config".to_string(),
                        self.dir
                            .join("coordinator.toml")
                            .to_string_lossy()
                            .into_owned(),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .collect::<Vec<_>>();
        self.coordinator = Some(self.spawn_in_env(
            "ctl",
            &bin("corral-coordinator"),
            &args,
            "coordinator.log",
            env,
        )?);
        wait_until(
            Duration::from_secs(20),
            "the coordinator to answer `corralctl whoami`",
            || {
                if let Some(c) = self.coordinator.as_mut() {
                    if let Some(status) = c.try_wait()? {
                        bail!("the coordinator exited: {status}");
                    }
                }
                Ok(self.ctl(&["whoami"])?.status.success())
            },
        )
    }

    /// Kills the coordinator with SIGKILL (a crash) and waits for it.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the coordinator with SIGTERM and waits for it.
    pub fn stop_coordinator(&mut self) -> Result<()> {
        if let Some(mut c) = self.coordinator.take() {
            stop_child(&mut c)?;
        }
        Ok(())
    }

    /// Starts agent `i` (node id `vmI`), enrolling with `token` if given
    /// (from a file, as docs/operating.md says to: not on the command line).
    pub fn start_agent(&mut self, i: usize, token: Option<&str>) -> Result<()> {
        let mut extra = Vec::new();
        if let Some(t) = token {
            let file = self.dir.join(format!("vm{i}.join"));
            std::fs::write(&file, t)?;
            extra.push("--join-file".to_string());
            extra.push(file.to_string_lossy().into_owned());
        }
        extra.push("--node-id".into());
        extra.push(format!("vm{i}"));
        let child = self.spawn_agent(i, &extra)?;
        self.agents[i - 1] = Some(child);
        Ok(())
    }

    /// Spawns an agent in VM `i` with `extra` arguments, not tracked as the
    /// VM's agent: for tests that expect it to exit.
    pub fn spawn_agent(&self, i: usize, extra: &[String]) -> Result<Child> {
        self.spawn_agent_env(i, extra, &[])
    }

    /// Starts the agent of enrolled VM `i` again, with extra environment
    /// (e.g. systemd's NOTIFY_SOCKET and WATCHDOG_USEC).
    pub fn start_agent_env(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let extra = ["--node-id".to_string(), format!("vm{i}")];
        let child = self.spawn_agent_env(i, &extra, env)?;
        self.agents[i - 1] = Some(child);
        Ok(())
    }

    fn spawn_agent_env(&self, i: usize, extra: &[String], env: &[(&str, &str)]) -> Result<Child> {
        let mut args = vec![
            "--state-dir".to_string(),
            self.state_dir(i).to_string_lossy().into_owned(),
            "--coordinator".into(),
            self.ctl_addr(),
            "--listen".into(),
            self.vm_addr(i),
            "--heartbeat-interval-ms".into(),
            self.opts.heartbeat_interval_ms.to_string(),
        ];
        args.extend(extra.iter().cloned());
        self.spawn_in_env(
            &format!("vm{i}"),
            &bin("corral-agent"),
            &args,
            &format!("vm{i}-agent.log"),
            env,
        )
    }

    /// Runs an agent in VM `i` that is expected to exit (a refused
    /// enrollment); returns its exit status and stderr.
    pub fn run_agent_to_exit(
        &self,
        i: usize,
        extra: &[&str],
        state_dir: &Path,
    ) -> Result<(Option<i32>, String)> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(&format!("vm{i}"))])
            .arg(bin("corral-agent"))
            .args([
                "--state-dir",
                &state_dir.to_string_lossy(),
                "--coordinator",
                &self.ctl_addr(),
                "--listen",
                &self.vm_addr(i),
            ]);
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                let out = child.wait_with_output()?;
                return Ok((
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ));
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "the agent kept running; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.agents[i - 1].take() {
            stop_child(&mut c)?;
        }
        Ok(())
    }

    /// Kills every process in VM `i` (agent and engine) with SIGKILL, like a
    /// VM losing power.
    pub fn kill_vm(&mut self, i: usize) {
        kill_ns_processes(&self.ns(&format!("vm{i}")));
        if let Some(mut c) = self.agents[i - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`) to VM `i`'s agent
    /// alone: the engine it supervises keeps running. After `TERM` or
    /// `KILL` this waits for the agent to be gone ([`Lab::restart_vm`]
    /// starts it again, as systemd would); after `STOP` it is frozen until
    /// `CONT`.
    pub fn signal_agent(&mut self, i: usize, signal: &str) -> Result<()> {
        let c = self.agents[i - 1]
            .as_mut()
            .ok_or_else(|| anyhow!("vm{i} runs no agent"))?;
        sh("kill", &[&format!("-{signal}"), &c.id().to_string()])?;
        if matches!(signal, "TERM" | "KILL") {
            let began = Instant::now();
            while c.try_wait()?.is_none() {
                if began.elapsed() > Duration::from_secs(20) {
                    bail!("vm{i}'s agent did not exit within 20 s of SIG{signal}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Starts agent `i` again after [`Lab::kill_vm`] (or
    /// [`Lab::stop_agent`]), like a VM booting: no token, since its node
    /// certificate is still in its state directory. Does not wait for the
    /// node to be up: after a failover the test usually wants to watch what
    /// the returning node does first ([`Lab::wait_node_state`] waits).
    pub fn restart_vm(&mut self, i: usize) -> Result<()> {
        if let Some(c) = self.agents[i - 1].as_mut() {
            if c.try_wait()?.is_none() {
                bail!("agent {i} is still running: kill_vm({i}) or stop_agent({i}) first");
            }
        }
        self.start_agent(i, None)
    }

    /// Pids of processes named `comm` running in VM `i`.
    pub fn pids_in_vm(&self, i: usize, comm: &str) -> Vec<i32> {
        let pids = sh("ip", &["netns", "pids", &self.ns(&format!("vm{i}"))]).unwrap_or_default();
        pids.split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
            })
            .collect()
    }
}
