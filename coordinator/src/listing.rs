//! Paged lists of the audit log, the events and the operations.
//!
//! Each page holds the newest rows before a cursor (none: the newest of
//! all), oldest first as the CLI prints them, at most [`MAX_PAGE`]; when
//! older rows remain, the page says where the next one starts (the oldest
//! row's id, passed back as `before`).

use crate::store::row::in_order;
use crate::store::{self, AuditRow, EventRow, OperationRow};
use anyhow::Result;
use rusqlite::{params, Connection};

/// The most rows one page holds, whatever the caller asks.
pub const MAX_PAGE: u32 = 10_000;

/// Rows of a page when the caller asks for none in particular.
pub const DEFAULT_AUDIT: u32 = 1000;
pub const DEFAULT_EVENTS: u32 = 200;
pub const DEFAULT_OPERATIONS: u32 = 1000;

/// A `before` that names no operation.
#[derive(Debug, thiserror::Error)]
#[error("no operation {0:?} to list from: pass an id that `corralctl operation list` printed")]
pub struct UnknownCursor(pub String);

/// The page size for a request of `asked` (0: `default`), capped.
pub fn page_size(asked: u32, default: u32) -> u32 {
    match asked {
        0 => default,
        n => n.min(MAX_PAGE),
    }
}

/// Rows fetched newest first, one more than `limit` to tell whether older
/// ones remain: returns them oldest first, with the cursor of the next page.
fn finish<T, C>(mut rows: Vec<T>, limit: u32, cursor: impl Fn(&T) -> C) -> (Vec<T>, Option<C>) {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    rows.reverse();
    let next = if more { rows.first().map(cursor) } else { None };
    (rows, next)
}

/// A page of the audit log before id `before` (0: from the newest).
pub fn audit(c: &Connection, limit: u32, before: i64) -> Result<(Vec<AuditRow>, Option<i64>)> {
    let mut st = c.prepare_cached(
        "SELECT id, at_ms, who, action, target, result FROM audit \
         WHERE ?1 <= 0 OR id < ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = st
        .query_map(
            params![before, i64::from(limit) + 1],
            |r| in_order!(r => AuditRow { id, at_ms, who, action, target, result }),
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(finish(rows, limit, |r| r.id))
}

/// A page of the events (of `node`, of `cluster`) before id `before`.
pub fn events(
    c: &Connection,
    node: Option<&str>,
    cluster: Option<&str>,
    limit: u32,
    before: i64,
) -> Result<(Vec<EventRow>, Option<i64>)> {
    let mut st = c.prepare_cached(
        "SELECT id, at_ms, node, cluster, kind, message FROM events \
         WHERE (?1 IS NULL OR node = ?1) AND (?2 IS NULL OR cluster = ?2) \
         AND (?3 <= 0 OR id < ?3) ORDER BY id DESC LIMIT ?4",
    )?;
    let rows = st
        .query_map(
            params![node, cluster, before, i64::from(limit) + 1],
            store::event_from_row,
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(finish(rows, limit, |r| r.id))
}

/// A page of the operations (of `cluster`) created before the operation
/// `before` ("": from the newest). An unknown `before` is an error.
pub fn operations(
    c: &Connection,
    cluster: Option<&str>,
    limit: u32,
    before: &str,
) -> Result<(Vec<OperationRow>, Option<String>)> {
    let cursor = if before.is_empty() {
        None
    } else {
        Some(
            store::get_operation(c, before)?
                .map(|o| (o.created_at_ms, o.id))
                .ok_or_else(|| UnknownCursor(before.to_string()))?,
        )
    };
    let (at, id) = cursor.unzip();
    let mut st = c.prepare_cached(&format!(
        "SELECT {} FROM operations WHERE (?1 IS NULL OR cluster = ?1) \
         AND (?2 IS NULL OR (created_at_ms, id) < (?2, ?3)) \
         ORDER BY created_at_ms DESC, id DESC LIMIT ?4",
        store::OP_COLS
    ))?;
    let rows = st
        .query_map(
            params![cluster, at, id, i64::from(limit) + 1],
            store::op_from_row,
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(finish(rows, limit, |r| r.id.clone()))
}

pub fn audit_pb(r: AuditRow) -> corral_proto::pb::AuditEntry {
    corral_proto::pb::AuditEntry {
        id: r.id,
        at_ms: r.at_ms,
        who: r.who,
        action: r.action,
        target: r.target,
        result: r.result,
    }
}

pub fn event_pb(e: EventRow) -> corral_proto::pb::Event {
    corral_proto::pb::Event {
        id: e.id,
        at_ms: e.at_ms,
        node: e.node,
        cluster: e.cluster,
        kind: e.kind,
        message: e.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_default_and_cap() {
        assert_eq!(page_size(0, 200), 200);
        assert_eq!(page_size(5, 200), 5);
        assert_eq!(page_size(1_000_000, 200), MAX_PAGE);
    }

    #[test]
    fn pages_go_back_from_the_newest_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let s = store::Store::open(&dir.path().join("corral.db")).unwrap();
        s.tx(|c| {
            for i in 0..25 {
                store::insert_audit(c, "w", "a", &format!("t{i}"), "ok")?;
                store::insert_event(c, i, "n", "c", "k", &format!("e{i}"), None)?;
                c.execute(
                    "INSERT INTO operations (id, cluster, kind, state, params, requested_by, \
                     created_at_ms, updated_at_ms) VALUES (?1, 'c', 'k', 'succeeded', '{}', 'w', ?2, ?2)",
                    params![format!("op-{i:02}"), 1000 + i],
                )?;
            }
            Ok(())
        })
        .unwrap();
        let (page, next) = s.read(|c| audit(c, 10, 0)).unwrap();
        assert_eq!(page.len(), 10);
        assert_eq!(page[0].target, "t15");
        assert_eq!(page[9].target, "t24");
        let (page2, next2) = s.read(|c| audit(c, 10, next.unwrap())).unwrap();
        assert_eq!(
            (page2[0].target.as_str(), page2[9].target.as_str()),
            ("t5", "t14")
        );
        let (page3, end) = s.read(|c| audit(c, 10, next2.unwrap())).unwrap();
        assert_eq!((page3.len(), end), (5, None));

        let (ev, next) = s.read(|c| events(c, Some("n"), None, 20, 0)).unwrap();
        assert_eq!((ev.len(), ev[0].message.as_str()), (20, "e5"));
        let (ev, end) = s
            .read(|c| events(c, None, None, 20, next.unwrap()))
            .unwrap();
        assert_eq!((ev.len(), end), (5, None));

        let (ops, next) = s.read(|c| operations(c, Some("c"), 10, "")).unwrap();
        assert_eq!(
            (ops[0].id.as_str(), next.as_deref()),
            ("op-15", Some("op-15"))
        );
        let (ops, _) = s.read(|c| operations(c, None, 10, "op-15")).unwrap();
        assert_eq!((ops[0].id.as_str(), ops[9].id.as_str()), ("op-05", "op-14"));
        let e = s.read(|c| operations(c, None, 10, "op-nope")).unwrap_err();
        assert!(e.to_string().contains("no operation \"op-nope\""), "{e}");
    }
}
