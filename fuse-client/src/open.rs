//! Opening a file: the chain that decides how the kernel reads it, and each inode's io mode.
//!
//! Passthrough: when the worker on this machine holds a verified whole copy of exactly the
//! version an open sees ([`CacheApi::local_copy`]),
//! [`GranaryFs::open_passthrough`](crate::fs::GranaryFs::open_passthrough) hands that file to the
//! kernel (through the adapter's `register` callback) and the kernel reads it directly; no read
//! request reaches this process. The kernel allows one backing file per inode and never mixes
//! passthrough and ordinary opens of one inode, so each inode here is in one io mode at a time
//! until its last handle is released (`IoModes`).
//!
//! The local copy the worker named for a pinned version is remembered (and opened again only if
//! it is still the same file), and its kernel registration is kept for a while after the last
//! close ([`crate::backings`]), so the second open of a hot pinned file needs no call to the
//! worker and no system call: [`GranaryFs::open_now`](crate::fs::GranaryFs::open_now) answers it
//! on the FUSE thread.
//!
//! `Opener` runs the chain over the parts of `GranaryFs` it reads (the worker, the inode table,
//! the pins epoch, the io modes) and returns what it `Decided`; `GranaryFs` makes the handle.

use crate::backings::{IdleBackings, Kept};
use crate::error::FsError;
use crate::inodes::{FileIdentity, InodeTable, LocalCopy, seen_now};
use granary_core::trust::{PinsView, Ttls};
use granary_proto::{ApiError, CacheApi, Entry, EntryKind, ObjectRef};
use std::any::Any;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A local file registered with the kernel for passthrough, as the adapter made it (a
/// [`crate::kernel::shared::KernelBacking`]). Held while any open handle of its inode uses it;
/// dropping the last reference unregisters it.
pub type Backing = Arc<dyn Any + Send + Sync>;

/// How the kernel serves an open file's reads.
#[derive(Clone)]
pub enum OpenIo {
    /// Reads come to this process ([`GranaryFs::read`](crate::fs::GranaryFs::read)).
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

impl InodeIo {
    fn opens(&mut self) -> &mut u64 {
        match self {
            InodeIo::Userspace { opens } | InodeIo::Passthrough { opens, .. } => opens,
        }
    }
}

/// How the kernel reads inodes: the modes of those with open handles, and the registrations
/// kept for pinned ones without.
struct IoState {
    modes: HashMap<u64, InodeIo>,
    idle: IdleBackings<Backing>,
}

/// How the kernel reads each inode ([`IoState`], under its lock), which version its page cache
/// holds, and whether passthrough may still be used. Backing files it lets go of are dropped
/// (unregistered: an ioctl each) outside its locks.
pub(crate) struct IoModes {
    /// How the kernel reads each inode.
    io: Mutex<IoState>,
    /// Per inode, the object fingerprint the kernel's page cache holds.
    cached_versions: Mutex<HashMap<u64, u128>>,
    /// Passthrough is wanted and neither the kernel nor our privileges refused it (yet).
    passthrough: AtomicBool,
}

impl IoModes {
    /// `passthrough`: wanted; at most `kept_backings` registrations kept, each for `ttl` at first.
    pub(crate) fn new(passthrough: bool, kept_backings: usize, ttl: Duration) -> Self {
        IoModes {
            io: Mutex::new(IoState {
                modes: HashMap::new(),
                idle: IdleBackings::new(kept_backings, ttl),
            }),
            cached_versions: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(passthrough),
        }
    }

    /// Whether new opens may still use passthrough.
    pub(crate) fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Stops using passthrough for new opens (the kernel or our privileges refused it), saying
    /// why once. Handles already open through passthrough keep their backing file.
    pub(crate) fn disable_passthrough(&self, why: &str) {
        if self.passthrough.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                reason = why,
                "FUSE passthrough unavailable: files held locally are read through userspace"
            );
        }
    }

    /// Whether `ino` has open handles (its io mode is set).
    pub(crate) fn is_open(&self, ino: u64) -> bool {
        self.io.lock().expect("io lock").modes.contains_key(&ino)
    }

    /// What an open of `ino` (version `fingerprint`) needs for passthrough.
    fn need(&self, ino: u64, fingerprint: u128, register: bool) -> Need {
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

    /// Decides the io mode of a new handle of `ino` and counts it: an inode already open keeps
    /// its mode; else the kept registration of this (pinned) version if it was checked, else the
    /// copy registered with the kernel, else userspace.
    fn choose(
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

    /// Whether the kernel may keep `ino`'s pages for a new handle reading version `fingerprint`
    /// through `io`; records the version a userspace open leaves in the page cache.
    fn keep_cache(&self, ino: u64, fingerprint: u128, io: &OpenIo) -> bool {
        match io {
            // The kernel's page cache of the inode is not used (nor filled) by passthrough reads;
            // leave its record alone so that the next userspace open decides correctly.
            OpenIo::Passthrough(_) => false,
            OpenIo::Userspace => {
                let mut versions = self.cached_versions.lock().expect("versions lock");
                versions.insert(ino, fingerprint) == Some(fingerprint)
            }
        }
    }

    /// A handle of `ino` was closed at `now`; the inode's last handle ends its io mode. Its
    /// passthrough backing file is unregistered then, or, for a pinned version, kept for a while
    /// for the next open.
    pub(crate) fn release(&self, ino: u64, now: Instant) {
        let unregister = {
            let mut io = self.io.lock().expect("io lock");
            let last = io.modes.get_mut(&ino).is_some_and(|mode| {
                let opens = mode.opens();
                *opens -= 1;
                *opens == 0
            });
            let mut unregister = io.idle.expire(now);
            if last {
                match io.modes.remove(&ino) {
                    Some(InodeIo::Passthrough {
                        fingerprint,
                        backing,
                        keep: true,
                        ..
                    }) => unregister.extend(io.idle.keep(ino, fingerprint, backing, now)),
                    Some(InodeIo::Passthrough { backing, .. }) => unregister.push(backing),
                    _ => {}
                }
            }
            unregister
        };
        // Unregistering backing files (an ioctl each) happens outside the lock.
        drop(unregister);
    }

    /// The kernel forgot `ino`: the registration kept for it goes, and so does the record of
    /// its page cache (gone with the inode).
    pub(crate) fn forget(&self, ino: u64) {
        self.cached_versions
            .lock()
            .expect("versions lock")
            .remove(&ino);
        let kept = self.io.lock().expect("io lock").idle.remove(ino);
        // Unregistering (an ioctl) outside the lock.
        drop(kept);
    }

    /// Unregisters kept backing files past their time.
    pub(crate) fn expire_kept(&self) {
        let expired = self.io.lock().expect("io lock").idle.expire(Instant::now());
        drop(expired);
    }

    /// After a check of the pins epoch: registrations are kept for `ttl` from now on, and all
    /// those kept go when the epoch they were trusted under `ended`.
    pub(crate) fn pins_checked(&self, ttl: Duration, ended: bool) {
        let dropped = {
            let mut io = self.io.lock().expect("io lock");
            io.idle.set_ttl(ttl);
            if ended { io.idle.clear() } else { Vec::new() }
        };
        // Unregistering (an ioctl each) outside the lock.
        drop(dropped);
    }

    /// Puts back the io mode of `ino`, open `opens` times: through passthrough of `backing`
    /// (version `fingerprint`), or through this process with version `fingerprint` in the
    /// kernel's page cache. For a server that took over the connection of another.
    pub(crate) fn restore(
        &self,
        ino: u64,
        fingerprint: u128,
        opens: u64,
        backing: Option<Backing>,
    ) {
        let mode = match backing {
            Some(backing) => InodeIo::Passthrough {
                fingerprint,
                backing,
                opens,
                keep: false,
            },
            None => {
                self.cached_versions
                    .lock()
                    .expect("versions lock")
                    .insert(ino, fingerprint);
                InodeIo::Userspace { opens }
            }
        };
        self.io.lock().expect("io lock").modes.insert(ino, mode);
    }

    /// Number of passthrough registrations kept for inodes without open handles.
    pub(crate) fn kept(&self) -> usize {
        self.io.lock().expect("io lock").idle.len()
    }

    /// Number of open handles of `ino` reading through passthrough.
    pub(crate) fn passthrough_handles(&self, ino: u64) -> u64 {
        match self.io.lock().expect("io lock").modes.get(&ino) {
            Some(InodeIo::Passthrough { opens, .. }) => *opens,
            _ => 0,
        }
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

/// Opens a local copy read-only, never through a symlink at its last component, and checks
/// that it is a regular file of `size` bytes; returns it with its identity. (A remote worker's
/// path is checked to lie beneath that worker's dataset store before it gets here.)
fn open_local_copy(path: &Path, size: u64) -> Result<(File, FileIdentity), Unusable> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(Unusable::Io)?;
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

/// What an open decided, for `GranaryFs` to make the handle: the version it reads, whether the
/// kernel keeps its pages, and its io mode (already counted in [`IoModes`]).
pub(crate) struct Decided {
    pub(crate) path: String,
    pub(crate) object: ObjectRef,
    pub(crate) keep_cache: bool,
    pub(crate) io: OpenIo,
}

/// The open chain, over what it reads and updates: the worker, the inode table, the pins epoch
/// (under its lock, read when the chain needs it) and the trust rules, the io modes.
pub(crate) struct Opener<'a, A> {
    pub(crate) api: &'a A,
    pub(crate) inodes: &'a Mutex<InodeTable>,
    pub(crate) pins: &'a Mutex<PinsView>,
    pub(crate) ttls: Ttls,
    pub(crate) modes: &'a IoModes,
}

impl<A: CacheApi> Opener<'_, A> {
    /// The pins epoch pinned entries are trusted under, as the last check left it.
    fn known_epoch(&self) -> Option<u64> {
        self.pins.lock().expect("pins lock").trusted()
    }

    fn snapshot(&self, ino: u64) -> Result<OpenSnapshot, FsError> {
        let known = self.known_epoch();
        let inodes = self.inodes.lock().expect("inode lock");
        let inode = inodes.get(ino).ok_or(FsError::NotFound)?;
        Ok(OpenSnapshot {
            path: inode.path.clone(),
            entry: inode.entry.clone(),
            trusted: inode.entry.pinned
                && self
                    .ttls
                    .fresh(inode.entry.pinned, inode.seen, known, Instant::now),
            local: inode.local.clone(),
            epoch: known,
        })
    }

    /// The open of a trusted (pinned, fresh) entry from what is known, or `None`.
    pub(crate) fn open_known<R: FnOnce(&File) -> std::io::Result<Backing>>(
        &self,
        ino: u64,
        write: bool,
        register: &mut Option<R>,
    ) -> Option<Result<Decided, FsError>> {
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
        let need = self.modes.need(ino, fingerprint, register.is_some());
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
        Some(self.decide(
            ino,
            snap.path,
            &snap.entry,
            copy,
            reuse_kept,
            register.take(),
        ))
    }

    /// The open from what is known ([`Opener::open_known`]), else after asking the worker: a
    /// stat (none for a trusted entry) and, when this open could use one, a local copy.
    pub(crate) async fn open(
        &self,
        ino: u64,
        write: bool,
        register: Option<impl FnOnce(&File) -> std::io::Result<Backing>>,
    ) -> Result<Decided, FsError> {
        let mut register = register;
        if let Some(decided) = self.open_known(ino, write, &mut register) {
            return decided;
        }
        let snap = self.snapshot(ino)?;
        // Ask for a local copy of the version the inode last showed while the stat runs, when
        // this open could use one (an inode already open in either mode stays in that mode).
        let ask = match &snap.entry.object {
            Some(known) if register.is_some() && self.modes.passthrough_enabled() => {
                let idle = !self.modes.is_open(ino);
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
                seen_now(snap.epoch),
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
        self.decide(ino, snap.path, &entry, copy, false, register)
    }

    /// The rest of an open once the entry (and a local copy, or a checked kept registration) is
    /// known: the io mode and the page cache decision.
    fn decide(
        &self,
        ino: u64,
        path: String,
        entry: &Entry,
        copy: Option<File>,
        reuse_kept: bool,
        register: Option<impl FnOnce(&File) -> std::io::Result<Backing>>,
    ) -> Result<Decided, FsError> {
        let object = file_object(&path, entry)?;
        let fingerprint = object.id.fingerprint();
        let source = Source {
            fingerprint,
            pinned: entry.pinned,
            copy,
            reuse_kept,
        };
        let io = self.modes.choose(ino, &path, source, register)?;
        let keep_cache = self.modes.keep_cache(ino, fingerprint, &io);
        Ok(Decided {
            object: object.clone(),
            path,
            keep_cache,
            io,
        })
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
}
