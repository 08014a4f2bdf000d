//! A mount that outlives its server: the keeper holds the kernel connection, servers come and
//! go.
//!
//! The kernel keeps a FUSE connection as long as one process holds its `/dev/fuse` file. The
//! keeper ([`hold`]) mounts, answers FUSE_INIT (with what any Granary server needs) and holds
//! the file and a journal ([`crate::journal`]); it reads no request. Each server it starts gets
//! both (inherited, named in `GRANARY_FUSE_HANDOFF`: [`Handoff`]); [`serve`] replays the journal
//! into the filesystem's tables (node ids and their counts, open files and their versions,
//! directory handles, passthrough backing ids), asks the kernel to send again the requests the
//! last server took and never answered (`FUSE_NOTIFY_RESEND`, Linux 6.9+), and serves
//! ([`super::devfuse`]). A reader whose request the dead server held waits for the next one;
//! it sees no error.
//!
//! `unsafe`: taking ownership of the inherited descriptors the handoff names.
#![allow(unsafe_code)]

use super::devfuse::{self, DevNotifier};
use super::fuser::{Agreed, negotiate};
use super::mount::{
    MountError, Mounted, check_fuse_device, check_mount_dir, kernel_readahead_kb, maintain,
    mount_config, set_kernel_readahead,
};
use super::shared::{KernelBacking, backing_id};
use crate::fs::{Backing, FsConfig, GranaryFs};
use crate::journal::{self, Journal};
use fuser::{Filesystem, KernelConfig, Request, Session};
use granary_core::metrics as m;
use granary_proto::CacheApi;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The environment variable naming what a server inherits from its keeper.
pub const HANDOFF_ENV: &str = "GRANARY_FUSE_HANDOFF";

/// Threads reading `/dev/fuse` in a server.
const DEV_THREADS: usize = 2;

/// Answers FUSE_INIT for the servers to come, and nothing else.
struct InitOnly {
    passthrough: bool,
    agreed: Arc<Mutex<Option<Agreed>>>,
}

impl Filesystem for InitOnly {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let agreed = negotiate(config, self.passthrough, false);
        *self.agreed.lock().expect("agreed lock") = Some(agreed);
        Ok(())
    }
}

/// The keeper's hold on a mount: the connection, mounted and initialized; unmounted by
/// [`Connection::unmount`] or when dropped.
pub struct Connection {
    session: Session<InitOnly>,
    dev: OwnedFd,
    journal: File,
    passthrough: bool,
    dir: PathBuf,
    /// With `auto_unmount`: an inheritable copy of fusermount3's control socket, for servers.
    _unmount_socket: Option<OwnedFd>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("dir", &self.dir)
            .finish()
    }
}

/// Mounts `dir` read-only as `fsname` with `config`'s mount flags and answers FUSE_INIT; the
/// mount serves nothing until a server takes it ([`serve`]). Checks the mount point first (a
/// dead Granary mount there is detached).
pub fn hold(dir: &Path, fsname: &str, config: &FsConfig) -> Result<Connection, MountError> {
    check_mount_dir(dir)?;
    check_fuse_device()?;
    let agreed = Arc::new(Mutex::new(None));
    let init = InitOnly {
        passthrough: config.passthrough,
        agreed: agreed.clone(),
    };
    let mount_err = |e| MountError::Mount(dir.into(), e);
    let session = Session::new(init, dir, &mount_config(config, fsname)).map_err(mount_err)?;
    let dev = session.as_fd().try_clone_to_owned().map_err(mount_err)?;
    let journal = journal::create_file().map_err(mount_err)?;
    let agreed = agreed.lock().expect("agreed lock").take();
    let passthrough = match agreed {
        Some(Agreed {
            no_passthrough: None,
            ..
        }) => config.passthrough,
        Some(Agreed {
            no_passthrough: Some(why),
            ..
        }) => {
            tracing::info!(reason = why, "FUSE passthrough unavailable on this mount");
            false
        }
        None => false,
    };
    // fusermount3 unmounts (`auto_unmount`) once its control socket closes, if the mount no
    // longer answers then. Servers inherit a copy, numbered above their other descriptors
    // (closed last when a process dies): the socket closes only after the last server's
    // `/dev/fuse`, whoever dies first.
    let unmount_socket = match config.auto_unmount {
        true => unmount_socket().map_err(mount_err)?,
        false => None,
    };
    Ok(Connection {
        session,
        dev,
        journal,
        passthrough,
        dir: dir.to_path_buf(),
        _unmount_socket: unmount_socket,
    })
}

/// An inheritable copy, numbered 512 or above, of the one socket this process holds after
/// mounting with `auto_unmount`: fuser's end of fusermount3's control socket.
fn unmount_socket() -> std::io::Result<Option<OwnedFd>> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::metadata(entry.path())
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if is_socket {
            // SAFETY: borrowed only for the duplication, while /proc lists it as open.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let copy = rustix::io::fcntl_dupfd_cloexec(borrowed, 512)?;
            rustix::io::fcntl_setfd(&copy, rustix::io::FdFlags::empty())?;
            found = Some(copy);
        }
    }
    Ok(found)
}

impl Connection {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The value of [`HANDOFF_ENV`] for a server that inherits `dev`, `journal` and `ready`
    /// (descriptors the caller made inheritable: see [`inheritable`]); `handovers` earlier
    /// servers ended, by crash and by upgrade.
    pub fn handoff_env(
        &self,
        dev: RawFd,
        journal: RawFd,
        ready: RawFd,
        handovers: Handovers,
    ) -> String {
        let Handovers { crashes, upgrades } = handovers;
        format!(
            "dev={dev},journal={journal},ready={ready},passthrough={},crashes={crashes},upgrades={upgrades},keeper={}",
            u8::from(self.passthrough),
            std::process::id()
        )
    }

    pub fn device(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }

    pub fn journal(&self) -> BorrowedFd<'_> {
        self.journal.as_fd()
    }

    /// Unmounts; a mount still in use is detached lazily.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.unmount() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(dir = %self.dir.display(), "mount busy; detaching it lazily");
                rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH)
                    .map_err(std::io::Error::from)
            }
            other => other,
        }
    }
}

/// A copy of `fd` that a child process inherits (no close-on-exec).
pub fn inheritable(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let copy = rustix::io::fcntl_dupfd_cloexec(fd, 3)?;
    rustix::io::fcntl_setfd(&copy, rustix::io::FdFlags::empty())?;
    Ok(copy)
}

/// How many servers of a mount ended before this one, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handovers {
    pub crashes: u64,
    pub upgrades: u64,
}

/// What a server inherits from its keeper.
#[derive(Debug)]
pub struct Handoff {
    dev: OwnedFd,
    journal: File,
    /// Written (one byte) and closed once the server serves.
    ready: Option<File>,
    passthrough: bool,
    handovers: Handovers,
}

impl Handoff {
    /// Takes what [`HANDOFF_ENV`] names (`None`: not started by a keeper); call it first thing
    /// in `main`, before anything opens a file. Each descriptor is checked to be what it should
    /// be before it is used, and made close-on-exec. This process dies with its keeper
    /// (`PR_SET_PDEATHSIG`): a mount outlives its server, not its keeper.
    pub fn from_env() -> Result<Option<Handoff>, String> {
        static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let Ok(spec) = std::env::var(HANDOFF_ENV) else {
            return Ok(None);
        };
        if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(format!("{HANDOFF_ENV}: taken already"));
        }
        let field = |name: &str| {
            spec.split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .ok_or(format!("{HANDOFF_ENV}: no {name}= in {spec:?}"))
        };
        let fd = |name: &str, kind: libc::mode_t| -> Result<OwnedFd, String> {
            let raw: RawFd = field(name)?
                .parse()
                .map_err(|_| format!("{HANDOFF_ENV}: {name} is not a descriptor"))?;
            let wrong =
                || format!("{HANDOFF_ENV}: descriptor {raw} ({name}) is not what a keeper passes");
            if raw < 3 {
                return Err(wrong());
            }
            // SAFETY: the keeper passed this descriptor to us alone (the caller's contract).
            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
            let st = rustix::fs::fstat(&owned).map_err(|_| wrong())?;
            if st.st_mode & libc::S_IFMT != kind {
                // Not ours after all: leave it open for whoever owns it.
                std::mem::forget(owned);
                return Err(wrong());
            }
            rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|_| wrong())?;
            Ok(owned)
        };
        let keeper: i32 = field("keeper")?
            .parse()
            .map_err(|_| format!("{HANDOFF_ENV}: keeper is not a process id"))?;
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
            .map_err(|e| format!("cannot tie this server's life to its keeper's: {e}"))?;
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        if parent != keeper {
            return Err(format!(
                "started by keeper {keeper}, which is gone (parent now {parent})"
            ));
        }
        let dev = fd("dev", libc::S_IFCHR)?;
        let journal = File::from(fd("journal", libc::S_IFREG)?);
        let ready = Some(File::from(fd("ready", libc::S_IFIFO)?));
        Ok(Some(Handoff {
            dev,
            journal,
            ready,
            passthrough: field("passthrough")? == "1",
            handovers: Handovers {
                crashes: field("crashes")?.parse().unwrap_or(0),
                upgrades: field("upgrades")?.parse().unwrap_or(0),
            },
        }))
    }
}

/// Serves the connection a keeper handed over with `fs`: replays the journal, has the kernel
/// send again what the last server left unanswered, and serves until the process ends. The
/// returned [`Mounted`] does not unmount: the keeper does.
pub async fn serve<A: CacheApi>(
    fs: Arc<GranaryFs<A>>,
    dir: &Path,
    handoff: Handoff,
) -> Result<Mounted, MountError> {
    let Handoff {
        dev,
        journal,
        ready,
        passthrough,
        handovers,
    } = handoff;
    let io_err = |e| MountError::Io(dir.into(), e);
    let dev = Arc::new(dev);
    let (journal, rebuilt) = Journal::open(journal).map_err(io_err)?;
    let journal = Arc::new(journal);
    if !passthrough {
        fs.disable_passthrough("the kernel connection did not agree on FUSE passthrough");
    }
    fs.attach_journal(journal.clone(), backing_id);
    let adopt = {
        let (dev, journal) = (dev.clone(), journal.clone());
        move |id| Arc::new(KernelBacking::adopt(&dev, id, Some(&journal))) as Backing
    };
    let records = rebuilt.records;
    fs.restore(rebuilt, adopt).await;
    devfuse::start(
        dev.clone(),
        fs.clone(),
        tokio::runtime::Handle::current(),
        Some(journal),
        DEV_THREADS,
    )
    .map_err(io_err)?;
    let notifier = DevNotifier(dev);
    metrics::counter!(m::FUSE_HANDOVERS, "reason" => "crash").absolute(handovers.crashes);
    metrics::counter!(m::FUSE_HANDOVERS, "reason" => "upgrade").absolute(handovers.upgrades);
    if handovers == Handovers::default() {
        // A stat of the mount point: only once a server answers.
        set_kernel_readahead(dir, kernel_readahead_kb(fs.config()));
    } else {
        match notifier.resend() {
            Ok(()) => tracing::info!(
                records,
                crashes = handovers.crashes,
                upgrades = handovers.upgrades,
                "took the mount over; the kernel sends again what the last server left unanswered"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "the kernel cannot send unanswered requests again (FUSE_NOTIFY_RESEND needs Linux 6.9+): readers the last server held may wait until interrupted"
            ),
        }
    }
    tokio::spawn(maintain(Arc::downgrade(&fs), notifier));
    crate::hint::listen(fs.hints().clone(), dir);
    if let Some(mut ready) = ready {
        let _ = ready.write_all(b"r");
    }
    Ok(Mounted::kept(dir))
}
