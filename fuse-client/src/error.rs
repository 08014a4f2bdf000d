//! What the filesystem answers with when it fails ([`FsError`]), by errno: one type for the
//! answers of [`crate::fs`] and the open chain of [`crate::open`], mapped from the worker's
//! [`ApiError`] and to the kernel's errno and a metric label.

use granary_proto::ApiError;

/// What the filesystem answers with, by errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("read-only file system")]
    ReadOnly,
    #[error("bad file handle")]
    BadHandle,
    #[error("stale file: {0}")]
    Stale(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("I/O error: {0}")]
    Io(String),
    /// The worker refused (a symlink leading out of a POSIX source, a token's scope).
    #[error("permission denied: {0}")]
    Denied(String),
    /// The open-handle table is full (`FsConfig::max_handles`).
    #[error("too many open files on this mount ({0} handles)")]
    TooManyOpen(usize),
}

impl From<ApiError> for FsError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(_) => FsError::NotFound,
            ApiError::NotADirectory(_) => FsError::NotADirectory,
            ApiError::Stale(m) => FsError::Stale(m),
            ApiError::Invalid(m) => FsError::Invalid(m),
            ApiError::Denied(m) => FsError::Denied(m),
            other => FsError::Io(other.to_string()),
        }
    }
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::Stale(_) => libc::ESTALE,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Io(_) => libc::EIO,
            FsError::Denied(_) => libc::EACCES,
            FsError::TooManyOpen(_) => libc::ENFILE,
        }
    }

    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FsError::NotFound => "enoent",
            FsError::NotADirectory => "enotdir",
            FsError::IsADirectory => "eisdir",
            FsError::ReadOnly => "erofs",
            FsError::BadHandle => "ebadf",
            FsError::Stale(_) => "estale",
            FsError::Invalid(_) => "einval",
            FsError::Io(_) => "eio",
            FsError::Denied(_) => "eacces",
            FsError::TooManyOpen(_) => "enfile",
        }
    }
}
