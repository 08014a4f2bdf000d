//! The keeper: the process `granary up` and `granary mount` run as, which holds the mount and
//! runs the FUSE server (this same command, started again with [`HANDOFF_ENV`]) as its child.
//!
//! It mounts and answers FUSE_INIT ([`granary_fuse_client::hold`]), then starts the server and
//! waits. When the server dies for any reason it starts another, which takes the connection
//! over (`granary_fuse_client::kernel::handover`); SIGHUP stops the server and starts the
//! binary now on disk (a live upgrade); SIGTERM or SIGINT stops the server and unmounts. A
//! server that exits before serving on the first start (bad flags, a backend refusing it)
//! ends the keeper with its status, after unmounting; later, a server that keeps failing is
//! started again with a growing pause (up to 5 s), and an upgraded one that fails to start
//! three times running is given up for the keeper's own build. A server that stops answering (a `statfs` of
//! the mount, every 5 s, not back within 30 s) is killed and replaced the same way. The keeper
//! reads no request and does no I/O beyond this probe: one thread and the probe's, no runtime.

use anyhow::Context;
use granary_fuse_client::{Connection, FsConfig, HANDOFF_ENV, Handovers, hold, inheritable};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

/// What the keeper mounts.
pub struct Kept {
    pub dir: PathBuf,
    pub fsname: String,
    pub config: FsConfig,
}

/// How long a server may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// An upgraded server that fails to start this many times running is given up.
const UPGRADE_TRIES: u32 = 3;

/// How often the keeper checks that the server answers, and how long an answer may take.
const PROBE_EVERY: Duration = Duration::from_secs(5);
const HUNG_AFTER: Duration = Duration::from_secs(30);

/// How a wait for the server ended.
enum Event {
    Exited(WaitStatus),
    Upgrade,
    Stop,
}

struct Keeper {
    signals: SignalFd,
    /// Readable when the probe finds the mount hung.
    hung: std::fs::File,
    conn: Connection,
    dev: OwnedFd,
    journal: OwnedFd,
    exe: PathBuf,
}

pub fn run(kept: Kept) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
    ] {
        mask.add(s);
    }
    mask.thread_block().context("cannot block signals")?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("cannot open a signalfd")?;
    let conn = hold(&kept.dir, &kept.fsname, &kept.config)?;
    let dev = inheritable(conn.device())?;
    let journal = inheritable(conn.journal())?;
    let (hung_read, hung_write) = nix::unistd::pipe().context("cannot make a pipe")?;
    let dir = kept.dir.clone();
    std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || probe(dir, std::fs::File::from(hung_write)))
        .context("cannot start the probe thread")?;
    let keeper = Keeper {
        signals,
        hung: std::fs::File::from(hung_read),
        conn,
        dev,
        journal,
        exe,
    };
    keeper.supervise()
}

impl Keeper {
    fn supervise(self) -> anyhow::Result<ExitCode> {
        let mut handovers = Handovers::default();
        let mut failures = 0u32;
        // The binary servers start from: the one on disk, or the keeper's own after an upgrade
        // that does not start.
        let own = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
        let mut exe = self.exe.clone();
        loop {
            let started = Instant::now();
            let (mut child, ready) = self.start(&exe, handovers)?;
            let (event, served) = self.wait(&mut child, ready)?;
            match event {
                Event::Stop => {
                    self.stop(&mut child);
                    return self.unmount(ExitCode::SUCCESS);
                }
                Event::Upgrade => {
                    tracing::info!(exe = %self.exe.display(), "SIGHUP: starting the server on disk, which takes the mount over");
                    self.stop(&mut child);
                    handovers.upgrades += 1;
                    failures = 0;
                    exe = self.exe.clone();
                }
                Event::Exited(status) => {
                    if handovers == Handovers::default() && !served {
                        tracing::error!(
                            ?status,
                            "the FUSE server exited before serving; unmounting"
                        );
                        let code = match status {
                            WaitStatus::Exited(_, code) => (code & 0xff) as u8,
                            _ => 1,
                        };
                        return self.unmount(ExitCode::from(code.max(1)));
                    }
                    failures = if served { 0 } else { failures + 1 };
                    tracing::warn!(
                        ?status,
                        ran_for = ?started.elapsed(),
                        "the FUSE server exited; starting another, which takes the mount over"
                    );
                    handovers.crashes += 1;
                    if failures >= UPGRADE_TRIES && handovers.upgrades > 0 && exe != own {
                        tracing::error!(
                            exe = %self.exe.display(),
                            "the upgraded FUSE server failed to start {UPGRADE_TRIES} times: going back to the keeper's own build"
                        );
                        exe = own.clone();
                    }
                    if failures > 0 {
                        let pause = (Duration::from_millis(100) * 2u32.saturating_pow(failures))
                            .min(MAX_PAUSE);
                        if self.pause(pause)? {
                            return self.unmount(ExitCode::SUCCESS);
                        }
                    }
                }
            }
        }
    }

    /// Starts a server that inherits the connection; returns it and the read end of its
    /// "serving" pipe.
    fn start(
        &self,
        exe: &std::path::Path,
        handovers: Handovers,
    ) -> anyhow::Result<(Child, std::fs::File)> {
        let (ready_read, ready_write) = nix::unistd::pipe().context("cannot make a pipe")?;
        let ready_write = inheritable(ready_write.as_fd())?;
        let env = self.conn.handoff_env(
            self.dev.as_raw_fd(),
            self.journal.as_raw_fd(),
            ready_write.as_raw_fd(),
            handovers,
        );
        let child = Command::new(exe)
            .arg0(&self.exe)
            .args(std::env::args_os().skip(1))
            .env(HANDOFF_ENV, env)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        tracing::debug!(pid = child.id(), ?handovers, "FUSE server started");
        Ok((child, std::fs::File::from(ready_read)))
    }

    /// Waits for the server to exit, or for a signal to the keeper; also says whether the
    /// server got as far as serving.
    fn wait(&self, child: &mut Child, mut ready: std::fs::File) -> anyhow::Result<(Event, bool)> {
        let mut served = false;
        let mut ready_open = true;
        loop {
            let mut fds = vec![
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.hung.as_fd(), PollFlags::POLLIN),
            ];
            if ready_open {
                fds.push(PollFd::new(ready.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => other.context("poll")?,
            };
            let ready_event = ready_open && fds[2].any().unwrap_or(false);
            let signal_event = fds[0].any().unwrap_or(false);
            let hung_event = fds[1].any().unwrap_or(false);
            drop(fds);
            if hung_event {
                let mut byte = [0u8; 1];
                let _ = (&self.hung).read(&mut byte);
                // A server still starting may take its time; one serving may not.
                if served {
                    tracing::error!(
                        pid = child.id(),
                        "the FUSE server has not answered a statfs of the mount for {HUNG_AFTER:?}: killing it; the next one takes the mount over"
                    );
                    let _ = child.kill();
                }
            }
            if ready_event {
                let mut byte = [0u8; 1];
                match ready.read(&mut byte) {
                    Ok(1) => served = true,
                    _ => ready_open = false,
                }
            }
            if signal_event {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGHUP) => return Ok((Event::Upgrade, served)),
                        Ok(Signal::SIGTERM | Signal::SIGINT) => {
                            tracing::info!(
                                "shutting down: stopping the FUSE server, then unmounting"
                            );
                            return Ok((Event::Stop, served));
                        }
                        _ => {}
                    }
                }
                if let Some(status) = reap(child) {
                    return Ok((Event::Exited(status), served));
                }
            }
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after [`STOP_GRACE`].
    fn stop(&self, child: &mut Child) {
        let pid = Pid::from_raw(child.id() as i32);
        if reap(child).is_some() {
            return;
        }
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if reap(child).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(
            pid = pid.as_raw(),
            "the FUSE server did not stop in time; killing it"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sleeps `pause`, or less if told to stop (then true).
    fn pause(&self, pause: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + pause;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                .unwrap_or(PollTimeout::ZERO);
            match poll(&mut fds, ms) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {
                    while let Ok(Some(info)) = self.signals.read_signal() {
                        if matches!(
                            Signal::try_from(info.ssi_signo as i32),
                            Ok(Signal::SIGTERM | Signal::SIGINT)
                        ) {
                            return Ok(true);
                        }
                    }
                }
                Err(e) => return Err(e).context("poll"),
            }
        }
    }

    fn unmount(self, code: ExitCode) -> anyhow::Result<ExitCode> {
        let dir = self.conn.dir().to_path_buf();
        self.conn
            .unmount()
            .with_context(|| format!("cannot unmount {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), "unmounted");
        Ok(code)
    }
}

/// Every [`PROBE_EVERY`], a `statfs` of the mount (which the kernel sends to the server); when
/// one has not come back after [`HUNG_AFTER`], says so on `hung` (once per hung probe).
fn probe(dir: PathBuf, mut hung: std::fs::File) {
    use std::io::Write;
    loop {
        std::thread::sleep(PROBE_EVERY);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.clone();
        let spawned = std::thread::Builder::new()
            .name("statfs".into())
            .spawn(move || {
                let _ = tx.send(nix::sys::statvfs::statvfs(&path).is_ok());
            });
        if spawned.is_err() {
            continue;
        }
        if rx.recv_timeout(HUNG_AFTER).is_err() {
            if hung.write_all(b"h").is_err() {
                return;
            }
            // Until it comes back (the next server answers it), no second report.
            let _ = rx.recv();
        }
    }
}

/// `granary mount --upgrade DIR`: finds the keeper of the mount at `dir` (a process whose command
/// line `mount_dir` reads as mounting it, with no handoff of its own), sends it SIGHUP, and
/// waits until a new server answers at `dir`.
pub fn upgrade(
    dir: &std::path::Path,
    mount_dir: fn(&[std::ffi::OsString]) -> Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let want = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let keeper = find_keeper(&want, mount_dir)?;
    let old = server_of(keeper);
    kill(Pid::from_raw(keeper as i32), Signal::SIGHUP)
        .with_context(|| format!("cannot signal keeper {keeper}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(new) = server_of(keeper)
            && Some(new) != old
            && nix::sys::statvfs::statvfs(&want).is_ok()
        {
            println!(
                "granary: {} upgraded: keeper {keeper} runs server {new} (was {})",
                want.display(),
                old.map_or("none".into(), |p| p.to_string())
            );
            return Ok(ExitCode::SUCCESS);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "keeper {keeper} of {} has no new server after 120 s (see its log)",
            want.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The keeper of the mount at `dir`, among this machine's processes.
fn find_keeper(
    dir: &std::path::Path,
    mount_dir: fn(&[std::ffi::OsString]) -> Option<PathBuf>,
) -> anyhow::Result<u32> {
    use std::os::unix::ffi::OsStringExt;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").context("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv: Vec<std::ffi::OsString> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsString::from_vec(a.to_vec()))
            .collect();
        let is_granary = argv
            .first()
            .and_then(|a| std::path::Path::new(a).file_name())
            .is_some_and(|n| n.to_string_lossy().starts_with("granary"));
        if !is_granary {
            continue;
        }
        // Servers carry the handoff in their environment; keepers do not.
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ
            .split(|&b| b == 0)
            .any(|v| v.starts_with(HANDOFF_ENV.as_bytes()))
        {
            continue;
        }
        let Some(mounted) = mount_dir(&argv) else {
            continue;
        };
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        if std::fs::canonicalize(cwd.join(mounted)).is_ok_and(|m| m == dir) {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => Ok(pid),
        [] => anyhow::bail!(
            "no Granary keeper serves {} (is it mounted with `granary up` or `granary mount`, without --no-keeper?)",
            dir.display()
        ),
        _ => anyhow::bail!("several processes claim {}: {found:?}", dir.display()),
    }
}

/// The `granary` server child of keeper `pid`, if it has one now.
fn server_of(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| {
            std::fs::read(format!("/proc/{c}/environ")).is_ok_and(|e| {
                e.split(|&b| b == 0)
                    .any(|v| v.starts_with(HANDOFF_ENV.as_bytes()))
            })
        })
}

/// The server's exit status, if it has exited.
fn reap(child: &Child) -> Option<WaitStatus> {
    match waitpid(Pid::from_raw(child.id() as i32), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => None,
        Ok(status) => Some(status),
        // Reaped already (ECHILD): it is gone.
        Err(_) => Some(WaitStatus::Exited(Pid::from_raw(child.id() as i32), 1)),
    }
}
