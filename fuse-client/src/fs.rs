//! The filesystem logic, independent of the kernel interface.
//!
//! [`GranaryFs`] answers lookups, attributes, directory listings, opens and reads in its own
//! types ([`Attr`], [`FsError`]); `fuse.rs` adapts them to fuser. It is read-only: every write
//! path fails with EROFS. Directory handles snapshot their listing at opendir, so readdir offsets
//! stay stable. A file handle pins the object version seen at open: reads serve exactly that
//! version or fail, never a mix. The kernel may keep a file's page cache across opens
//! (FOPEN_KEEP_CACHE) only while the object version is unchanged.

use crate::inodes::{InodeTable, ROOT, child_path};
use crate::prefetch::{Budget, FileReader};
use bytes::Bytes;
use granary_core::BlockSize;
use granary_proto::{ApiError, CacheApi, Entry, EntryKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Settings of the FUSE client.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long the kernel (and we) may trust attributes and entries.
    pub attr_ttl: Duration,
    /// Readahead per open file, in bytes (rounded down to whole blocks, at least one block).
    pub readahead_per_file: u64,
    /// Readahead across all open files, in bytes.
    pub readahead_total: u64,
    /// A read that has not completed by then fails with EIO.
    pub read_timeout: Duration,
    pub uid: u32,
    pub gid: u32,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            attr_ttl: Duration::from_secs(30),
            readahead_per_file: 64 << 20,
            readahead_total: 128 << 20,
            read_timeout: Duration::from_secs(25),
            uid: 0,
            gid: 0,
        }
    }
}

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
}

impl From<ApiError> for FsError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(_) => FsError::NotFound,
            ApiError::NotADirectory(_) => FsError::NotADirectory,
            ApiError::Stale(m) => FsError::Stale(m),
            ApiError::Invalid(m) => FsError::Invalid(m),
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
        }
    }
}

/// File attributes, in our own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// One entry of a directory read: offset of the next entry, inode, kind, name, attributes.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub next_offset: u64,
    pub ino: u64,
    pub name: String,
    pub attr: Attr,
}

/// The answer to open.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The object is the version the kernel last cached: keep its pages.
    pub keep_cache: bool,
}

struct DirHandle {
    path: String,
    parent_ino: u64,
    entries: Arc<Vec<Entry>>,
}

pub struct GranaryFs<A> {
    api: Arc<A>,
    config: FsConfig,
    block_size: BlockSize,
    max_ahead_blocks: u64,
    budget: Budget,
    inodes: Mutex<InodeTable>,
    files: Mutex<HashMap<u64, Arc<FileReader>>>,
    dirs: Mutex<HashMap<u64, DirHandle>>,
    /// Per inode, the object fingerprint the kernel's page cache holds.
    cached_versions: Mutex<HashMap<u64, u128>>,
    next_fh: AtomicU64,
}

impl<A> std::fmt::Debug for GranaryFs<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GranaryFs")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<A: CacheApi> GranaryFs<A> {
    pub fn new(api: Arc<A>, config: FsConfig) -> Self {
        let block_size = api.info().block_size;
        let mounted_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let root = Entry {
            name: String::new(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: mounted_ns,
            object: None,
        };
        GranaryFs {
            max_ahead_blocks: (config.readahead_per_file / block_size.get()).max(1),
            budget: Budget::new(config.readahead_total),
            api,
            block_size,
            inodes: Mutex::new(InodeTable::new(root, Instant::now())),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            cached_versions: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            config,
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Bytes currently held by readahead.
    pub fn readahead_bytes(&self) -> u64 {
        self.budget.used_bytes()
    }

    fn attr(&self, ino: u64, entry: &Entry) -> Attr {
        let (perm, size) = match entry.kind {
            EntryKind::Dir => (0o555, 4096),
            EntryKind::File => (0o444, entry.size),
        };
        Attr {
            ino,
            kind: entry.kind,
            size,
            mtime_ns: entry.mtime_ns,
            perm,
            uid: self.config.uid,
            gid: self.config.gid,
            blksize: self.block_size.get().min(1 << 20) as u32,
        }
    }

    fn path_of(&self, ino: u64) -> Result<String, FsError> {
        let inodes = self.inodes.lock().expect("inode lock");
        inodes
            .get(ino)
            .map(|i| i.path.clone())
            .ok_or(FsError::NotFound)
    }

    /// Looks `name` up in directory `parent`; the kernel takes one reference on success.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(FsError::Invalid(format!("bad name {name:?}")));
        }
        let parent_path = self.path_of(parent)?;
        let path = child_path(&parent_path, name);
        let entry = self.api.stat(&path).await?;
        let ino =
            self.inodes
                .lock()
                .expect("inode lock")
                .upsert(&path, entry.clone(), 1, Instant::now());
        Ok(self.attr(ino, &entry))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.lock().expect("inode lock").forget(ino, n);
    }

    /// Attributes of `ino`, refreshed from the worker once older than the TTL.
    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let (path, entry, fresh) = {
            let inodes = self.inodes.lock().expect("inode lock");
            let inode = inodes.get(ino).ok_or(FsError::NotFound)?;
            (
                inode.path.clone(),
                inode.entry.clone(),
                inode.seen.elapsed() < self.config.attr_ttl,
            )
        };
        if fresh || ino == ROOT {
            return Ok(self.attr(ino, &entry));
        }
        let entry = self.api.stat(&path).await?;
        self.inodes
            .lock()
            .expect("inode lock")
            .refresh(ino, entry.clone(), Instant::now());
        Ok(self.attr(ino, &entry))
    }

    /// Opens a file for reading; `write` = the open asked for write access.
    pub async fn open(&self, ino: u64, write: bool) -> Result<Opened, FsError> {
        if write {
            return Err(FsError::ReadOnly);
        }
        let path = self.path_of(ino)?;
        let entry = self.api.stat(&path).await?;
        self.inodes
            .lock()
            .expect("inode lock")
            .refresh(ino, entry.clone(), Instant::now());
        let object = match (entry.kind, entry.object) {
            (EntryKind::File, Some(object)) => object,
            (EntryKind::Dir, _) => return Err(FsError::IsADirectory),
            (EntryKind::File, None) => {
                return Err(FsError::Io(format!("{path}: file without an object")));
            }
        };
        let fingerprint = object.id.fingerprint();
        let keep_cache = {
            let mut versions = self.cached_versions.lock().expect("versions lock");
            versions.insert(ino, fingerprint) == Some(fingerprint)
        };
        let reader = FileReader::new(
            object,
            self.block_size,
            self.max_ahead_blocks,
            self.budget.clone(),
        );
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .expect("files lock")
            .insert(fh, Arc::new(reader));
        Ok(Opened { fh, keep_cache })
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let reader = self
            .files
            .lock()
            .expect("files lock")
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        match tokio::time::timeout(
            self.config.read_timeout,
            reader.read(&self.api, offset, size as u64),
        )
        .await
        {
            Ok(result) => Ok(result?),
            Err(_) => Err(FsError::Io(format!(
                "read of {:?} at {offset} did not complete within {:?}",
                reader.object().id.key,
                self.config.read_timeout
            ))),
        }
    }

    pub fn release(&self, fh: u64) {
        self.files.lock().expect("files lock").remove(&fh);
    }

    /// Opens a directory: its listing is taken now and served from this handle.
    pub async fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let (path, parent_ino) = {
            let inodes = self.inodes.lock().expect("inode lock");
            let inode = inodes.get(ino).ok_or(FsError::NotFound)?;
            if inode.entry.kind != EntryKind::Dir {
                return Err(FsError::NotADirectory);
            }
            let parent = inode
                .path
                .rsplit_once('/')
                .map(|(p, _)| if p.is_empty() { "/" } else { p })
                .unwrap_or("/");
            (inode.path.clone(), inodes.ino_of(parent).unwrap_or(ROOT))
        };
        let entries = self.api.list(&path).await?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().expect("dirs lock").insert(
            fh,
            DirHandle {
                path,
                parent_ino,
                entries,
            },
        );
        Ok(fh)
    }

    /// Directory entries from `offset` on, `.` and `..` first. With `plus`, each returned entry is
    /// registered as an inode and `accept` must return whether the kernel took it (a reference).
    pub fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        plus: bool,
        mut accept: impl FnMut(&DirItem) -> bool,
    ) -> Result<(), FsError> {
        let (path, parent_ino, entries) = {
            let dirs = self.dirs.lock().expect("dirs lock");
            let d = dirs.get(&fh).ok_or(FsError::BadHandle)?;
            (d.path.clone(), d.parent_ino, d.entries.clone())
        };
        let self_entry = Entry {
            name: ".".into(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: 0,
            object: None,
        };
        let total = entries.len() as u64 + 2;
        for off in offset..total {
            let item = match off {
                0 => DirItem {
                    next_offset: 1,
                    ino,
                    name: ".".into(),
                    attr: self.attr(ino, &self_entry),
                },
                1 => DirItem {
                    next_offset: 2,
                    ino: parent_ino,
                    name: "..".into(),
                    attr: self.attr(parent_ino, &self_entry),
                },
                _ => {
                    let entry = &entries[(off - 2) as usize];
                    let child = child_path(&path, &entry.name);
                    let now = Instant::now();
                    let child_ino = {
                        let mut inodes = self.inodes.lock().expect("inode lock");
                        if plus {
                            inodes.upsert(&child, entry.clone(), 1, now)
                        } else {
                            inodes
                                .ino_of(&child)
                                .unwrap_or_else(|| synthetic_ino(&child))
                        }
                    };
                    DirItem {
                        next_offset: off + 1,
                        ino: child_ino,
                        name: entry.name.clone(),
                        attr: self.attr(child_ino, entry),
                    }
                }
            };
            if !accept(&item) {
                if plus && off >= 2 {
                    self.forget(item.ino, 1);
                }
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().expect("dirs lock").remove(&fh);
    }

    /// Number of inodes the kernel holds references to.
    pub fn inode_count(&self) -> usize {
        self.inodes.lock().expect("inode lock").len()
    }
}

/// A stable inode number for plain readdir entries the kernel has not looked up (it looks a
/// name up before any operation on it, so this only fills `d_ino`). The high bit keeps it apart
/// from the table's numbers. FNV-1a of the path.
fn synthetic_ino(path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | (1 << 63)
}
