//! S3 and S3-compatible stores, through object_store: a store plus the source's key prefix.
//! Listings are our own ListObjectsV2 ([`super::s3_list`]), which a hostile key cannot break:
//! keys that cannot be names are left out, counted and logged once per listing.
//!
//! object_store's `Path` is made with `Path::parse`, which keeps a key's bytes (`Path::from` and
//! `PathPart::from` would percent-encode `%`, `#` and every non-ASCII byte into a different key).

use super::s3_list::{ListError, Lister};
use super::{BackendError, Delivered, ObjectSource, ProbeFailure, RawEntry, skipped_key};
use crate::config::{BackendSettings, S3Section};
use bytes::Bytes;
use futures::future::BoxFuture;
use granary_core::SourceUri;
use granary_core::keys::{self, Child};
use granary_proto::ApiError;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, RetryConfig};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// A bucket (or a prefix of one) read through object_store.
pub(super) struct S3Source {
    store: Arc<dyn ObjectStore>,
    lister: Lister,
    /// The key prefix of the source (`""` for the whole bucket), without a trailing `/`.
    prefix: String,
}

impl S3Source {
    /// The source `s3://{bucket}/{prefix}` (`source` is its URI, for messages).
    pub(super) fn new(
        source: &SourceUri,
        bucket: &str,
        prefix: &str,
        s3: &S3Section,
        settings: &BackendSettings,
    ) -> Result<Self, BackendError> {
        if !prefix.is_empty()
            && let Err(e) = keys::check_key(prefix)
        {
            return Err(BackendError::Config(format!(
                "source {source}: the prefix {prefix:?} cannot be a path: {e}"
            )));
        }
        let (store, lister) = s3_store(bucket, s3, settings)?;
        Ok(S3Source {
            store,
            lister,
            prefix: prefix.to_string(),
        })
    }
}

fn s3_store(
    bucket: &str,
    s3: &S3Section,
    settings: &BackendSettings,
) -> Result<(Arc<dyn ObjectStore>, Lister), BackendError> {
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
    let b = b.with_client_options(client).with_retry(retry);
    let store = b
        .clone()
        .build()
        .map_err(|e| BackendError::Config(format!("s3://{bucket}: {e}")))?;
    let lister = Lister::new(
        &b,
        &store,
        s3.anonymous,
        settings.request_timeout,
        settings.connect_timeout,
        settings.max_retries,
    )
    .map_err(|e| BackendError::Config(format!("s3://{bucket}: {e}")))?;
    Ok((Arc::new(store), lister))
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

/// The store path of `key` (relative, checked; `""` for the root) below `prefix`, byte for byte.
fn store_path(id: &str, prefix: &str, key: &str) -> Result<StorePath, ApiError> {
    // A checked key below a checked prefix is what `parse` accepts, and it keeps the bytes.
    StorePath::parse(keys::join(prefix, key))
        .map_err(|e| ApiError::Invalid(format!("{id}/{key}: {e}")))
}

impl ObjectSource for S3Source {
    fn list<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RawEntry>, ApiError>> {
        Box::pin(async move {
            let path = store_path(id, &self.prefix, key)?;
            let dir = path.as_ref();
            let at = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            let l = self
                .lister
                .list(&at)
                .await
                .map_err(|e| list_error(id, key, e))?;
            let mut out = Vec::with_capacity(l.prefixes.len() + l.objects.len());
            let mut skipped: Vec<String> = Vec::new();
            for raw in &l.undecodable {
                skipped_key(dir, "not_utf8", raw);
                skipped.push(raw.clone());
            }
            let listed = l.prefixes.iter().map(|p| (p, None));
            let listed = listed.chain(l.objects.iter().map(|o| (&o.key, Some(o))));
            for (listed, object) in listed {
                match keys::child(dir, listed) {
                    // A name object_store cannot ask for is no entry either: never opened.
                    Child::Name(_) if StorePath::parse(listed.trim_end_matches('/')).is_err() => {
                        skipped_key(dir, "unparsable", listed);
                        skipped.push(listed.clone());
                    }
                    Child::Name(name) => out.push(RawEntry {
                        name: name.to_string(),
                        dir: object.is_none(),
                        key: keys::join(key, name),
                        size: object.map_or(0, |o| o.size),
                        mtime_ns: object
                            .map_or(0, |o| o.last_modified.timestamp_nanos_opt().unwrap_or(0)),
                        etag: object.and_then(|o| o.e_tag.clone()),
                        version: None,
                        owner: None,
                    }),
                    // The directory's own folder marker makes it exist; it is no file.
                    Child::Marker => {}
                    Child::Invalid(e) => {
                        skipped_key(dir, e.label(), listed);
                        skipped.push(listed.clone());
                    }
                }
            }
            if !skipped.is_empty() {
                tracing::warn!(
                    source = id,
                    dir = key,
                    keys = skipped.len(),
                    first = ?skipped.iter().take(5).collect::<Vec<_>>(),
                    "left out of the listing: keys that cannot be file names"
                );
            }
            Ok(out)
        })
    }

    fn read<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
        range: Range<u64>,
        etag: Option<&'a str>,
        version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Bytes, ApiError>> {
        Box::pin(async move {
            let path = store_path(id, &self.prefix, key)?;
            let options = exact_range(range, etag, version);
            let got = match self.store.get_opts(&path, options).await {
                Ok(r) => r.bytes().await,
                Err(e) => Err(e),
            };
            got.map_err(|e| store_error("get", id, key, e))
        })
    }

    fn read_to<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
        range: Range<u64>,
        etag: Option<&'a str>,
        version: Option<&'a str>,
        sink: &'a mut (dyn FnMut(&[u8]) + Send),
    ) -> BoxFuture<'a, Result<Delivered, ApiError>> {
        use futures::StreamExt;
        Box::pin(async move {
            let path = store_path(id, &self.prefix, key)?;
            let expected = range.end - range.start;
            let options = exact_range(range, etag, version);
            let mut got = 0u64;
            async {
                let mut stream = self.store.get_opts(&path, options).await?.into_stream();
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
            .map_err(|e| store_error("get", id, key, e))?;
            Ok(Delivered::Streamed(got))
        })
    }

    fn probe<'a>(
        &'a self,
        id: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), (ProbeFailure, String)>> {
        Box::pin(async move {
            let path = store_path(id, &self.prefix, "")
                .map_err(|e| (ProbeFailure::Refused, e.to_string()))?;
            let at = if path.as_ref().is_empty() {
                String::new()
            } else {
                format!("{}/", path.as_ref())
            };
            match tokio::time::timeout(timeout, self.lister.list(&at)).await {
                Err(_) => Err((
                    ProbeFailure::Timeout,
                    format!("no answer within {timeout:?}"),
                )),
                Ok(Err(e)) => Err((list_failure(&e), e.to_string())),
                Ok(Ok(_)) => Ok(()),
            }
        })
    }
}

/// The answer to a failed listing.
fn list_error(id: &str, key: &str, e: ListError) -> ApiError {
    let what = format!("list {id}/{key}: {e}");
    match list_failure(&e) {
        ProbeFailure::NoBucket => ApiError::NotFound(what),
        ProbeFailure::AccessDenied => ApiError::Denied(what),
        _ => ApiError::Unavailable(what),
    }
}

/// What a failed listing of our own says of the source: its status, else its text.
fn list_failure(e: &ListError) -> ProbeFailure {
    match e.status {
        Some(404) => ProbeFailure::NoBucket,
        Some(401 | 403) => ProbeFailure::AccessDenied,
        _ => probe_failure(&object_store::Error::Generic {
            store: "S3",
            source: e.message.clone().into(),
        }),
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
