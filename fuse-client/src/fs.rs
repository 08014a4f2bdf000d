//! The filesystem logic, independent of the kernel interface.
//!
//! [`GranaryFs`] answers lookups, attributes, directory listings, opens and reads in its own
//! types ([`Attr`], [`FsError`]); `kernel/fuser.rs` adapts them to fuser. It is read-only: every
//! write path fails with EROFS. Directory handles snapshot their listing at opendir, so readdir
//! offsets stay stable. A file handle pins the object version seen at open: reads serve exactly
//! that version or fail, never a mix. The kernel may keep a file's page cache across opens
//! (FOPEN_KEEP_CACHE) only while the object version is unchanged.
//!
//! How an open is read (passthrough, a kept registration, or reads through this process) is
//! decided by [`crate::open`]; this module makes the handle.
//!
//! Pinned files: an entry the worker answered from a pinned dataset's frozen manifest
//! ([`Entry::pinned`]) cannot change version while the pin lasts, so an open of it trusts the
//! entry it has instead of asking the worker (outside pins every open asks: close-to-open
//! consistency). For how long: while the worker's pins epoch ([`CacheApi::pins_epoch`], polled
//! by the mount once a second through [`GranaryFs::check_pins`]) is the one the client knew when
//! it asked for the entry, and the kernel is told to keep such entries for the pinned TTL; when
//! the epoch changes, `check_pins` names the entries the kernel must drop. A worker that does not
//! track its pins, or does not answer, gets the attribute TTL. The rules are pure functions in
//! [`granary_core::trust`]; the epoch's state ([`PinsView`]) is kept here under its lock.

use crate::hint::Hints;
use crate::inodes::{InodeTable, KernelEntry, ROOT, Seen, child_path, seen_now};
use crate::journal::{Journal, Record};
use crate::open::{Decided, IoModes, Opener};
use crate::pods::PodJobs;
use crate::prefetch::{Budget, FileReader, LabelSets};
use bytes::Bytes;
use granary_core::BlockSize;
use granary_core::trust::{PinsView, Ttls};
use granary_proto::{ApiError, CacheApi, Entry, EntryKind};
use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod bounds;
mod takeover;

pub use crate::error::FsError;
pub use crate::open::{Backing, OpenIo, Opened};

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
    /// The CSI driver's pod records (`granary csi --pods-dir`): a file opened by a pod's
    /// process is labelled with that pod's `namespace/job` instead of `job`.
    pub pods_dir: Option<std::path::PathBuf>,
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
    /// Let users other than the mounter use the mount (FUSE `allow_other`; for a non-root
    /// mounter `/etc/fuse.conf` must have `user_allow_other`). The kernel still checks each
    /// file's mode bits (`default_permissions`).
    pub allow_other: bool,
    /// Unmount when the daemon exits, however it exits (FUSE `auto_unmount`, through
    /// fusermount3): for a user's mount, so that a killed daemon leaves no dead mount behind.
    pub auto_unmount: bool,
    /// Inodes kept for the kernel before the least recently used are handed back: past this,
    /// the kernel is asked (once a second) to drop entries it is not using, and forgets them.
    pub max_inodes: usize,
    /// Open file and directory handles at most; an open beyond fails with ENFILE.
    pub max_handles: usize,
    /// Bytes of hinted files fetched ahead of the job at most (`granary hint`); 0 = an eighth of
    /// the worker's memory tier.
    pub hint_budget: u64,
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
            pods_dir: None,
            kept_backings: 4096,
            pinned_ttl: Duration::from_secs(3600),
            io_uring: false,
            allow_other: false,
            auto_unmount: false,
            max_inodes: 262_144,
            max_handles: 65_536,
            hint_budget: 0,
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

/// How long [`GranaryFs::check_pins`] waits for the worker.
const PINS_POLL_TIMEOUT: Duration = Duration::from_secs(5);

struct OpenFile {
    ino: u64,
    reader: Arc<FileReader>,
}

/// Where a server records what the kernel holds ([`crate::journal`]), and how it names a
/// passthrough backing file's kernel id in those records.
struct Journaled {
    journal: Arc<Journal>,
    backing_id: fn(&Backing) -> Option<u32>,
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
    /// How the kernel reads each inode, and which version its page cache holds.
    modes: IoModes,
    /// The worker's pins epoch, as last polled.
    pins: Mutex<PinsView>,
    /// Read metric labels by top directory and job.
    labels: LabelSets,
    /// The jobs of the CSI driver's pods, when it records them.
    pods: Option<PodJobs>,
    next_fh: AtomicU64,
    /// Set when a keeper holds the connection: every reference given to the kernel is recorded.
    journal: OnceLock<Journaled>,
    /// The order the job said it will read files in, fetched ahead (`granary hint`).
    hints: Arc<Hints<A>>,
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
        let info = api.info();
        let block_size = info.block_size;
        let hint_budget = match config.hint_budget {
            0 => (info.memory_capacity / 8).max(block_size.get()),
            b => b,
        };
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
            owner: None,
        };
        GranaryFs {
            max_ahead_blocks: (config.readahead_per_file / block_size.get()).max(1),
            budget: Budget::new(config.readahead_total),
            block_size,
            inodes: Mutex::new(InodeTable::new(root, Instant::now())),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            modes: IoModes::new(config.passthrough, config.kept_backings, config.attr_ttl),
            pins: Mutex::new(PinsView::default()),
            labels: LabelSets::new(config.job.clone()),
            pods: config.pods_dir.clone().map(PodJobs::new),
            next_fh: AtomicU64::new(1),
            journal: OnceLock::new(),
            hints: Hints::new(api.clone(), block_size, hint_budget),
            api,
            config,
        }
    }

    /// The mount's prefetcher of hinted files.
    pub fn hints(&self) -> &Arc<Hints<A>> {
        &self.hints
    }

    /// Records every reference given to the kernel in `journal` from now on; `backing_id`
    /// names a backing file's kernel id.
    pub fn attach_journal(&self, journal: Arc<Journal>, backing_id: fn(&Backing) -> Option<u32>) {
        let _ = self.journal.set(Journaled {
            journal,
            backing_id,
        });
    }

    fn log(&self, records: &[Record]) {
        if let Some(j) = self.journal.get() {
            j.journal.records(records);
        }
    }

    /// A handle of directory `ino`: its listing, taken now.
    async fn list_dir(&self, ino: u64) -> Result<DirHandle, FsError> {
        let (path, parent_ino) = self.dir_path(ino)?;
        let epoch = self.known_epoch();
        let entries = self.api.list(&path).await?;
        Ok(DirHandle {
            path,
            parent_ino,
            entries,
            epoch,
        })
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
        self.modes.passthrough_enabled()
    }

    /// Stops using passthrough for new opens (the kernel or our privileges refused it), saying
    /// why once. Handles already open through passthrough keep their backing file.
    pub fn disable_passthrough(&self, why: &str) {
        self.modes.disable_passthrough(why)
    }

    /// The pins epoch pinned entries are trusted under, as the last check left it (the client
    /// stops trusting at the check that tells the kernel to drop them, not before).
    fn known_epoch(&self) -> Option<u64> {
        self.pins.lock().expect("pins lock").trusted()
    }

    /// The attribute and pinned TTLs the trust rules apply.
    fn ttls(&self) -> Ttls {
        Ttls {
            attr: self.config.attr_ttl,
            pinned: self.config.pinned_ttl,
        }
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
        let kernel = self.ttls().kernel(entry.pinned, seen, known);
        if let Some(epoch) = kernel.kept_under {
            inodes.kept_in(ino, epoch);
        }
        kernel.ttl
    }

    /// Whether `entry`, had as `seen`, may be used without asking the worker again.
    fn fresh(&self, entry: &Entry, seen: Seen, known: Option<u64>) -> bool {
        self.ttls().fresh(entry.pinned, seen, known, Instant::now)
    }

    /// An entry's attributes: a POSIX source's mode bits and owner as they are; else read-only
    /// for all, owned by the mount's uid/gid.
    fn attr(&self, ino: u64, entry: &Entry, ttl: Duration) -> Attr {
        let (perm, size) = match entry.kind {
            EntryKind::Dir => (0o555, 4096),
            EntryKind::File => (0o444, entry.size),
        };
        let (perm, uid, gid) = match entry.owner {
            Some(o) => ((o.mode & 0o777) as u16, o.uid, o.gid),
            None => (perm, self.config.uid, self.config.gid),
        };
        Attr {
            ino,
            kind: entry.kind,
            size,
            mtime_ns: entry.mtime_ns,
            perm,
            uid,
            gid,
            blksize: self.block_size.get().min(1 << 20) as u32,
            ttl,
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
        let seen = seen_now(epoch);
        // Against the epoch known now: if it changed during the stat, the kernel is not told to
        // keep an entry of the old one.
        let known = self.known_epoch();
        let mut inodes = self.inodes.lock().expect("inode lock");
        let ino = inodes.upsert(&path, entry.clone(), 1, seen);
        let ttl = self.kernel_ttl(&mut inodes, ino, &entry, seen, known);
        drop(inodes);
        self.log(&[Record::Lookup {
            ino,
            n: 1,
            dir: entry.kind == EntryKind::Dir,
            path,
        }]);
        Ok(self.attr(ino, &entry, ttl))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.log(&[Record::Forget { ino, n }]);
        self.forget_unlogged(ino, n);
    }

    /// The kernel gave these references back at once (BATCH_FORGET): one journal write.
    pub fn forget_many(&self, forgets: &[(u64, u64)]) {
        let records: Vec<Record> = forgets
            .iter()
            .map(|&(ino, n)| Record::Forget { ino, n })
            .collect();
        self.log(&records);
        for &(ino, n) in forgets {
            self.forget_unlogged(ino, n);
        }
    }

    fn forget_unlogged(&self, ino: u64, n: u64) {
        let gone = self.inodes.lock().expect("inode lock").forget(ino, n);
        if gone {
            self.modes.forget(ino);
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
        inodes.touch(ino, Instant::now());
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
        let seen = seen_now(epoch);
        let known = self.known_epoch();
        let mut inodes = self.inodes.lock().expect("inode lock");
        inodes.refresh(ino, entry.clone(), seen);
        let ttl = self.kernel_ttl(&mut inodes, ino, &entry, seen, known);
        drop(inodes);
        Ok(self.attr(ino, &entry, ttl))
    }

    /// Opens a file for reading through this process; `write` = the open asked for write access,
    /// `pid` = the opener's (0: unknown), whose pod's job labels the file's read metrics.
    /// (An inode already open through passthrough is opened the same way, as the kernel requires.)
    pub async fn open(&self, ino: u64, write: bool, pid: u32) -> Result<Opened, FsError> {
        self.open_inner(
            ino,
            write,
            pid,
            None::<fn(&File) -> std::io::Result<Backing>>,
        )
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
        pid: u32,
        register: impl FnOnce(&File) -> std::io::Result<Backing>,
    ) -> Result<Opened, FsError> {
        self.open_inner(ino, write, pid, Some(register)).await
    }

    /// [`GranaryFs::open_passthrough`] without waiting, when the open needs no call to the
    /// worker: a pinned file whose entry is still trusted, and, for
    /// passthrough, a kept registration or a remembered local copy of its version (or an inode
    /// already open). `None`: the worker must be asked (`register` was not called).
    pub fn open_now(
        &self,
        ino: u64,
        write: bool,
        pid: u32,
        register: impl FnOnce(&File) -> std::io::Result<Backing>,
    ) -> Option<Result<Opened, FsError>> {
        if let Err(e) = self.room_for_a_handle() {
            return Some(Err(e));
        }
        self.opener()
            .open_known(ino, write, &mut Some(register))
            .map(|decided| decided.map(|decided| self.handle(ino, decided, pid)))
    }

    /// The open chain ([`crate::open`]) over this filesystem's parts.
    fn opener(&self) -> Opener<'_, A> {
        Opener {
            api: &self.api,
            inodes: &self.inodes,
            pins: &self.pins,
            ttls: self.ttls(),
            modes: &self.modes,
        }
    }

    async fn open_inner(
        &self,
        ino: u64,
        write: bool,
        pid: u32,
        register: Option<impl FnOnce(&File) -> std::io::Result<Backing>>,
    ) -> Result<Opened, FsError> {
        self.room_for_a_handle()?;
        let decided = self.opener().open(ino, write, register).await?;
        Ok(self.handle(ino, decided, pid))
    }

    /// The handle of an open of `ino` by `pid` once its io mode and page cache decision are
    /// made.
    fn handle(&self, ino: u64, decided: Decided, pid: u32) -> Opened {
        let Decided {
            path,
            object,
            keep_cache,
            io,
        } = decided;
        self.hints.opened(&path);
        let reader = FileReader::new(
            object,
            self.block_size,
            self.max_ahead_blocks,
            self.budget.clone(),
            self.labels
                .for_path(&path, self.pods.as_ref().and_then(|p| p.job_of(pid))),
        );
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = self.journal.get() {
            let passthrough = match &io {
                OpenIo::Passthrough(backing) => {
                    (j.backing_id)(backing).map(|id| (reader.object().id.fingerprint(), id))
                }
                OpenIo::Userspace => None,
            };
            j.journal.record(Record::Open {
                fh,
                ino,
                path,
                object: reader.object().clone(),
                passthrough,
            });
        }
        self.files.lock().expect("files lock").insert(
            fh,
            OpenFile {
                ino,
                reader: Arc::new(reader),
            },
        );
        Opened { fh, keep_cache, io }
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
        self.log(&[Record::Release { fh }]);
        let now = Instant::now();
        self.modes.release(file.ino, now);
    }

    /// Unregisters kept backing files past their time (also done on every
    /// release; call it now and then so that an idle mount lets go of them too).
    pub fn expire_kept_backings(&self) {
        self.modes.expire_kept();
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
        let check = {
            let mut pins = self.pins.lock().expect("pins lock");
            match answer {
                Ok(epoch) => pins.answered(epoch, now),
                Err(e) => tracing::debug!(error = %e, "the worker did not give its pins epoch"),
            }
            pins.check(now, self.config.attr_ttl)
        };
        // `ended`: the epoch trusted until now, if it is no longer the one known.
        let (ended, after) = (check.ended, check.known);
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
        self.modes
            .pins_checked(self.ttls().kept_registrations(after), ended.is_some());
        let inodes = self.inodes.lock().expect("inode lock");
        let mut stale = Vec::new();
        for epoch in check.to_invalidate() {
            stale.extend(inodes.kept_under(epoch));
        }
        stale
    }

    /// Number of passthrough registrations kept for inodes without open handles.
    pub fn kept_backings(&self) -> usize {
        self.modes.kept()
    }
    /// Number of open handles of `ino` reading through passthrough.
    pub fn passthrough_handles(&self, ino: u64) -> u64 {
        self.modes.passthrough_handles(ino)
    }

    /// Opens a directory: its listing is taken now and served from this handle.
    pub async fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        self.room_for_a_handle()?;
        let handle = self.list_dir(ino).await?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.log(&[Record::OpenDir { fh, ino }]);
        self.dirs.lock().expect("dirs lock").insert(fh, handle);
        Ok(fh)
    }

    /// The path of directory `ino`, and its parent's inode.
    fn dir_path(&self, ino: u64) -> Result<(String, u64), FsError> {
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
        Ok((inode.path.clone(), inodes.ino_of(parent).unwrap_or(ROOT)))
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
            owner: None,
        };
        let total = entries.len() as u64 + 2;
        // References given with readdirplus, recorded once the answer is complete.
        let mut given = Vec::new();
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
                    let seen = seen_now(epoch);
                    // Plain readdir gives the kernel no entry to keep, only a name.
                    let (child_ino, child_ttl) = {
                        let mut inodes = self.inodes.lock().expect("inode lock");
                        if plus {
                            let child_ino = inodes.upsert(&child, entry.clone(), 1, seen);
                            let child_ttl =
                                self.kernel_ttl(&mut inodes, child_ino, entry, seen, known);
                            given.push(Record::Lookup {
                                ino: child_ino,
                                n: 1,
                                dir: entry.kind == EntryKind::Dir,
                                path: child,
                            });
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
                    given.pop();
                    self.forget_unlogged(item.ino, 1);
                }
                break;
            }
        }
        self.log(&given);
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        if self.dirs.lock().expect("dirs lock").remove(&fh).is_some() {
            self.log(&[Record::ReleaseDir { fh }]);
        }
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
