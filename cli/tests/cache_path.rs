//! The block cache's read path through a real mount: random readers get exactly the bytes they
//! ask for, fetched and read as parts of blocks, and kept for the next pass.

mod support;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use support::data::{Tree, content, write_local};
use support::metric;
use support::process::{Mount, UpOptions};

const MIB: u64 = 1 << 20;

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
    let mount = Mount::up(UpOptions {
        source: format!("file://{}", source.path().display()),
        envs: vec![],
        cache_dir: cache.path(),
        mount_dir: mnt.path(),
        extra: [
            "--block-size",
            "4MiB",
            "--memory-cache",
            "16MiB",
            "--disk-cache",
            "512MiB",
        ]
        .map(String::from)
        .to_vec(),
    });
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
