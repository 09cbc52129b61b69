//! Reading a row into a struct whose fields are the SELECT's columns, in
//! order: one line per struct instead of one `r.get(i)?` per field.

/// `in_order!(r => T { a, b, c })` is
/// `Ok(T { a: r.get(0)?, b: r.get(1)?, c: r.get(2)? })`: each field is
/// read from the next column, with the conversion its type asks for
/// (`u64`, with rusqlite's `fallible_uint`, refuses a negative value
/// instead of wrapping it).
macro_rules! in_order {
    ($r:expr => $t:ident { $($f:ident),+ $(,)? }) => {{
        let row: &rusqlite::Row = $r;
        let mut column = 0usize;
        #[allow(unused_assignments)]
        let value = $t {
            $($f: {
                let v = row.get(column)?;
                column += 1;
                v
            }),+
        };
        Ok(value)
    }};
}
pub(crate) use in_order;

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq)]
    struct Three {
        a: i64,
        b: String,
        c: u64,
    }

    fn read(sql: &str) -> rusqlite::Result<Three> {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.query_row(sql, [], |r| in_order!(r => Three { a, b, c }))
    }

    #[test]
    fn fields_are_read_from_the_columns_in_order() {
        let t = read("SELECT 7, 'x', 9").unwrap();
        assert_eq!(
            t,
            Three {
                a: 7,
                b: "x".into(),
                c: 9
            }
        );
    }

    #[test]
    fn a_wrong_type_or_a_negative_count_is_an_error_not_a_wrapped_value() {
        assert!(read("SELECT 'seven', 'x', 9").is_err());
        assert!(read("SELECT 7, 'x', -1").is_err());
    }
}
