//! The filesystem logic, independent of the kernel interface.
//!
//! [`GranaryFs`] answers lookups, attributes, directory listings, opens and reads in its own
//! types ([`Attr`], [`FsError`]); `fuse.rs` adapts them to fuser. It is read-only: every write
//! path fails with EROFS. Directory handles snapshot their listing at opendir, so readdir offsets
//! stay stable. A file handle pins the object version seen at open: reads serve exactly that
//! version or fail, never a mix. The kernel may keep a file's page cache across opens
//! (FOPEN_KEEP_CACHE) only while the object version is unchanged.
//!
//! Passthrough: when the worker on this machine holds a verified whole copy of exactly the
//! version an open sees ([`CacheApi::local_copy`]), [`GranaryFs::open_passthrough`] hands that
//! file to the kernel (through the adapter's `register` callback) and the kernel reads it
//! directly; no read request reaches this process. The kernel allows one backing file per inode
//! and never mixes passthrough and ordinary opens of one inode, so each inode here is in one io
//! mode at a time until its last handle is released.

use crate::inodes::{InodeTable, ROOT, child_path};
use crate::prefetch::{Budget, FileReader, ReadLabels};
use bytes::Bytes;
use granary_core::BlockSize;
use granary_proto::{ApiError, CacheApi, Entry, EntryKind};
use std::any::Any;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Let the kernel read files the local worker holds whole (a pinned dataset's files) straight
    /// from the worker's copy (FUSE passthrough). Only meaningful when the API's worker runs on
    /// this machine: the paths it returns are local paths.
    pub passthrough: bool,
    /// The job (or pod) this mount serves, a label of its data-stall metric ("" = none).
    pub job: String,
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
            passthrough: true,
            job: String::new(),
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

/// A local file registered with the kernel for passthrough, as the adapter made it (a
/// `fuser::BackingId`). Held while any open handle of its inode uses it; dropping the last
/// reference unregisters it.
pub type Backing = Arc<dyn Any + Send + Sync>;

/// How the kernel serves an open file's reads.
#[derive(Clone)]
pub enum OpenIo {
    /// Reads come to this process ([`GranaryFs::read`]).
    Userspace,
    /// The kernel reads this registered local copy itself.
    Passthrough(Backing),
}

impl std::fmt::Debug for OpenIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenIo::Userspace => f.write_str("Userspace"),
            OpenIo::Passthrough(_) => f.write_str("Passthrough"),
        }
    }
}

/// The answer to open.
#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: u64,
    /// The object is the version the kernel last cached: keep its pages (userspace opens only).
    pub keep_cache: bool,
    pub io: OpenIo,
}

impl Opened {
    pub fn is_passthrough(&self) -> bool {
        matches!(self.io, OpenIo::Passthrough(_))
    }
}

/// The io mode of an inode with open handles. The kernel fails an open (EIO) that mixes modes
/// on one inode, or that names a second backing file for it.
enum InodeIo {
    /// `opens` handles read through this process.
    Userspace { opens: u64 },
    /// `opens` handles read `backing`, the local copy of the version with `fingerprint`.
    Passthrough {
        fingerprint: u128,
        backing: Backing,
        opens: u64,
    },
}

impl InodeIo {
    fn opens(&mut self) -> &mut u64 {
        match self {
            InodeIo::Userspace { opens } | InodeIo::Passthrough { opens, .. } => opens,
        }
    }
}

struct OpenFile {
    ino: u64,
    reader: Arc<FileReader>,
}

/// Why a local copy was not used.
#[derive(Debug)]
enum Unusable {
    NotARegularFile,
    WrongSize(u64),
    Io(std::io::Error),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::NotARegularFile => f.write_str("not a regular file"),
            Unusable::WrongSize(n) => write!(f, "it has {n} bytes"),
            Unusable::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Opens a local copy read-only and checks that it is a regular file of `size` bytes.
fn open_local_copy(path: &Path, size: u64) -> Result<File, Unusable> {
    let file = File::open(path).map_err(Unusable::Io)?;
    let meta = file.metadata().map_err(Unusable::Io)?;
    if !meta.is_file() {
        return Err(Unusable::NotARegularFile);
    }
    if meta.len() != size {
        return Err(Unusable::WrongSize(meta.len()));
    }
    Ok(file)
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
    files: Mutex<HashMap<u64, OpenFile>>,
    dirs: Mutex<HashMap<u64, DirHandle>>,
    /// Per inode, the object fingerprint the kernel's page cache holds.
    cached_versions: Mutex<HashMap<u64, u128>>,
    /// Per inode with open handles, how the kernel reads it.
    io_modes: Mutex<HashMap<u64, InodeIo>>,
    /// Passthrough is wanted and neither the kernel nor our privileges refused it (yet).
    passthrough: AtomicBool,
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
            io_modes: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(config.passthrough),
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

    /// Whether new opens may still use passthrough.
    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Stops using passthrough for new opens (the kernel or our privileges refused it), saying
    /// why once. Handles already open through passthrough keep their backing file.
    pub fn disable_passthrough(&self, why: &str) {
        if self.passthrough.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                reason = why,
                "FUSE passthrough unavailable: files held locally are read through userspace"
            );
        }
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

    /// Opens a file for reading through this process; `write` = the open asked for write access.
    /// (An inode already open through passthrough is opened the same way, as the kernel requires.)
    pub async fn open(&self, ino: u64, write: bool) -> Result<Opened, FsError> {
        self.open_inner(ino, write, None::<fn(&File) -> std::io::Result<Backing>>)
            .await
    }

    /// Opens a file for reading, through passthrough when the worker holds a usable local copy
    /// of exactly this version: `register` hands the opened copy to the kernel. Falls back to
    /// reading through this process when there is no copy, the copy does not match, or the
    /// kernel refuses it; fails only as [`GranaryFs::open`] does, or with `Stale` when the
    /// object changed while another handle reads the old version through passthrough (the
    /// kernel allows one backing file per inode and no ordinary opens beside it).
    pub async fn open_passthrough(
        &self,
        ino: u64,
        write: bool,
        register: impl FnOnce(&File) -> std::io::Result<Backing>,
    ) -> Result<Opened, FsError> {
        self.open_inner(ino, write, Some(register)).await
    }

    async fn open_inner(
        &self,
        ino: u64,
        write: bool,
        register: Option<impl FnOnce(&File) -> std::io::Result<Backing>>,
    ) -> Result<Opened, FsError> {
        if write {
            return Err(FsError::ReadOnly);
        }
        let (path, known) = {
            let inodes = self.inodes.lock().expect("inode lock");
            let inode = inodes.get(ino).ok_or(FsError::NotFound)?;
            (inode.path.clone(), inode.entry.object.clone())
        };
        // Ask for a local copy of the version the inode last showed while the stat runs, when
        // this open could use one (an inode already open in either mode stays in that mode).
        let ask = match known {
            Some(known) if register.is_some() && self.passthrough_enabled() => {
                let idle = !self.io_modes.lock().expect("io lock").contains_key(&ino);
                idle.then_some(known)
            }
            _ => None,
        };
        let (entry, copy) = match &ask {
            Some(known) => {
                let (entry, copy) =
                    futures::join!(self.api.stat(&path), self.api.local_copy(known));
                (entry?, Some(copy))
            }
            None => (self.api.stat(&path).await?, None),
        };
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
        // A copy is only good for the version it was asked for; a changed version reads through
        // userspace this time (never a second local_copy call per open).
        let copy = match (ask, copy) {
            (Some(asked), Some(copy)) if asked == object => {
                self.usable_copy(&path, entry.size, copy)
            }
            _ => None,
        };
        let io = self.choose_io(ino, &path, fingerprint, copy, register)?;
        let keep_cache = match io {
            // The kernel's page cache of the inode is not used (nor filled) by passthrough reads;
            // leave its record alone so that the next userspace open decides correctly.
            OpenIo::Passthrough(_) => false,
            OpenIo::Userspace => {
                let mut versions = self.cached_versions.lock().expect("versions lock");
                versions.insert(ino, fingerprint) == Some(fingerprint)
            }
        };
        // Stall time by the namespace's top directory (a mount point: low cardinality) and job.
        let top = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let labels = Arc::new(ReadLabels {
            dataset: top,
            job: self.config.job.clone(),
        });
        let reader = FileReader::new(
            object,
            self.block_size,
            self.max_ahead_blocks,
            self.budget.clone(),
            labels,
        );
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().expect("files lock").insert(
            fh,
            OpenFile {
                ino,
                reader: Arc::new(reader),
            },
        );
        Ok(Opened { fh, keep_cache, io })
    }

    /// The local copy the worker named, opened and checked, if it is usable.
    fn usable_copy(
        &self,
        path: &str,
        size: u64,
        answer: Result<Option<std::path::PathBuf>, ApiError>,
    ) -> Option<File> {
        match answer {
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(%path, error = %e, "no local copy (worker did not answer); reading through userspace");
                None
            }
            // A local open and fstat: cheap enough to do on the runtime thread.
            Ok(Some(local)) => match open_local_copy(&local, size) {
                Ok(file) => Some(file),
                Err(why) => {
                    tracing::warn!(
                        %path,
                        local = %local.display(),
                        expected_bytes = size,
                        problem = %why,
                        "the worker's local copy is not usable; reading through userspace"
                    );
                    None
                }
            },
        }
    }

    /// Decides the io mode of a new handle of `ino` and counts it, registering `copy` with the
    /// kernel if it is the inode's first passthrough handle.
    fn choose_io(
        &self,
        ino: u64,
        path: &str,
        fingerprint: u128,
        copy: Option<File>,
        register: Option<impl FnOnce(&File) -> std::io::Result<Backing>>,
    ) -> Result<OpenIo, FsError> {
        let mut modes = self.io_modes.lock().expect("io lock");
        match modes.get_mut(&ino) {
            Some(InodeIo::Passthrough {
                fingerprint: f,
                backing,
                opens,
            }) => {
                if *f != fingerprint {
                    return Err(FsError::Stale(format!(
                        "{path} changed while open through passthrough; it can be opened again once those handles are closed"
                    )));
                }
                *opens += 1;
                return Ok(OpenIo::Passthrough(backing.clone()));
            }
            Some(InodeIo::Userspace { opens }) => {
                *opens += 1;
                return Ok(OpenIo::Userspace);
            }
            None => {}
        }
        if let (Some(file), Some(register)) = (copy, register)
            && self.passthrough_enabled()
        {
            match register(&file) {
                Ok(backing) => {
                    modes.insert(
                        ino,
                        InodeIo::Passthrough {
                            fingerprint,
                            backing: backing.clone(),
                            opens: 1,
                        },
                    );
                    return Ok(OpenIo::Passthrough(backing));
                }
                Err(e) => {
                    self.disable_passthrough(&format!("registering a backing file failed: {e}"))
                }
            }
        }
        modes.insert(ino, InodeIo::Userspace { opens: 1 });
        Ok(OpenIo::Userspace)
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let reader = self
            .files
            .lock()
            .expect("files lock")
            .get(&fh)
            .map(|f| f.reader.clone())
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

    /// Closes a file handle; the inode's last handle ends its io mode (and unregisters its
    /// passthrough backing file).
    pub fn release(&self, fh: u64) {
        let Some(file) = self.files.lock().expect("files lock").remove(&fh) else {
            return;
        };
        let ended = {
            let mut modes = self.io_modes.lock().expect("io lock");
            let last = modes.get_mut(&file.ino).is_some_and(|mode| {
                let opens = mode.opens();
                *opens -= 1;
                *opens == 0
            });
            if last { modes.remove(&file.ino) } else { None }
        };
        // Unregistering the backing file (an ioctl) happens outside the lock.
        drop(ended);
    }

    /// Number of open handles of `ino` reading through passthrough.
    pub fn passthrough_handles(&self, ino: u64) -> u64 {
        match self.io_modes.lock().expect("io lock").get(&ino) {
            Some(InodeIo::Passthrough { opens, .. }) => *opens,
            _ => 0,
        }
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
