//! A POSIX directory (GlusterFS, CephFS, NFS mounts), read with positional reads on blocking
//! threads. A file's version tag is its inode, mtime and size.

use super::{BackendError, ObjectSource, ProbeFailure, RawEntry, STALE, skipped_key};
use bytes::Bytes;
use futures::future::BoxFuture;
use granary_core::SourceUri;
use granary_core::keys;
use granary_proto::ApiError;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A directory of the local file system (or a network file system mounted on it).
pub(super) struct PosixSource {
    root: PathBuf,
}

impl PosixSource {
    /// The source directory `path` (`source` is its URI, for messages); it must be a directory.
    pub(super) fn new(source: &SourceUri, path: &str) -> Result<Self, BackendError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| BackendError::Config(format!("source {source}: {e}")))?;
        if !meta.is_dir() {
            return Err(BackendError::Config(format!(
                "source {source} is not a directory"
            )));
        }
        Ok(PosixSource {
            root: PathBuf::from(path),
        })
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

impl ObjectSource for PosixSource {
    fn list<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RawEntry>, ApiError>> {
        Box::pin(async move {
            let (root, key_owned) = (self.root.clone(), key.to_string());
            tokio::task::spawn_blocking(move || posix_list(&root, &key_owned))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| io_error("list", id, key, e))
        })
    }

    fn read<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
        range: Range<u64>,
        etag: Option<&'a str>,
        _version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Bytes, ApiError>> {
        Box::pin(async move {
            let (root, key_owned, etag_owned) =
                (self.root.clone(), key.to_string(), etag.map(str::to_string));
            tokio::task::spawn_blocking(move || {
                posix_read(&root, &key_owned, range, etag_owned.as_deref())
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| match e {
                PosixReadError::Stale => ApiError::Stale(format!("get {id}/{key}: {STALE}")),
                PosixReadError::Io(e) => io_error("get", id, key, e),
            })
        })
    }

    fn probe<'a>(
        &'a self,
        _id: &'a str,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<(), (ProbeFailure, String)>> {
        // One read of the directory, on this thread: `timeout` is not applied to it.
        Box::pin(async move {
            std::fs::read_dir(&self.root).map(drop).map_err(|e| {
                let kind = match e.kind() {
                    std::io::ErrorKind::NotFound => ProbeFailure::NoDirectory,
                    std::io::ErrorKind::PermissionDenied => ProbeFailure::AccessDenied,
                    _ => ProbeFailure::Refused,
                };
                (kind, e.to_string())
            })
        })
    }
}
