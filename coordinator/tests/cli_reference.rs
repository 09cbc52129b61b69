//! docs/cli.md is corralctl's reference, generated from its clap
//! definitions: this test fails when the two differ. After changing a
//! command, rewrite the page with
//! `CORRAL_BLESS=1 cargo test -p corral-coordinator --test cli_reference`.

use clap::CommandFactory;
use corral_coordinator::cli::Cli;
use std::path::Path;

/// Every command's long help, depth first, as one markdown page.
fn reference() -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let mut page = String::from(
        "# corralctl reference\n\n\
         Generated from corralctl's own definitions by `coordinator/tests/cli_reference.rs`\n\
         (`CORRAL_BLESS=1 cargo test -p corral-coordinator --test cli_reference` rewrites\n\
         it); `corralctl COMMAND --help` prints the same. The guide to using them is\n\
         [operating.md](operating.md).\n",
    );
    walk(&mut cmd, "corralctl", &mut page);
    page
}

fn walk(cmd: &mut clap::Command, path: &str, page: &mut String) {
    // The page must not depend on the environment it was generated in.
    *cmd = std::mem::take(cmd).mut_args(|a| a.hide_env_values(true));
    let help = cmd.render_long_help().to_string();
    let help: Vec<&str> = help.lines().map(str::trim_end).collect();
    page.push_str(&format!(
        "\n## {path}\n\n```text\n{}\n```\n",
        help.join("\n")
    ));
    for sub in cmd.get_subcommands_mut() {
        if sub.get_name() == "help" {
            continue;
        }
        let name = format!("{path} {}", sub.get_name());
        walk(sub, &name, page);
    }
}

#[test]
fn docs_cli_md_is_the_clap_reference() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
    let want = reference();
    if std::env::var_os("CORRAL_BLESS").is_some() {
        std::fs::write(&file, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        have == want,
        "docs/cli.md differs from corralctl's definitions: rewrite it with \
         CORRAL_BLESS=1 cargo test -p corral-coordinator --test cli_reference"
    );
}

#[test]
fn every_command_is_in_the_reference() {
    let page = reference();
    for command in [
        "## corralctl cluster create",
        "## corralctl cluster allowlist set",
        "## corralctl node promote",
        "## corralctl backup restore",
        "## corralctl pki init",
        "## corralctl logs",
    ] {
        assert!(page.contains(&format!("{command}\n")), "{command} missing");
    }
    assert!(
        page.matches("\n## corralctl").count() > 45,
        "fewer commands than corralctl has"
    );
}
