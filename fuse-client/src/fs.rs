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
//!
//! Pinned files: an entry the worker answered from a pinned dataset's frozen manifest
//! ([`Entry::pinned`]) cannot change version while the pin lasts, so an open of it trusts the
//! entry it has instead of asking the worker (outside pins every open asks: close-to-open
//! consistency). For how long: while the worker's pins epoch ([`CacheApi::pins_epoch`], polled
//! by the mount once a second through [`GranaryFs::check_pins`]) is the one the client knew when
//! it asked for the entry, and the kernel is told to keep such entries for the pinned TTL; when
//! the epoch changes, `check_pins` names the entries the kernel must drop. A worker that does not
//! track its pins, or does not answer, gets the attribute TTL.
//!
//! The local copy the worker named for a pinned version is remembered (and opened again only if
//! it is still the same file), and its kernel registration is kept for a while after the last
//! close ([`crate::backings`]), so the second open of a hot pinned file needs no call to the
//! worker and no system call: [`GranaryFs::open_now`] answers it on the FUSE thread.

use crate::backings::{IdleBackings, Kept};
use crate::inodes::{FileIdentity, InodeTable, KernelEntry, LocalCopy, ROOT, Seen, child_path};
use crate::prefetch::{Budget, FileReader, ReadLabels};
use bytes::Bytes;
use granary_core::BlockSize;
use granary_proto::{ApiError, CacheApi, Entry, EntryKind, ObjectRef};
use std::any::Any;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
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
    /// Passthrough registrations of pinned files kept after their last close (for as long as
    /// their entries are trusted), so that reopening a hot file costs no system call; 0 = none.
    pub kept_backings: usize,
    /// How long the kernel may keep a pinned entry while the worker's pins epoch holds (it is
    /// told to drop it when the epoch changes); at least `attr_ttl`.
    pub pinned_ttl: Duration,
    /// Take requests over FUSE-over-io_uring where the kernel offers it (one ring per CPU; as
    /// root, the mount turns on the `fuse` module's `enable_uring` parameter), else `/dev/fuse`.
    /// Off by default: see docs/ARCHITECTURE.md, "The kernel interface".
    pub io_uring: bool,
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
            kept_backings: 4096,
            pinned_ttl: Duration::from_secs(3600),
            io_uring: false,
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
    /// How long the kernel may keep this entry and these attributes.
    pub ttl: Duration,
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
/// [`crate::fuse::KernelBacking`]). Held while any open handle of its inode uses it; dropping the last
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
    /// `opens` handles read `backing`, the local copy of the version with `fingerprint`; `keep`:
    /// a pinned version, whose registration outlives the last close for a while.
    Passthrough {
        fingerprint: u128,
        backing: Backing,
        opens: u64,
        keep: bool,
    },
}

/// How the kernel reads inodes: the modes of those with open handles, and the registrations
/// kept for pinned ones without.
struct IoState {
    modes: HashMap<u64, InodeIo>,
    idle: IdleBackings<Backing>,
}

/// What the client knows of the worker's pins epoch.
#[derive(Debug, Default)]
struct PinsView {
    epoch: Option<u64>,
    /// When the worker last answered.
    checked: Option<Instant>,
    /// The epoch known at the last check: pinned entries had in it are trusted, and the kernel
    /// may keep them, until a check finds it changed or lapsed.
    trusted: Option<u64>,
    /// The epoch that ended at the last check, if one did: its entries are named once more.
    retired: Option<u64>,
}

impl PinsView {
    /// The epoch, if the worker answered within `ttl`.
    fn known(&self, now: Instant, ttl: Duration) -> Option<u64> {
        self.checked
            .filter(|at| now.saturating_duration_since(*at) < ttl)
            .and(self.epoch)
    }
}

/// What an open knows about its inode before asking the worker anything.
struct OpenSnapshot {
    path: String,
    entry: Entry,
    /// A pinned entry still trusted: its version holds, no stat needed.
    trusted: bool,
    local: Option<LocalCopy>,
    /// The pins epoch known when the snapshot was taken.
    epoch: Option<u64>,
}

/// What passthrough needs for an open, before anything is opened.
enum Need {
    /// Nothing: the inode is open already (its mode stays), or this open cannot use passthrough.
    Nothing,
    /// A registration of this version is kept: check that its file is still the one named.
    KeptStillValid,
    /// A local copy to open and register.
    Copy,
}

/// What an open's io mode is chosen from.
struct Source {
    fingerprint: u128,
    pinned: bool,
    /// The local copy the worker named (or the remembered one), opened and checked.
    copy: Option<File>,
    /// The kept registration of this version may be used (its file was checked).
    reuse_kept: bool,
}

/// How long [`GranaryFs::check_pins`] waits for the worker.
const PINS_POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// Most distinct label sets kept for read metrics (one per top directory).
const MAX_LABEL_SETS: usize = 256;

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

/// Opens a local copy read-only and checks that it is a regular file of `size` bytes; returns
/// it with its identity.
fn open_local_copy(path: &Path, size: u64) -> Result<(File, FileIdentity), Unusable> {
    let file = File::open(path).map_err(Unusable::Io)?;
    let meta = file.metadata().map_err(Unusable::Io)?;
    Ok((file, checked(&meta, size)?))
}

/// The identity of a local copy if it is a regular file of `size` bytes.
fn checked(meta: &std::fs::Metadata, size: u64) -> Result<FileIdentity, Unusable> {
    if !meta.is_file() {
        return Err(Unusable::NotARegularFile);
    }
    if meta.len() != size {
        return Err(Unusable::WrongSize(meta.len()));
    }
    Ok(FileIdentity::of(meta))
}

/// The object of a file entry, or why an open of it fails.
fn file_object<'a>(path: &str, entry: &'a Entry) -> Result<&'a ObjectRef, FsError> {
    match (entry.kind, &entry.object) {
        (EntryKind::File, Some(object)) => Ok(object),
        (EntryKind::Dir, _) => Err(FsError::IsADirectory),
        (EntryKind::File, None) => Err(FsError::Io(format!("{path}: file without an object"))),
    }
}

struct DirHandle {
    path: String,
    parent_ino: u64,
    entries: Arc<Vec<Entry>>,
    /// The pins epoch known before the listing was asked for.
    epoch: Option<u64>,
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
    /// How the kernel reads each inode.
    io: Mutex<IoState>,
    /// The worker's pins epoch, as last polled.
    pins: Mutex<PinsView>,
    /// Read metric labels by top directory.
    labels: Mutex<HashMap<String, Arc<ReadLabels>>>,
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
            pinned: false,
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
            io: Mutex::new(IoState {
                modes: HashMap::new(),
                idle: IdleBackings::new(config.kept_backings, config.attr_ttl),
            }),
            pins: Mutex::new(PinsView::default()),
            labels: Mutex::new(HashMap::new()),
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

    /// The pins epoch pinned entries are trusted under, as the last check left it (the client
    /// stops trusting at the check that tells the kernel to drop them, not before).
    fn known_epoch(&self) -> Option<u64> {
        self.pins.lock().expect("pins lock").trusted
    }

    /// How long the kernel keeps a pinned entry trusted under a known epoch.
    fn pinned_ttl(&self) -> Duration {
        self.config.pinned_ttl.max(self.config.attr_ttl)
    }

    /// A pinned entry had in the epoch still known: trusted, and kept by the kernel, for as long
    /// as the epoch holds.
    fn pinned_in_known_epoch(entry: &Entry, seen: Seen, known: Option<u64>) -> bool {
        entry.pinned && seen.epoch.is_some() && seen.epoch == known
    }

    /// How long the kernel may keep `ino`'s `entry`, had as `seen`, with `known` the pins
    /// epoch known now; an entry given the pinned TTL is recorded as kept under its epoch, for
    /// [`GranaryFs::pins_checked`] to name when that epoch ends.
    fn kernel_ttl(
        &self,
        inodes: &mut InodeTable,
        ino: u64,
        entry: &Entry,
        seen: Seen,
        known: Option<u64>,
    ) -> Duration {
        match known {
            Some(epoch) if Self::pinned_in_known_epoch(entry, seen, known) => {
                inodes.kept_in(ino, epoch);
                self.pinned_ttl()
            }
            _ => self.config.attr_ttl,
        }
    }

    /// Whether `entry`, had as `seen`, may be used without asking the worker again.
    fn fresh(&self, entry: &Entry, seen: Seen, known: Option<u64>) -> bool {
        Self::pinned_in_known_epoch(entry, seen, known) || seen.at.elapsed() < self.config.attr_ttl
    }

    fn attr(&self, ino: u64, entry: &Entry, ttl: Duration) -> Attr {
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
            ttl,
        }
    }

    /// An entry had now, asked for when the pins epoch known was `epoch`.
    fn seen_now(epoch: Option<u64>) -> Seen {
        Seen {
            at: Instant::now(),
            epoch,
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
        let epoch = self.known_epoch();
        let entry = self.api.stat(&path).await?;
        let seen = Self::seen_now(epoch);
        // Against the epoch known now: if it changed during the stat, the kernel is not told to
        // keep an entry of the old one.
        let known = self.known_epoch();
        let mut inodes = self.inodes.lock().expect("inode lock");
        let ino = inodes.upsert(&path, entry.clone(), 1, seen);
        let ttl = self.kernel_ttl(&mut inodes, ino, &entry, seen, known);
        drop(inodes);
        Ok(self.attr(ino, &entry, ttl))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let gone = self.inodes.lock().expect("inode lock").forget(ino, n);
        if gone {
            let kept = self.io.lock().expect("io lock").idle.remove(ino);
            // Unregistering (an ioctl) outside the lock.
            drop(kept);
        }
    }

    /// Attributes of `ino` when they are fresh enough to answer without the worker.
    pub fn getattr_now(&self, ino: u64) -> Option<Attr> {
        let known = self.known_epoch();
        let mut inodes = self.inodes.lock().expect("inode lock");
        let inode = inodes.get(ino)?;
        if ino != ROOT && !self.fresh(&inode.entry, inode.seen, known) {
            return None;
        }
        let (entry, seen) = (inode.entry.clone(), inode.seen);
        let ttl = self.kernel_ttl(&mut inodes, ino, &entry, seen, known);
        Some(self.attr(ino, &entry, ttl))
    }

    /// Attributes of `ino`, refreshed from the worker once no longer trusted.
    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if let Some(attr) = self.getattr_now(ino) {
            return Ok(attr);
        }
        let path = self.path_of(ino)?;
        let epoch = self.known_epoch();
        let entry = self.api.stat(&path).await?;
        let seen = Self::seen_now(epoch);
        let known = self.known_epoch();
        let mut inodes = self.inodes.lock().expect("inode lock");
        inodes.refresh(ino, entry.clone(), seen);
        let ttl = self.kernel_ttl(&mut inodes, ino, &entry, seen, known);
        drop(inodes);
        Ok(self.attr(ino, &entry, ttl))
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

    /// [`GranaryFs::open_passthrough`] without waiting, when the open needs no call to the
    /// worker: a pinned file whose entry is still trusted, and, for
    /// passthrough, a kept registration or a remembered local copy of its version (or an inode
    /// already open). `None`: the worker must be asked (`register` was not called).
    pub fn open_now(
        &self,
        ino: u64,
        write: bool,
        register: impl FnOnce(&File) -> std::io::Result<Backing>,
    ) -> Option<Result<Opened, FsError>> {
        self.open_known(ino, write, &mut Some(register))
    }

    fn snapshot(&self, ino: u64) -> Result<OpenSnapshot, FsError> {
        let known = self.known_epoch();
        let inodes = self.inodes.lock().expect("inode lock");
        let inode = inodes.get(ino).ok_or(FsError::NotFound)?;
        Ok(OpenSnapshot {
            path: inode.path.clone(),
            entry: inode.entry.clone(),
            trusted: inode.entry.pinned && self.fresh(&inode.entry, inode.seen, known),
            local: inode.local.clone(),
            epoch: known,
        })
    }

    /// What an open of `ino` (version `fingerprint`) needs for passthrough.
    fn passthrough_need(&self, ino: u64, fingerprint: u128, register: bool) -> Need {
        if !register || !self.passthrough_enabled() {
            return Need::Nothing;
        }
        let io = self.io.lock().expect("io lock");
        if io.modes.contains_key(&ino) {
            Need::Nothing
        } else if io.idle.holds(ino, fingerprint, Instant::now()) {
            Need::KeptStillValid
        } else {
            Need::Copy
        }
    }

    /// The open of a trusted (pinned, fresh) entry from what is known, or `None`.
    fn open_known<R: FnOnce(&File) -> std::io::Result<Backing>>(
        &self,
        ino: u64,
        write: bool,
        register: &mut Option<R>,
    ) -> Option<Result<Opened, FsError>> {
        if write {
            return Some(Err(FsError::ReadOnly));
        }
        let snap = match self.snapshot(ino) {
            Ok(snap) => snap,
            Err(e) => return Some(Err(e)),
        };
        if !snap.trusted {
            return None;
        }
        let (fingerprint, size) = match file_object(&snap.path, &snap.entry) {
            Ok(object) => (object.id.fingerprint(), snap.entry.size),
            Err(e) => return Some(Err(e)),
        };
        // A kept registration or the remembered copy is used only while the copy's path still
        // leads to the very file the worker named (it drops or replaces files when a dataset is
        // unpinned or repaired); anything else asks the worker again.
        let need = self.passthrough_need(ino, fingerprint, register.is_some());
        let remembered = || snap.local.as_ref().filter(|c| c.fingerprint == fingerprint);
        let still_there = |local: &LocalCopy, file: Result<FileIdentity, Unusable>| {
            if file.as_ref().is_ok_and(|f| *f == local.file) {
                return true;
            }
            tracing::debug!(path = %snap.path, local = %local.path.display(), "the remembered local copy changed or went; asking the worker");
            self.inodes
                .lock()
                .expect("inode lock")
                .forget_copy(ino, fingerprint);
            false
        };
        let (copy, reuse_kept) = match need {
            Need::Nothing => (None, false),
            Need::KeptStillValid => {
                let local = remembered()?;
                let identity = std::fs::metadata(&local.path)
                    .map_err(Unusable::Io)
                    .and_then(|meta| checked(&meta, size));
                if !still_there(local, identity) {
                    return None;
                }
                (None, true)
            }
            Need::Copy => {
                let local = remembered()?;
                match open_local_copy(&local.path, size) {
                    Ok((file, identity)) if still_there(local, Ok(identity)) => (Some(file), false),
                    Ok(_) => return None,
                    Err(e) => {
                        still_there(local, Err(e));
                        return None;
                    }
                }
            }
        };
        Some(self.finish_open(
            ino,
            &snap.path,
            &snap.entry,
            copy,
            reuse_kept,
            register.take(),
        ))
    }

    async fn open_inner(
        &self,
        ino: u64,
        write: bool,
        register: Option<impl FnOnce(&File) -> std::io::Result<Backing>>,
    ) -> Result<Opened, FsError> {
        let mut register = register;
        if let Some(opened) = self.open_known(ino, write, &mut register) {
            return opened;
        }
        let snap = self.snapshot(ino)?;
        // Ask for a local copy of the version the inode last showed while the stat runs, when
        // this open could use one (an inode already open in either mode stays in that mode).
        let ask = match &snap.entry.object {
            Some(known) if register.is_some() && self.passthrough_enabled() => {
                let idle = !self.io.lock().expect("io lock").modes.contains_key(&ino);
                idle.then(|| known.clone())
            }
            _ => None,
        };
        // A trusted entry (pinned, fresh) needs no stat: its version cannot have changed.
        let (entry, copy) = match (&ask, snap.trusted) {
            (Some(known), true) => (snap.entry, Some(self.api.local_copy(known).await)),
            (Some(known), false) => {
                let (entry, copy) =
                    futures::join!(self.api.stat(&snap.path), self.api.local_copy(known));
                (entry?, Some(copy))
            }
            (None, true) => (snap.entry, None),
            (None, false) => (self.api.stat(&snap.path).await?, None),
        };
        if !snap.trusted {
            self.inodes.lock().expect("inode lock").refresh(
                ino,
                entry.clone(),
                Self::seen_now(snap.epoch),
            );
        }
        let object = file_object(&snap.path, &entry)?;
        // A copy is only good for the version it was asked for; a changed version reads through
        // userspace this time (never a second local_copy call per open).
        let copy = match (ask, copy) {
            (Some(asked), Some(copy)) if asked == *object => {
                self.usable_copy(ino, &snap.path, &entry, copy)
            }
            _ => None,
        };
        // Whatever was kept for this inode is not reused: the worker has just been asked.
        self.finish_open(ino, &snap.path, &entry, copy, false, register)
    }

    /// The rest of an open once the entry (and a local copy, or a checked kept registration) is
    /// known: the io mode, the page cache decision and the handle.
    fn finish_open(
        &self,
        ino: u64,
        path: &str,
        entry: &Entry,
        copy: Option<File>,
        reuse_kept: bool,
        register: Option<impl FnOnce(&File) -> std::io::Result<Backing>>,
    ) -> Result<Opened, FsError> {
        let object = file_object(path, entry)?;
        let fingerprint = object.id.fingerprint();
        let source = Source {
            fingerprint,
            pinned: entry.pinned,
            copy,
            reuse_kept,
        };
        let io = self.choose_io(ino, path, source, register)?;
        let keep_cache = match io {
            // The kernel's page cache of the inode is not used (nor filled) by passthrough reads;
            // leave its record alone so that the next userspace open decides correctly.
            OpenIo::Passthrough(_) => false,
            OpenIo::Userspace => {
                let mut versions = self.cached_versions.lock().expect("versions lock");
                versions.insert(ino, fingerprint) == Some(fingerprint)
            }
        };
        let reader = FileReader::new(
            object.clone(),
            self.block_size,
            self.max_ahead_blocks,
            self.budget.clone(),
            self.labels_for(path),
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

    /// Stall time by the namespace's top directory (a mount point: low cardinality) and job;
    /// one shared label set per top directory.
    fn labels_for(&self, path: &str) -> Arc<ReadLabels> {
        let top = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let mut labels = self.labels.lock().expect("labels lock");
        if let Some(found) = labels.get(top) {
            return found.clone();
        }
        let made = Arc::new(ReadLabels {
            dataset: top.to_string(),
            job: self.config.job.clone(),
        });
        if labels.len() < MAX_LABEL_SETS {
            labels.insert(top.to_string(), made.clone());
        }
        made
    }

    /// The local copy the worker named, opened and checked, if it is usable; remembered for the
    /// next opens when the entry is pinned.
    fn usable_copy(
        &self,
        ino: u64,
        path: &str,
        entry: &Entry,
        answer: Result<Option<PathBuf>, ApiError>,
    ) -> Option<File> {
        match answer {
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(%path, error = %e, "no local copy (worker did not answer); reading through userspace");
                None
            }
            // A local open and fstat: cheap enough to do on the runtime thread.
            Ok(Some(local)) => match open_local_copy(&local, entry.size) {
                Ok((file, identity)) => {
                    if entry.pinned
                        && let Some(object) = &entry.object
                    {
                        let copy = LocalCopy {
                            fingerprint: object.id.fingerprint(),
                            path: local,
                            file: identity,
                        };
                        self.inodes
                            .lock()
                            .expect("inode lock")
                            .remember_copy(ino, copy);
                    }
                    Some(file)
                }
                Err(why) => {
                    tracing::warn!(
                        %path,
                        local = %local.display(),
                        expected_bytes = entry.size,
                        problem = %why,
                        "the worker's local copy is not usable; reading through userspace"
                    );
                    None
                }
            },
        }
    }

    /// Decides the io mode of a new handle of `ino` and counts it: an inode already open keeps
    /// its mode; else the kept registration of this (pinned) version if it was checked, else the
    /// copy registered with the kernel, else userspace.
    fn choose_io(
        &self,
        ino: u64,
        path: &str,
        source: Source,
        register: Option<impl FnOnce(&File) -> std::io::Result<Backing>>,
    ) -> Result<OpenIo, FsError> {
        let Source {
            fingerprint,
            pinned,
            copy,
            reuse_kept,
        } = source;
        let mut io = self.io.lock().expect("io lock");
        match io.modes.get_mut(&ino) {
            Some(InodeIo::Passthrough {
                fingerprint: f,
                backing,
                opens,
                ..
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
        let passthrough = register.is_some() && self.passthrough_enabled();
        let mut unused = None;
        if passthrough {
            match io.idle.take(ino, fingerprint, Instant::now()) {
                Kept::Reusable(backing) if pinned && reuse_kept => {
                    io.modes.insert(
                        ino,
                        InodeIo::Passthrough {
                            fingerprint,
                            backing: backing.clone(),
                            opens: 1,
                            keep: true,
                        },
                    );
                    return Ok(OpenIo::Passthrough(backing));
                }
                Kept::Reusable(backing) | Kept::Unusable(backing) => unused = Some(backing),
                Kept::None => {}
            }
        }
        let mut chosen = OpenIo::Userspace;
        if let (Some(file), Some(register)) = (copy, register)
            && passthrough
        {
            match register(&file) {
                Ok(backing) => {
                    io.modes.insert(
                        ino,
                        InodeIo::Passthrough {
                            fingerprint,
                            backing: backing.clone(),
                            opens: 1,
                            keep: pinned,
                        },
                    );
                    chosen = OpenIo::Passthrough(backing);
                }
                Err(e) => {
                    self.disable_passthrough(&format!("registering a backing file failed: {e}"))
                }
            }
        }
        if let OpenIo::Userspace = chosen {
            io.modes.insert(ino, InodeIo::Userspace { opens: 1 });
        }
        drop(io);
        // A kept registration of another version is unregistered (an ioctl) outside the lock.
        drop(unused);
        Ok(chosen)
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

    /// Closes a file handle; the inode's last handle ends its io mode. Its passthrough backing
    /// file is unregistered then, or, for a pinned version, kept for a while for the next open.
    pub fn release(&self, fh: u64) {
        let Some(file) = self.files.lock().expect("files lock").remove(&fh) else {
            return;
        };
        let now = Instant::now();
        let unregister = {
            let mut io = self.io.lock().expect("io lock");
            let last = io.modes.get_mut(&file.ino).is_some_and(|mode| {
                let opens = mode.opens();
                *opens -= 1;
                *opens == 0
            });
            let mut unregister = io.idle.expire(now);
            if last {
                match io.modes.remove(&file.ino) {
                    Some(InodeIo::Passthrough {
                        fingerprint,
                        backing,
                        keep: true,
                        ..
                    }) => unregister.extend(io.idle.keep(file.ino, fingerprint, backing, now)),
                    Some(InodeIo::Passthrough { backing, .. }) => unregister.push(backing),
                    _ => {}
                }
            }
            unregister
        };
        // Unregistering backing files (an ioctl each) happens outside the lock.
        drop(unregister);
    }

    /// Unregisters kept backing files past their time (also done on every
    /// release; call it now and then so that an idle mount lets go of them too).
    pub fn expire_kept_backings(&self) {
        let expired = self.io.lock().expect("io lock").idle.expire(Instant::now());
        drop(expired);
    }

    /// Asks the worker for its pins epoch and takes the answer ([`GranaryFs::pins_checked`]);
    /// returns the entries the kernel must drop. The mount calls it once a second.
    pub async fn check_pins(&self) -> Vec<KernelEntry> {
        let answer = match tokio::time::timeout(PINS_POLL_TIMEOUT, self.api.pins_epoch()).await {
            Ok(answer) => answer,
            Err(_) => Err(ApiError::Unavailable(format!(
                "no pins epoch within {PINS_POLL_TIMEOUT:?}"
            ))),
        };
        self.pins_checked(answer, Instant::now())
    }

    /// Takes the worker's answer to [`CacheApi::pins_epoch`] at `now`. When the epoch pinned
    /// entries were trusted under is no longer the one known (it changed, or the worker has
    /// not answered for the attribute TTL), those entries are trusted no more, the registrations
    /// kept for pinned files go, and the entries (the kernel may keep them for the pinned TTL)
    /// are returned for the caller to invalidate in the kernel. They are returned once more at
    /// the next check: an answer decided under the old epoch may reach the kernel after the
    /// first invalidation (a lookup in flight while the epoch changed).
    pub fn pins_checked(
        &self,
        answer: Result<Option<u64>, ApiError>,
        now: Instant,
    ) -> Vec<KernelEntry> {
        // `ended`: the epoch trusted until now, if it is no longer the one known.
        let (ended, after, again) = {
            let mut pins = self.pins.lock().expect("pins lock");
            match answer {
                Ok(epoch) => {
                    pins.epoch = epoch;
                    pins.checked = Some(now);
                }
                Err(e) => tracing::debug!(error = %e, "the worker did not give its pins epoch"),
            }
            let after = pins.known(now, self.config.attr_ttl);
            let ended = std::mem::replace(&mut pins.trusted, after).filter(|e| Some(*e) != after);
            (ended, after, std::mem::replace(&mut pins.retired, ended))
        };
        metrics::gauge!(granary_core::metrics::FUSE_PINS_EPOCH_KNOWN).set(match after {
            Some(_) => 1.0,
            None => 0.0,
        });
        if let Some(from) = ended {
            tracing::info!(
                from,
                to = after,
                "the worker's pins changed (or it stopped answering): no longer trusting pinned entries"
            );
        }
        let dropped = {
            let mut io = self.io.lock().expect("io lock");
            io.idle.set_ttl(match after {
                Some(_) => self.pinned_ttl(),
                None => self.config.attr_ttl,
            });
            if ended.is_some() {
                io.idle.clear()
            } else {
                Vec::new()
            }
        };
        // Unregistering (an ioctl each) outside the lock.
        drop(dropped);
        let inodes = self.inodes.lock().expect("inode lock");
        let mut stale = Vec::new();
        for epoch in [ended, again].into_iter().flatten() {
            stale.extend(inodes.kept_under(epoch));
        }
        stale
    }

    /// Number of passthrough registrations kept for inodes without open handles.
    pub fn kept_backings(&self) -> usize {
        self.io.lock().expect("io lock").idle.len()
    }
    /// Number of open handles of `ino` reading through passthrough.
    pub fn passthrough_handles(&self, ino: u64) -> u64 {
        match self.io.lock().expect("io lock").modes.get(&ino) {
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
        let epoch = self.known_epoch();
        let entries = self.api.list(&path).await?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().expect("dirs lock").insert(
            fh,
            DirHandle {
                path,
                parent_ino,
                entries,
                epoch,
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
        let (path, parent_ino, entries, epoch) = {
            let dirs = self.dirs.lock().expect("dirs lock");
            let d = dirs.get(&fh).ok_or(FsError::BadHandle)?;
            (d.path.clone(), d.parent_ino, d.entries.clone(), d.epoch)
        };
        let known = self.known_epoch();
        let ttl = self.config.attr_ttl;
        let self_entry = Entry {
            name: ".".into(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: 0,
            object: None,
            pinned: false,
        };
        let total = entries.len() as u64 + 2;
        for off in offset..total {
            let item = match off {
                0 => DirItem {
                    next_offset: 1,
                    ino,
                    name: ".".into(),
                    attr: self.attr(ino, &self_entry, ttl),
                },
                1 => DirItem {
                    next_offset: 2,
                    ino: parent_ino,
                    name: "..".into(),
                    attr: self.attr(parent_ino, &self_entry, ttl),
                },
                _ => {
                    let entry = &entries[(off - 2) as usize];
                    let child = child_path(&path, &entry.name);
                    let seen = Self::seen_now(epoch);
                    // Plain readdir gives the kernel no entry to keep, only a name.
                    let (child_ino, child_ttl) = {
                        let mut inodes = self.inodes.lock().expect("inode lock");
                        if plus {
                            let child_ino = inodes.upsert(&child, entry.clone(), 1, seen);
                            let child_ttl =
                                self.kernel_ttl(&mut inodes, child_ino, entry, seen, known);
                            (child_ino, child_ttl)
                        } else {
                            let child_ino = inodes
                                .ino_of(&child)
                                .unwrap_or_else(|| synthetic_ino(&child));
                            (child_ino, ttl)
                        }
                    };
                    DirItem {
                        next_offset: off + 1,
                        ino: child_ino,
                        name: entry.name.clone(),
                        attr: self.attr(child_ino, entry, child_ttl),
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
