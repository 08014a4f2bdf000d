//! Faults: a backend that goes away, and a damaged disk cache. Granary must keep serving what it
//! has cached, fail what it has not with EIO in bounded time, and never return wrong bytes.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use support::backends::{S3Target, unique};
use support::data::{Tree, content, write_local};
use support::metric;
use support::own::OwnService;
use support::process::{Mount, UpOptions};

/// A moto server of this test's own, so the test can stop it.
fn own_moto() -> (OwnService, S3Target) {
    let moto = OwnService::start("moto");
    let target = S3Target {
        endpoint: moto.get("GRANARY_TEST_S3_ENDPOINT"),
        access_key: moto.get("GRANARY_TEST_S3_ACCESS_KEY"),
        secret_key: moto.get("GRANARY_TEST_S3_SECRET_KEY"),
        bucket: moto.get("GRANARY_TEST_S3_BUCKET"),
    };
    (moto, target)
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
}

#[test]
fn backend_down_serves_cached_data_and_fails_uncached_reads_in_bounded_time() {
    let (moto, target) = own_moto();
    let prefix = unique("down");
    let mut tree = Tree::new();
    tree.insert("warm/big.bin".into(), 20 << 20);
    tree.insert("warm/small.txt".into(), 1000);
    tree.insert("cold/big.bin".into(), 9 << 20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(target.upload(&prefix, &tree));

    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mount = Mount::up(UpOptions {
        source: target.uri(&prefix),
        envs: target.env(),
        cache_dir: cache.path(),
        mount_dir: mnt.path(),
        extra: vec![
            "--metadata-ttl".into(),
            "1h".into(),
            "--block-size".into(),
            "1MiB".into(),
        ],
    });
    let m = mnt.path();
    for path in ["warm/big.bin", "warm/small.txt"] {
        assert_eq!(
            read_all(&m.join(path)).unwrap(),
            content(path, tree[path]),
            "{path}"
        );
    }
    // Known to the metadata cache, never read.
    assert_eq!(
        std::fs::metadata(m.join("cold/big.bin")).unwrap().len(),
        9 << 20
    );

    moto.stop();
    drop_page_cache();

    // Cached data still reads, byte for byte.
    for path in ["warm/big.bin", "warm/small.txt"] {
        assert_eq!(
            read_all(&m.join(path)).unwrap(),
            content(path, tree[path]),
            "{path} after the backend stopped"
        );
    }
    // Uncached data fails with EIO, in bounded time, and never returns wrong bytes.
    let start = Instant::now();
    let file = std::fs::File::open(m.join("cold/big.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let err = file.read_at(&mut buf, 3 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO, got {err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "failed after {:?}",
        start.elapsed()
    );
    // A directory never listed fails too, also in bounded time.
    let start = Instant::now();
    assert!(std::fs::read_dir(m.join("never-listed")).is_err());
    assert!(start.elapsed() < Duration::from_secs(30));
    let errors = metric(
        &mount.metrics(),
        "granary_backend_requests_total",
        &[("outcome", "error")],
    );
    assert!(errors > 0.0, "backend errors are counted");
    drop(file);
    assert!(mount.stop().success());
}

/// Overwrites a few bytes in every 256 KiB of every file of the disk tier.
fn corrupt_disk_tier(dir: &Path) -> usize {
    let mut damaged = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            damaged += corrupt_disk_tier(&path);
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let len = file.metadata().unwrap().len();
        let mut offset = 4096 + 777;
        while offset + 64 < len {
            let mut old = [0u8; 64];
            file.read_exact_at(&mut old, offset).unwrap();
            if old.iter().any(|&b| b != 0) {
                let flipped: Vec<u8> = old.iter().map(|b| !b).collect();
                file.write_all_at(&flipped, offset).unwrap();
                damaged += 1;
            }
            offset += 256 << 10;
        }
    }
    damaged
}

#[test]
fn a_corrupted_disk_block_is_detected_and_refetched() {
    let source = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    // 160 blocks: more than the disk tier's write queue (32 MiB), read from a local source as
    // fast as the disk tier can take them.
    tree.insert("data.bin".into(), 160 << 20);
    write_local(source.path(), &tree);
    let expected = content("data.bin", 160 << 20);
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        let mnt = tempfile::tempdir().unwrap();
        let mount = Mount::up(UpOptions {
            source: format!("file://{}", source.path().display()),
            envs: vec![],
            cache_dir: cache.path(),
            mount_dir: mnt.path(),
            extra: [
                "--block-size",
                "1MiB",
                "--memory-cache",
                "8MiB",
                "--disk-cache",
                "256MiB",
            ]
            .map(String::from)
            .to_vec(),
        });
        let got = std::fs::read(mnt.path().join("data.bin")).unwrap();
        assert!(
            got == expected,
            "bytes read through the mount differ from the source"
        );
        let text = mount.metrics();
        assert!(mount.stop().success());
        (
            metric(&text, "granary_backend_requests_total", &[("op", "get")]),
            metric(&text, "granary_block_reads_total", &[("tier", "disk")]),
        )
    };
    // Every block is fetched. (A few may be fetched twice when the kernel's many concurrent,
    // out-of-order reads of one `read(2)` of the whole file make the readahead window restart;
    // single flight itself is tested in the worker tests.)
    let (gets, _) = run();
    assert!(
        (160.0..200.0).contains(&gets),
        "first read: {gets} GETs for 160 blocks"
    );
    // A restart finds every block on disk: the disk tier kept all it fetched, however fast the
    // cold read ran.
    let (gets, disk_hits) = run();
    assert!(
        gets == 0.0 && disk_hits >= 160.0,
        "restart: {gets} GETs, {disk_hits} disk hits for 160 blocks"
    );
    // Damage the disk tier: the damaged blocks are refetched, never served.
    let damaged = corrupt_disk_tier(&cache.path().join("block-files"));
    assert!(damaged > 0, "nothing to damage");
    // The damaged entries are refetched (without damage this run would make almost no GET, as
    // the previous one did) and the bytes read are right (checked in `run`).
    let (gets, _) = run();
    assert!(
        gets >= 150.0,
        "only {gets} of 160 damaged blocks were refetched"
    );
}
