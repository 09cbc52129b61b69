//! docs/ARCHITECTURE.md stays true: its operation kinds are the code's
//! (`model::KINDS`, in order, each with its file), its operator RPCs are
//! the proto's (each served by the service file it names), and every path
//! it names exists.

use corral_coordinator::model::KINDS;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The table rows (`| ... |`) of the section headed `heading`, as cells
/// with their backticks removed; the header and separator rows left out.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/ARCHITECTURE.md has no section {heading:?}"));
    let section = &doc[start + heading.len() + 2..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect()
}

/// The RPC names of `service NAME { ... }` in corral.proto, in order.
fn rpcs(proto: &str, service: &str) -> Vec<String> {
    let start = proto
        .find(&format!("service {service} {{"))
        .unwrap_or_else(|| panic!("corral.proto has no service {service}"));
    let body = &proto[start..];
    let body = &body[..body.find("\n}").unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l[..l.find('(').unwrap()].trim().to_string())
        .collect()
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn operation_kinds_are_the_codes() {
    let doc = read("docs/ARCHITECTURE.md");
    let rows = table(&doc, "## Operation kinds");
    let listed: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        listed, KINDS,
        "docs/ARCHITECTURE.md's operation kinds differ from model::KINDS: list each kind once, in the same order"
    );
    for row in &rows {
        let file = &row[1];
        assert_eq!(
            file,
            &format!("coordinator/src/ops/{}.rs", row[0]),
            "kind {} should live in its own file",
            row[0]
        );
        assert!(root().join(file).is_file(), "{file} does not exist");
    }
}

#[test]
fn operator_rpcs_are_the_protos() {
    let doc = read("docs/ARCHITECTURE.md");
    let proto = read("proto/proto/corral.proto");
    let rows = table(&doc, "## Operator API");
    let listed: Vec<String> = rows.iter().map(|r| r[0].clone()).collect();
    assert_eq!(
        listed,
        rpcs(&proto, "Operator"),
        "docs/ARCHITECTURE.md's operator RPCs differ from corral.proto's `service Operator`"
    );
    for row in &rows {
        let (rpc, file) = (&row[0], &row[1]);
        let source = read(file);
        let method = snake(rpc);
        assert!(
            source.contains(&format!("pub async fn {method}("))
                || source.contains(&format!("pub fn {method}(")),
            "{file} does not define Service::{method}, which serves {rpc}: fix the table or move the method"
        );
    }
}

/// The backticked spans of `doc` that name a path of the repository, with
/// `{a,b}` expanded (`agent/tests/{postgres,redis}_tls.rs`).
fn named_paths(doc: &str) -> Vec<String> {
    let tops = [
        "agent/",
        "coordinator/",
        "proto/",
        "tests/",
        "tools/",
        "scripts/",
        "docs/",
        "systemd/",
        "packaging/",
    ];
    let mut out = Vec::new();
    for (i, span) in doc.split('`').enumerate() {
        if i % 2 == 0 || span.contains(' ') || !tops.iter().any(|t| span.starts_with(t)) {
            continue;
        }
        let path = span.split([':', '#']).next().unwrap();
        match (path.find('{'), path.find('}')) {
            (Some(a), Some(b)) if a < b => {
                for alt in path[a + 1..b].split(',') {
                    out.push(format!("{}{alt}{}", &path[..a], &path[b + 1..]));
                }
            }
            _ => out.push(path.to_string()),
        }
    }
    out
}

#[test]
fn every_named_path_exists() {
    let doc = read("docs/ARCHITECTURE.md");
    let named = named_paths(&doc);
    assert!(
        named.len() > 40,
        "only {} paths found: is the parser broken?",
        named.len()
    );
    for path in named {
        assert!(
            root().join(&path).exists(),
            "docs/ARCHITECTURE.md names {path}, which does not exist"
        );
    }
}

/// The rest of the manual names files too; a move must update it.
#[test]
fn the_manual_names_only_existing_paths() {
    let mut pages = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") && name != "cli.md" {
            pages.push(format!("docs/{name}"));
        }
    }
    let mut stale = Vec::new();
    for page in &pages {
        for path in named_paths(&read(page)) {
            if !root().join(&path).exists() {
                stale.push(format!("{page}: {path}"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "the manual names paths that do not exist (moved? update the page):\n{}",
        stale.join("\n")
    );
}

#[test]
fn the_configuration_page_shows_the_example_file() {
    let page = read("docs/configuration.md");
    let example = read("packaging/coordinator.toml.example");
    let block = page
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("docs/configuration.md has no toml block");
    assert_eq!(
        block,
        example.trim_end(),
        "docs/configuration.md's example differs from packaging/coordinator.toml.example: copy the file into the page"
    );
}
