//! A POSIX directory (GlusterFS, CephFS, NFS mounts), read with positional reads on blocking
//! threads. A file's version tag is its inode, mtime and size; its mode bits and owner are shown
//! as they are.
//!
//! Every path is opened beneath the source's root ([`super::beneath`]): a symlink inside the root
//! works; one leading out of it (or `..` above it) is refused (`EXDEV` from the kernel, told as
//! permission denied, naming the link); it is listed as a one-byte file nobody may read.

use super::beneath::{self, Links};
use super::{BackendError, ObjectSource, ProbeFailure, RawEntry, STALE, skipped_key};
use bytes::Bytes;
use futures::future::BoxFuture;
use granary_core::SourceUri;
use granary_core::keys;
use granary_proto::{ApiError, Owner};
use rustix::fs::OFlags;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A directory of the local file system (or a network file system mounted on it).
pub(super) struct PosixSource {
    root: PathBuf,
    /// The root directory, opened once: every path is resolved beneath it.
    dir: Arc<OwnedFd>,
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
        let dir = beneath::open_root(std::path::Path::new(path))
            .map_err(|e| BackendError::Config(format!("source {source}: {e}")))?;
        Ok(PosixSource {
            root: PathBuf::from(path),
            dir: Arc::new(dir),
        })
    }
}

fn io_error(op: &str, id: &str, key: &str, e: std::io::Error) -> ApiError {
    if beneath::escaped(&e) {
        tracing::warn!(
            source = id,
            path = key,
            "refused: a symlink leads out of the source"
        );
        return ApiError::Denied(format!(
            "{op} {id}/{key}: a symlink on the path leads out of the source"
        ));
    }
    let what = format!("{op} {id}/{key}: {e}");
    match e.kind() {
        std::io::ErrorKind::NotFound => ApiError::NotFound(what),
        std::io::ErrorKind::NotADirectory => ApiError::NotADirectory(what),
        std::io::ErrorKind::PermissionDenied => ApiError::Denied(what),
        std::io::ErrorKind::InvalidInput => ApiError::Invalid(what),
        _ => ApiError::Unavailable(what),
    }
}

/// A file's permission bits and owner, as they are.
fn owner(meta: &std::fs::Metadata) -> Owner {
    Owner {
        mode: meta.mode() & 0o777,
        uid: meta.uid(),
        gid: meta.gid(),
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
fn posix_list(root: &OwnedFd, key: &str) -> std::io::Result<Vec<RawEntry>> {
    let dir = beneath::open_at(
        root,
        key,
        OFlags::RDONLY | OFlags::DIRECTORY,
        0,
        Links::Inside,
    )?;
    let mut out = Vec::new();
    let mut outside = Vec::new();
    let mut skipped = 0u64;
    for entry in rustix::fs::Dir::new(dir)? {
        let entry = entry?;
        let raw = entry.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let Ok(name) = String::from_utf8(raw.to_vec()) else {
            skipped_key(key, "not_utf8", &String::from_utf8_lossy(raw));
            skipped += 1;
            continue;
        };
        if let Err(e) = keys::check_name(&name) {
            skipped_key(key, e.label(), &name);
            skipped += 1;
            continue;
        }
        // Follow symlinks beneath the root; leave out what cannot be stat'ed (dangling links)
        // and special files. A link leading out of the root is shown as a one-byte file nobody
        // may read (mode 0, root's): every read of it (root's too) asks the source and is
        // refused with permission denied, naming the link.
        let child = keys::join(key, &name);
        let meta = match beneath::open_at(root, &child, OFlags::PATH, 0, Links::Inside)
            .and_then(|f| f.metadata())
        {
            Ok(meta) => meta,
            Err(e) if beneath::escaped(&e) => {
                outside.push(name.clone());
                out.push(RawEntry {
                    key: child,
                    name,
                    dir: false,
                    size: 1,
                    mtime_ns: 0,
                    etag: None,
                    version: None,
                    owner: Some(Owner {
                        mode: 0,
                        uid: 0,
                        gid: 0,
                    }),
                });
                continue;
            }
            Err(_) => continue,
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
            owner: Some(owner(&meta)),
        });
    }
    if skipped > 0 {
        tracing::warn!(
            dir = key,
            names = skipped,
            "left out of the listing: names that cannot be file names here"
        );
    }
    if !outside.is_empty() {
        tracing::warn!(
            dir = key,
            links = ?outside,
            "symlinks leading out of the source: shown, never opened"
        );
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
    root: &OwnedFd,
    key: &str,
    range: Range<u64>,
    etag: Option<&str>,
) -> Result<Bytes, PosixReadError> {
    let file = beneath::open_at(root, key, OFlags::RDONLY, 0, Links::Inside)?;
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
            let (root, key_owned) = (self.dir.clone(), key.to_string());
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
                (self.dir.clone(), key.to_string(), etag.map(str::to_string));
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
