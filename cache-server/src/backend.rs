//! Backends: where bytes come from. Each mount's source becomes an `object_store` store plus a
//! key prefix; every request goes through [`Backend`], which bounds concurrency, times requests
//! and counts them in the metric catalogue.

use crate::config::{BackendSettings, S3Section};
use bytes::Bytes;
use granary_core::SourceUri;
use granary_core::metrics as m;
use granary_proto::ApiError;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{
    ClientOptions, GetOptions, GetRange, ListResult, ObjectStore, RetryConfig,
};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Why a backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Config(String),
    #[error("{backend}: {message}")]
    Unreachable { backend: String, message: String },
}

pub struct Backend {
    /// The source URI, also the backend part of object identities.
    id: String,
    store: Arc<dyn ObjectStore>,
    prefix: Option<StorePath>,
    limit: Semaphore,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("id", &self.id).finish()
    }
}

fn s3_store(bucket: &str, s3: &S3Section, settings: &BackendSettings) -> Result<Arc<dyn ObjectStore>, BackendError> {
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
    let plain_http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
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

fn store_error(op: &str, id: &str, key: &str, e: object_store::Error) -> ApiError {
    use object_store::Error as E;
    let what = format!("{op} {id}/{key}");
    match e {
        E::NotFound { .. } => ApiError::NotFound(what),
        E::Precondition { .. } | E::NotModified { .. } => ApiError::Stale(format!("{what}: the object changed in the backend")),
        E::InvalidPath { .. } => ApiError::Invalid(format!("{what}: {e}")),
        other => ApiError::Unavailable(format!("{what}: {other}")),
    }
}

impl Backend {
    pub fn new(source: &SourceUri, s3: &S3Section, settings: &BackendSettings) -> Result<Self, BackendError> {
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match source {
            SourceUri::S3 { bucket, prefix } => (s3_store(bucket, s3, settings)?, prefix.clone()),
            SourceUri::Local { path } => {
                let meta = std::fs::metadata(path)
                    .map_err(|e| BackendError::Config(format!("source {source}: {e}")))?;
                if !meta.is_dir() {
                    return Err(BackendError::Config(format!("source {source} is not a directory")));
                }
                let fs = LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| BackendError::Config(format!("source {source}: {e}")))?;
                (Arc::new(fs), String::new())
            }
        };
        Ok(Backend {
            id: source.to_string(),
            store,
            prefix: (!prefix.is_empty()).then(|| StorePath::from(prefix)),
            limit: Semaphore::new(settings.max_concurrency),
        })
    }

    /// The identity of this backend inside object ids.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The store path of a key relative to this backend's prefix.
    fn path(&self, key: &str) -> StorePath {
        match (&self.prefix, key.is_empty()) {
            (None, _) => StorePath::from(key),
            (Some(p), true) => p.clone(),
            (Some(p), false) => StorePath::from(format!("{p}/{key}")),
        }
    }

    /// The key relative to this backend's prefix of a store path it returned.
    pub fn key_of(&self, path: &StorePath) -> String {
        let s = path.as_ref();
        match &self.prefix {
            Some(p) => s.strip_prefix(p.as_ref()).unwrap_or(s).trim_start_matches('/').to_string(),
            None => s.to_string(),
        }
    }

    /// Lists one directory level under `key` (`""` = the backend's root).
    pub async fn list(&self, key: &str) -> Result<ListResult, ApiError> {
        let path = self.path(key);
        let prefix = (!path.as_ref().is_empty()).then_some(&path);
        let _permit = self.limit.acquire().await.map_err(|_| ApiError::Unavailable("backend closed".into()))?;
        let start = Instant::now();
        let result = self.store.list_with_delimiter(prefix).await;
        record("list", start, result.is_ok());
        result.map_err(|e| store_error("list", &self.id, key, e))
    }

    /// Reads `range` of exactly the object version named by `etag`/`version`.
    pub async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        version: Option<&str>,
    ) -> Result<Bytes, ApiError> {
        let path = self.path(key);
        let options = GetOptions {
            if_match: etag.map(str::to_string),
            version: version.map(str::to_string),
            range: Some(GetRange::Bounded(range.clone())),
            ..GetOptions::default()
        };
        let _permit = self.limit.acquire().await.map_err(|_| ApiError::Unavailable("backend closed".into()))?;
        let start = Instant::now();
        let result = match self.store.get_opts(&path, options).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        record("get", start, result.is_ok());
        let data = result.map_err(|e| store_error("get", &self.id, key, e))?;
        metrics::counter!(m::BACKEND_BYTES).increment(data.len() as u64);
        let expected = range.end - range.start;
        if data.len() as u64 != expected {
            return Err(ApiError::Stale(format!(
                "get {}/{key}: asked {expected} bytes at {}, got {}: the object changed in the backend",
                self.id,
                range.start,
                data.len()
            )));
        }
        Ok(data)
    }

    /// Checks, within `timeout`, that the source exists and answers with these credentials.
    pub async fn probe(&self, timeout: Duration) -> Result<(), BackendError> {
        let unreachable = |message: String| BackendError::Unreachable {
            backend: self.id.clone(),
            message,
        };
        match tokio::time::timeout(timeout, self.store.list_with_delimiter(self.prefix.as_ref())).await {
            Err(_) => Err(unreachable(format!("no answer within {timeout:?} (is the endpoint right and up?)"))),
            Ok(Err(e)) => Err(unreachable(describe_probe_error(&e))),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

fn describe_probe_error(e: &object_store::Error) -> String {
    let text = e.to_string();
    let hint = if text.contains("NoSuchBucket") || matches!(e, object_store::Error::NotFound { .. }) {
        "the bucket does not exist"
    } else if text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") || text.contains("403") {
        "access denied (check the credentials)"
    } else if text.contains("onnect") || text.contains("dns") || text.contains("error sending request") {
        "cannot connect to the endpoint"
    } else {
        "the backend refused the listing"
    };
    format!("{hint}: {text}")
}

fn record(op: &'static str, start: Instant, ok: bool) {
    metrics::histogram!(m::BACKEND_REQUEST_SECONDS, "op" => op).record(start.elapsed().as_secs_f64());
    metrics::counter!(m::BACKEND_REQUESTS, "op" => op, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}
