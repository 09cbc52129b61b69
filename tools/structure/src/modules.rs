//! The module tree of one crate, read from its root file by following `mod`
//! declarations (with `#[path]`) the way rustc does, and the `crate::` /
//! `super::` / `self::` paths each file names.

use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// A module path from the crate root: `["engine", "mariadb"]`.
pub type ModPath = Vec<String>;

/// One source file of a crate and what it refers to.
pub struct SourceFile {
    pub path: PathBuf,
    /// The module the file defines.
    pub module: ModPath,
    /// Absolute paths (from the crate root) this file names, with the line.
    pub refs: Vec<(ModPath, usize)>,
}

/// Every file of the crate whose root is `root` (`src/lib.rs`), and the
/// module each inline `mod x { .. }` lives in (mapped to its file).
pub struct Crate {
    pub files: Vec<SourceFile>,
    /// Module path -> index into `files`.
    pub owner: BTreeMap<ModPath, usize>,
}

impl Crate {
    pub fn read(root: &Path) -> Result<Crate> {
        let mut krate = Crate {
            files: Vec::new(),
            owner: BTreeMap::new(),
        };
        krate.read_file(root, Vec::new(), root.parent().unwrap_or(Path::new(".")))?;
        Ok(krate)
    }

    /// The file that defines the longest known prefix of `path`.
    pub fn file_of(&self, path: &[String]) -> Option<usize> {
        (0..=path.len())
            .rev()
            .find_map(|n| self.owner.get(&path[..n]).copied())
    }

    fn read_file(&mut self, path: &Path, module: ModPath, dir: &Path) -> Result<()> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let ast = syn::parse_file(&text).map_err(|e| {
            let at = e.span().start();
            anyhow!("{}:{}:{}: {e}", path.display(), at.line, at.column + 1)
        })?;
        let index = self.files.len();
        self.files.push(SourceFile {
            path: path.to_path_buf(),
            module: module.clone(),
            refs: Vec::new(),
        });
        self.owner.insert(module.clone(), index);
        let mut walker = Walker {
            module: module.clone(),
            refs: Vec::new(),
            children: Vec::new(),
            inline: Vec::new(),
        };
        walker.visit_file(&ast);
        for inline in &walker.inline {
            self.owner.insert(inline.clone(), index);
        }
        self.files[index].refs = walker.refs;
        for child in walker.children {
            let (file, child_dir) = child_file(path, dir, &child)?;
            let mut child_module = module.clone();
            child_module.extend(child.inline_parents);
            child_module.push(child.name);
            self.read_file(&file, child_module, &child_dir)?;
        }
        Ok(())
    }
}

/// A `mod name;` declaration found in a file.
struct ChildDecl {
    name: String,
    /// `#[path = "..."]`, if any.
    path_attr: Option<String>,
    /// Inline modules the declaration sits in (`mod a { mod b; }`).
    inline_parents: Vec<String>,
}

/// Where a `mod x;` declared in `parent` (whose own module directory is
/// `dir`) lives, and the directory of x's own submodules.
fn child_file(parent: &Path, dir: &Path, child: &ChildDecl) -> Result<(PathBuf, PathBuf)> {
    let mut base = dir.to_path_buf();
    for p in &child.inline_parents {
        base.push(p);
    }
    if let Some(rel) = &child.path_attr {
        let file = parent.parent().unwrap_or(Path::new(".")).join(rel);
        let sub = file.with_extension("");
        return Ok((file, sub));
    }
    let flat = base.join(format!("{}.rs", child.name));
    if flat.exists() {
        return Ok((flat, base.join(&child.name)));
    }
    let nested = base.join(&child.name).join("mod.rs");
    if nested.exists() {
        return Ok((nested, base.join(&child.name)));
    }
    Err(anyhow!(
        "{}: `mod {};` has no file ({} or {})",
        parent.display(),
        child.name,
        flat.display(),
        nested.display()
    ))
}

struct Walker {
    /// The module being visited (grows inside inline modules).
    module: ModPath,
    refs: Vec<(ModPath, usize)>,
    children: Vec<ChildDecl>,
    inline: Vec<ModPath>,
}

impl Walker {
    /// Makes `segments` absolute from the crate root, if it starts with
    /// `crate`, `super` or `self`.
    fn absolute(&self, segments: &[String]) -> Option<ModPath> {
        let first = segments.first()?;
        let mut out = match first.as_str() {
            "crate" => Vec::new(),
            "self" | "super" => self.module.clone(),
            _ => return None,
        };
        let mut rest = if first == "crate" {
            &segments[1..]
        } else {
            segments
        };
        while let Some(s) = rest.first() {
            match s.as_str() {
                "super" => {
                    out.pop();
                }
                "self" => {}
                _ => break,
            }
            rest = &rest[1..];
        }
        out.extend(rest.iter().cloned());
        Some(out)
    }

    fn record(&mut self, segments: &[String], line: usize) {
        if let Some(abs) = self.absolute(segments) {
            self.refs.push((abs, line));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.record(prefix, n.ident.span().start().line);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.record(prefix, r.ident.span().start().line);
                prefix.pop();
            }
            syn::UseTree::Glob(g) => self.record(prefix, g.star_token.spans[0].start().line),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

fn path_attr(attrs: &[syn::Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| match &a.meta {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}

impl<'ast> Visit<'ast> for Walker {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let name = m.ident.to_string();
        match &m.content {
            None => {
                let depth = self.module.len() - self.inline_base();
                let inline_parents = self.module[self.module.len() - depth..].to_vec();
                self.children.push(ChildDecl {
                    name,
                    path_attr: path_attr(&m.attrs),
                    inline_parents,
                });
            }
            // Test code may use what sits above it (fixtures, the store):
            // it is compiled only in test builds and shapes no layer.
            Some(_) if crate::lengths::is_test_code(&m.attrs) => {}
            Some((_, items)) => {
                self.module.push(name);
                self.inline.push(self.module.clone());
                for item in items {
                    self.visit_item(item);
                }
                self.module.pop();
            }
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut prefix = Vec::new();
        self.use_tree(&mut prefix, &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        let line = p
            .segments
            .first()
            .map(|s| s.ident.span().start().line)
            .unwrap_or(0);
        self.record(&segments, line);
        syn::visit::visit_path(self, p);
    }
}

impl Walker {
    /// How long the file's own module path is (inline modules add to it).
    fn inline_base(&self) -> usize {
        self.module.len()
            - self
                .inline
                .iter()
                .filter(|m| self.module.starts_with(m))
                .count()
    }
}
