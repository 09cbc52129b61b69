//! S3 uploads: the producer's bytes, in parts of [`PART_SIZE`], go through
//! a small bounded channel to a task uploading them (a single PUT when the
//! object fits in one part, else a multipart upload that is aborted on any
//! failure), so at most a few parts are in memory.

use super::s3::{REQUEST_TIMEOUT, S3};
use super::PART_SIZE;
use anyhow::{anyhow, Result};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Parts queued between the producer and the uploader.
const QUEUED_PARTS: usize = 1;
/// Parts being uploaded at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Completing a multipart upload (the server may assemble the parts).
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);
/// The slowest upload rate tolerated for a part, in bytes per second.
const MIN_UPLOAD_RATE: u64 = 128 << 10;

/// How a stream of parts ended on the uploader's side.
pub(super) enum Msg {
    Part(Bytes),
    /// `produce` returned Ok and everything was sent.
    Done,
}

/// How an upload ended without storing the object.
enum Stop {
    /// The producer stopped (failed or panicked) or put_stream was dropped.
    Producer,
    /// The upload itself failed: the cause.
    Failed(anyhow::Error),
}

/// The upload's failure, for the producer's writer.
#[derive(Default)]
struct Failure(Mutex<Option<String>>);

impl Failure {
    fn set(&self, msg: String) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(msg);
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The writer `produce` gets: cuts the stream in parts and hands them to
/// the uploader; fails as soon as the upload has failed.
struct PartWriter {
    tx: mpsc::Sender<Msg>,
    buf: Vec<u8>,
    failure: Arc<Failure>,
}

impl PartWriter {
    fn failed(&self) -> io::Error {
        io::Error::other(
            self.failure
                .get()
                .unwrap_or_else(|| "the upload stopped".to_string()),
        )
    }

    fn send(&mut self, msg: Msg) -> io::Result<()> {
        self.tx.blocking_send(msg).map_err(|_| self.failed())
    }

    fn send_part(&mut self) -> io::Result<()> {
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(PART_SIZE));
        self.send(Msg::Part(Bytes::from(part)))
    }

    fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        self.send(Msg::Done)
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.tx.is_closed() {
            return Err(self.failed());
        }
        let n = data.len().min(PART_SIZE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PART_SIZE {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Parts go out whole (S3's minimum part size); Done sends the rest.
        if self.tx.is_closed() {
            return Err(self.failed());
        }
        Ok(())
    }
}

/// The time a part of `len` bytes may take to upload.
fn upload_timeout(len: usize) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs(len as u64 / MIN_UPLOAD_RATE)
}

impl S3 {
    pub(super) async fn put_stream<T, F>(&self, object: &str, produce: F) -> Result<(T, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
    {
        let key = self.key(object)?;
        let (tx, rx) = mpsc::channel(QUEUED_PARTS);
        let failure = Arc::new(Failure::default());
        // Dropped when put_stream is: the uploader then aborts.
        let (_cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let uploader = {
            let s3 = self.clone();
            let object = object.to_string();
            let failure = failure.clone();
            tokio::spawn(async move { s3.upload(&object, key, rx, cancel_rx, &failure).await })
        };
        let mut writer = PartWriter {
            tx,
            buf: Vec::with_capacity(PART_SIZE),
            failure,
        };
        let produced = tokio::task::spawn_blocking(move || {
            let value = produce(&mut writer)?;
            writer.finish()?;
            Ok::<_, anyhow::Error>(value)
        })
        .await;
        let uploaded = uploader
            .await
            .map_err(|e| anyhow!("backup target {}: the uploader stopped: {e}", self.describe))?;
        let produced = produced.map_err(|e| {
            anyhow!(
                "backup target {}: the backup writer stopped: {e}",
                self.describe
            )
        })?;
        match (produced, uploaded) {
            (Ok(value), Ok(stored)) => Ok((value, stored)),
            (_, Err(Stop::Failed(e))) => Err(e),
            (Err(e), _) => Err(e.context(format!(
                "backup target {}: storing {object:?} (nothing stored)",
                self.describe
            ))),
            (Ok(_), Err(Stop::Producer)) => Err(anyhow!(
                "backup target {}: storing {object:?}: the upload stopped",
                self.describe
            )),
        }
    }

    async fn upload(
        &self,
        object: &str,
        key: StorePath,
        mut rx: mpsc::Receiver<Msg>,
        mut cancel: oneshot::Receiver<()>,
        failure: &Failure,
    ) -> Result<u64, Stop> {
        let result = self
            .upload_parts(object, &key, &mut rx, &mut cancel, failure)
            .await;
        if let Err(Stop::Failed(e)) = &result {
            failure.set(format!("{e}"));
        }
        // The producer's next write fails now.
        rx.close();
        result
    }

    async fn upload_parts(
        &self,
        object: &str,
        key: &StorePath,
        rx: &mut mpsc::Receiver<Msg>,
        cancel: &mut oneshot::Receiver<()>,
        failure: &Failure,
    ) -> Result<u64, Stop> {
        let put_whole = |part: Bytes| async move {
            let len = part.len();
            self.bounded(
                "storing",
                object,
                upload_timeout(len),
                self.data.put(key, PutPayload::from(part)),
            )
            .await
            .map(|_| len as u64)
            .map_err(Stop::Failed)
        };
        let first = match next(rx, cancel).await? {
            Msg::Done => return put_whole(Bytes::new()).await,
            Msg::Part(b) => b,
        };
        let second = match next(rx, cancel).await? {
            Msg::Done => return put_whole(first).await,
            Msg::Part(b) => b,
        };
        let mut upload = self
            .bounded(
                "starting the upload of",
                object,
                REQUEST_TIMEOUT,
                self.data.put_multipart(key),
            )
            .await
            .map_err(Stop::Failed)?;
        let sent = self
            .send_parts(object, &mut upload, [first, second], rx, cancel)
            .await;
        let result = match sent {
            Ok(total) => self
                .bounded(
                    "completing the upload of",
                    object,
                    COMPLETE_TIMEOUT,
                    upload.complete(),
                )
                .await
                .map(|_| total)
                .map_err(Stop::Failed),
            Err(stop) => Err(stop),
        };
        if let Err(stop) = &result {
            // Let the producer stop, with the cause, before the abort's
            // round trip.
            if let Stop::Failed(e) = stop {
                failure.set(format!("{e}"));
            }
            rx.close();
            if let Err(e) = self
                .bounded(
                    "aborting the upload of",
                    object,
                    REQUEST_TIMEOUT,
                    upload.abort(),
                )
                .await
            {
                tracing::warn!(
                    "{e:#} (the bucket may keep the parts until its lifecycle rules remove them)"
                );
            }
        }
        result
    }

    /// Uploads `first`, then every part the producer sends until it is
    /// done, at most [`PARTS_IN_FLIGHT`] at once; returns the bytes sent.
    async fn send_parts(
        &self,
        object: &str,
        upload: &mut Box<dyn object_store::MultipartUpload>,
        first: [Bytes; 2],
        rx: &mut mpsc::Receiver<Msg>,
        cancel: &mut oneshot::Receiver<()>,
    ) -> Result<u64, Stop> {
        let mut total = 0u64;
        let mut in_flight = FuturesUnordered::new();
        let mut send_part = |upload: &mut Box<dyn object_store::MultipartUpload>, part: Bytes| {
            total += part.len() as u64;
            let limit = upload_timeout(part.len());
            let put = upload.put_part(PutPayload::from(part));
            async move { tokio::time::timeout(limit, put).await.map_err(|_| limit) }
        };
        for part in first {
            in_flight.push(send_part(upload, part));
        }
        let part_done = |r: Result<object_store::Result<()>, Duration>| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Stop::Failed(self.error("uploading a part of", object, &e))),
            Err(limit) => Err(Stop::Failed(self.timed_out(
                "uploading a part of",
                object,
                limit,
            ))),
        };
        loop {
            while in_flight.len() >= PARTS_IN_FLIGHT {
                if let Some(r) = in_flight.next().await {
                    part_done(r)?;
                }
            }
            tokio::select! {
                biased;
                Some(r) = in_flight.next(), if !in_flight.is_empty() => part_done(r)?,
                m = next(rx, cancel) => match m? {
                    Msg::Part(b) => in_flight.push(send_part(upload, b)),
                    Msg::Done => break,
                },
            }
        }
        while let Some(r) = in_flight.next().await {
            part_done(r)?;
        }
        Ok(total)
    }
}

/// The producer's next message, or Stop::Producer when it went away or the
/// upload was cancelled.
async fn next(
    rx: &mut mpsc::Receiver<Msg>,
    cancel: &mut oneshot::Receiver<()>,
) -> Result<Msg, Stop> {
    tokio::select! {
        m = rx.recv() => m.ok_or(Stop::Producer),
        _ = cancel => Err(Stop::Producer),
    }
}
