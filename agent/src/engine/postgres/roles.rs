//! Creating or updating a role from its SCRAM verifier.

use super::sql::{quote_ident, quote_literal};
use anyhow::{Context, Result};

/// Creates or updates a role; only its SCRAM verifier reaches the server.
pub(super) async fn upsert_role(
    client: &tokio_postgres::Client,
    name: &str,
    options: &str,
    password: &str,
) -> Result<()> {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let exists = !client
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await?
        .is_empty();
    let verb = if exists { "ALTER" } else { "CREATE" };
    client
        .batch_execute(&format!(
            "{verb} ROLE {} WITH {options} PASSWORD {}",
            quote_ident(name),
            quote_literal(&verifier)
        ))
        .await
        .with_context(|| format!("{verb} ROLE {name}"))
}
