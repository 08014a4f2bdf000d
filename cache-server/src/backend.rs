//! Backends: where bytes come from. Each mount's source becomes an `object_store` store plus a
//! key prefix; every request goes through [`Backend`], which bounds concurrency, times requests
//! and counts them in the metric catalogue.
//!
//! Keys are names byte for byte ([`granary_core::keys`]): a listed key is shown as it is, and a
//! read asks for exactly the key listed. object_store's `Path` is made with `Path::parse`, which
//! keeps a key's bytes (`Path::from` and `PathPart::from` would percent-encode `%`, `#` and every
//! non-ASCII byte into a different key).

use crate::config::{BackendSettings, S3Section};
use bytes::Bytes;
use granary_core::SourceUri;
use granary_core::keys::{self, Child};
use granary_core::metrics as m;
use granary_core::rate::TokenBucket;
use granary_proto::ApiError;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, RetryConfig};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Why a backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Config(String),
    #[error("{backend}: {}: {message}", kind.hint())]
    Unreachable {
        backend: String,
        kind: ProbeFailure,
        message: String,
    },
}

/// Why a source did not answer the probe at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The bucket does not exist.
    NoBucket,
    /// The source directory does not exist.
    NoDirectory,
    /// The credentials were refused.
    AccessDenied,
    /// No connection to the endpoint.
    CannotConnect,
    /// No answer in time.
    Timeout,
    /// Any other refusal of the listing.
    Refused,
}

impl ProbeFailure {
    /// What an operator should check, as the message says it.
    pub fn hint(self) -> &'static str {
        match self {
            ProbeFailure::NoBucket => "the bucket does not exist",
            ProbeFailure::NoDirectory => "the source directory does not exist",
            ProbeFailure::AccessDenied => "access denied (check the credentials)",
            ProbeFailure::CannotConnect => "cannot connect to the endpoint",
            ProbeFailure::Timeout => "no answer in time (is the endpoint right and up?)",
            ProbeFailure::Refused => "the backend refused the listing",
        }
    }
}

/// One name in a backend directory, before it becomes an [`granary_proto::Entry`].
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub name: String,
    pub dir: bool,
    /// The object's key relative to the backend root (files only).
    pub key: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub etag: Option<String>,
    pub version: Option<String>,
}

enum Store {
    /// S3 and S3-compatible stores, through object_store.
    Object {
        store: Arc<dyn ObjectStore>,
        /// The key prefix of the source (`""` for the whole bucket), without a trailing `/`.
        prefix: String,
    },
    /// A POSIX directory (GlusterFS, CephFS, NFS mounts), read with positional reads.
    Posix { root: PathBuf },
}

pub struct Backend {
    /// The source URI, also the backend part of object identities.
    id: String,
    store: Store,
    limit: Semaphore,
    rate: Option<std::sync::Mutex<TokenBucket>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("id", &self.id).finish()
    }
}

fn s3_store(
    bucket: &str,
    s3: &S3Section,
    settings: &BackendSettings,
) -> Result<Arc<dyn ObjectStore>, BackendError> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(e) = &s3.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = &s3.region {
        b = b.with_region(r);
    }
    if let Some(k) = &s3.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &s3.secret_access_key {
        b = b.with_secret_access_key(k);
    }
    if let Some(t) = &s3.session_token {
        b = b.with_token(t);
    }
    let has_keys = s3.access_key_id.is_some() || std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
    let sdk_finds_credentials = s3.use_instance_credentials
        || std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
        || std::env::var_os("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_some()
        || std::env::var_os("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_some();
    if s3.anonymous {
        b = b.with_skip_signature(true);
    } else if !has_keys && !sdk_finds_credentials {
        return Err(BackendError::Config(format!(
            "no credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (or [s3] access_key_id/secret_access_key, anonymous = true, use_instance_credentials = true)"
        )));
    }
    let endpoint = s3
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT").ok());
    let plain_http = endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    let client = ClientOptions::new()
        .with_allow_http(plain_http)
        .with_timeout(settings.request_timeout)
        .with_connect_timeout(settings.connect_timeout)
        .with_pool_max_idle_per_host(settings.max_concurrency);
    let retry = RetryConfig {
        max_retries: settings.max_retries,
        retry_timeout: settings.request_timeout,
        ..RetryConfig::default()
    };
    let store = b
        .with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| BackendError::Config(format!("s3://{bucket}: {e}")))?;
    Ok(Arc::new(store))
}

/// A GET of `range` of exactly the object version named by `etag`/`version`.
fn exact_range(range: Range<u64>, etag: Option<&str>, version: Option<&str>) -> GetOptions {
    GetOptions {
        if_match: etag.map(str::to_string),
        version: version.map(str::to_string),
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    }
}

fn store_error(op: &str, id: &str, key: &str, e: object_store::Error) -> ApiError {
    use object_store::Error as E;
    let what = format!("{op} {id}/{key}");
    match e {
        E::NotFound { .. } => ApiError::NotFound(what),
        E::Precondition { .. } | E::NotModified { .. } => {
            ApiError::Stale(format!("{what}: the object changed in the backend"))
        }
        E::InvalidPath { .. } => ApiError::Invalid(format!("{what}: {e}")),
        other => ApiError::Unavailable(format!("{what}: {other}")),
    }
}

fn io_error(op: &str, id: &str, key: &str, e: std::io::Error) -> ApiError {
    let what = format!("{op} {id}/{key}: {e}");
    match e.kind() {
        std::io::ErrorKind::NotFound => ApiError::NotFound(what),
        std::io::ErrorKind::NotADirectory => ApiError::NotADirectory(what),
        _ => ApiError::Unavailable(what),
    }
}

/// The version tag of a POSIX file: inode, mtime and size.
fn posix_etag(meta: &std::fs::Metadata) -> String {
    format!("{:x}-{:x}-{:x}", meta.ino(), mtime_ns(meta), meta.len())
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Lists a POSIX directory (blocking).
fn posix_list(root: &Path, key: &str) -> std::io::Result<Vec<RawEntry>> {
    let dir = root.join(key);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            skipped_key(
                &dir.display().to_string(),
                "not_utf8",
                &entry.file_name().to_string_lossy(),
            );
            continue;
        };
        if let Err(e) = keys::check_name(&name) {
            skipped_key(&dir.display().to_string(), e.label(), &name);
            continue;
        }
        // Follow symlinks; skip what cannot be stat'ed (dangling links) and special files.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if !(meta.is_dir() || meta.is_file()) {
            continue;
        }
        out.push(RawEntry {
            key: keys::join(key, &name),
            name,
            dir: meta.is_dir(),
            size: if meta.is_file() { meta.len() } else { 0 },
            mtime_ns: mtime_ns(&meta),
            etag: meta.is_file().then(|| posix_etag(&meta)),
            version: None,
        });
    }
    Ok(out)
}

/// Why a POSIX read failed.
#[derive(Debug)]
enum PosixReadError {
    Io(std::io::Error),
    /// The file is no longer the version asked for (another tag, or shorter).
    Stale,
}

impl From<std::io::Error> for PosixReadError {
    fn from(e: std::io::Error) -> Self {
        PosixReadError::Io(e)
    }
}

/// Reads `range` of a POSIX file whose version must still be `etag` (blocking).
fn posix_read(
    root: &Path,
    key: &str,
    range: Range<u64>,
    etag: Option<&str>,
) -> Result<Bytes, PosixReadError> {
    let file = std::fs::File::open(root.join(key))?;
    if let Some(expected) = etag
        && posix_etag(&file.metadata()?) != expected
    {
        return Err(PosixReadError::Stale);
    }
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    file.read_exact_at(&mut buf, range.start).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            PosixReadError::Stale
        } else {
            PosixReadError::Io(e)
        }
    })?;
    Ok(Bytes::from(buf))
}

/// The store path of `key` (relative, checked; `""` for the root) below `prefix`, byte for byte.
fn store_path(id: &str, prefix: &str, key: &str) -> Result<StorePath, ApiError> {
    // A checked key below a checked prefix is what `parse` accepts, and it keeps the bytes.
    StorePath::parse(keys::join(prefix, key))
        .map_err(|e| ApiError::Invalid(format!("{id}/{key}: {e}")))
}

/// Notes a key left out of a listing because it cannot be a path: counted by `reason`, logged at
/// debug level (a bucket can hold many).
fn skipped_key(dir: &str, reason: &'static str, key: &str) {
    metrics::counter!(m::BACKEND_KEYS_SKIPPED, "reason" => reason).increment(1);
    tracing::debug!(
        dir,
        key,
        reason,
        "left out of the listing: the key cannot be a path"
    );
}

const STALE: &str = "the object changed in the backend";

impl Backend {
    pub fn new(
        source: &SourceUri,
        s3: &S3Section,
        settings: &BackendSettings,
    ) -> Result<Self, BackendError> {
        let store = match source {
            SourceUri::S3 { bucket, prefix } => {
                if !prefix.is_empty()
                    && let Err(e) = keys::check_key(prefix)
                {
                    return Err(BackendError::Config(format!(
                        "source {source}: the prefix {prefix:?} cannot be a path: {e}"
                    )));
                }
                Store::Object {
                    store: s3_store(bucket, s3, settings)?,
                    prefix: prefix.clone(),
                }
            }
            SourceUri::Local { path } => {
                let meta = std::fs::metadata(path)
                    .map_err(|e| BackendError::Config(format!("source {source}: {e}")))?;
                if !meta.is_dir() {
                    return Err(BackendError::Config(format!(
                        "source {source} is not a directory"
                    )));
                }
                Store::Posix {
                    root: PathBuf::from(path),
                }
            }
        };
        Ok(Backend {
            id: source.to_string(),
            store,
            limit: Semaphore::new(settings.max_concurrency),
            rate: settings
                .max_requests_per_second
                .map(|r| std::sync::Mutex::new(TokenBucket::new(r, r))),
        })
    }

    /// Waits for a request slot: one of `max_concurrency`, and a token when rate-limited.
    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        if let Some(rate) = &self.rate {
            loop {
                let wait = match rate.lock().expect("rate lock").try_take(Instant::now()) {
                    Ok(()) => break,
                    Err(wait) => wait,
                };
                tokio::time::sleep(wait).await;
            }
        }
        self.limit
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable("backend closed".into()))
    }

    /// Refuses a key that cannot be a path before anything is asked for it.
    fn check(&self, op: &str, key: &str) -> Result<(), ApiError> {
        keys::check_key(key).map_err(|e| {
            ApiError::Invalid(format!(
                "{op} {}/{key}: the key cannot be a path: {e}",
                self.id
            ))
        })
    }

    /// The identity of this backend inside object ids.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Lists one directory level under `key` (`""` = the backend's root).
    pub async fn list(&self, key: &str) -> Result<Vec<RawEntry>, ApiError> {
        if !key.is_empty() {
            self.check("list", key)?;
        }
        let _permit = self.admit().await?;
        let start = Instant::now();
        let result = match &self.store {
            Store::Object { store, prefix } => {
                let path = store_path(&self.id, prefix, key)?;
                let listed = store
                    .list_with_delimiter((!path.as_ref().is_empty()).then_some(&path))
                    .await
                    .map_err(|e| store_error("list", &self.id, key, e));
                listed.map(|l| {
                    let dir = path.as_ref();
                    let mut out = Vec::with_capacity(l.common_prefixes.len() + l.objects.len());
                    let mut entry = |listed: &str, object: Option<&object_store::ObjectMeta>| {
                        match keys::child(dir, listed) {
                            Child::Name(name) => out.push(RawEntry {
                                name: name.to_string(),
                                dir: object.is_none(),
                                key: keys::join(key, name),
                                size: object.map_or(0, |o| o.size),
                                mtime_ns: object.map_or(0, |o| {
                                    o.last_modified.timestamp_nanos_opt().unwrap_or(0)
                                }),
                                etag: object.and_then(|o| o.e_tag.clone()),
                                version: object.and_then(|o| o.version.clone()),
                            }),
                            // The directory's own folder marker makes it exist; it is no file.
                            Child::Marker => {}
                            Child::Invalid(e) => skipped_key(dir, e.label(), listed),
                        }
                    };
                    for p in &l.common_prefixes {
                        entry(p.as_ref(), None);
                    }
                    for o in &l.objects {
                        entry(o.location.as_ref(), Some(o));
                    }
                    out
                })
            }
            Store::Posix { root } => {
                let (root, key_owned) = (root.clone(), key.to_string());
                tokio::task::spawn_blocking(move || posix_list(&root, &key_owned))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(|e| io_error("list", &self.id, key, e))
            }
        };
        record("list", start, result.is_ok());
        result
    }

    /// Reads `range` of exactly the object version named by `etag`/`version`.
    pub async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        version: Option<&str>,
    ) -> Result<Bytes, ApiError> {
        self.check("get", key)?;
        let _permit = self.admit().await?;
        let start = Instant::now();
        let result = match &self.store {
            Store::Object { store, prefix } => {
                let path = store_path(&self.id, prefix, key)?;
                let options = exact_range(range.clone(), etag, version);
                let got = match store.get_opts(&path, options).await {
                    Ok(r) => r.bytes().await,
                    Err(e) => Err(e),
                };
                got.map_err(|e| store_error("get", &self.id, key, e))
            }
            Store::Posix { root } => {
                let (root, key_owned, etag_owned, r) = (
                    root.clone(),
                    key.to_string(),
                    etag.map(str::to_string),
                    range.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    posix_read(&root, &key_owned, r, etag_owned.as_deref())
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| match e {
                    PosixReadError::Stale => {
                        ApiError::Stale(format!("get {}/{key}: {STALE}", self.id))
                    }
                    PosixReadError::Io(e) => io_error("get", &self.id, key, e),
                })
            }
        };
        record("get", start, result.is_ok());
        let data = result?;
        self.received(key, &range, data.len() as u64)?;
        Ok(data)
    }

    /// Counts `got` bytes received for `range` of `key`; fewer or more than asked means the
    /// object is not the version asked for.
    fn received(&self, key: &str, range: &Range<u64>, got: u64) -> Result<(), ApiError> {
        metrics::counter!(m::BACKEND_BYTES).increment(got);
        let expected = range.end - range.start;
        if got != expected {
            return Err(ApiError::Stale(format!(
                "get {}/{key}: asked {expected} bytes at {}, got {got}: {STALE}",
                self.id, range.start
            )));
        }
        Ok(())
    }

    /// Like [`Backend::get_range`], but hands the bytes to `sink` piece by piece as they arrive
    /// instead of gathering them into one buffer (for a caller that puts them somewhere itself).
    pub async fn get_range_to(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        version: Option<&str>,
        sink: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<(), ApiError> {
        use futures::StreamExt;
        let Store::Object { store, prefix } = &self.store else {
            sink(&self.get_range(key, range, etag, version).await?);
            return Ok(());
        };
        self.check("get", key)?;
        let path = store_path(&self.id, prefix, key)?;
        let _permit = self.admit().await?;
        let start = Instant::now();
        let options = exact_range(range.clone(), etag, version);
        let expected = range.end - range.start;
        let mut got = 0u64;
        let result = async {
            let mut stream = store.get_opts(&path, options).await?.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                // Never more than asked for, whatever the server sends.
                let take = chunk.len().min(expected.saturating_sub(got) as usize);
                sink(&chunk[..take]);
                got += chunk.len() as u64;
            }
            Ok(())
        }
        .await
        .map_err(|e| store_error("get", &self.id, key, e));
        record("get", start, result.is_ok());
        result?;
        self.received(key, &range, got)
    }

    /// Checks, within `timeout`, that the source exists and answers with these credentials.
    pub async fn probe(&self, timeout: Duration) -> Result<(), BackendError> {
        let unreachable = |kind: ProbeFailure, message: String| BackendError::Unreachable {
            backend: self.id.clone(),
            kind,
            message,
        };
        match &self.store {
            Store::Object { store, prefix } => {
                let path = store_path(&self.id, prefix, "")
                    .map_err(|e| unreachable(ProbeFailure::Refused, e.to_string()))?;
                let at = (!prefix.is_empty()).then_some(&path);
                match tokio::time::timeout(timeout, store.list_with_delimiter(at)).await {
                    Err(_) => Err(unreachable(
                        ProbeFailure::Timeout,
                        format!("no answer within {timeout:?}"),
                    )),
                    Ok(Err(e)) => Err(unreachable(probe_failure(&e), e.to_string())),
                    Ok(Ok(_)) => Ok(()),
                }
            }
            Store::Posix { root } => std::fs::read_dir(root).map(drop).map_err(|e| {
                let kind = match e.kind() {
                    std::io::ErrorKind::NotFound => ProbeFailure::NoDirectory,
                    std::io::ErrorKind::PermissionDenied => ProbeFailure::AccessDenied,
                    _ => ProbeFailure::Refused,
                };
                unreachable(kind, e.to_string())
            }),
        }
    }
}

/// What a failed listing says of the source. object_store turns a LIST's HTTP status into text
/// (`Error::Generic`), so beyond the typed variants the text is read.
fn probe_failure(e: &object_store::Error) -> ProbeFailure {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => return ProbeFailure::NoBucket,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            return ProbeFailure::AccessDenied;
        }
        _ => {}
    }
    let text = e.to_string();
    if text.contains("NoSuchBucket") {
        ProbeFailure::NoBucket
    } else if text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        // An HTTP status, not any "403" (a request's duration, "384.403695ms", has one).
        || text.contains("403 Forbidden")
        || text.contains("status 403")
    {
        ProbeFailure::AccessDenied
    } else if text.contains("onnect")
        || text.contains("dns")
        || text.contains("error sending request")
    {
        ProbeFailure::CannotConnect
    } else {
        ProbeFailure::Refused
    }
}

/// A failed probe as the message says it: what to check, then the backend's words.
#[cfg(test)]
fn describe_probe_error(e: &object_store::Error) -> String {
    format!("{}: {e}", probe_failure(e).hint())
}

fn record(op: &'static str, start: Instant, ok: bool) {
    metrics::histogram!(m::BACKEND_REQUEST_SECONDS, "op" => op)
        .record(start.elapsed().as_secs_f64());
    metrics::counter!(m::BACKEND_REQUESTS, "op" => op, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_error(text: &str) -> String {
        describe_probe_error(&object_store::Error::Generic {
            store: "S3",
            source: text.into(),
        })
    }

    #[test]
    fn probe_errors_are_named_by_their_cause_not_by_digits_in_a_duration() {
        // Seen in CI: a refused connection whose retry time happened to contain "403".
        let refused = "Error performing list request: Error performing GET \
            http://127.0.0.1:32901/granary-test?delimiter=%2F&list-type=2 in 384.403695ms, after 3 \
            retries, max_retries: 3, retry_timeout: 20s  - HTTP error: error sending request";
        assert!(probe_error(refused).starts_with("cannot connect to the endpoint"));
        let forbidden = "Error performing list request: Received redirect without LOCATION, \
            Client error with status 403 Forbidden: <Error><Code>AccessDenied</Code></Error>";
        assert!(probe_error(forbidden).starts_with("access denied"));
        assert!(probe_error("<Code>SignatureDoesNotMatch</Code>").starts_with("access denied"));
        assert!(probe_error("<Code>NoSuchBucket</Code>").starts_with("the bucket does not exist"));
    }
}
