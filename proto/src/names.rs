//! Names of clusters and nodes.
//!
//! One rule for both, checked at every entry point (CLI, operator API,
//! enrollment) so that a name is always safe as a DNS label, a file name and
//! a SQL identifier: 1 to 63 characters of lowercase letters, digits and `-`,
//! starting with a letter and not ending with `-`.

/// Checks `name` as the name of a `what` ("cluster", "node").
pub fn validate(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} name {name:?}: use 1 to 63 lowercase letters, digits and '-', \
             starting with a letter and not ending with '-' (e.g. \"orders-db\")"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_dns_labels() {
        for n in ["a", "orders-db", "vm1", "a-b-c-9"] {
            assert!(validate("cluster", n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        let long = "a".repeat(64);
        for n in [
            "",
            "1abc",
            "Orders",
            "a_b",
            "a-",
            "a b",
            "a/b",
            "../x",
            "é",
            long.as_str(),
        ] {
            let err = validate("cluster", n).unwrap_err();
            assert!(err.contains("invalid cluster name"), "{err}");
        }
    }
}
