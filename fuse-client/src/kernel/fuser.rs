//! The fuser adapter: each kernel request opens a span, runs the [`GranaryFs`] call on the tokio
//! runtime, maps the error to an errno, replies, and records the op's latency and outcome.
//! Nothing here decides anything about the filesystem; the one kernel-specific step it adds is
//! registering a local copy as a passthrough backing file when [`GranaryFs`] asks for it.
//!
//! An open or getattr that [`GranaryFs`] can answer without the worker (`open_now`,
//! `getattr_now`: a hot pinned file, fresh attributes) is answered on the FUSE thread itself:
//! handing it to the runtime (a wakeup and a context switch each way) costs more than the
//! answer.

use super::shared::{MAX_PAYLOAD, passthrough_open, record, register_backing, wants_write};
use crate::fs::{Attr, Backing, FsError, GranaryFs, OpenIo, Opened};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use granary_core::metrics as m;
use granary_proto::{CacheApi, EntryKind};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokio::runtime::Handle;

pub struct FuseAdapter<A> {
    fs: Arc<GranaryFs<A>>,
    rt: Handle,
    dev: Arc<OnceLock<Arc<OwnedFd>>>,
    uring: Arc<AtomicBool>,
}

impl<A: CacheApi> FuseAdapter<A> {
    /// `dev` must be set to the session's `/dev/fuse` before the session serves requests (it
    /// registers passthrough files). `uring` asks FUSE_INIT for FUSE over io_uring when true,
    /// and is left true only if the kernel agreed: then no request is served until every ring
    /// is registered ([`super::uring::start`]).
    pub fn new(
        fs: Arc<GranaryFs<A>>,
        rt: Handle,
        dev: Arc<OnceLock<Arc<OwnedFd>>>,
        uring: Arc<AtomicBool>,
    ) -> Self {
        FuseAdapter { fs, rt, dev, uring }
    }

    fn register(&self) -> impl FnOnce(&std::fs::File) -> std::io::Result<Backing> + use<A> {
        let dev = self.dev.get().cloned();
        move |file| match dev {
            Some(dev) => register_backing(&dev, file, None),
            None => Err(std::io::Error::other("the FUSE session has no device yet")),
        }
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = if a.mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(a.mtime_ns as u64)
    } else {
        UNIX_EPOCH
    };
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: match a.kind {
            EntryKind::Dir => FileType::Directory,
            EntryKind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: if a.kind == EntryKind::Dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        flags: 0,
        blksize: a.blksize,
    }
}

/// Replies to an open with its outcome, and records it.
#[allow(unsafe_code)]
fn reply_open(reply: ReplyOpen, start: Instant, result: Result<Opened, FsError>) {
    record("open", start, result.as_ref().map(|_| ()));
    match result {
        Ok(opened) => match &opened.io {
            OpenIo::Passthrough(backing) => {
                // SAFETY: the id stays registered while `backing` lives (the open handle holds
                // it); `into_raw` below keeps fuser from unregistering it.
                let id = unsafe { reply.wrap_backing(passthrough_open(backing)) };
                // No FOPEN_KEEP_CACHE: the kernel fails a passthrough open with flags other
                // than direct-io ones, and the inode's page cache is not used.
                reply.opened_passthrough(FileHandle(opened.fh), FopenFlags::empty(), &id);
                id.into_raw();
            }
            OpenIo::Userspace => {
                let flags = if opened.keep_cache {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(opened.fh), flags)
            }
        },
        Err(e) => reply.error(errno(&e)),
    }
}

/// What FUSE_INIT agreed on beyond the basics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    pub io_uring: bool,
    /// Passthrough was wanted and the kernel refused it: why.
    pub no_passthrough: Option<&'static str>,
}

/// Answers FUSE_INIT's `config` for this filesystem: readdirplus, parallel directory
/// operations, asynchronous reads, 1 MiB requests; FUSE over io_uring and passthrough when
/// asked for and offered.
pub fn negotiate(config: &mut KernelConfig, passthrough: bool, io_uring: bool) -> Agreed {
    let wanted = InitFlags::FUSE_DO_READDIRPLUS
        | InitFlags::FUSE_READDIRPLUS_AUTO
        | InitFlags::FUSE_PARALLEL_DIROPS
        | InitFlags::FUSE_ASYNC_READ;
    if let Err(unsupported) = config.add_capabilities(wanted) {
        tracing::info!(?unsupported, "kernel lacks some FUSE capabilities");
        let _ = config.add_capabilities(wanted - unsupported);
    }
    let _ = config
        .set_max_readahead(1 << 20)
        .or_else(|max| config.set_max_readahead(max));
    let _ = config.set_max_background(64);
    // Read-only: no write is ever this large, and a ring slot holds the largest request.
    let _ = config.set_max_write(MAX_PAYLOAD as u32);
    let mut agreed = Agreed {
        io_uring: false,
        no_passthrough: None,
    };
    if io_uring {
        match config.add_capabilities(InitFlags::FUSE_OVER_IO_URING) {
            Ok(()) => agreed.io_uring = true,
            Err(_) => tracing::info!(
                "the kernel does not offer FUSE over io_uring (fuse.enable_uring=N or a kernel before 6.14): requests go through /dev/fuse"
            ),
        }
    }
    if passthrough {
        // Depth 1: backing files (the worker's dataset store) must sit on an ordinary
        // filesystem, not on a stacked one such as overlayfs (the kernel refuses those with
        // ELOOP, and we fall back), while this mount can still be a layer under overlayfs.
        match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
            Ok(()) => {
                let _ = config.set_max_stack_depth(1);
            }
            Err(_) => agreed.no_passthrough = Some("the kernel does not offer FUSE passthrough"),
        }
    }
    agreed
}

fn kind(k: EntryKind) -> FileType {
    match k {
        EntryKind::Dir => FileType::Directory,
        EntryKind::File => FileType::RegularFile,
    }
}

impl<A: CacheApi> Filesystem for FuseAdapter<A> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let uring = self.uring.swap(false, Ordering::Relaxed);
        let agreed = negotiate(config, self.fs.passthrough_enabled(), uring);
        self.uring.store(agreed.io_uring, Ordering::Relaxed);
        if let Some(why) = agreed.no_passthrough {
            self.fs.disable_passthrough(why);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = self.fs.clone();
        let name = name.to_string_lossy().into_owned();
        self.rt.spawn(async move {
            let start = Instant::now();
            let result = fs.lookup(parent.0, &name).await;
            record("lookup", start, result.as_ref().map(|_| ()));
            match result {
                Ok(attr) => reply.entry(&attr.ttl, &file_attr(&attr), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(attr) = self.fs.getattr_now(ino.0) {
            record("getattr", Instant::now(), Ok(()));
            reply.attr(&attr.ttl, &file_attr(&attr));
            return;
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            let start = Instant::now();
            let result = fs.getattr(ino.0).await;
            record("getattr", start, result.as_ref().map(|_| ()));
            match result {
                Ok(attr) => reply.attr(&attr.ttl, &file_attr(&attr)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let start = Instant::now();
        let write = wants_write(flags.0);
        let pid = req.pid();
        if let Some(result) = self.fs.open_now(ino.0, write, pid, self.register()) {
            reply_open(reply, start, result);
            return;
        }
        let fs = self.fs.clone();
        let register = self.register();
        self.rt.spawn(async move {
            let result = fs.open_passthrough(ino.0, write, pid, register).await;
            reply_open(reply, start, result);
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            let start = Instant::now();
            let result = fs.read(fh.0, offset, size).await;
            record("read", start, result.as_ref().map(|_| ()));
            match result {
                Ok(data) => {
                    metrics::counter!(m::FUSE_READ_BYTES).increment(data.len() as u64);
                    reply.data(&data)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            let start = Instant::now();
            let result = fs.opendir(ino.0).await;
            record("opendir", start, result.as_ref().map(|_| ()));
            match result {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let start = Instant::now();
        let result = self.fs.readdir(ino.0, fh.0, offset, false, |item| {
            !reply.add(
                INodeNo(item.ino),
                item.next_offset,
                kind(item.attr.kind),
                &item.name,
            )
        });
        record("readdir", start, result.as_ref().map(|_| ()));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let start = Instant::now();
        let result = self.fs.readdir(ino.0, fh.0, offset, true, |item| {
            !reply.add(
                INodeNo(item.ino),
                item.next_offset,
                &item.name,
                &item.attr.ttl,
                &file_attr(&item.attr),
                Generation(0),
            )
        });
        record("readdirplus", start, result.as_ref().map(|_| ()));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only mount: ENOSYS tells the kernel to stop sending FLUSH
        // (a round trip to this process on every close(2)) for the rest of the mount's life.
        reply.error(Errno::ENOSYS);
    }

    /// No ioctl is implemented: ENOTTY ("not a terminal", what `isatty()` expects), counted, not
    /// logged (fuser's default logs a warning per call, and Python's buffered `open()` sends one).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        metrics::counter!(m::FUSE_UNSUPPORTED_IOCTLS).increment(1);
        reply.error(Errno::ENOTTY);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let info = self.fs.block_size();
        let bsize = info.get().min(1 << 20) as u32;
        let capacity = (self.fs.inode_count() as u64).max(1);
        // A read-only view: report what it holds as used and nothing free.
        reply.statfs(1 << 30, 0, 0, capacity, 0, bsize, 255, bsize);
    }
}
