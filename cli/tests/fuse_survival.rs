//! The mount survives its FUSE server: `granary up` runs as a keeper holding the kernel
//! connection and a server child; the child is SIGKILLed at random moments, or replaced by
//! another build of the binary with SIGHUP, while readers read sequentially (sha256 of a 1 GiB
//! file), 2,000 small files in a shuffled order, and a third file through `mmap`; and a walk of
//! 300,000 entries twice, which must not grow the server past its inode limit. No reader may
//! see an error or a wrong byte, and every kill must be followed by service within a bound.
//! Real kernel mounts, a POSIX source written as plain files.

mod support;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::cluster::{drop_page_cache, sha};
use support::data::content;
use support::process::{Mount, granary, granary_bin, run_with_timeout, server_of, signal};
use support::{free_port, metric, wait_until};

const SMALL_FILES: usize = 2000;
const MAPPED: u64 = 24 << 20;
/// The longest a reader may wait for the next server.
const SERVICE_BOUND: Duration = Duration::from_secs(20);

/// A tiny deterministic generator (xorshift64*), seeded per run and printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The source: `big` (1 GiB of random bytes), `small/NNNN` and `mapped`, as plain files.
struct Source {
    dir: PathBuf,
    big_sha: String,
}

fn write_source(root: &Path, big: u64) -> Source {
    let dir = root.join("src");
    std::fs::create_dir_all(dir.join("small")).unwrap();
    std::fs::create_dir_all(dir.join("pinned")).unwrap();
    let status = Command::new("head")
        .arg("-c")
        .arg(big.to_string())
        .arg("/dev/urandom")
        .stdout(std::fs::File::create(dir.join("big")).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    for i in 0..SMALL_FILES {
        let name = format!("small/{i:04}");
        std::fs::write(
            dir.join(&name),
            content(&name, 4096 + (i as u64 % 7) * 3000),
        )
        .unwrap();
    }
    std::fs::write(dir.join("mapped"), content("mapped", MAPPED)).unwrap();
    for i in 0..8 {
        let name = format!("pinned/p{i}");
        std::fs::write(dir.join(&name), content(&name, 3 << 20)).unwrap();
    }
    Source {
        big_sha: sha(&dir.join("big")),
        dir,
    }
}

/// Readers running until told to stop: what they saw.
struct Readers {
    stop: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<String>>>,
    /// When each reader last completed an operation.
    last_ok: Arc<Mutex<[Instant; 3]>>,
    passes: Arc<Mutex<[u64; 3]>>,
    threads: Vec<JoinHandle<()>>,
}

impl Readers {
    fn start(mnt: &Path, big_sha: &str, seed: u64) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let last_ok = Arc::new(Mutex::new([Instant::now(); 3]));
        let passes = Arc::new(Mutex::new([0u64; 3]));
        let mut threads = Vec::new();
        let ctx = |i: usize| {
            (
                stop.clone(),
                errors.clone(),
                last_ok.clone(),
                passes.clone(),
                mnt.to_path_buf(),
                i,
            )
        };

        // 0: sha256 of the big file, read sequentially by another process.
        let (stop0, errs, last, pass, mnt0, i) = ctx(0);
        let want = big_sha.to_string();
        threads.push(std::thread::spawn(move || {
            while !stop0.load(Ordering::Relaxed) {
                let out = Command::new("sha256sum")
                    .arg(mnt0.join("big"))
                    .output()
                    .unwrap();
                let got = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() || !got.starts_with(&want) {
                    errs.lock().unwrap().push(format!(
                        "sha256 of big: {got} {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                last.lock().unwrap()[i] = Instant::now();
                pass.lock().unwrap()[i] += 1;
            }
        }));

        // 1: the small files, each pass in a new shuffled order.
        let (stop1, errs, last, pass, mnt1, i) = ctx(1);
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            let mut order: Vec<usize> = (0..SMALL_FILES).collect();
            while !stop1.load(Ordering::Relaxed) {
                for k in (1..order.len()).rev() {
                    order.swap(k, rng.below(k as u64 + 1) as usize);
                }
                for &n in &order {
                    let name = format!("small/{n:04}");
                    let want = content(&name, 4096 + (n as u64 % 7) * 3000);
                    match std::fs::read(mnt1.join(&name)) {
                        Ok(got) if got == want => last.lock().unwrap()[i] = Instant::now(),
                        Ok(_) => errs.lock().unwrap().push(format!("{name}: wrong bytes")),
                        Err(e) => errs.lock().unwrap().push(format!("{name}: {e}")),
                    }
                }
                pass.lock().unwrap()[i] += 1;
            }
        }));

        // 2: the mapped file, pages touched in a random order, mapped afresh each pass.
        let (stop2, errs, last, pass, mnt2, i) = ctx(2);
        threads.push(std::thread::spawn(move || {
            let want = content("mapped", MAPPED);
            let mut rng = Rng(seed.rotate_left(17) | 1);
            while !stop2.load(Ordering::Relaxed) {
                let file = match std::fs::File::open(mnt2.join("mapped")) {
                    Ok(f) => f,
                    Err(e) => {
                        errs.lock().unwrap().push(format!("open mapped: {e}"));
                        continue;
                    }
                };
                // SAFETY (test): the file is read-only and never changes.
                #[allow(unsafe_code)]
                let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
                for _ in 0..512 {
                    let at = rng.below(MAPPED - 4096) as usize;
                    if map[at..at + 4096] != want[at..at + 4096] {
                        errs.lock()
                            .unwrap()
                            .push(format!("mapped: wrong bytes at {at}"));
                    }
                    last.lock().unwrap()[i] = Instant::now();
                }
                pass.lock().unwrap()[i] += 1;
            }
        }));
        Readers {
            stop,
            errors,
            last_ok,
            passes,
            threads,
        }
    }

    /// How long until the small-file and mapped readers (which note every operation; the
    /// sha256 reader notes whole passes) both completed an operation after `since`.
    fn all_served_after(&self, since: Instant, limit: Duration) -> Duration {
        let deadline = since + limit;
        loop {
            let last = *self.last_ok.lock().unwrap();
            if last[1] > since && last[2] > since {
                return since.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "readers not served within {limit:?} after a server change: {:?}",
                self.errors.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the readers after their current pass; returns their errors and passes.
    fn finish(self) -> (Vec<String>, [u64; 3]) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        let passes = *self.passes.lock().unwrap();
        (errors, passes)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Waits for the keeper `keeper` to have a server other than `old` (and returns it).
fn next_server(keeper: u32, old: u32) -> u32 {
    let deadline = Instant::now() + SERVICE_BOUND;
    loop {
        if let Some(pid) = server_of(keeper)
            && pid != old
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no new server within {SERVICE_BOUND:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn up(bin: &str, src: &Path, work: &Path, mnt: &Path, extra: &[&str]) -> Mount {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin);
    cmd.args([
        "up",
        "--source",
        src.to_str().unwrap(),
        "--mount",
        mnt.to_str().unwrap(),
        "--cache-dir",
        work.join("cache").to_str().unwrap(),
        "--memory-cache",
        "256MiB",
        "--disk-cache",
        "2GiB",
        "--metrics-addr",
        &metrics,
    ]);
    cmd.args(extra);
    Mount::spawn(cmd, mnt, metrics)
}

#[test]
fn ten_kills_of_the_fuse_server_mid_read_cost_the_readers_nothing() {
    let work = tempfile::tempdir().unwrap();
    let source = write_source(work.path(), 1 << 30);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = up(granary_bin(), &source.dir, work.path(), &mnt, &[]);
    let keeper = mount.pid();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed | 1);
    let readers = Readers::start(&mnt, &source.big_sha, seed);
    let mut stalls = Vec::new();
    let mut server = mount.server_pid();
    assert_ne!(
        server, keeper,
        "granary up runs its FUSE server as the keeper's child"
    );
    for kill in 0..10 {
        std::thread::sleep(Duration::from_millis(200 + rng.below(1300)));
        // Readers must reach the server, not the page cache.
        drop_page_cache();
        let at = Instant::now();
        signal(server, "KILL");
        server = next_server(keeper, server);
        let stall = readers.all_served_after(at, SERVICE_BOUND);
        eprintln!("kill {kill}: readers served again after {stall:?}");
        stalls.push(stall);
    }
    let (errors, passes) = readers.finish();
    assert!(errors.is_empty(), "readers saw errors: {errors:?}");
    assert!(
        passes.iter().all(|&p| p > 0),
        "every reader finished a pass: {passes:?}"
    );
    stalls.sort();
    eprintln!(
        "stall after a kill: p50 {:?}, p99 {:?}, max {:?}; passes {passes:?}",
        percentile(&stalls, 0.5),
        percentile(&stalls, 0.99),
        stalls.last().unwrap()
    );
    // The keeper counted the handovers, and the last server says so.
    let m = mount.metrics();
    assert_eq!(
        metric(&m, "granary_fuse_handovers_total", &[("reason", "crash")]),
        10.0,
        "{m}"
    );
    // A fresh full read after all that: right bytes.
    drop_page_cache();
    assert_eq!(sha(&mnt.join("big")), source.big_sha);
    assert!(mount.stop().success());
}

/// Replaces the 16 digits of the build id in a copy of the binary.
fn second_build(from: &Path, to: &Path, id: &str) {
    let mut bytes = std::fs::read(from).unwrap();
    let marker = b"granary-build-id:";
    let mut found = 0;
    let mut at = 0;
    while let Some(pos) = bytes[at..].windows(marker.len()).position(|w| w == marker) {
        let start = at + pos + marker.len();
        bytes[start..start + 16].copy_from_slice(id.as_bytes());
        found += 1;
        at = start + 16;
    }
    assert!(found > 0, "no build id in {}", from.display());
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(to)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .unwrap();
}

#[test]
fn sighup_upgrades_to_the_binary_on_disk_with_passthrough_files_open_and_readers_reading() {
    let work = tempfile::tempdir().unwrap();
    let source = write_source(work.path(), 256 << 20);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // The installed binary: a copy, replaced by a package-manager-like rename at each upgrade.
    let installed = work.path().join("granary");
    let next = work.path().join("granary.next");
    std::fs::copy(granary_bin(), &installed).unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let mount = up(
        installed.to_str().unwrap(),
        &source.dir,
        work.path(),
        &mnt,
        &["--listen", &api],
    );
    let keeper = mount.pid();
    let dataset = |args: &[&str]| {
        let mut all = vec!["dataset", "--server", &api];
        all.extend_from_slice(args);
        let out = run_with_timeout(granary(&all, &[]), Duration::from_secs(120));
        assert!(out.status.success(), "dataset {args:?}: {}", out.stderr);
    };
    dataset(&["pin", "ds", "--path", "/pinned"]);
    dataset(&["load", "ds"]);
    dataset(&["wait", "ds", "--timeout", "60s"]);
    // A pinned file held open through passthrough across every upgrade.
    let held = std::fs::File::open(mnt.join("pinned/p0")).unwrap();
    let opens = || {
        metric(
            &mount.metrics(),
            "granary_fuse_passthrough_opens_total",
            &[],
        )
    };
    assert!(opens() >= 1.0, "the pinned file opened through passthrough");
    let want = content("pinned/p0", 3 << 20);
    let read_held = |f: &std::fs::File| {
        let mut got = vec![0u8; want.len()];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut got, 0).unwrap();
        assert!(got == want, "the held passthrough file reads right");
    };
    read_held(&held);

    let readers = Readers::start(&mnt, &source.big_sha, 7);
    let mut server = mount.server_pid();
    let mut stalls = Vec::new();
    for (n, id) in ["1111111111111111", "2222222222222222", "3333333333333333"]
        .iter()
        .enumerate()
    {
        std::thread::sleep(Duration::from_millis(700));
        second_build(Path::new(granary_bin()), &next, id);
        std::fs::rename(&next, &installed).unwrap();
        drop_page_cache();
        let at = Instant::now();
        if n == 1 {
            // The command does the same as SIGHUP, finding the keeper by its mount.
            let out = run_with_timeout(
                granary(&["mount", "--upgrade", mnt.to_str().unwrap()], &[]),
                Duration::from_secs(120),
            );
            assert!(out.status.success(), "{}", out.stderr);
            assert!(out.stdout.contains("upgraded"), "{}", out.stdout);
        } else {
            signal(keeper, "HUP");
        }
        server = next_server(keeper, server);
        let stall = readers.all_served_after(at, SERVICE_BOUND);
        eprintln!("upgrade {n}: readers served again after {stall:?}");
        stalls.push(stall);
        wait_until("the new build to log its version", SERVICE_BOUND, || {
            mount.stderr().contains(&format!("granary-build-id:{id}"))
        });
        read_held(&held);
    }
    let (errors, passes) = readers.finish();
    assert!(errors.is_empty(), "readers saw errors: {errors:?}");
    assert!(passes.iter().all(|&p| p > 0), "{passes:?}");
    eprintln!(
        "stall after an upgrade: max {:?}",
        stalls.iter().max().unwrap()
    );
    // The held file, and a second open of it beside (the kernel allows one backing file per
    // inode: the new server must name the one the kernel has), read right.
    let second = std::fs::File::open(mnt.join("pinned/p0")).unwrap();
    read_held(&second);
    read_held(&held);
    drop((held, second));
    // Other pinned files open through passthrough with the last build.
    let before = opens();
    for i in 1..8 {
        let name = format!("pinned/p{i}");
        assert!(std::fs::read(mnt.join(&name)).unwrap() == content(&name, 3 << 20));
    }
    assert!(
        opens() - before >= 7.0,
        "passthrough opens after the upgrades"
    );
    assert_eq!(
        metric(
            &mount.metrics(),
            "granary_fuse_handovers_total",
            &[("reason", "upgrade")]
        ),
        3.0
    );
    assert!(mount.stop().success());
}

/// Peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb >> 10
}

#[test]
fn walking_300_000_entries_twice_keeps_the_server_bounded() {
    // 300,000 entries, ten times the inode limit (a million runs the same way, in minutes).
    const DIRS: usize = 300;
    const FILES: usize = 1000;
    const MAX_INODES: &str = "30000";
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for d in 0..DIRS {
        let dir = src.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..FILES {
            std::fs::write(dir.join(format!("f{f:03}")), &b"0123456789"[..f % 10]).unwrap();
        }
    }
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = up(
        granary_bin(),
        &src,
        work.path(),
        &mnt,
        &["--max-inodes", MAX_INODES],
    );
    let server = mount.server_pid();
    for walk in 0..2 {
        // find + stat of every entry: each is looked up, and the kernel holds it.
        let out = Command::new("find")
            .arg(&mnt)
            .args(["-printf", "%s\\n"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = out.stdout.iter().filter(|&&b| b == b'\n').count();
        assert_eq!(
            lines,
            1 + DIRS + DIRS * FILES,
            "walk {walk} saw every entry"
        );
        let m = mount.metrics();
        let held = metric(&m, "granary_fuse_inodes", &[]);
        eprintln!(
            "walk {walk}: {held} inodes held, {} shed, peak RSS {} MiB",
            metric(&m, "granary_fuse_inodes_shed_total", &[]),
            peak_rss_mib(server)
        );
        // Trimmed once a second, at the pace the kernel forgets: under load the table runs
        // past the limit by the lookups of a second or two (27,892-94,067 seen), never with
        // the walk (unbounded: 289,366 after one walk).
        assert!(
            held < (DIRS * FILES) as f64 / 2.0,
            "{held} inodes held: the table grows with the walk"
        );
    }
    // Unbounded (--max-inodes 10000000), the first walk alone left 289,366 inodes held and a
    // peak RSS of 491 MiB; bounded, two walks peaked at 242-367 MiB (glibc's arenas make it
    // vary). The inode count above is the exact check; this one catches gross growth.
    let peak = peak_rss_mib(server);
    assert!(
        peak < 460,
        "peak RSS {peak} MiB after two walks of 300,000 entries"
    );
    assert!(mount.stop().success());
}
