//! The block cache's read path through a real mount: random readers get exactly the bytes they
//! ask for, fetched and read as parts of blocks, and kept for the next pass.

mod support;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use support::data::{Tree, content, write_local};
use support::metric;
use support::process::{Mount, UpOptions, granary, run_with_timeout};

const MIB: u64 = 1 << 20;

/// `granary up` of the plain files under `source`, with `extra` flags.
fn up(
    source: &std::path::Path,
    cache: &std::path::Path,
    mnt: &std::path::Path,
    extra: &[&str],
) -> Mount {
    Mount::up(UpOptions {
        source: format!("file://{}", source.display()),
        envs: vec![],
        cache_dir: cache,
        mount_dir: mnt,
        extra: extra.iter().map(|s| s.to_string()).collect(),
    })
}

/// A deterministic generator (xorshift64), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_reads_return_exact_bytes_and_fetch_only_what_covers_them() {
    let source = tempfile::tempdir().unwrap();
    let size = 256 * MIB + 12_345;
    let mut tree = Tree::new();
    tree.insert("random.bin".into(), size);
    write_local(source.path(), &tree);
    let expected = content("random.bin", size);
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mount = up(
        source.path(),
        cache.path(),
        mnt.path(),
        &[
            "--block-size",
            "4MiB",
            "--memory-cache",
            "16MiB",
            "--disk-cache",
            "512MiB",
        ],
    );
    // O_DIRECT: every read reaches the mount at its own offset and length, as a loader that
    // bypasses the page cache (or an mmap of a file larger than memory) makes them.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(mnt.path().join("random.bin"))
        .unwrap();
    let mut rng = Rng(0x5EED_0000_0000_0001);
    let reads: Vec<(u64, usize)> = (0..1_000)
        .map(|i| {
            // Lengths from 1 byte to 64 KiB, and to 1 MiB for every twentieth; every tenth
            // read straddles a block boundary.
            let max = if i % 20 == 5 { MIB } else { 64 << 10 };
            let len = 1 + (rng.next() % max) as usize;
            let offset = if i % 10 == 0 {
                let boundary = (1 + rng.next() % 63) * 4 * MIB;
                boundary - 1 - rng.next() % (len as u64).min(boundary)
            } else {
                rng.next() % size
            };
            (offset, len)
        })
        .collect();
    let pass = |label: &str| {
        let mut asked = 0u64;
        for &(offset, len) in &reads {
            let mut buf = vec![0u8; len];
            let n = file.read_at(&mut buf, offset).unwrap();
            let end = (offset as usize + len).min(size as usize);
            assert_eq!(
                n,
                end - offset as usize,
                "{label}: short read at {offset}+{len}"
            );
            assert!(
                buf[..n] == expected[offset as usize..end],
                "{label}: wrong bytes at {offset}+{len}"
            );
            asked += n as u64;
        }
        asked
    };
    let asked = pass("cold");
    let text = mount.metrics();
    let fetched = metric(&text, "granary_backend_bytes_total", &[]);
    // Each read fetches the 64 KiB chunks that cover it (at most 128 KiB more than it asks
    // for, less when chunks are shared): about 100 MiB here, where whole 4 MiB blocks would
    // fetch the whole file.
    assert!(
        fetched <= (asked + 1_000 * (128 << 10)) as f64,
        "asked for {asked} bytes, fetched {fetched} from the backend"
    );
    // The second pass is served by the disk tier: no backend request at all.
    let gets = metric(&text, "granary_backend_requests_total", &[("op", "get")]);
    pass("hot");
    let text = mount.metrics();
    let again = metric(&text, "granary_backend_requests_total", &[("op", "get")]) - gets;
    assert_eq!(again, 0.0, "the hot pass went to the backend {again} times");
    assert!(
        metric(&text, "granary_block_reads_total", &[("tier", "disk")]) >= 1_000.0,
        "the hot pass did not read from the disk tier"
    );
    drop(file);
    assert!(mount.stop().success());
}

/// Reads every file of `order` whole, the page cache dropped first; the share of the blocks
/// the FUSE server fetched that its worker found in memory, and the blocks it fetched.
fn epoch(mount: &Mount, order: &[String], expected: &[Vec<u8>]) -> (f64, f64) {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let blocks =
        |text: &str, origin: &str| metric(text, "granary_fuse_blocks_total", &[("origin", origin)]);
    let before = mount.metrics();
    for name in order {
        let i: usize = name.trim_start_matches("f").parse().unwrap();
        let got = std::fs::read(mount.dir.join(name)).unwrap();
        assert!(got == expected[i], "wrong bytes in {name}");
        // The "GPU" works on the sample meanwhile.
        std::thread::sleep(std::time::Duration::from_millis(15));
    }
    let after = mount.metrics();
    let memory = blocks(&after, "memory") - blocks(&before, "memory");
    let backend = blocks(&after, "backend") - blocks(&before, "backend");
    (memory / (memory + backend), memory + backend)
}

fn shuffled(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut v: Vec<String> = (0..n).map(|i| format!("f{i:03}")).collect();
    for i in (1..n).rev() {
        v.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    v
}

#[test]
fn a_hinted_epoch_finds_its_files_fetched_ahead() {
    // 96 files of 1 MiB over a 32 MiB memory tier, no disk tier: without a hint, a shuffled
    // epoch finds about a third of its blocks in memory.
    let source = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    for i in 0..96 {
        tree.insert(format!("f{i:03}"), MIB);
    }
    write_local(source.path(), &tree);
    let expected: Vec<Vec<u8>> = (0..96).map(|i| content(&format!("f{i:03}"), MIB)).collect();
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mount = up(
        source.path(),
        cache.path(),
        mnt.path(),
        &[
            "--block-size",
            "1MiB",
            "--memory-cache",
            "32MiB",
            "--disk-cache",
            "0",
        ],
    );
    let hint = |list: &str| {
        let file = cache.path().join("order.txt");
        std::fs::write(&file, list).unwrap();
        run_with_timeout(
            granary(
                &[
                    "hint",
                    "--mount",
                    mnt.path().to_str().unwrap(),
                    file.to_str().unwrap(),
                ],
                &[],
            ),
            std::time::Duration::from_secs(20),
        )
    };
    // A bad list is refused whole, naming the line.
    let out = hint("f001\n../etc/passwd\n");
    assert!(!out.status.success());
    assert!(out.stderr.contains("line 2"), "{}", out.stderr);

    epoch(&mount, &shuffled(96, 1), &expected);
    let (plain, _) = epoch(&mount, &shuffled(96, 2), &expected);

    let order = shuffled(96, 3);
    // Absolute paths under the mount, as a loader lists them.
    let list: String = order
        .iter()
        .map(|n| format!("{}\n", mnt.path().join(n).display()))
        .collect();
    let out = hint(&list);
    assert!(out.status.success(), "granary hint failed: {}", out.stderr);
    assert!(out.stdout.contains("96 files"), "{}", out.stdout);
    let (hinted, fetched) = epoch(&mount, &order, &expected);
    println!("epoch hit ratio without a hint {plain:.2}, with one {hinted:.2}");
    assert!(fetched >= 96.0, "only {fetched} blocks reached the server");
    assert!(
        hinted >= 0.9,
        "a hinted epoch found {hinted:.2} of its blocks in memory (without a hint: {plain:.2})"
    );
    assert!(mount.stop().success());
}

/// The server's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

#[test]
fn sixteen_readers_stay_within_the_memory_cache_and_its_budgets() {
    // 16 readers, each streaming its own 48 MiB file (768 MiB, twelve times the memory tier),
    // then reading it again at random.
    let source = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    for i in 0..16 {
        tree.insert(format!("r{i:02}"), 48 * MIB);
    }
    write_local(source.path(), &tree);
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let memory = 64 * MIB;
    let mount = up(
        source.path(),
        cache.path(),
        mnt.path(),
        &["--memory-cache", "64MiB", "--disk-cache", "512MiB"],
    );
    let server = support::process::server_of(mount.pid()).expect("the FUSE server");
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    std::thread::scope(|s| {
        for i in 0..16u64 {
            let path = mnt.path().join(format!("r{i:02}"));
            s.spawn(move || {
                use std::io::Read;
                let mut f = std::fs::File::open(&path).unwrap();
                let mut buf = vec![0u8; MIB as usize];
                let mut total = 0;
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                assert_eq!(total, 48 * MIB);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
                    .open(&path)
                    .unwrap();
                let mut rng = Rng(0x1234_5678 + i);
                for _ in 0..100 {
                    let offset = rng.next() % (47 * MIB);
                    f.read_at(&mut buf[..256 << 10], offset).unwrap();
                }
            });
        }
    });
    let peak = peak_rss(server);
    println!("peak RSS of the FUSE server: {} MiB", peak >> 20);
    // The target is the memory cache + 256 MiB (readahead 128 MiB, the disk tier's write
    // queue 32 MiB, the rest); a debug build gets 64 MiB more.
    assert!(
        peak <= memory + 320 * MIB,
        "peak RSS {} MiB with a {} MiB memory cache",
        peak >> 20,
        memory >> 20
    );
    assert!(mount.stop().success());
}
