//! Logs the coordinator may read from this node: the engine's server log
//! and the agent's own.
//!
//! - [`writer`]: the agent's log file, rotated by size.
//! - [`stamp`]: when a line was written, from its timestamp, per engine.
//! - [`read`]: the last lines, the lines since a time, and following a file.
//!
//! Only these two files (and their rotated predecessors) are ever read: the
//! request names a source, never a path.

pub mod read;
pub mod stamp;
pub mod writer;

use corral_proto::pb;
use read::Query;
use stamp::Family;
use std::path::PathBuf;
use tonic::Status;

/// Chunks in flight between the reading thread and the gRPC stream: the
/// reader waits (and memory stays bounded) when the caller reads slowly.
const CHANNEL_CHUNKS: usize = 4;

pub type LogStream = tokio_stream::wrappers::ReceiverStream<Result<pb::LogLines, Status>>;

/// Streams the log at `path`, read as `family`, for `q`. The file is read
/// on a blocking thread; it stops when the stream is dropped (the caller
/// went away), noticed at the next chunk or poll.
pub fn serve(path: PathBuf, family: Family, q: Query) -> LogStream {
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let mut send = |chunk: pb::LogLines| tx.blocking_send(Ok(chunk)).is_ok();
        let result = read::stream(&path, family, q, &mut send, &|| tx.is_closed());
        match result {
            // A follow ends only when the caller goes.
            Ok(()) if q.follow => {
                tracing::debug!("stopped following {}: the caller went away", path.display())
            }
            Ok(()) => {}
            Err(e) => {
                let msg = format!("reading {}: {e}", path.display());
                tracing::warn!("{msg}");
                let _ = tx.blocking_send(Err(Status::internal(msg)));
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
