//! `join_tokens`: the hash of each join token's secret, its expiry, and who
//! used it.

use super::row::in_order;
use anyhow::Result;
use corral_proto::now_ms;
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub expires_at_ms: i64,
    pub used_at_ms: Option<i64>,
    pub used_by_node: Option<String>,
}

// -------------------------------------------------------------- join tokens

pub fn insert_token(c: &Connection, hash: &str, by: &str, expires_at_ms: i64) -> Result<()> {
    c.execute(
        "INSERT INTO join_tokens (secret_hash, created_by, created_at_ms, expires_at_ms) \
         VALUES (?1, ?2, ?3, ?4)",
        params![hash, by, now_ms(), expires_at_ms],
    )?;
    Ok(())
}

pub fn get_token(c: &Connection, hash: &str) -> Result<Option<TokenRow>> {
    Ok(c.query_row(
        "SELECT expires_at_ms, used_at_ms, used_by_node FROM join_tokens WHERE secret_hash = ?1",
        [hash],
        |r| in_order!(r => TokenRow { expires_at_ms, used_at_ms, used_by_node }),
    )
    .optional()?)
}

pub fn use_token(c: &Connection, hash: &str, node: &str) -> Result<()> {
    c.execute(
        "UPDATE join_tokens SET used_at_ms = ?2, used_by_node = ?3 WHERE secret_hash = ?1",
        params![hash, now_ms(), node],
    )?;
    Ok(())
}
