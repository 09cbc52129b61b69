//! `check-structure`: the shape rules of the Corral tree, checked on every
//! `make test` (docs/ARCHITECTURE.md, "Shape").
//!
//! - no import cycle between the files of a crate ([`cycles`] says what
//!   counts as an edge);
//! - no `.rs` file over 800 lines, tests included;
//! - no function over 120 lines outside test code ([`lengths`]);
//! - no protocol crate in the coordinator's service layer ([`FORBIDDEN`]).
//!
//! `check-structure [--report] [ROOT]`: ROOT is the repository (default: the
//! current directory). `--report` also prints the figures the architecture
//! notes quote: file counts, the longest files and functions.
//!
//! `tools/structure/debt.txt` lists the violations that are known and being
//! paid off (`file PATH`, `fn PATH NAME`, `cycle CRATE-ROOT`): they are
//! printed, not failed. A new violation fails, and so does an entry that no
//! longer matches anything (delete it: the list only shrinks).

mod cycles;
mod lengths;
mod modules;

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 120;

/// Folders that must not name a crate: the service layer holds the rules
/// every API shares, so no protocol crate may appear in it.
const FORBIDDEN: &[(&str, &str)] = &[("coordinator/src/service/", "tonic")];

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("check-structure: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut report = false;
    let mut root = PathBuf::from(".");
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--report" => report = true,
            "-h" | "--help" => {
                println!("usage: check-structure [--report] [ROOT]");
                return Ok(true);
            }
            _ => root = PathBuf::from(arg),
        }
    }
    let files = rust_files(&root)?;
    let debt = read_debt(&root)?;
    let mut problems: Vec<(String, String)> = Vec::new();
    let mut sizes = Vec::new();
    let mut fns = Vec::new();
    for rel in &files {
        let text = std::fs::read_to_string(root.join(rel))
            .with_context(|| format!("read {}", rel.display()))?;
        let lines = text.lines().count();
        sizes.push((lines, rel.clone()));
        if lines > MAX_FILE_LINES {
            problems.push((
                format!("file {}", rel.display()),
                format!(
                    "{}: {lines} lines (at most {MAX_FILE_LINES}): split it by concern",
                    rel.display()
                ),
            ));
        }
        for (dir, name) in FORBIDDEN {
            if rel.starts_with(dir) && names_crate(&text, name) {
                problems.push((
                    format!("crate {} {name}", rel.display()),
                    format!(
                        "{}: names `{name}`, which {dir} must not: the adapter in \
                         coordinator/src/api/ does the protocol",
                        rel.display()
                    ),
                ));
            }
        }
        if is_test_path(rel) {
            continue;
        }
        let ast = syn::parse_file(&text).with_context(|| format!("parse {}", rel.display()))?;
        for f in lengths::functions(&ast) {
            if f.lines > MAX_FN_LINES {
                problems.push((
                    format!("fn {} {}", rel.display(), f.name),
                    format!(
                        "{}:{}: fn {} is {} lines (at most {MAX_FN_LINES}): split it into named steps",
                        rel.display(),
                        f.line,
                        f.name,
                        f.lines
                    ),
                ));
            }
            fns.push((f.lines, format!("{}:{} {}", rel.display(), f.line, f.name)));
        }
    }
    let mut cycle_count = 0;
    for crate_root in files.iter().filter(|f| is_crate_root(f)) {
        let krate = modules::Crate::read(&root.join(crate_root))?;
        let graph = cycles::edges(&krate);
        for component in cycles::cycles(&graph) {
            cycle_count += 1;
            let name = |i: usize| relative(&root, &krate.files[i].path);
            let walk: Vec<String> = cycles::witness(&graph, &component)
                .into_iter()
                .map(|(f, line)| format!("{}:{line}", name(f)))
                .collect();
            problems.push((
                format!("cycle {}", crate_root.display()),
                format!(
                    "import cycle among {} files ({}): {} -> back to the first. Move what both \
                     sides need into a module below them both",
                    component.len(),
                    component
                        .iter()
                        .map(|&i| name(i))
                        .collect::<Vec<_>>()
                        .join(", "),
                    walk.join(" -> ")
                ),
            ));
        }
    }
    if report {
        print_report(&files, &mut sizes, &mut fns, cycle_count);
    }
    let (known, new): (Vec<_>, Vec<_>) = problems.iter().partition(|(key, _)| debt.contains(key));
    for (_, p) in &known {
        println!("known (tools/structure/debt.txt): {p}");
    }
    for (_, p) in &new {
        eprintln!("{p}");
    }
    let stale: Vec<&String> = debt
        .iter()
        .filter(|d| !problems.iter().any(|(key, _)| key == *d))
        .collect();
    for d in &stale {
        eprintln!("tools/structure/debt.txt: `{d}` is paid off: delete the line");
    }
    if problems.is_empty() {
        println!(
            "structure: {} Rust files, none over {MAX_FILE_LINES} lines, no function over \
             {MAX_FN_LINES} lines outside tests, no import cycle",
            files.len()
        );
    }
    Ok(new.is_empty() && stale.is_empty())
}

fn read_debt(root: &Path) -> Result<Vec<String>> {
    let path = root.join("tools/structure/debt.txt");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

fn print_report(
    files: &[PathBuf],
    sizes: &mut [(usize, PathBuf)],
    fns: &mut [(usize, String)],
    cycles: usize,
) {
    for dir in ["coordinator/src", "agent/src", "proto/src", "tests"] {
        let n = files.iter().filter(|f| f.starts_with(dir)).count();
        println!("files under {dir}: {n}");
    }
    sizes.sort_by(|a, b| b.cmp(a));
    println!("longest files:");
    for (n, f) in sizes.iter().take(8) {
        println!("  {n:5} {}", f.display());
    }
    fns.sort_by(|a, b| b.cmp(a));
    println!("longest functions outside tests:");
    for (n, f) in fns.iter().take(8) {
        println!("  {n:5} {f}");
    }
    println!("import cycles: {cycles}");
}

/// Whether `text` uses crate `name` (`name::` or `use name`).
fn names_crate(text: &str, name: &str) -> bool {
    text.contains(&format!("{name}::")) || text.contains(&format!("use {name}"))
}

/// Integration tests, benches and the e2e crate are test code: their files
/// obey the file limit but not the function limit.
fn is_test_path(rel: &Path) -> bool {
    rel.components()
        .any(|c| matches!(c.as_os_str().to_str(), Some("tests" | "benches")))
}

fn is_crate_root(rel: &Path) -> bool {
    let parent = rel
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    let name = rel.file_name().and_then(|n| n.to_str());
    matches!((parent, name), (Some("src"), Some("lib.rs" | "main.rs"))) || parent == Some("bin")
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The repository's Rust files: what git tracks plus what it does not
/// ignore, as they are in the working tree.
fn rust_files(root: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "*.rs",
        ])
        .output()
        .context("run git ls-files (check-structure reads the files git knows)")?;
    anyhow::ensure!(
        out.status.success(),
        "git ls-files in {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut files: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .filter(|p| root.join(p).exists())
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}
