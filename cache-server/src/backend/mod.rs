//! Backends: where bytes come from. Each mount's source becomes an `ObjectSource`: an
//! `object_store` store plus a key prefix (`s3.rs`) or a POSIX directory (`posix.rs`); every
//! request goes through [`Backend`], which checks the key, bounds concurrency, times requests and
//! counts them in the metric catalogue. A new kind of backend is a new file implementing
//! `ObjectSource` and an arm in [`Backend::new`].
//!
//! Keys are names byte for byte ([`granary_core::keys`]): a listed key is shown as it is, and a
//! read asks for exactly the key listed.

pub(crate) mod beneath;
mod limits;
mod posix;
mod s3;
mod s3_list;

use crate::config::{BackendSettings, S3Section};
use bytes::Bytes;
use futures::future::BoxFuture;
use granary_core::SourceUri;
use granary_core::keys;
use granary_core::metrics as m;
use granary_proto::ApiError;
use std::ops::Range;
use std::time::{Duration, Instant};

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
    /// Mode bits and owner, shown as they are (POSIX sources); `None`: read-only for all.
    pub owner: Option<granary_proto::Owner>,
}

/// What an implementation provides: the operations that ask its backend. [`Backend`] checks the
/// key, admits, times and counts each request around them; `id` is the backend's identity, for
/// messages.
trait ObjectSource: Send + Sync {
    /// Lists one directory level under `key` (`""` = the backend's root).
    fn list<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RawEntry>, ApiError>>;

    /// Reads `range` of exactly the object version named by `etag`/`version`.
    fn read<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
        range: Range<u64>,
        etag: Option<&'a str>,
        version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Bytes, ApiError>>;

    /// Like [`ObjectSource::read`], but may hand the bytes to `sink` piece by piece as they
    /// arrive. By default the bytes are read whole and handed back ([`Delivered::Whole`]): the
    /// caller checks their length before `sink` sees them.
    fn read_to<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
        range: Range<u64>,
        etag: Option<&'a str>,
        version: Option<&'a str>,
        sink: &'a mut (dyn FnMut(&[u8]) + Send),
    ) -> BoxFuture<'a, Result<Delivered, ApiError>> {
        let _ = sink;
        Box::pin(async move {
            self.read(id, key, range, etag, version)
                .await
                .map(Delivered::Whole)
        })
    }

    /// Checks, within `timeout`, that the source exists and answers: why not, and the backend's
    /// words.
    fn probe<'a>(
        &'a self,
        id: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), (ProbeFailure, String)>>;
}

/// What [`ObjectSource::read_to`] did with the bytes.
enum Delivered {
    /// Handed to the sink as they arrived: this many bytes came (the sink saw at most the range).
    Streamed(u64),
    /// Read whole, not yet handed to the sink.
    Whole(Bytes),
}

pub struct Backend {
    /// The source URI, also the backend part of object identities.
    id: String,
    source: Box<dyn ObjectSource>,
    limits: limits::Limits,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("id", &self.id).finish()
    }
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
        let implementation: Box<dyn ObjectSource> = match source {
            SourceUri::S3 { bucket, prefix } => {
                Box::new(s3::S3Source::new(source, bucket, prefix, s3, settings)?)
            }
            SourceUri::Local { path } => Box::new(posix::PosixSource::new(source, path)?),
        };
        Ok(Backend {
            id: source.to_string(),
            source: implementation,
            limits: limits::Limits::new(&source.to_string(), settings),
        })
    }

    /// Takes this worker's share of the cluster-wide limits, `members` live workers sharing
    /// them (see `limits.rs`).
    pub fn set_members(&self, members: usize) {
        self.limits.set_members(members);
    }

    /// Waits for a request slot, and a token when rate-limited.
    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        self.limits.admit().await
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
        let result = self.source.list(&self.id, key).await;
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
        let result = self
            .source
            .read(&self.id, key, range.clone(), etag, version)
            .await;
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
        self.check("get", key)?;
        let permit = self.admit().await?;
        let start = Instant::now();
        let mut whole = None;
        let result = self
            .source
            .read_to(&self.id, key, range.clone(), etag, version, &mut *sink)
            .await
            .map(|delivered| match delivered {
                Delivered::Streamed(got) => got,
                Delivered::Whole(data) => {
                    let got = data.len() as u64;
                    whole = Some(data);
                    got
                }
            });
        record("get", start, result.is_ok());
        self.received(key, &range, result?)?;
        // A whole read is handed over once its slot is free again.
        drop(permit);
        if let Some(data) = whole {
            sink(&data);
        }
        Ok(())
    }

    /// Checks, within `timeout`, that the source exists and answers with these credentials.
    pub async fn probe(&self, timeout: Duration) -> Result<(), BackendError> {
        self.source
            .probe(&self.id, timeout)
            .await
            .map_err(|(kind, message)| BackendError::Unreachable {
                backend: self.id.clone(),
                kind,
                message,
            })
    }
}

fn record(op: &'static str, start: Instant, ok: bool) {
    metrics::histogram!(m::BACKEND_REQUEST_SECONDS, "op" => op)
        .record(start.elapsed().as_secs_f64());
    metrics::counter!(m::BACKEND_REQUESTS, "op" => op, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}
