//! A real S3-compatible server for backup tests: s3s-fs (installed by
//! scripts/install-deps.sh), which checks SigV4 signatures and stores each
//! object as a file, so a test can damage one byte of a stored backup.

use anyhow::{Context, Result};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const ACCESS_KEY: &str = "corral-test-key";
pub const SECRET_KEY: &str = "corral-test-secret-0123456789";
pub const BUCKET: &str = "corral-backups";

pub struct S3Server {
    pub endpoint: String,
    /// The directory holding the buckets.
    pub root: PathBuf,
    child: Child,
}

fn program() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cargo_bin = Path::new(&home).join(".cargo/bin/s3s-fs");
    if cargo_bin.exists() {
        cargo_bin
    } else {
        PathBuf::from("s3s-fs")
    }
}

impl S3Server {
    /// Starts it on `ip` (the lab's host address, which every VM reaches)
    /// with the bucket [`BUCKET`] created.
    pub fn start(ip: &str, dir: &Path) -> Result<S3Server> {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join(BUCKET))?;
        let port = TcpListener::bind((ip, 0))?.local_addr()?.port();
        let child = Command::new(program())
            .args(["--host", ip, "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("s3s-fs.log"))?)
            .spawn()
            .context("starting s3s-fs (scripts/install-deps.sh installs it)")?;
        let server = S3Server {
            endpoint: format!("http://{ip}:{port}"),
            root,
            child,
        };
        crate::wait_until(Duration::from_secs(15), "s3s-fs to listen", || {
            Ok(TcpStream::connect((ip, port)).is_ok())
        })?;
        Ok(server)
    }

    /// A `[backup.targets.NAME]` section for the coordinator's config.
    pub fn target_toml(&self, name: &str) -> String {
        format!(
            "[backup.targets.{name}]\nkind = \"s3\"\nendpoint = \"{}\"\nallow_http = true\n\
             bucket = \"{BUCKET}\"\nprefix = \"lab\"\naccess_key_id = \"{ACCESS_KEY}\"\n\
             secret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint
        )
    }

    /// Where s3s-fs keeps object `name` (under the target's prefix).
    pub fn object_file(&self, name: &str) -> PathBuf {
        self.root.join(BUCKET).join("lab").join(name)
    }

    /// Every stored object under the target's prefix, relative names.
    pub fn objects(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else if let Ok(rel) = p.strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let base = self.root.join(BUCKET).join("lab");
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out.sort();
        out
    }
}

/// A lab of `vms` VMs whose coordinator knows the S3 server as target
/// `s3` (and any `extra` configuration).
pub fn lab_with_s3(vms: usize, extra: &str) -> (crate::Lab, S3Server) {
    let mut lab = crate::Lab::start_with(crate::LabOptions {
        vms,
        ..Default::default()
    })
    .unwrap();
    let s3 = S3Server::start(&lab.host_ip(), lab.dir()).unwrap();
    lab.opts.coordinator_config = Some(format!("{}\n{extra}", s3.target_toml("s3")));
    lab.stop_coordinator().unwrap();
    lab.start_coordinator().unwrap();
    for i in 1..=vms {
        lab.wait_node_state(&format!("vm{i}"), "up", Duration::from_secs(20))
            .unwrap();
    }
    (lab, s3)
}

/// Gives PostgreSQL cluster `cluster` a schedule to `target` (which makes
/// it archive its WAL there, and takes no backup before next year) and
/// waits until its nodes are configured for it.
pub fn archive_wal(lab: &crate::Lab, cluster: &str, target: &str) {
    lab.ctl_ok(&[
        "backup",
        "schedule",
        cluster,
        "--cron",
        "0 0 1 1 *",
        "--retain",
        "7",
        "--target",
        target,
    ])
    .unwrap();
    crate::wait_until(
        Duration::from_secs(60),
        "WAL archiving to be configured",
        || Ok(lab.operation(cluster, "configure_backups")?["state"] == "succeeded"),
    )
    .unwrap();
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
