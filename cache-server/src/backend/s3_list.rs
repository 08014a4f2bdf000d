//! Our own S3 ListObjectsV2: one directory level (`delimiter=/`), keys URL-encoded by the
//! server (`encoding-type=url`, so any key survives XML) and decoded here, every page followed.
//!
//! object_store's listing fails a whole page when one key cannot be its `Path` (`a//b`, `x/../y`,
//! a control character): one hostile key would make a directory unlistable for everyone. Here a
//! key is only a string; the caller leaves out those that cannot be names. Requests are signed
//! with object_store's `AwsAuthorizer` and the credentials of the source's store, and go to the
//! same endpoint, region and addressing style.

use chrono::{DateTime, Utc};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::{HttpRequest, HttpRequestBody};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::Deserialize;
use std::time::Duration;

/// What a query value may hold unencoded (SigV4's canonical query: the unreserved characters).
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Pages of one listing at most (1,000 keys a page): a bound on a directory's size.
const MAX_PAGES: usize = 100_000;

/// Bytes of one page's answer at most: 1,000 keys of up to 1 KiB, each URL-encoded (3 bytes a
/// byte at worst), with their metadata, fit well within it.
const MAX_PAGE_BYTES: usize = 16 << 20;

/// Lists a bucket with the settings of its object_store store.
pub(super) struct Lister {
    http: reqwest::Client,
    /// `{endpoint}/{bucket}` (path style), or the bucket's own host (virtual-hosted style).
    bucket_url: String,
    region: String,
    /// `None`: unsigned requests (a public bucket).
    credentials: Option<object_store::aws::AwsCredentialProvider>,
    max_retries: usize,
}

/// One object of a listing, its key decoded.
#[derive(Debug, Clone)]
pub(super) struct ListedObject {
    pub key: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
    pub e_tag: Option<String>,
}

/// One directory level: objects, and common prefixes (each ending in `/`).
#[derive(Debug, Default)]
pub(super) struct Listed {
    pub objects: Vec<ListedObject>,
    pub prefixes: Vec<String>,
    /// Keys the server sent that do not decode to UTF-8 (left out).
    pub undecodable: Vec<String>,
}

/// Why a listing failed: the HTTP status, when the server answered, and what it said.
#[derive(Debug)]
pub(super) struct ListError {
    pub status: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "status {s}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Page {
    #[serde(default)]
    contents: Vec<Contents>,
    #[serde(default)]
    common_prefixes: Vec<Prefix>,
    #[serde(default)]
    is_truncated: bool,
    next_continuation_token: Option<String>,
    encoding_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Contents {
    key: String,
    size: u64,
    last_modified: DateTime<Utc>,
    #[serde(rename = "ETag")]
    e_tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Prefix {
    prefix: String,
}

/// A key as `encoding-type=url` sends it, decoded (`+` is a space, as in a form: S3's docs).
fn decode_key(encoded: &str) -> Option<String> {
    let plus = encoded.replace('+', " ");
    percent_decode_str(&plus).decode_utf8().ok().map(Into::into)
}

impl Lister {
    /// The lister of the bucket `builder` names (its config read before it is built), signing
    /// with `store`'s credentials unless `anonymous`.
    pub(super) fn new(
        builder: &AmazonS3Builder,
        store: &AmazonS3,
        anonymous: bool,
        request_timeout: Duration,
        connect_timeout: Duration,
        max_retries: usize,
    ) -> Result<Self, String> {
        let get = |k| builder.get_config_value(&k);
        let bucket = get(AmazonS3ConfigKey::Bucket).ok_or("no bucket name")?;
        let region = get(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = get(AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        // As object_store addresses the bucket (an S3-specific endpoint first; S3 Express
        // zonal endpoints are not derived here).
        let endpoint =
            get(AmazonS3ConfigKey::S3Endpoint).or_else(|| get(AmazonS3ConfigKey::Endpoint));
        let bucket_url = match (endpoint, virtual_hosted) {
            (Some(e), true) => e.trim_end_matches('/').to_string(),
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Lister {
            http,
            bucket_url,
            region,
            credentials: (!anonymous).then(|| store.credentials().clone()),
            max_retries,
        })
    }

    /// Lists the level below `prefix` (`""`, or a key ending in `/`), every page.
    pub(super) async fn list(&self, prefix: &str) -> Result<Listed, ListError> {
        let mut out = Listed::default();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self.page(prefix, token.as_deref()).await?;
            let decode = page.encoding_type.as_deref() == Some("url");
            let key = |raw: String, out: &mut Listed| {
                if !decode {
                    return Some(raw);
                }
                let k = decode_key(&raw);
                if k.is_none() {
                    out.undecodable.push(raw);
                }
                k
            };
            for c in page.contents {
                if let Some(k) = key(c.key, &mut out) {
                    out.objects.push(ListedObject {
                        key: k,
                        size: c.size,
                        last_modified: c.last_modified,
                        e_tag: c.e_tag,
                    });
                }
            }
            for p in page.common_prefixes {
                if let Some(k) = key(p.prefix, &mut out) {
                    out.prefixes.push(k);
                }
            }
            match page.next_continuation_token {
                Some(next) if page.is_truncated => token = Some(next),
                _ => return Ok(out),
            }
        }
        Err(ListError {
            status: None,
            message: format!("over {MAX_PAGES} pages under {prefix:?}"),
        })
    }

    /// One page, retried on no answer or a server error.
    async fn page(&self, prefix: &str, token: Option<&str>) -> Result<Page, ListError> {
        let mut query = format!(
            "delimiter=%2F&encoding-type=url&list-type=2&prefix={}",
            utf8_percent_encode(prefix, QUERY)
        );
        if let Some(t) = token {
            query = format!(
                "continuation-token={}&{query}",
                utf8_percent_encode(t, QUERY)
            );
        }
        let url = format!("{}?{query}", self.bucket_url);
        let mut attempt = 0;
        loop {
            match self.get(&url).await {
                Err(e) if attempt < self.max_retries && e.status.is_none_or(|s| s >= 500) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                }
                other => return other,
            }
        }
    }

    async fn get(&self, url: &str) -> Result<Page, ListError> {
        let fail = |status, message: String| ListError { status, message };
        let mut request: HttpRequest = http::Request::builder()
            .method(http::Method::GET)
            .uri(url)
            .body(HttpRequestBody::empty())
            .map_err(|e| fail(None, format!("{url}: {e}")))?;
        if let Some(provider) = &self.credentials {
            let credential = provider
                .get_credential()
                .await
                .map_err(|e| fail(None, format!("credentials: {e}")))?;
            AwsAuthorizer::new(&credential, "s3", &self.region)
                .try_authorize(&mut request, None)
                .map_err(|e| fail(None, format!("signing: {e}")))?;
        }
        let mut response = self
            .http
            .get(url)
            .headers(request.headers().clone())
            .send()
            .await
            .map_err(|e| fail(None, format!("GET {url}: error sending request: {e}")))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| fail(Some(status.as_u16()), format!("GET {url}: {e}")))?
        {
            if body.len() + chunk.len() > MAX_PAGE_BYTES {
                return Err(fail(
                    Some(status.as_u16()),
                    format!("GET {url}: the answer is over {MAX_PAGE_BYTES} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let body = String::from_utf8_lossy(&body);
        if !status.is_success() {
            // (The server's own words, as far as a message needs them.)
            let words: String = body.chars().take(1024).collect();
            return Err(fail(Some(status.as_u16()), format!("GET {url}: {words}")));
        }
        quick_xml::de::from_str(&body).map_err(|e| {
            fail(
                Some(status.as_u16()),
                format!("GET {url}: not a listing: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_as_the_s3_docs_say() {
        assert_eq!(decode_key("a%2F%2Fb").as_deref(), Some("a//b"));
        assert_eq!(decode_key("q%2520a.txt").as_deref(), Some("q%20a.txt"));
        assert_eq!(decode_key("with+space").as_deref(), Some("with space"));
        assert_eq!(decode_key("plus%2Bsign").as_deref(), Some("plus+sign"));
        assert_eq!(decode_key("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(decode_key("nul%00x").as_deref(), Some("nul\0x"));
        assert_eq!(decode_key("bad%FF"), None);
    }

    #[test]
    fn a_page_parses_with_its_encoded_keys() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Name>b</Name><Prefix>d%2F</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
<Delimiter>%2F</Delimiter><IsTruncated>true</IsTruncated><EncodingType>url</EncodingType>
<NextContinuationToken>tok+en/=</NextContinuationToken>
<Contents><Key>d%2F..%2Fx</Key><LastModified>2024-01-02T03:04:05.000Z</LastModified>
<ETag>&quot;abc&quot;</ETag><Size>3</Size><StorageClass>STANDARD</StorageClass></Contents>
<CommonPrefixes><Prefix>d%2Fsub%2F</Prefix></CommonPrefixes>
</ListBucketResult>"#;
        let page: Page = quick_xml::de::from_str(xml).unwrap();
        assert!(page.is_truncated);
        assert_eq!(page.next_continuation_token.as_deref(), Some("tok+en/="));
        assert_eq!(page.contents[0].key, "d%2F..%2Fx");
        assert_eq!(page.contents[0].e_tag.as_deref(), Some("\"abc\""));
        assert_eq!(page.common_prefixes[0].prefix, "d%2Fsub%2F");
        assert_eq!(page.encoding_type.as_deref(), Some("url"));
    }
}
