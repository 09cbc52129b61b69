//! Function lengths: every `fn` with a body (free, in an `impl`, a trait
//! default), from its signature's first line to its closing brace. Test code
//! is skipped: `#[test]`-like functions and everything in a `#[cfg(test)]`
//! module.

use syn::spanned::Spanned;
use syn::visit::Visit;

pub struct Function {
    pub name: String,
    pub line: usize,
    pub lines: usize,
}

pub fn functions(file: &syn::File) -> Vec<Function> {
    let mut v = Lengths::default();
    v.visit_file(file);
    v.out
}

#[derive(Default)]
struct Lengths {
    out: Vec<Function>,
    /// Names of the enclosing `impl` types / traits, for the report.
    owner: Vec<String>,
}

pub fn is_test_code(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let path = a.path();
        let last = path.segments.last().map(|s| s.ident.to_string());
        if matches!(last.as_deref(), Some("test")) {
            return true;
        }
        path.is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .map(|m| m.path().is_ident("test"))
                .unwrap_or(false)
    })
}

impl Lengths {
    fn record(&mut self, name: &syn::Ident, sig: &syn::Signature, block: &syn::Block) {
        let start = sig.span().start().line;
        let end = block.span().end().line;
        let name = match self.owner.last() {
            Some(owner) => format!("{owner}::{name}"),
            None => name.to_string(),
        };
        self.out.push(Function {
            name,
            line: start,
            lines: end + 1 - start,
        });
    }
}

impl<'ast> Visit<'ast> for Lengths {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test_code(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test_code(&f.attrs) {
            self.record(&f.sig.ident, &f.sig, &f.block);
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if is_test_code(&i.attrs) {
            return;
        }
        let ty = &i.self_ty;
        self.owner.push(quote_type(ty));
        syn::visit::visit_item_impl(self, i);
        self.owner.pop();
    }

    fn visit_item_trait(&mut self, t: &'ast syn::ItemTrait) {
        self.owner.push(t.ident.to_string());
        syn::visit::visit_item_trait(self, t);
        self.owner.pop();
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_code(&f.attrs) {
            self.record(&f.sig.ident, &f.sig, &f.block);
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.record(&f.sig.ident, &f.sig, block);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

fn quote_type(ty: &syn::Type) -> String {
    match ty {
        syn::Type::Path(p) => p
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .unwrap_or_default(),
        _ => "impl".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_signature_to_closing_brace_and_skips_tests() {
        let src = "fn a() {\n    1;\n}\nimpl X {\n    fn b(&self) {}\n}\n#[cfg(test)]\nmod t {\n    fn c() {\n\n\n}\n}\n#[test]\nfn d() {\n}\n";
        let f = functions(&syn::parse_file(src).unwrap());
        let got: Vec<_> = f
            .iter()
            .map(|f| (f.name.as_str(), f.line, f.lines))
            .collect();
        assert_eq!(got, vec![("a", 1, 3), ("X::b", 5, 1)]);
    }
}
