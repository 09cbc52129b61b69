//! Names, quoting and parsing: replication slot names,
//! synchronous_standby_names, LSNs, pg_basebackup progress, SQL quoting.

use crate::engine::EngineSpec;

/// The replication slot that serves replica `node`.
pub fn slot_name(node: &str) -> String {
    // Node names are [a-z0-9-], at most 63 bytes; slot names are [a-z0-9_],
    // at most 63 bytes.
    let name = node.replace('-', "_");
    if name.len() <= 56 {
        return format!("corral_{name}");
    }
    // FNV-1a: stable across builds, enough to tell long names apart.
    let hash = node.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("corral_{}_{:08x}", &name[..47], hash as u32)
}

/// `ANY 1 ("a", "b")` over the replicas when sync is on, else empty.
pub fn synchronous_standby_names(spec: &EngineSpec) -> String {
    if !spec.sync || spec.replicas.is_empty() {
        return String::new();
    }
    let names: Vec<String> = spec
        .replicas
        .iter()
        .map(|r| format!("\"{}\"", r.replace('"', "\"\"")))
        .collect();
    format!("ANY 1 ({})", names.join(", "))
}

/// "0/3000028" -> 0x3000028.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// "123/4567 kB (2%), 0/1 tablespace" -> (123 KiB, 4567 KiB) in bytes.
pub(super) fn parse_basebackup_progress(line: &str) -> Option<(u64, u64)> {
    let kb = line.find(" kB")?;
    let nums = line[..kb].trim();
    let (done, total) = nums.rsplit(' ').next()?.split_once('/')?;
    Some((
        done.parse::<u64>().ok()? * 1024,
        total.parse::<u64>().ok()? * 1024,
    ))
}

pub(super) fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

pub(super) fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// A .pgpass line escapes ':' and '\'.
pub(super) fn pgpass_escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace(':', "\\:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::postgres::settings::conf_quote;

    #[test]
    fn quoting() {
        assert_eq!(conf_quote("/a/it's"), "'/a/it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("o'k"), "'o''k'");
    }
}
