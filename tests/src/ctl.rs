//! Running commands in a namespace and `corralctl` from the client namespace:
//! plain, JSON, operators, tokens and node state.

use super::*;

impl Lab {
    /// Runs a command in namespace `crlK-<ns>`.
    pub fn in_ns(&self, ns: &str, program: &str, args: &[&str]) -> Result<Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), program])
            .args(args)
            .output()?)
    }

    /// `corralctl` run in the client namespace with the lab's admin config.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        self.ctl_env(args, &[])
    }

    /// `corralctl` with extra environment (CORRAL_CERT, ...).
    pub fn ctl_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let config = self.pki_dir().join("corralctl.toml");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns("cli")])
            .arg(bin("corralctl"))
            .arg("--config")
            .arg(&config)
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(cmd.output()?)
    }

    /// `corralctl ARGS` writing into a pipe whose reader is already gone
    /// (`corralctl ... | head -0`); returns its exit status and stderr.
    pub fn ctl_into_closed_pipe(
        &self,
        args: &[&str],
    ) -> Result<(std::process::ExitStatus, String)> {
        let config = self.pki_dir().join("corralctl.toml");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns("cli")])
            .arg(bin("corralctl"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        let out = child.wait_with_output()?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `corralctl ARGS`, which must succeed; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        if !out.status.success() {
            bail!(
                "corralctl {} failed ({}):\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `corralctl --output json ARGS`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let text = self.ctl_ok(&full)?;
        serde_json::from_str(&text)
            .with_context(|| format!("corralctl {} printed invalid JSON: {text}", args.join(" ")))
    }

    /// Issues an operator certificate offline (`pki issue-operator`):
    /// returns the prefix of its `.crt` and `.key` files.
    pub fn issue_operator(&self, name: &str, role: &str) -> Result<PathBuf> {
        let prefix = self.dir.join(name);
        sh(
            &bin("corralctl").to_string_lossy(),
            &[
                "pki",
                "issue-operator",
                "--dir",
                &self.pki_dir().to_string_lossy(),
                "--name",
                name,
                "--role",
                role,
                "--out",
                &prefix.to_string_lossy(),
            ],
        )?;
        Ok(prefix)
    }

    /// A fresh join token.
    pub fn token(&self) -> Result<String> {
        Ok(self
            .ctl_ok(&["token", "create", "--ttl", "10m"])?
            .trim()
            .to_string())
    }

    /// Node `id` as `node list --output json` shows it.
    pub fn node(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let v = self.ctl_json(&["node", "list"])?;
        Ok(v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["id"] == id))
            .cloned())
    }

    pub fn wait_node_state(&self, id: &str, state: &str, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("node {id} to be {state}"), || {
            Ok(self.node(id)?.is_some_and(|n| n["state"] == state))
        })
    }
}
