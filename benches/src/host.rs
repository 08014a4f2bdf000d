//! The machine side: daemons we start (own process group, log file, stopped with SIGTERM then
//! SIGKILL), what /proc says about a process (CPU time, peak RSS), mounts and unmounting, dropping
//! the page cache, free ports, and a description of the machine for the report.

use crate::cleanup::{self, Guard};
use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Linux reports CPU times in /proc in clock ticks of USER_HZ, which is 100 on every architecture.
const USER_HZ: f64 = 100.0;
/// How long a daemon gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A long-running child process: its stdout and stderr go to a log file, it runs in its own
/// process group (so Ctrl-C reaches only us, and we tear down in order), and it is stopped when
/// this value is dropped.
pub struct Daemon {
    name: String,
    pid: u32,
    child: Arc<Mutex<Child>>,
    log: PathBuf,
    /// Where this daemon's part of the (shared, appended) log starts.
    log_start: usize,
    _stop: Guard,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Daemon> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let log_start = out.metadata()?.len() as usize;
        writeln!(out, "===== {} =====", describe(&cmd))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {}", describe(&cmd)))?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        let stop = {
            let child = child.clone();
            cleanup::register(format!("stop {name} (pid {pid})"), move || {
                stop_child(&child)
            })
        };
        Ok(Daemon {
            name: name.to_string(),
            pid,
            child,
            log: log.to_path_buf(),
            log_start,
            _stop: stop,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails (with the end of its log) if the daemon has exited.
    pub fn check_running(&self) -> anyhow::Result<()> {
        let status = lock(&self.child).try_wait()?;
        match status {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            ),
        }
    }

    /// Waits until `ready` holds, failing if the daemon exits or `timeout` passes.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{}: timed out after {timeout:?} waiting for {what}; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What this daemon has logged so far.
    pub fn log_text(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(text.get(self.log_start..).unwrap_or_default()).into_owned()
    }

    /// The last lines this daemon logged.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

fn lock(child: &Mutex<Child>) -> std::sync::MutexGuard<'_, Child> {
    child
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`]; reaps the child either way.
fn stop_child(child: &Mutex<Child>) {
    let mut child = lock(child);
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "granary-bench: pid {} ignored SIGTERM for {STOP_GRACE:?}; killing it",
        child.id()
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a short command to completion, failing with its output if it fails.
pub fn run_command(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{stdout}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcStats {
    /// User plus system CPU time of all its threads so far.
    pub cpu_seconds: f64,
    /// Peak resident set size so far (VmHWM).
    pub peak_rss_bytes: u64,
}

impl ProcStats {
    /// The process `pid` and its descendants, summed (`granary up` is a keeper whose child
    /// serves: both count). The peaks are summed too, an upper bound of the tree's peak.
    pub fn read(pid: u32) -> anyhow::Result<ProcStats> {
        let mut total = ProcStats::read_one(pid)?;
        for child in children(pid) {
            // A child may end meanwhile: what it used is then not counted.
            if let Ok(c) = ProcStats::read(child) {
                total.cpu_seconds += c.cpu_seconds;
                total.peak_rss_bytes += c.peak_rss_bytes;
            }
        }
        Ok(total)
    }

    /// The process `pid` alone.
    pub fn read_one(pid: u32) -> anyhow::Result<ProcStats> {
        let cpu_seconds = stat_cpu_seconds(&format!("/proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let peak_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("no VmHWM in /proc/PID/status")?;
        Ok(ProcStats {
            cpu_seconds,
            peak_rss_bytes: peak_kib * 1024,
        })
    }
}

/// The CPU time (user plus system) of one thread of this process so far.
pub fn thread_cpu_seconds(tid: u32) -> anyhow::Result<f64> {
    stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
}

/// User plus system CPU time in a `/proc/.../stat` file.
fn stat_cpu_seconds(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the command name, which is in parentheses and may contain anything:
    // [0] is field 3 (state), so utime (field 14) is [11] and stime (field 15) is [12].
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("odd {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("short {path}"))?
            .parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// The children of every thread of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// An exclusive lock on a file, held until dropped (the kernel drops it if we die): one benchmark
/// at a time per work directory, since a starting run stops the S3 server and removes the mounts
/// it finds there.
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock on `path` (created if missing) and writes our pid into it, or fails at once
    /// naming the pid that holds it.
    pub fn acquire(path: &Path) -> anyhow::Result<RunLock> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if let Err(e) = file.try_lock() {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            bail!(
                "another granary-bench (pid {}) is using the work directory ({}: {e}); wait for it \
                 to end",
                holder.trim(),
                path.display()
            );
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(RunLock { _file: file })
    }
}

/// Whether something is mounted exactly at `dir`.
pub fn is_mounted(dir: &Path) -> bool {
    mounts_under(dir).iter().any(|m| m == dir)
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// Unmounts everything at or below `dir`: `fusermount3 -u`, then `umount -l` for what is busy
/// or whose daemon is gone. Never fails; reports what it could not do.
pub fn unmount_all_under(dir: &Path) {
    for m in mounts_under(dir) {
        let quiet = |prog: &str, args: &[&str]| {
            Command::new(prog)
                .args(args)
                .arg(&m)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !quiet("fusermount3", &["-u"]) && !quiet("umount", &["-l"]) {
            eprintln!("granary-bench: cannot unmount {}", m.display());
        }
    }
}

/// Unmounts whatever is mounted at or below `dir`; false (said on stderr) if something stays
/// mounted: touching files through a mount would reach into someone else's.
fn unmount_all_quietly(dir: &Path) -> bool {
    unmount_all_under(dir);
    let clear = mounts_under(dir).is_empty();
    if !clear {
        eprintln!(
            "granary-bench: {} is still mounted; leaving it",
            dir.display()
        );
    }
    clear
}

/// Unmounts whatever is mounted at or below `dir`, then deletes it (unless something stays
/// mounted: deleting through a mount would reach into someone else's files). Never fails.
pub fn remove_tree(dir: &Path) {
    if !unmount_all_quietly(dir) {
        return;
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            eprintln!("granary-bench: cannot remove {}: {e}", dir.display())
        }
        _ => {}
    }
}

/// Frees the disk space of the files under `dir` (each truncated to 0 bytes) but keeps them:
/// a later [`remove_tree`] deletes them. On ext4 without a journal (as on the machines this
/// benchmark was written on), creating files within a minute or more of deleting thousands makes
/// each creation skip the recently deleted inodes one by one (`recently_deleted` in ext4's inode
/// allocator), so deleting one run's thousands of files would slow the next run's load.
pub fn empty_tree(dir: &Path) {
    if !unmount_all_quietly(dir) {
        return;
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => {
                    let truncated = std::fs::OpenOptions::new()
                        .write(true)
                        .open(entry.path())
                        .and_then(|f| f.set_len(0));
                    if let Err(e) = truncated {
                        eprintln!(
                            "granary-bench: cannot empty {}: {e}",
                            entry.path().display()
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

/// Writes back dirty pages, then drops the page cache, dentries and inodes (needs root).
pub fn drop_caches() -> anyhow::Result<()> {
    run_command(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("cannot write /proc/sys/vm/drop_caches (the benchmark must run as root)")
}

/// The machine's 1-minute load average (other work on the 2 cores shows up here).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_local_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `n` distinct ports on 127.0.0.1 that were free a moment ago for both TCP and UDP (a Granary
/// worker serves gRPC over TCP and QUIC over UDP on the same port number).
pub fn free_local_addrs(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    free_addrs(std::net::Ipv4Addr::LOCALHOST, n)
}

/// `n` distinct ports on `ip` (an address of this machine) that were free a moment ago for both
/// TCP and UDP.
pub fn free_addrs(ip: std::net::Ipv4Addr, n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n * 20 {
        if held.len() == n {
            break;
        }
        let tcp = TcpListener::bind((ip, 0))?;
        let addr = tcp.local_addr()?;
        if let Ok(udp) = UdpSocket::bind(addr) {
            held.push((tcp, udp, addr));
        }
    }
    if held.len() < n {
        bail!("cannot find {n} free ports on {ip} for both TCP and UDP");
    }
    Ok(held.into_iter().map(|(_, _, addr)| addr).collect())
}

/// CPU time of the whole machine so far, all cores together, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// Everything but idle, I/O wait and steal.
    pub busy: f64,
    /// Of `busy`: interrupts and softirqs (loopback networking, mostly). With tick-based
    /// accounting (this kernel's), also charged to the process that was running.
    pub irq: f64,
    /// Time the hypervisor gave to someone else.
    pub steal: f64,
    /// Everything, steal included.
    pub total: f64,
}

impl MachineCpu {
    pub fn read() -> anyhow::Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice: inside user, nice]
        let field = |i: usize| fields.get(i).copied().unwrap_or(0) as f64 / USER_HZ;
        let total: f64 = (0..8).map(field).sum();
        Ok(MachineCpu {
            busy: total - field(3) - field(4) - field(7),
            irq: field(5) + field(6),
            steal: field(7),
            total,
        })
    }

    /// What was spent between `earlier` and this reading.
    pub fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: self.busy - earlier.busy,
            irq: self.irq - earlier.irq,
            steal: self.steal - earlier.steal,
            total: self.total - earlier.total,
        }
    }
}

/// The pids recorded in the `*.pid` files under `dir` (as `scripts/services/*.sh` write them).
pub fn pids_under(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return pids;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            pids.extend(pids_under(&path));
        } else if path.extension().is_some_and(|e| e == "pid") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            pids.extend(text.trim().parse::<u32>().ok());
        }
    }
    pids
}

/// `cmd` if it is on PATH.
pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

/// Creates `path` as a file readable by its owner only (credentials).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f: File = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// What the figures were measured on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    pub cpu: String,
    /// The cpuidle driver, and the haltpoll driver's guest polling window when it is the one.
    pub cpuidle: String,
    /// What waking a blocked thread costs here ([`WakeRoundTrip`]); `None` if not measured.
    pub wake_round_trip: Option<WakeRoundTrip>,
}

/// One byte sent back and forth between two threads over a socket pair, each blocking in `read`
/// for the other: the shape of a FUSE request and its answer. Microseconds per round trip,
/// median of [`WAKE_TRIALS`] trials of [`WAKE_ROUNDS`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WakeRoundTrip {
    /// Both threads on one CPU: each wake is a switch on one core.
    pub same_cpu_us: f64,
    /// The threads on two CPUs: each wake reaches an idle core, which on a VM whose idle vCPUs
    /// halt is a wake-up of the vCPU by its host.
    pub cross_cpu_us: f64,
    /// The two CPUs (the first two this process may run on).
    pub cpus: [usize; 2],
}

const WAKE_ROUNDS: u32 = 5_000;
const WAKE_TRIALS: usize = 3;

impl WakeRoundTrip {
    /// Measures on the first two CPUs this process may run on (about 1 s on a VM with halting
    /// idle vCPUs); `None` where it may run on one only.
    pub fn measure() -> anyhow::Result<Option<WakeRoundTrip>> {
        let (a, b) = match allowed_cpus()?[..] {
            [a, b, ..] => (a, b),
            _ => return Ok(None),
        };
        let median = |a: usize, b: usize| -> anyhow::Result<f64> {
            let mut trials = (0..WAKE_TRIALS)
                .map(|_| ping_pong(a, b, WAKE_ROUNDS))
                .collect::<anyhow::Result<Vec<f64>>>()?;
            trials.sort_by(f64::total_cmp);
            Ok(trials[WAKE_TRIALS / 2])
        };
        Ok(Some(WakeRoundTrip {
            same_cpu_us: median(a, a)?,
            cross_cpu_us: median(a, b)?,
            cpus: [a, b],
        }))
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

/// Microseconds per round trip between a thread on CPU `a` and one on CPU `b`.
fn ping_pong(a: usize, b: usize, rounds: u32) -> anyhow::Result<f64> {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    fn pin(cpu: usize) -> anyhow::Result<()> {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
            .with_context(|| format!("cannot run a thread on CPU {cpu}"))
    }
    let (mut ping, mut pong) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(b)?;
        let mut byte = [0u8];
        // Until the pinger hangs up: it may fail before its first byte.
        while pong.read(&mut byte)? == 1 {
            pong.write_all(&byte)?;
        }
        Ok(())
    });
    let pinger = std::thread::spawn(move || -> anyhow::Result<f64> {
        pin(a)?;
        let mut byte = [0u8];
        let mut round = || -> std::io::Result<()> {
            ping.write_all(&byte)?;
            ping.read_exact(&mut byte)
        };
        for _ in 0..rounds / 10 {
            round()?;
        }
        let start = Instant::now();
        for _ in 0..rounds {
            round()?;
        }
        Ok(start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds))
    });
    let us = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("the pinging thread panicked"))?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echoing thread panicked"))??;
    us
}

impl Machine {
    pub fn describe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let meminfo = read("/proc/meminfo");
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let mut cpuidle = read("/sys/devices/system/cpu/cpuidle/current_driver")
            .trim()
            .to_string();
        if cpuidle == "haltpoll" {
            let poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns");
            cpuidle = format!("haltpoll, guest_halt_poll_ns {}", poll.trim());
        }
        let wake_round_trip = WakeRoundTrip::measure()
            .inspect_err(|e| eprintln!("the wake-up round trip was not measured: {e:#}"))
            .ok()
            .flatten();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_bytes: memory_kib * 1024,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            cpuidle,
            wake_round_trip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wake_round_trip_is_timed_on_the_cpus_asked_for_and_an_absent_cpu_is_named() {
        let cpus = allowed_cpus().unwrap();
        let first = *cpus.first().expect("this test runs on some CPU");
        let us = ping_pong(first, first, 200).unwrap();
        assert!(us > 0.0 && us.is_finite(), "{us} µs");
        let err = ping_pong(first, 1023, 200).expect_err("no machine here has 1,024 CPUs");
        assert!(format!("{err:#}").contains("CPU 1023"), "{err:#}");
    }
}
