//! Connecting to a server over its socket and building commands.

use super::settings::COMMAND_TIMEOUT;
use ::redis::aio::MultiplexedConnection;
use anyhow::{Context, Result};
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use std::path::Path;

/// Whether an error means the connection itself is unusable.
pub(super) fn broken(e: &::redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// Connects to the server's socket as `user` with `password`.
pub(super) async fn connect(
    socket: &Path,
    user: &str,
    password: &str,
) -> Result<MultiplexedConnection> {
    let info = ConnectionAddr::Unix(socket.to_path_buf())
        .into_connection_info()?
        .set_redis_settings(
            RedisConnectionInfo::default()
                .set_username(user)
                .set_password(password)
                .set_skip_set_lib_name(),
        );
    let client = ::redis::Client::open(info)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))
}

pub(super) fn cmd(name: &str) -> ::redis::Cmd {
    ::redis::cmd(name)
}
