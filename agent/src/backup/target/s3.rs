//! The S3 backend (object_store): opening a bucket from its description,
//! errors that name the target and what to fix, bounded requests,
//! downloads, listing and deletion. Uploads are in `upload.rs`.

use super::{check_name, ObjectInfo};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use corral_proto::pb;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as StorePath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Connecting to an S3 endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole requests without a payload (list, delete, starting, aborting an
/// upload), retries included.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Total time object_store may spend retrying one request.
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for the next piece of a download.
const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A bucket (and a key prefix in it) as a backup target.
#[derive(Clone)]
pub(super) struct S3 {
    /// For requests without a payload: every request is bounded in time.
    pub(super) ctl: Arc<AmazonS3>,
    /// For uploads and downloads, which may take long: object_store's
    /// request timeout is off, each step is bounded here instead.
    pub(super) data: Arc<AmazonS3>,
    /// Key prefix inside the bucket ("" or without surrounding slashes).
    pub(super) prefix: Arc<str>,
    pub(super) bucket: Arc<str>,
    pub(super) describe: Arc<str>,
    /// The operator's name (the coordinator's [backup.targets.NAME]).
    pub(super) name: Arc<str>,
}

impl S3 {
    pub(super) fn open(t: &pb::BackupTarget, name: &str, fix: &str) -> Result<S3> {
        if t.bucket.is_empty() {
            bail!("backup target {name}: an s3 target needs a bucket: {fix}");
        }
        let endpoint = t.endpoint.trim().trim_end_matches('/').to_string();
        if !endpoint.is_empty() {
            let Some((scheme, rest)) = endpoint.split_once("://") else {
                bail!(
                    "backup target {name}: the endpoint must be an http:// or https:// URL: {fix}"
                );
            };
            if rest.split('/').next().unwrap_or("").contains('@') {
                bail!(
                    "backup target {name}: the endpoint must not hold credentials \
                     (use access_key_id and secret_access_key): {fix}"
                );
            }
            match scheme {
                "https" => {}
                "http" if t.allow_http => {}
                "http" => bail!(
                    "backup target {name}: the endpoint {endpoint} is plain http; \
                     set allow_http = true to allow it: {fix}"
                ),
                _ => bail!(
                    "backup target {name}: the endpoint {endpoint} must be an http:// or https:// URL: {fix}"
                ),
            }
        }
        if t.access_key_id.is_empty() || t.secret_access_key.is_empty() {
            bail!("backup target {name}: an s3 target needs access_key_id and secret_access_key: {fix}");
        }
        let prefix = t.path.trim_matches('/').to_string();
        if !prefix.is_empty() {
            check_name(&prefix, "path (key prefix)")
                .with_context(|| format!("backup target {name}: {fix}"))?;
        }
        let region = if t.region.is_empty() {
            "us-east-1"
        } else {
            &t.region
        };
        let mut describe = format!("{name} (s3 ");
        if endpoint.is_empty() {
            describe += &format!("region {region}");
        } else {
            describe += &endpoint;
        }
        describe += &format!(" bucket {}", t.bucket);
        if !prefix.is_empty() {
            describe += &format!(" prefix {prefix}");
        }
        describe += ")";
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: RETRY_TIMEOUT,
        };
        let build = |options: ClientOptions| {
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&t.bucket)
                .with_region(region)
                .with_access_key_id(&t.access_key_id)
                .with_secret_access_key(&t.secret_access_key)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(t.allow_http)
                .with_retry(retry.clone())
                .with_client_options(
                    options
                        .with_allow_http(t.allow_http)
                        .with_connect_timeout(CONNECT_TIMEOUT),
                );
            if !endpoint.is_empty() {
                b = b.with_endpoint(&endpoint);
            }
            // The builder's errors quote configuration, never the secret.
            b.build()
                .map_err(|e| anyhow!("backup target {describe}: {e}: {fix}"))
                .map(Arc::new)
        };
        let ctl = build(ClientOptions::new().with_timeout(REQUEST_TIMEOUT))?;
        let data = build(ClientOptions::new().with_timeout_disabled())?;
        Ok(S3 {
            ctl,
            data,
            prefix: prefix.into(),
            bucket: t.bucket.clone().into(),
            describe: describe.into(),
            name: name.into(),
        })
    }

    pub(super) fn key(&self, name: &str) -> Result<StorePath> {
        let key = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        };
        StorePath::parse(&key).map_err(|e| anyhow!("the object name {name:?} is not valid: {e}"))
    }

    /// The name of a listed key relative to the target.
    pub(super) fn name_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(key)
        } else {
            key.strip_prefix(&*self.prefix)?.strip_prefix('/')
        }
    }

    /// Explains an object_store error: the target, what was done, the
    /// cause, and what to check.
    pub(super) fn error(
        &self,
        doing: &str,
        object: &str,
        e: &object_store::Error,
    ) -> anyhow::Error {
        let mut chain = Vec::new();
        let mut http_kind = None;
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
                http_kind.get_or_insert(h.kind());
            }
            chain.push(err.to_string());
            source = err.source();
        }
        let all = chain.join(" | ");
        let root = chain.last().cloned().unwrap_or_default();
        let code = xml_field(&all, "Code");
        let message = xml_field(&all, "Message");
        let server_says = match (&code, &message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.clone(),
            _ => root.clone(),
        };
        use object_store::client::HttpErrorKind;
        let what = format!("backup target {}: {doing} {object:?}", self.describe);
        let check = format!(
            "check the endpoint and credentials in the coordinator's [backup.targets.{}]",
            self.name
        );
        let status = |s: &str| all.contains(&format!("status code: {s}"));
        let cause = match code.as_deref() {
            Some("NoSuchBucket") => format!(
                "the bucket {:?} does not exist ({server_says}); the bucket must exist \
                 (Corral does not create it): create it or {check}",
                self.bucket
            ),
            Some(
                "SignatureDoesNotMatch"
                | "InvalidAccessKeyId"
                | "NotSignedUp"
                | "InvalidSecurity"
                | "AccessDenied"
                | "InvalidToken"
                | "ExpiredToken"
                | "AuthorizationHeaderMalformed",
            ) => format!("the endpoint refused the credentials ({server_says}): {check}"),
            Some("NoSuchKey") => format!("no such object ({server_says})"),
            _ if matches!(
                e,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ) || status("403")
                || status("401") =>
            {
                format!(
                    "the endpoint refused the credentials or their rights ({server_says}): {check}"
                )
            }
            _ if matches!(e, object_store::Error::NotFound { .. }) => {
                format!("not found ({server_says})")
            }
            _ => match http_kind {
                Some(HttpErrorKind::Connect) => {
                    format!("cannot connect to the endpoint ({root}): {check}")
                }
                Some(HttpErrorKind::Timeout) => {
                    format!("the endpoint did not answer in time ({root}): {check}")
                }
                _ => format!("{server_says}: {check}"),
            },
        };
        anyhow!("{what}: {cause}")
    }

    pub(super) fn timed_out(&self, doing: &str, object: &str, after: Duration) -> anyhow::Error {
        anyhow!(
            "backup target {}: {doing} {object:?}: no answer from the endpoint within {}s: \
             check the endpoint and credentials in the coordinator's [backup.targets.{}]",
            self.describe,
            after.as_secs(),
            self.name
        )
    }

    /// Runs a request with a time bound, explaining its error.
    pub(super) async fn bounded<T>(
        &self,
        doing: &str,
        object: &str,
        limit: Duration,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(doing, object, &e)),
            Err(_) => Err(self.timed_out(doing, object, limit)),
        }
    }
}

impl S3 {
    pub(super) async fn get(
        &self,
        object: &str,
    ) -> Result<BoxStream<'static, object_store::Result<Bytes>>> {
        let key = self.key(object)?;
        let got = self
            .bounded("reading", object, REQUEST_TIMEOUT, self.data.get(&key))
            .await?;
        Ok(got.into_stream())
    }

    /// The download's chunks, each awaited at most READ_IDLE_TIMEOUT.
    pub(super) fn chunks(
        &self,
        object: &str,
        stream: BoxStream<'static, object_store::Result<Bytes>>,
    ) -> BoxStream<'static, Result<Bytes>> {
        let s3 = self.clone();
        let object = object.to_string();
        futures::stream::try_unfold(stream, move |mut stream| {
            let s3 = s3.clone();
            let object = object.clone();
            async move {
                match tokio::time::timeout(READ_IDLE_TIMEOUT, stream.next()).await {
                    Ok(None) => Ok(None),
                    Ok(Some(Ok(b))) => Ok(Some((b, stream))),
                    Ok(Some(Err(e))) => Err(s3.error("reading", &object, &e)),
                    Err(_) => Err(s3.timed_out("reading", &object, READ_IDLE_TIMEOUT)),
                }
            }
        })
        .boxed()
    }

    pub(super) async fn get_chunks(
        &self,
        object: &str,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let stream = self.get(object).await?;
        Ok(self.chunks(object, stream))
    }

    pub(super) async fn get_stream<T, F>(&self, object: &str, consume: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
    {
        let mut chunks = self.chunks(object, self.get(object).await?);
        let (tx, rx) = mpsc::channel::<Result<Bytes, Arc<anyhow::Error>>>(16);
        let forwarder = tokio::spawn(async move {
            while let Some(chunk) = chunks.next().await {
                let failed = chunk.is_err();
                if tx.send(chunk.map_err(Arc::new)).await.is_err() || failed {
                    break;
                }
            }
        });
        let mut reader = ChunkReader {
            rx,
            chunk: Bytes::new(),
            error: None,
        };
        let consumed = tokio::task::spawn_blocking(move || {
            let r = consume(&mut reader);
            (r, reader.error)
        })
        .await;
        // consume may have stopped early: stop the download.
        forwarder.abort();
        let (consumed, download_error) = consumed.map_err(|e| {
            anyhow!(
                "backup target {}: the backup reader stopped: {e}",
                self.describe
            )
        })?;
        match (consumed, download_error) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(e)) => Err(anyhow!("{e}")),
            (Err(e), None) => Err(e.context(format!(
                "backup target {}: reading {object:?}",
                self.describe
            ))),
        }
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // object_store lists by whole path parts: list the directory of the
        // prefix and keep the names starting with it.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let dir_key = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(dir.to_string()),
            (false, true) => Some(self.prefix.to_string()),
            (false, false) => Some(format!("{}/{dir}", self.prefix)),
        };
        let dir_key = dir_key
            .map(|k| StorePath::parse(&k).map_err(|e| anyhow!("bad prefix {prefix:?}: {e}")))
            .transpose()?;
        let mut stream = self.ctl.list(dir_key.as_ref());
        let mut found = Vec::new();
        loop {
            let limit = REQUEST_TIMEOUT + RETRY_TIMEOUT;
            let item = match tokio::time::timeout(limit, stream.next()).await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => return Err(self.timed_out("listing", prefix, limit)),
            };
            let meta = item.map_err(|e| self.error("listing", prefix, &e))?;
            let Some(name) = self.name_of(meta.location.as_ref()) else {
                continue;
            };
            if name.starts_with(prefix) {
                found.push(ObjectInfo {
                    name: name.to_string(),
                    size: meta.size,
                    modified_ms: meta.last_modified.timestamp_millis(),
                });
            }
        }
        Ok(found)
    }

    pub(super) async fn delete(&self, objects: &[ObjectInfo]) -> Result<u64> {
        // Eight at a time. (A plain loop over batches rather than
        // `buffer_unordered` over a borrowing closure, whose future the
        // compiler cannot prove Send for every lifetime inside a spawned
        // task.)
        let mut deleted = 0;
        for batch in objects.chunks(8) {
            let pending: Vec<_> = batch.iter().map(|o| self.delete_one(&o.name)).collect();
            for r in futures::future::join_all(pending).await {
                r?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    pub(super) async fn delete_one(&self, name: &str) -> Result<()> {
        let key = self.key(name)?;
        match self.ctl.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("deleting", name, &e)),
        }
    }
}

/// `<Field>value</Field>` in an S3 error body.
pub(super) fn xml_field(text: &str, field: &str) -> Option<String> {
    let start = text.find(&format!("<{field}>"))? + field.len() + 2;
    let end = start + text[start..].find(&format!("</{field}>"))?;
    Some(text[start..end].to_string())
}

/// The `Read` `consume` gets: the download's chunks, arriving through a
/// bounded channel; a download error becomes an I/O error (kept, so that
/// the error returned is the download's).
struct ChunkReader {
    rx: mpsc::Receiver<Result<Bytes, Arc<anyhow::Error>>>,
    chunk: Bytes,
    error: Option<Arc<anyhow::Error>>,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = &self.error {
            return Err(io::Error::other(e.to_string()));
        }
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => {
                    let err = io::Error::other(e.to_string());
                    self.error = Some(e);
                    return Err(err);
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}
