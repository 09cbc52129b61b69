//! The README's five-minute tour, run line by line against a lab set up as
//! `make demo` sets up its cluster (PostgreSQL `demo` on vm1..vm3, sync,
//! a table `hello`). Three things differ from the demo and are substituted:
//! the path of `corralctl.toml`, the binaries' directory and the
//! namespaces' prefix (`cdemo-` is the lab's `crlK-`). Every line must
//! succeed, and what the tour's comments promise is checked after the line
//! that promises it.

use corral_tests::{bin, wait_until, Lab};
use std::process::Command;
use std::time::Duration;

const MARKER: &str = "<!-- tour: tests/tests/readme_tour.rs runs this block against a lab -->";

/// The tour's command lines: the `sh` block after the marker, without
/// blank lines and comment-only lines.
fn tour() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let after = &readme[readme.find(MARKER).expect("README.md has no tour marker")..];
    let block = &after[after.find("```sh\n").expect("no sh block after the marker") + 6..];
    let block = &block[..block.find("\n```").expect("unterminated tour block")];
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Runs one tour line in bash in the lab's client namespace, with
/// `corralctl` the built binary; returns stdout, or fails with stderr.
fn run(lab: &Lab, line: &str) -> String {
    let config = lab.pki_dir().join("corralctl.toml");
    let bin_dir = bin("corralctl")
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let line = line
        .replace("cdemo-", &lab.ns(""))
        .replace(
            "/tmp/corral-demo/pki/corralctl.toml",
            &config.to_string_lossy(),
        )
        .replace("$PWD/target/debug", &bin_dir);
    let script = format!(
        "set -eo pipefail\ncorralctl() {{ {} \"$@\"; }}\n{line}\n",
        bin("corralctl").display()
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("cli"), "bash", "-c", &script])
        .env("CORRAL_CONFIG", &config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the README's tour line `{line}` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn primary(lab: &Lab) -> String {
    lab.wait_until_primary("demo", Duration::from_secs(30))
        .unwrap()
}

#[test]
fn the_readme_tour_runs_as_written() {
    let lines = tour();
    assert!(lines.len() >= 10, "the tour has only {} lines", lines.len());
    let lab = Lab::start(3).unwrap();
    // What `make demo` does before the tour (scripts/demo.sh).
    lab.ctl_ok(&[
        "cluster",
        "create",
        "--name",
        "demo",
        "--engine",
        "postgres",
        "--mode",
        "primary-replica",
        "--nodes",
        "vm1,vm2,vm3",
        "--sync",
    ])
    .unwrap();
    let uri = lab.ctl_ok(&["cluster", "credentials", "demo"]).unwrap();
    lab.psql(
        uri.trim(),
        "CREATE TABLE hello (id serial PRIMARY KEY, said text); \
         INSERT INTO hello (said) VALUES ('hello from make demo')",
    )
    .unwrap();

    let mut killed = false;
    for line in &lines {
        let out = run(&lab, line);
        if line.contains("SELECT * FROM hello") {
            assert!(out.contains("hello from make demo"), "{out}");
        }
        if line.contains("node promote demo vm2") {
            assert_eq!(
                primary(&lab),
                "vm2",
                "the switchover did not make vm2 primary"
            );
        }
        if line.starts_with("corralctl backup list demo") {
            assert!(
                out.contains("succeeded"),
                "no succeeded backup listed:\n{out}"
            );
        }
        if line.starts_with("kill -9") {
            killed = true;
            // The tour sleeps; the test waits for the outcome it promises.
            wait_until(
                Duration::from_secs(60),
                "another node to be primary",
                || Ok(primary(&lab) != "vm2"),
            )
            .unwrap();
        }
        if line.contains("after the failover") {
            let rows = lab
                .psql(uri.trim(), "SELECT said FROM hello ORDER BY id")
                .unwrap();
            assert_eq!(rows, "hello from make demo\nafter the failover");
        }
        if line.starts_with("corralctl event list --cluster demo") {
            assert!(out.contains("failover"), "no failover event:\n{out}");
        }
    }
    assert!(killed, "the tour no longer loses the primary's VM");
}
