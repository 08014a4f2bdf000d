//! Mounting: the checks that make a bad mount fail fast with a clear message, then fuser.
//!
//! The session answers FUSE_INIT through [`FuseAdapter`]; when FUSE over io_uring was asked for
//! and agreed, the rings ([`super::uring`]) take the requests, and if they fail to start the
//! mount is made again over `/dev/fuse`. While mounted, a task polls the worker's pins epoch once
//! a second and tells the kernel which entries to drop.

use super::fuser::FuseAdapter;
use super::uring::{self, Rings};
use crate::fs::{FsConfig, GranaryFs};
use crate::inodes::KernelEntry;
use fuser::{BackgroundSession, Config, INodeNo, MountOption, Notifier, Session, SessionACL};
use granary_proto::CacheApi;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {0} does not exist")]
    Missing(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mount point {0} is not empty")]
    NotEmpty(PathBuf),
    #[error("mount point {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("no permission to open /dev/fuse ({0}): run as root or grant access to /dev/fuse")]
    FuseDevice(std::io::Error),
    #[error("cannot mount at {0}: {1}")]
    Mount(PathBuf, std::io::Error),
}

/// The mount point must exist, be a directory and be empty. A dead Granary mount there (its
/// daemon killed: `ENOTCONN`) is detached first, with a log line saying so; a dead mount of any
/// other filesystem is left alone and named in the error.
pub fn check_mount_dir(dir: &Path) -> Result<(), MountError> {
    // A dead mount answers ENOTCONN, to stat or (its root's attributes still cached) to
    // readdir. Dead mounts may be stacked (each restart mounted over the last): detach them all.
    let mut probe = probe_mount_dir(dir);
    for _ in 0..8 {
        match probe {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                detach_dead_mount(dir, e)?;
                probe = probe_mount_dir(dir);
            }
            _ => break,
        }
    }
    match probe {
        Ok(Some(true)) => Ok(()),
        Ok(Some(false)) => Err(MountError::NotEmpty(dir.into())),
        Ok(None) => Err(MountError::NotADirectory(dir.into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(MountError::Missing(dir.into())),
        Err(e) => Err(MountError::Io(dir.into(), e)),
    }
}

/// Whether `dir` is an empty directory (`None`: not a directory).
fn probe_mount_dir(dir: &Path) -> std::io::Result<Option<bool>> {
    if !std::fs::metadata(dir)?.is_dir() {
        return Ok(None);
    }
    Ok(Some(std::fs::read_dir(dir)?.next().is_none()))
}

/// What `/proc/self/mountinfo` says is mounted at `dir`: (filesystem type, source).
fn mounted_at(dir: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = std::path::absolute(dir).ok()?;
    // The last line for a mount point is the one on top.
    text.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mount_point = unescape_mountinfo(fields.get(4)?);
        let dash = fields.iter().position(|f| *f == "-")?;
        let (fstype, source) = (fields.get(dash + 1)?, fields.get(dash + 2)?);
        (Path::new(&mount_point) == want).then(|| (fstype.to_string(), unescape_mountinfo(source)))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily detaches the dead Granary mount at `dir` (`stat` gave `error`, ENOTCONN).
fn detach_dead_mount(dir: &Path, error: std::io::Error) -> Result<(), MountError> {
    let Some((fstype, source)) = mounted_at(dir) else {
        return Err(MountError::Io(dir.into(), error));
    };
    if !(fstype.starts_with("fuse") && source.starts_with("granary:")) {
        return Err(MountError::Io(
            dir.into(),
            std::io::Error::other(format!(
                "{error}: a dead {fstype} mount of {source:?} is there; unmount it first (umount -l)"
            )),
        ));
    }
    let detached = match rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        // Not root: the setuid helper may detach a mount its user made.
        Err(rustix::io::Errno::PERM) => std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(dir)
            .status()
            .map_err(|e| e.to_string())
            .and_then(|s| s.success().then_some(()).ok_or(format!("fusermount3: {s}"))),
        Err(e) => Err(e.to_string()),
    };
    detached.map_err(|why| {
        MountError::Io(
            dir.into(),
            std::io::Error::other(format!(
                "{error}; detaching the dead Granary mount failed: {why}"
            )),
        )
    })?;
    tracing::warn!(
        dir = %dir.display(),
        source = %source,
        "detached a dead Granary mount (its daemon is gone); mounting afresh"
    );
    Ok(())
}

/// The FUSE device must be openable for reading and writing.
pub fn check_fuse_device() -> Result<(), MountError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(MountError::FuseDevice)
}

/// A mounted filesystem; unmounts when dropped or with [`Mounted::unmount`].
pub struct Mounted {
    session: Option<BackgroundSession>,
    rings: Option<Rings>,
    dir: PathBuf,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted").field("dir", &self.dir).finish()
    }
}

impl Mounted {
    /// A mount whose connection a keeper holds ([`super::handover`]): the keeper unmounts it.
    pub(crate) fn kept(dir: &Path) -> Self {
        Mounted {
            session: None,
            rings: None,
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many io_uring queues take this mount's requests (one per CPU); 0 = `/dev/fuse`.
    pub fn io_uring_queues(&self) -> usize {
        self.rings.as_ref().map_or(0, Rings::queues)
    }

    /// Unmounts and waits for the session thread to end. A mount still in use (open files, a
    /// shell inside it) is detached lazily instead: it disappears from the namespace now and
    /// its users get ENOTCONN once this process exits.
    pub fn unmount(mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => {
                if let Some(rings) = self.rings.take() {
                    rings.stop();
                }
                Ok(())
            }
            // The rings keep serving the open files until this process exits.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(dir = %self.dir.display(), "mount busy; detaching it lazily");
                lazy_unmount(&self.dir)
            }
            Err(e) => Err(e),
        }
    }
}

/// The kernel's readahead for the mount, at most: 4 MiB.
const KERNEL_READAHEAD_MAX_KB: u64 = 4096;

/// Raises the kernel's readahead for this mount (FUSE starts at 128 KiB, which splits a
/// sequential read into many small requests). Measured on a 1 GiB file: 128 KiB -> 4 MiB takes a
/// memory-tier read from 2.3 to 3.9 GB/s and a cold read from 0.60 to 0.78 GB/s. Needs root (it
/// is a sysfs knob of the mount's backing device); without it the default stays, said once.
pub(crate) fn set_kernel_readahead(dir: &Path, kb: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&knob, kb.to_string()) {
        Ok(()) => tracing::debug!(%knob, kb, "kernel readahead set"),
        Err(e) => {
            tracing::info!(%knob, error = %e, "cannot raise the kernel's readahead; sequential reads will be slower")
        }
    }
}

fn lazy_unmount(dir: &Path) -> std::io::Result<()> {
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(dir)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => {
            let s = std::process::Command::new("umount")
                .arg("-l")
                .arg(dir)
                .status()?;
            if s.success() {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "cannot detach {}",
                    dir.display()
                )))
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take()
            && s.umount_and_join().is_ok()
            && let Some(rings) = self.rings.take()
        {
            rings.stop();
        }
    }
}

/// Once a second: asks the worker for its pins epoch, and when pinned entries the kernel was
/// told to keep are no longer trusted, tells the kernel to drop them; lets go of kept
/// passthrough registrations past their time (also while nothing is opened or closed). Ends
/// with the filesystem.
pub(crate) async fn maintain<A: CacheApi>(fs: Weak<GranaryFs<A>>, notifier: impl Invalidate) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(fs) = fs.upgrade() else {
            return;
        };
        let stale = fs.check_pins().await;
        fs.expire_kept_backings();
        let excess = fs.excess_entries();
        drop(fs);
        // A notification blocks while the kernel takes the directory's lock, which a request
        // in flight may hold: off the runtime's threads.
        for (entries, why) in [(stale, Why::PinsChanged), (excess, Why::TableFull)] {
            if !entries.is_empty() {
                let notifier = notifier.clone();
                let _ =
                    tokio::task::spawn_blocking(move || invalidate(&notifier, &entries, why)).await;
            }
        }
    }
}

/// How the kernel is told to drop an entry or an inode's attributes and pages: fuser's
/// notifier, or a kept connection's ([`super::devfuse::DevNotifier`]).
pub(crate) trait Invalidate: Clone + Send + 'static {
    fn entry(&self, parent: u64, name: &str) -> std::io::Result<()>;
    fn inode(&self, ino: u64) -> std::io::Result<()>;
}

impl Invalidate for Notifier {
    fn entry(&self, parent: u64, name: &str) -> std::io::Result<()> {
        self.inval_entry(INodeNo(parent), OsStr::new(name))
    }
    fn inode(&self, ino: u64) -> std::io::Result<()> {
        self.inval_inode(INodeNo(ino), 0, 0)
    }
}

impl Invalidate for super::devfuse::DevNotifier {
    fn entry(&self, parent: u64, name: &str) -> std::io::Result<()> {
        self.inval_entry(parent, name)
    }
    fn inode(&self, ino: u64) -> std::io::Result<()> {
        self.inval_inode(ino)
    }
}

/// Why the kernel is told to drop entries.
#[derive(Debug, Clone, Copy)]
enum Why {
    /// Pinned entries it keeps for the pinned TTL are no longer trusted.
    PinsChanged,
    /// The inode table is over its limit: the least used entries go.
    TableFull,
}

/// Tells the kernel to drop these entries and the attributes and pages of their inodes.
fn invalidate(notifier: &impl Invalidate, entries: &[KernelEntry], why: Why) {
    let mut failed = 0;
    for e in entries {
        if let Some(parent) = e.parent {
            failed += notify_failed(notifier.entry(parent, &e.name));
        }
        // A full table only needs the name gone (the kernel then forgets an inode it does
        // not use); untrusted pinned entries also lose their attributes and pages.
        if let Why::PinsChanged = why {
            failed += notify_failed(notifier.inode(e.ino));
        }
    }
    match why {
        Why::PinsChanged => {
            metrics::counter!(granary_core::metrics::FUSE_KERNEL_INVALIDATIONS)
                .increment(entries.len() as u64);
            tracing::info!(
                entries = entries.len(),
                failed,
                "told the kernel to drop pinned entries"
            );
        }
        Why::TableFull => tracing::debug!(
            entries = entries.len(),
            failed,
            "the inode table is full: told the kernel to drop the least used entries"
        ),
    }
}

/// 1 for a notification the kernel refused for another reason than not knowing the entry (it
/// forgot it already) or the mount being gone.
fn notify_failed(result: std::io::Result<()>) -> usize {
    match result {
        Err(e) if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {
            tracing::debug!(error = %e, "a kernel invalidation failed");
            1
        }
        _ => 0,
    }
}

/// Checks the mount point and the FUSE device, then mounts `fs` read-only at `dir`.
pub fn mount<A: CacheApi>(
    fs: Arc<GranaryFs<A>>,
    dir: &Path,
    fsname: &str,
) -> Result<Mounted, MountError> {
    check_mount_dir(dir)?;
    check_fuse_device()?;
    let config = mount_config(fs.config(), fsname);
    if fs.config().io_uring && is_root() {
        enable_fuse_io_uring();
    }
    let (session, rings) = match start_session(&fs, dir, &config, fs.config().io_uring)? {
        Started::Ready(session, rings) => (session, rings),
        Started::RingsFailed(e) => {
            // The kernel holds every request until the rings are up: mount again without them.
            tracing::warn!(error = %e, "FUSE over io_uring failed to start: mounting with /dev/fuse");
            match start_session(&fs, dir, &config, false)? {
                Started::Ready(session, rings) => (session, rings),
                Started::RingsFailed(e) => return Err(MountError::Mount(dir.into(), e)),
            }
        }
    };
    set_kernel_readahead(dir, kernel_readahead_kb(fs.config()));
    tokio::spawn(maintain(Arc::downgrade(&fs), session.notifier()));
    crate::hint::listen(fs.hints().clone(), dir);
    Ok(Mounted {
        session: Some(session),
        rings,
        dir: dir.to_path_buf(),
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// The kernel readahead this configuration wants, in KiB.
pub(crate) fn kernel_readahead_kb(config: &FsConfig) -> u64 {
    (config.readahead_per_file >> 10).clamp(128, KERNEL_READAHEAD_MAX_KB)
}

/// The mount options and session settings of a read-only Granary mount.
pub(crate) fn mount_config(fs: &FsConfig, fsname: &str) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("granary".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // Training pods often run as another user than the mounter: sharing the mount is the
    // operator's explicit choice (`--allow-other`); the kernel checks the modes either way.
    if fs.allow_other {
        config.acl = SessionACL::All;
    }
    if fs.auto_unmount {
        // The kernel mount goes when the daemon does (fusermount3 watches it); fusermount
        // needs an ACL other than "owner only": root may then use the mount too.
        config.mount_options.push(MountOption::AutoUnmount);
        if config.acl == SessionACL::Owner {
            config.acl = SessionACL::RootAndOwner;
        }
    }
    config.n_threads = Some(2);
    config.clone_fd = true;
    config
}

enum Started {
    Ready(BackgroundSession, Option<Rings>),
    /// FUSE_INIT agreed on io_uring but the rings did not start; the mount is gone again.
    RingsFailed(std::io::Error),
}

/// Mounts, answers FUSE_INIT, and starts serving: through the rings if `io_uring` was asked
/// and agreed, else through fuser's `/dev/fuse` threads.
fn start_session<A: CacheApi>(
    fs: &Arc<GranaryFs<A>>,
    dir: &Path,
    config: &Config,
    io_uring: bool,
) -> Result<Started, MountError> {
    let rt = tokio::runtime::Handle::current();
    let dev = Arc::new(OnceLock::new());
    let agreed = Arc::new(AtomicBool::new(io_uring));
    let adapter = FuseAdapter::new(fs.clone(), rt.clone(), dev.clone(), agreed.clone());
    let mount_err = |e| MountError::Mount(dir.into(), e);
    // Session::new mounts and answers FUSE_INIT; nothing else is served before spawn.
    let session = Session::new(adapter, dir, config).map_err(mount_err)?;
    let fd = Arc::new(session.as_fd().try_clone_to_owned().map_err(mount_err)?);
    let _ = dev.set(fd.clone());
    let session = session.spawn().map_err(mount_err)?;
    if !agreed.load(Ordering::Relaxed) {
        metrics::gauge!(granary_core::metrics::FUSE_IO_URING_QUEUES).set(0.0);
        return Ok(Started::Ready(session, None));
    }
    match uring::start(fd, fs.clone(), rt) {
        Ok(rings) => Ok(Started::Ready(session, Some(rings))),
        Err(e) => {
            let _ = session.umount_and_join();
            Ok(Started::RingsFailed(e))
        }
    }
}

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Turns on the fuse module's `enable_uring` (off by default in the kernel; it lets FUSE servers
/// that ask for it, like this one, take requests over io_uring). Absent: the kernel lacks it.
fn enable_fuse_io_uring() {
    match std::fs::read_to_string(ENABLE_URING) {
        Ok(v) if v.trim() == "Y" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(ENABLE_URING, "Y") {
                tracing::info!(knob = ENABLE_URING, error = %e, "cannot turn on FUSE over io_uring");
            }
        }
        Err(_) => tracing::debug!("this kernel has no FUSE over io_uring"),
    }
}
