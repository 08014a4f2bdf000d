//! Source URIs: where a part of the namespace comes from.
//!
//! * `s3://bucket[/prefix]`: S3 or an S3-compatible store (Ceph RGW, MinIO, ...).
//! * `file:///abs/path` or `/abs/path`: a POSIX directory (GlusterFS, CephFS or NFS mounts).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceUri {
    S3 { bucket: String, prefix: String },
    Local { path: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error(
        "unknown URI scheme {scheme:?} in {uri:?} (use s3://bucket/prefix, file:///path or an absolute path)"
    )]
    UnknownScheme { uri: String, scheme: String },
    #[error("missing bucket in {0:?} (expected s3://bucket/prefix)")]
    MissingBucket(String),
    #[error("invalid bucket name {bucket:?} in {uri:?}")]
    InvalidBucket { uri: String, bucket: String },
    #[error("{0:?} is not an absolute path")]
    RelativePath(String),
    #[error("empty source URI")]
    Empty,
}

impl FromStr for SourceUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let uri = uri.trim();
        if uri.is_empty() {
            return Err(UriError::Empty);
        }
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(UriError::MissingBucket(uri.to_string()));
            }
            let valid = bucket.len() >= 3
                && bucket.len() <= 63
                && bucket.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' || c == '_'
                });
            if !valid {
                return Err(UriError::InvalidBucket {
                    uri: uri.to_string(),
                    bucket: bucket.to_string(),
                });
            }
            let prefix = prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("/");
            return Ok(SourceUri::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        if let Some(path) = uri.strip_prefix("file://") {
            return local(path);
        }
        if let Some((scheme, _)) = uri.split_once("://") {
            return Err(UriError::UnknownScheme {
                uri: uri.to_string(),
                scheme: scheme.to_string(),
            });
        }
        local(uri)
    }
}

fn local(path: &str) -> Result<SourceUri, UriError> {
    if !path.starts_with('/') {
        return Err(UriError::RelativePath(path.to_string()));
    }
    let trimmed = path.trim_end_matches('/');
    Ok(SourceUri::Local {
        path: if trimmed.is_empty() {
            "/".into()
        } else {
            trimmed.into()
        },
    })
}

impl fmt::Display for SourceUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceUri::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            SourceUri::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            SourceUri::Local { path } => write!(f, "file://{path}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            "s3://bucket/a/b/".parse::<SourceUri>().unwrap(),
            SourceUri::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            "s3://bucket".parse::<SourceUri>().unwrap(),
            SourceUri::S3 {
                bucket: "bucket".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            "file:///mnt/gluster/".parse::<SourceUri>().unwrap(),
            SourceUri::Local {
                path: "/mnt/gluster".into()
            }
        );
        assert_eq!(
            "/data".parse::<SourceUri>().unwrap(),
            SourceUri::Local {
                path: "/data".into()
            }
        );
        assert_eq!(
            "s3://b-1/x".parse::<SourceUri>().unwrap().to_string(),
            "s3://b-1/x"
        );
    }

    #[test]
    fn rejects_bad_uris() {
        assert!(matches!(
            "gs://b/x".parse::<SourceUri>(),
            Err(UriError::UnknownScheme { .. })
        ));
        assert!(matches!(
            "s3:///x".parse::<SourceUri>(),
            Err(UriError::MissingBucket(_))
        ));
        assert!(matches!(
            "s3://".parse::<SourceUri>(),
            Err(UriError::MissingBucket(_))
        ));
        assert!(matches!(
            "s3://Bad Bucket/x".parse::<SourceUri>(),
            Err(UriError::InvalidBucket { .. })
        ));
        assert!(matches!(
            "data/x".parse::<SourceUri>(),
            Err(UriError::RelativePath(_))
        ));
        assert!(matches!(
            "file://rel".parse::<SourceUri>(),
            Err(UriError::RelativePath(_))
        ));
        assert!(matches!("".parse::<SourceUri>(), Err(UriError::Empty)));
    }
}
