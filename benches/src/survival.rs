//! `--survival`: what killing the FUSE server costs the readers of a mount. `granary up` runs as
//! a keeper that holds the kernel connection and starts a new server whenever the old one dies;
//! this mode measures how long readers wait when that happens, and what repeated kills do to
//! their throughput.
//!
//! The source is a local directory of plain files (no S3 server): a large file, small files of
//! 4 to 16 KiB and a file read through `mmap`, with deterministic bytes. One `granary up` mounts
//! it; an untimed pass reads and checks every byte, so the blocks are in Granary's cache. Then two
//! timed windows of equal length with the same three readers ([`readers`]): in the first no
//! server is killed, in the second the server child is SIGKILLed every `--kill-every` seconds.
//! The page cache is dropped at the start of each window and at each kill time (in both windows,
//! so that they differ only by the kills), so that reads reach the server. The stall of a kill is
//! the time from the kill until every reader has completed an operation begun after it. Any read
//! error or wrong byte fails the run.
//!
//! Reported: each reader's throughput in both windows and their ratio, the stalls (p50, p99,
//! max), the longest gap any reader saw between two operations, the peak RSS of the keeper and of
//! the servers, and the servers' CPU time per GB read. A table on stdout, JSON under
//! `target/bench-results/`.

mod readers;

use crate::cleanup;
use crate::dataset::{self, FileSpec, Rng};
use crate::host::{self, Daemon, ProcStats};
use crate::profile::{Name, Profile};
use crate::progress::Progress;
use crate::systems::scrape;
use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use readers::{Kind, Readers, Tally};
use serde::Serialize;
use serde_json::json;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const MIB: u64 = 1 << 20;
/// Granary's caches: the memory tier smaller than the data, so that reads also reach the disk.
const MEMORY_CACHE: u64 = 256 * MIB;
const DISK_CACHE: u64 = 4096 * MIB;
/// How long the mount, or a new server after a kill, gets to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A kill whose readers are not all served again within this fails the run.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// The readers' seed: the same order of small files and pages in both windows.
const SEED: u64 = 0x5eed_5a1f;
const HANDOVERS: &str = "granary_fuse_handovers_total";
/// The environment variable that marks the keeper's server child.
const HANDOFF_ENV: &[u8] = b"GRANARY_FUSE_HANDOFF";

/// What the survival mode gets from the common setup (main.rs).
pub struct Setup<'a> {
    pub started: SystemTime,
    pub profile: Profile,
    /// The benchmark's work directory (removed at the end).
    pub work: &'a Path,
    pub log_dir: &'a Path,
    pub results_dir: &'a Path,
    pub granary_bin: &'a Path,
    pub git: String,
    pub kill_every: Duration,
    pub progress: Progress,
}

/// The files and the length of a window, by profile.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    large_bytes: u64,
    small_count: usize,
    mapped_bytes: u64,
    window_seconds: u64,
}

impl Sizes {
    fn of(name: Name) -> Sizes {
        let (large_bytes, small_count, mapped_bytes, window_seconds) = match name {
            Name::Smoke => (64 * MIB, 200, 16 * MIB, 10),
            Name::Quick => (1024 * MIB, 2_000, 64 * MIB, 30),
            Name::Full => (2048 * MIB, 20_000, 256 * MIB, 60),
        };
        Sizes {
            large_bytes,
            small_count,
            mapped_bytes,
            window_seconds,
        }
    }
}

/// The source directory's files; the small and mapped ones with their bytes, kept to check
/// reads (the large file's are generated again for each read: [`dataset::expected`]).
pub struct Source {
    large: FileSpec,
    small: Vec<(FileSpec, Vec<u8>)>,
    mapped: (FileSpec, Vec<u8>),
}

impl Source {
    fn total_bytes(&self) -> u64 {
        self.large.size + self.small.iter().map(|(f, _)| f.size).sum::<u64>() + self.mapped.0.size
    }
}

/// Writes the source's files under `dir`.
fn write_source(dir: &Path, sizes: Sizes) -> anyhow::Result<Source> {
    std::fs::create_dir_all(dir.join("small"))?;
    let generated = |name: &str, size: u64| -> (FileSpec, Vec<u8>) {
        let spec = FileSpec {
            name: name.to_string(),
            size,
        };
        let mut data = vec![0u8; size as usize];
        dataset::expected(&spec, 0, &mut data);
        (spec, data)
    };
    let write = |spec: &FileSpec, data: &[u8]| {
        let path = dir.join(&spec.name);
        std::fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))
    };

    let large = FileSpec {
        name: "large.bin".into(),
        size: sizes.large_bytes,
    };
    let path = dir.join(&large.name);
    let mut out = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut chunk = vec![0u8; (8 * MIB) as usize];
    let mut offset = 0;
    while offset < large.size {
        let n = (large.size - offset).min(chunk.len() as u64) as usize;
        dataset::expected(&large, offset, &mut chunk[..n]);
        out.write_all(&chunk[..n])?;
        offset += n as u64;
    }

    let mut small = Vec::with_capacity(sizes.small_count);
    for i in 0..sizes.small_count {
        // 4 to 16 KiB, in steps of 1 KiB.
        let size = (4 + Rng::seeded(i as u64).next_u64() % 13) << 10;
        let (spec, data) = generated(&format!("small/{i:05}.bin"), size);
        write(&spec, &data)?;
        small.push((spec, data));
    }
    let mapped = generated("mapped.bin", sizes.mapped_bytes);
    write(&mapped.0, &mapped.1)?;
    Ok(Source {
        large,
        small,
        mapped,
    })
}

/// The running `granary up`: the keeper, its mount and metrics. Fields drop in order: the keeper
/// first (SIGTERM: it stops its server and unmounts), then the fallback unmount.
struct Mount {
    keeper: Daemon,
    _unmount: cleanup::Guard,
    mnt: PathBuf,
    metrics: SocketAddr,
}

impl Mount {
    fn start(bin: &Path, src: &Path, dir: &Path, log: &Path) -> anyhow::Result<Mount> {
        let (mnt, cache) = (dir.join("mnt"), dir.join("cache"));
        for d in [&mnt, &cache] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let unmount = {
            let mnt = mnt.clone();
            cleanup::register(format!("unmount {}", mnt.display()), move || {
                host::unmount_all_under(&mnt)
            })
        };
        let metrics = host::free_local_addr()?;
        let mut cmd = Command::new(bin);
        cmd.arg("up")
            .arg("--source")
            .arg(src)
            .arg("--mount")
            .arg(&mnt)
            .arg("--cache-dir")
            .arg(&cache)
            .args(["--memory-cache", &MEMORY_CACHE.to_string()])
            .args(["--disk-cache", &DISK_CACHE.to_string()])
            .args(["--metrics-addr", &metrics.to_string()]);
        let keeper = Daemon::spawn("granary up", cmd, log)?;
        let line = format!("mounted at {}", mnt.display());
        keeper.wait_until(&format!("'{line}'"), START_TIMEOUT, || {
            keeper.log_text().contains(&line)
        })?;
        if !host::is_mounted(&mnt) {
            bail!("granary said '{line}' but nothing is mounted there");
        }
        Ok(Mount {
            keeper,
            _unmount: unmount,
            mnt,
            metrics,
        })
    }

    /// The keeper's server child: the child whose environment carries the handoff.
    fn server(&self) -> Option<u32> {
        let keeper = self.keeper.pid();
        let children =
            std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).ok()?;
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
            .find(|c| {
                std::fs::read(format!("/proc/{c}/environ"))
                    .is_ok_and(|e| e.split(|&b| b == 0).any(|v| v.starts_with(HANDOFF_ENV)))
            })
    }

    /// Waits for a server other than `old`.
    fn next_server(&self, old: Option<u32>) -> anyhow::Result<u32> {
        let mut found = None;
        self.keeper.wait_until("a FUSE server", START_TIMEOUT, || {
            found = self.server().filter(|&pid| Some(pid) != old);
            found.is_some()
        })?;
        found.context("no server")
    }
}

/// Reads every byte of the source through the mount and checks it: the untimed warm pass.
fn warm_pass(source: &Source, mnt: &Path) -> anyhow::Result<u64> {
    let large = &source.large;
    let path = mnt.join(&large.name);
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let (mut got, mut want) = (vec![0u8; (8 * MIB) as usize], vec![0u8; (8 * MIB) as usize]);
    let mut offset = 0;
    while offset < large.size {
        let n = (large.size - offset).min(got.len() as u64) as usize;
        std::io::Read::read_exact(&mut file, &mut got[..n])
            .with_context(|| format!("{}: read at {offset}", large.name))?;
        dataset::expected(large, offset, &mut want[..n]);
        if got[..n] != want[..n] {
            bail!("{}: wrong bytes in the 8 MiB from {offset}", large.name);
        }
        offset += n as u64;
    }
    for (spec, want) in source.small.iter().chain([&source.mapped]) {
        let got = std::fs::read(mnt.join(&spec.name))
            .with_context(|| format!("cannot read {}", spec.name))?;
        if got != *want {
            bail!("{}: wrong bytes", spec.name);
        }
    }
    Ok(source.total_bytes())
}

/// One timed window.
#[derive(Debug, Serialize)]
struct Window {
    kills: bool,
    seconds: f64,
    readers: Vec<Tally>,
    /// Page-cache drops (at the start and at each kill time).
    drops: usize,
    kills_done: usize,
    /// One per kill.
    stall_seconds: Vec<f64>,
    /// The longest gap any reader saw between two operations.
    longest_gap_seconds: f64,
    /// CPU time of the servers during the window (each killed one up to its kill, each new one
    /// from its start).
    server_cpu_seconds: f64,
    /// The highest peak RSS of a server seen in the window (each read just before its kill).
    server_peak_rss_bytes: u64,
    errors: Vec<String>,
}

impl Window {
    fn bytes(&self) -> u64 {
        self.readers.iter().map(|t| t.bytes).sum()
    }

    fn rate(&self, kind: Kind) -> Option<f64> {
        let t = self.readers.iter().find(|t| t.kind == kind)?;
        Some(t.rate(self.seconds))
    }
}

struct Ctx<'a> {
    mount: &'a Mount,
    source: &'a Arc<Source>,
    length: Duration,
    kill_every: Duration,
}

fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

/// Runs one window, with or without kills.
fn window(ctx: &Ctx, kills: bool, progress: &mut Progress) -> anyhow::Result<Window> {
    let Ctx {
        mount,
        source,
        length,
        kill_every,
    } = *ctx;
    host::drop_caches()?;
    let mut drops = 1;
    let mut server = mount.next_server(None)?;
    let mut cpu_start = ProcStats::read(server)?.cpu_seconds;
    let (mut cpu, mut peak_rss) = (0.0, 0);
    let start = Instant::now();
    let deadline = start + length;
    let readers = Readers::start(source, &mount.mnt, deadline, SEED);
    let mut stalls = Vec::new();
    let mut errors = Vec::new();
    let mut at = start + kill_every;
    while at < deadline && !readers.failed() {
        sleep_until(at);
        at += kill_every;
        host::drop_caches()?;
        drops += 1;
        if !kills {
            continue;
        }
        let stats = ProcStats::read(server)?;
        cpu += stats.cpu_seconds - cpu_start;
        peak_rss = peak_rss.max(stats.peak_rss_bytes);
        let killed_at = readers.mark_kill();
        kill(Pid::from_raw(server as i32), Signal::SIGKILL)
            .with_context(|| format!("cannot kill the server {server}"))?;
        let old = server;
        server = mount.next_server(Some(old))?;
        cpu_start = 0.0;
        match readers::wait_served(&readers, killed_at, STALL_LIMIT) {
            Some(stall) => {
                progress.note(&format!(
                    "kill {} (server {old}, next {server}): readers served again after {:.0} ms",
                    stalls.len() + 1,
                    stall.as_secs_f64() * 1e3
                ));
                stalls.push(stall.as_secs_f64());
            }
            None if readers.failed() => break,
            None => {
                errors.push(format!(
                    "kill {}: the readers were not all served again within {STALL_LIMIT:?}",
                    stalls.len() + 1
                ));
                break;
            }
        }
    }
    sleep_until(deadline);
    let (tallies, reader_errors) = readers.finish();
    errors.extend(reader_errors);
    let stats = ProcStats::read(server)?;
    cpu += stats.cpu_seconds - cpu_start;
    peak_rss = peak_rss.max(stats.peak_rss_bytes);
    let longest_gap_seconds = tallies
        .iter()
        .map(|t| t.longest_gap_seconds)
        .fold(0.0, f64::max);
    Ok(Window {
        kills,
        seconds: length.as_secs_f64(),
        readers: tallies,
        drops,
        kills_done: stalls.len(),
        stall_seconds: stalls,
        longest_gap_seconds,
        server_cpu_seconds: cpu,
        server_peak_rss_bytes: peak_rss,
        errors,
    })
}

/// Stalls after the kills, in seconds.
#[derive(Debug, Serialize)]
struct Stalls {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Stalls {
    fn of(values: &[f64]) -> Option<Stalls> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).max(1) - 1];
        Some(Stalls {
            count: sorted.len(),
            p50: rank(0.5),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1],
        })
    }
}

#[derive(Debug, Serialize)]
struct GranaryConfig {
    binary: PathBuf,
    git: String,
    memory_cache_bytes: u64,
    disk_cache_bytes: u64,
}

#[derive(Debug, Serialize)]
struct SurvivalReport {
    mode: &'static str,
    started_at: String,
    finished_at: String,
    profile: Name,
    #[serde(skip)]
    label: &'static str,
    machine: host::Machine,
    granary: GranaryConfig,
    sizes: Sizes,
    small_bytes: u64,
    kill_every_seconds: f64,
    warm_pass_bytes: u64,
    warm_pass_seconds: f64,
    /// Without kills, then with.
    windows: Vec<Window>,
    stalls: Option<Stalls>,
    /// What the last server's metrics say of crash handovers (one per kill).
    handovers_counted: Option<f64>,
    keeper_peak_rss_bytes: u64,
    server_peak_rss_bytes: u64,
    errors: Vec<String>,
}

impl SurvivalReport {
    fn all_good(&self) -> bool {
        self.errors.is_empty()
            && self.windows.len() == 2
            && self.windows.iter().all(|w| w.errors.is_empty())
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nFUSE server survival (--{}, granary {}): two windows of {} s, the server \
             SIGKILLed every {} s in the second",
            self.label, self.granary.git, self.sizes.window_seconds, self.kill_every_seconds
        );
        if let [calm, killed] = &self.windows[..] {
            let _ = writeln!(
                out,
                "{:<38} {:>10} {:>11} {:>6}",
                "reader", "no kills", "with kills", "ratio"
            );
            for kind in Kind::ALL {
                let (a, b) = (calm.rate(kind), killed.rate(kind));
                let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
                let ratio = a
                    .zip(b)
                    .map_or("-".into(), |(a, b)| format!("{:.2}", b / a));
                let _ = writeln!(
                    out,
                    "{:<38} {:>10} {:>11} {:>6}",
                    kind.describe(),
                    cell(a),
                    cell(b),
                    ratio
                );
            }
            let _ = writeln!(
                out,
                "kills: {} (crash handovers counted by granary: {})",
                killed.kills_done,
                self.handovers_counted
                    .map_or("?".into(), |n| format!("{n:.0}"))
            );
            if let Some(s) = &self.stalls {
                let _ = writeln!(
                    out,
                    "stall after a kill: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                    s.p50 * 1e3,
                    s.p99 * 1e3,
                    s.max * 1e3
                );
            }
            let _ = writeln!(
                out,
                "longest gap between two operations of a reader: {:.0} ms without kills, {:.0} ms \
                 with kills",
                calm.longest_gap_seconds * 1e3,
                killed.longest_gap_seconds * 1e3
            );
            let per_gb = |w: &Window| w.server_cpu_seconds / (w.bytes() as f64 / 1e9);
            let _ = writeln!(
                out,
                "server CPU per GB read: {:.2} s without kills, {:.2} s with kills",
                per_gb(calm),
                per_gb(killed)
            );
        }
        let _ = writeln!(
            out,
            "peak RSS: keeper {} MiB, servers {} MiB (the highest of them)",
            self.keeper_peak_rss_bytes / MIB,
            self.server_peak_rss_bytes / MIB
        );
        for e in self
            .errors
            .iter()
            .chain(self.windows.iter().flat_map(|w| &w.errors))
        {
            let _ = writeln!(out, "FAILED: {e}");
        }
        out
    }

    fn write_json(&self, dir: &Path, stamp: &str) -> anyhow::Result<PathBuf> {
        crate::report::write_json(dir, stamp, Some("survival"), self.label, self)
    }
}

/// Runs the survival benchmark; `Ok(false)` when it ran but a reader saw an error or a wrong byte,
/// or a kill was not followed by service.
pub fn run(setup: Setup) -> anyhow::Result<bool> {
    let Setup {
        started,
        profile,
        work,
        log_dir,
        results_dir,
        granary_bin,
        git,
        kill_every,
        mut progress,
    } = setup;
    let sizes = Sizes::of(profile.name);
    let dir = work.join("survival");
    progress.note(&format!(
        "source: writing a {} MiB file, {} files of 4-16 KiB and a {} MiB file to map",
        sizes.large_bytes / MIB,
        sizes.small_count,
        sizes.mapped_bytes / MIB
    ));
    let source = Arc::new(write_source(&dir.join("src"), sizes)?);
    progress.expect(3);
    let mount = Mount::start(
        granary_bin,
        &dir.join("src"),
        &dir,
        &log_dir.join("survival-granary.log"),
    )?;

    host::drop_caches()?;
    let warm_start = Instant::now();
    let warm_pass_bytes = warm_pass(&source, &mount.mnt)?;
    let warm_pass_seconds = warm_start.elapsed().as_secs_f64();
    progress.pass(
        &format!(
            "warm pass: {} MiB read through the mount, every byte checked ({warm_pass_seconds:.1} s)",
            warm_pass_bytes / MIB
        ),
        json!({ "mode": "survival", "pass": "warm", "bytes": warm_pass_bytes }),
    );

    let ctx = Ctx {
        mount: &mount,
        source: &source,
        length: Duration::from_secs(sizes.window_seconds),
        kill_every,
    };
    let mut windows = Vec::new();
    let mut errors = Vec::new();
    for kills in [false, true] {
        let w = window(&ctx, kills, &mut progress)?;
        let rates: Vec<String> = Kind::ALL
            .iter()
            .map(|&k| format!("{:.0}", w.rate(k).unwrap_or(0.0)))
            .collect();
        progress.pass(
            &format!(
                "window {}: {} MB/s, {} files/s, {} pages/s; {} kills{}",
                if kills { "with kills" } else { "without kills" },
                rates[0],
                rates[1],
                rates[2],
                w.kills_done,
                if w.errors.is_empty() { "" } else { "; FAILED" }
            ),
            json!({
                "mode": "survival", "pass": "window", "kills": kills, "kills_done": w.kills_done,
                "errors": w.errors,
            }),
        );
        let failed = !w.errors.is_empty();
        windows.push(w);
        if failed {
            break;
        }
    }
    mount.keeper.check_running()?;
    let handovers_counted = scrape(mount.metrics, &[HANDOVERS])
        .into_iter()
        .find(|(series, _)| series.contains("reason=\"crash\""))
        .map(|(_, n)| n);
    let kills_done = windows.iter().map(|w| w.kills_done).sum::<usize>();
    if handovers_counted != Some(kills_done as f64) {
        errors.push(format!(
            "{kills_done} kills, but granary counted {handovers_counted:?} crash handovers"
        ));
    }
    let keeper_peak_rss_bytes = ProcStats::read_one(mount.keeper.pid())?.peak_rss_bytes;
    progress.note("tearing down");
    drop(mount);

    let stalls: Vec<f64> = windows
        .iter()
        .flat_map(|w| w.stall_seconds.iter().copied())
        .collect();
    let report = SurvivalReport {
        mode: "survival",
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        profile: profile.name,
        label: profile.label(),
        machine: host::Machine::describe(),
        granary: GranaryConfig {
            binary: granary_bin.to_path_buf(),
            git,
            memory_cache_bytes: MEMORY_CACHE,
            disk_cache_bytes: DISK_CACHE,
        },
        sizes,
        small_bytes: source.small.iter().map(|(f, _)| f.size).sum(),
        kill_every_seconds: kill_every.as_secs_f64(),
        warm_pass_bytes,
        warm_pass_seconds,
        stalls: Stalls::of(&stalls),
        handovers_counted,
        keeper_peak_rss_bytes,
        server_peak_rss_bytes: windows
            .iter()
            .map(|w| w.server_peak_rss_bytes)
            .max()
            .unwrap_or(0),
        windows,
        errors,
    };
    print!("{}", report.render());
    let stamp = crate::report::stamp(&report.started_at);
    let json = report.write_json(results_dir, &stamp)?;
    println!(
        "\nResults: {} (and survival-latest.json beside it); granary's log in {}",
        json.display(),
        log_dir.display()
    );
    Ok(report.all_good())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_percentiles_are_nearest_ranks() {
        let s = Stalls::of(&[0.3, 0.1, 0.2, 0.4]).unwrap();
        assert_eq!((s.count, s.p50, s.p99, s.max), (4, 0.2, 0.4, 0.4));
        assert!(Stalls::of(&[]).is_none());
    }
}
