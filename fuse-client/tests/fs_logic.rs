//! GranaryFs without a kernel: the filesystem logic over an in-memory worker (a fake CacheApi
//! for logic tests; the real worker and the real mount are tested in cli/tests).

use bytes::Bytes;
use granary_core::{BlockSize, ObjectId};
use granary_fuse_client::fs::{Backing, FsConfig, FsError, GranaryFs, OpenIo, Opened};
use granary_fuse_client::inodes::KernelEntry;
use granary_proto::{ApiError, Block, CacheApi, Entry, EntryKind, Info, ObjectRef};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

const BS: u64 = 64 << 10;

/// Files by path; every block read, stat and local_copy call is counted. `local` answers
/// `local_copy` by object key and ETag, as the worker promises: a copy of exactly that version
/// (an `Err` stands for a worker that does not answer). Paths in `pinned` are answered as a
/// pinned dataset's (`Entry::pinned`). `epoch` is the pins epoch it gives (`None`: not tracked);
/// with `epoch_down` it does not answer that call.
#[derive(Default)]
struct FakeWorker {
    files: Mutex<BTreeMap<String, (Vec<u8>, String)>>,
    block_reads: AtomicU64,
    local: Mutex<HashMap<String, Result<PathBuf, ApiError>>>,
    local_copy_calls: AtomicU64,
    stat_calls: AtomicU64,
    pinned: Mutex<HashSet<String>>,
    epoch: Mutex<Option<u64>>,
    epoch_down: std::sync::atomic::AtomicBool,
}

impl FakeWorker {
    fn put(&self, path: &str, data: Vec<u8>, etag: &str) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), (data, etag.to_string()));
    }

    fn pin(&self, path: &str) {
        self.pinned.lock().unwrap().insert(path.to_string());
    }

    fn unpin(&self, path: &str) {
        self.pinned.lock().unwrap().remove(path);
    }

    /// stat and local_copy calls so far.
    fn calls(&self) -> (u64, u64) {
        (
            self.stat_calls.load(Ordering::SeqCst),
            self.local_copy_calls.load(Ordering::SeqCst),
        )
    }

    fn entry(&self, path: &str, data: &[u8], etag: &str) -> Entry {
        let name = path.rsplit('/').next().unwrap().to_string();
        let pinned = self.pinned.lock().unwrap().contains(path);
        Entry {
            name,
            kind: EntryKind::File,
            size: data.len() as u64,
            mtime_ns: 0,
            object: Some(ObjectRef {
                mount: 0,
                id: ObjectId {
                    backend: "fake".into(),
                    key: path.trim_start_matches('/').into(),
                    size: data.len() as u64,
                    etag: Some(etag.into()),
                    version: None,
                    mtime_ns: 0,
                },
            }),
            pinned,
            owner: None,
        }
    }

    fn dir(name: &str) -> Entry {
        Entry {
            name: name.into(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: 0,
            object: None,
            pinned: false,
            owner: None,
        }
    }
}

impl CacheApi for FakeWorker {
    fn info(&self) -> Info {
        Info {
            node_id: "fake".into(),
            block_size: BlockSize::new(BS).unwrap(),
            memory_capacity: 0,
            disk_capacity: 0,
            stats: Default::default(),
        }
    }

    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        self.stat_calls.fetch_add(1, Ordering::SeqCst);
        let files = self.files.lock().unwrap();
        if let Some((data, etag)) = files.get(path) {
            return Ok(self.entry(path, data, etag));
        }
        let prefix = format!("{}/", path.trim_end_matches('/'));
        if path == "/" || files.keys().any(|k| k.starts_with(&prefix)) {
            return Ok(Self::dir(path.rsplit('/').next().unwrap()));
        }
        Err(ApiError::NotFound(path.into()))
    }

    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        let files = self.files.lock().unwrap();
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        let mut out: BTreeMap<String, Entry> = BTreeMap::new();
        for (k, (data, etag)) in files.iter() {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            match rest.split_once('/') {
                Some((dir, _)) => {
                    out.insert(dir.to_string(), Self::dir(dir));
                }
                None => {
                    out.insert(rest.to_string(), self.entry(k, data, etag));
                }
            }
        }
        if out.is_empty() && path != "/" {
            return Err(ApiError::NotFound(path.into()));
        }
        Ok(Arc::new(out.into_values().collect()))
    }

    async fn local_copy(&self, object: &ObjectRef) -> Result<Option<PathBuf>, ApiError> {
        self.local_copy_calls.fetch_add(1, Ordering::SeqCst);
        let version = format!(
            "{}@{}",
            object.id.key,
            object.id.etag.as_deref().unwrap_or("")
        );
        match self.local.lock().unwrap().get(&version) {
            None => Ok(None),
            Some(Ok(path)) => Ok(Some(path.clone())),
            Some(Err(e)) => Err(e.clone()),
        }
    }

    async fn pins_epoch(&self) -> Result<Option<u64>, ApiError> {
        if self.epoch_down.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable("the fake worker is down".into()));
        }
        Ok(*self.epoch.lock().unwrap())
    }

    async fn read_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        self.block_reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let files = self.files.lock().unwrap();
        let (data, etag) = files
            .get(&format!("/{}", object.id.key))
            .ok_or(ApiError::NotFound(object.id.key.clone()))?;
        if Some(etag) != object.id.etag.as_ref() {
            return Err(ApiError::Stale(object.id.key.clone()));
        }
        let range = BlockSize::new(BS).unwrap().range(index, data.len() as u64);
        Ok(Block::new(Bytes::copy_from_slice(
            &data[range.start as usize..range.end as usize],
        )))
    }
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| ((i * 7) as u8) ^ seed).collect()
}

fn fs(worker: Arc<FakeWorker>, config: FsConfig) -> GranaryFs<FakeWorker> {
    GranaryFs::new(worker, config)
}

#[tokio::test]
async fn lookup_list_and_attributes() {
    let w = Arc::new(FakeWorker::default());
    w.put("/a/x.bin", data(1000, 1), "e1");
    w.put("/b.txt", data(10, 2), "e2");
    let fs = fs(w, FsConfig::default());
    let a = fs.lookup(1, "a").await.unwrap();
    assert_eq!(a.kind, EntryKind::Dir);
    assert_eq!(a.perm, 0o555);
    let x = fs.lookup(a.ino, "x.bin").await.unwrap();
    assert_eq!((x.kind, x.size, x.perm), (EntryKind::File, 1000, 0o444));
    assert_eq!(fs.getattr(x.ino).await.unwrap(), x);
    assert_eq!(fs.lookup(1, "nope").await.unwrap_err(), FsError::NotFound);
    assert!(matches!(fs.lookup(1, "..").await, Err(FsError::Invalid(_))));

    let fh = fs.opendir(1).await.unwrap();
    let mut names = Vec::new();
    fs.readdir(1, fh, 0, true, |item| {
        names.push(item.name.clone());
        true
    })
    .unwrap();
    assert_eq!(names, [".", "..", "a", "b.txt"]);
    // Resume from an offset, stop when the buffer is full.
    let mut rest = Vec::new();
    fs.readdir(1, fh, 3, false, |item| {
        rest.push(item.name.clone());
        false
    })
    .unwrap();
    assert_eq!(rest, ["b.txt"]);
    fs.releasedir(fh);
    assert!(matches!(
        fs.opendir(x.ino).await,
        Err(FsError::NotADirectory)
    ));
    assert!(matches!(
        fs.open(a.ino, false, 0).await,
        Err(FsError::IsADirectory)
    ));
    assert!(matches!(
        fs.open(x.ino, true, 0).await,
        Err(FsError::ReadOnly)
    ));
}

#[tokio::test]
async fn reads_match_the_bytes_at_any_offset() {
    let w = Arc::new(FakeWorker::default());
    let bytes = data(10 * BS as usize + 123, 3);
    w.put("/f", bytes.clone(), "e");
    let fs = fs(w, FsConfig::default());
    let ino = fs.lookup(1, "f").await.unwrap().ino;
    let fh = fs.open(ino, false, 0).await.unwrap().fh;
    let mut state = 42u64;
    for _ in 0..300 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (state >> 20) % (bytes.len() as u64 + 100);
        let len = ((state >> 5) % (3 * BS)) as u32;
        let got = fs.read(fh, offset, len).await.unwrap();
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize + len as usize).min(bytes.len());
        assert_eq!(got[..], bytes[start..end], "read {len} at {offset}");
    }
    fs.release(fh);
    assert!(matches!(fs.read(fh, 0, 10).await, Err(FsError::BadHandle)));
}

#[tokio::test]
async fn random_reads_fetch_only_what_they_touch_and_sequential_reads_read_ahead() {
    let w = Arc::new(FakeWorker::default());
    w.put("/f", data(64 * BS as usize, 4), "e");
    let fs = fs(
        w.clone(),
        FsConfig {
            readahead_per_file: 8 * BS,
            ..FsConfig::default()
        },
    );
    let ino = fs.lookup(1, "f").await.unwrap().ino;
    let fh = fs.open(ino, false, 0).await.unwrap().fh;
    for i in [40u64, 3, 17, 55, 9] {
        fs.read(fh, i * BS + 10, 100).await.unwrap();
    }
    assert_eq!(
        w.block_reads.load(Ordering::SeqCst),
        5,
        "a seek reads only the touched block"
    );
    let fh2 = fs.open(ino, false, 0).await.unwrap().fh;
    w.block_reads.store(0, Ordering::SeqCst);
    for i in 0..4 {
        fs.read(fh2, i * (BS / 2), (BS / 2) as u32).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fetched = w.block_reads.load(Ordering::SeqCst);
    assert!(
        fetched > 2 && fetched <= 2 + 8,
        "sequential reads fetch ahead, within the window: {fetched}"
    );
}

#[tokio::test]
async fn out_of_order_requests_across_a_block_boundary_fetch_each_block_once() {
    let w = Arc::new(FakeWorker::default());
    w.put("/f", data(16 * BS as usize, 6), "e");
    let fs = fs(
        w.clone(),
        FsConfig {
            readahead_per_file: 4 * BS,
            ..FsConfig::default()
        },
    );
    let ino = fs.lookup(1, "f").await.unwrap().ino;
    let fh = fs.open(ino, false, 0).await.unwrap().fh;
    // The kernel's requests, a quarter block each, with the last quarter of every block
    // arriving after the first quarter of the next.
    let q = BS / 4;
    let mut order = Vec::new();
    for b in 0..8u64 {
        order.extend([b * BS, b * BS + q, b * BS + 2 * q]);
        if b > 0 {
            order.push((b - 1) * BS + 3 * q);
        }
    }
    for offset in order {
        let got = fs.read(fh, offset, q as u32).await.unwrap();
        assert_eq!(
            got[..],
            data(16 * BS as usize, 6)[offset as usize..(offset + q) as usize]
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fetched = w.block_reads.load(Ordering::SeqCst);
    assert!(
        fetched <= 8 + 4,
        "each block once (plus at most the readahead window): {fetched}"
    );
}

#[tokio::test]
async fn readahead_memory_is_bounded_in_total() {
    let w = Arc::new(FakeWorker::default());
    for i in 0..20 {
        w.put(&format!("/f{i}"), data(32 * BS as usize, i as u8), "e");
    }
    let total = 10 * BS;
    let fs = Arc::new(fs(
        w,
        FsConfig {
            readahead_per_file: 8 * BS,
            readahead_total: total,
            ..FsConfig::default()
        },
    ));
    let mut handles = Vec::new();
    for i in 0..20 {
        let ino = fs.lookup(1, &format!("f{i}")).await.unwrap().ino;
        handles.push(fs.open(ino, false, 0).await.unwrap().fh);
    }
    for step in 0..6u64 {
        for &fh in &handles {
            fs.read(fh, step * BS, BS as u32).await.unwrap();
            assert!(
                fs.readahead_bytes() <= total,
                "{} > {total}",
                fs.readahead_bytes()
            );
        }
    }
    for fh in handles {
        fs.release(fh);
    }
    assert_eq!(
        fs.readahead_bytes(),
        0,
        "released files give their budget back"
    );
}

#[tokio::test]
async fn versions_pin_opens_and_steer_the_page_cache() {
    let w = Arc::new(FakeWorker::default());
    w.put("/f", data(4 * BS as usize, 5), "v1");
    let fs = fs(
        w.clone(),
        FsConfig {
            attr_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let ino = fs.lookup(1, "f").await.unwrap().ino;
    let first = fs.open(ino, false, 0).await.unwrap();
    assert!(!first.keep_cache, "nothing cached yet");
    let second = fs.open(ino, false, 0).await.unwrap();
    assert!(second.keep_cache, "same version: keep the page cache");
    w.put("/f", data(4 * BS as usize, 6), "v2");
    // The open handle of v1 never gets v2's bytes.
    assert!(matches!(
        fs.read(first.fh, 0, 10).await,
        Err(FsError::Stale(_))
    ));
    let third = fs.open(ino, false, 0).await.unwrap();
    assert!(!third.keep_cache, "new version: drop the page cache");
    assert_eq!(fs.read(third.fh, 0, 4).await.unwrap()[..], data(4, 6)[..]);
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("granary-fs-logic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stands in for the kernel: counts registrations and hands out backings it can watch.
#[derive(Default)]
struct FakeKernel {
    registered: AtomicU64,
    refuse: bool,
    last: Mutex<Option<Weak<dyn std::any::Any + Send + Sync>>>,
}

impl FakeKernel {
    fn register(&self) -> impl FnOnce(&std::fs::File) -> std::io::Result<Backing> + '_ {
        move |file| {
            if self.refuse {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            self.registered.fetch_add(1, Ordering::SeqCst);
            let backing: Backing = Arc::new(file.metadata()?.len());
            *self.last.lock().unwrap() = Some(Arc::downgrade(&backing));
            Ok(backing)
        }
    }

    /// Whether the last backing handed out is still held by the filesystem.
    fn last_alive(&self) -> bool {
        self.last
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|w| w.upgrade().is_some())
    }
}

fn same_backing(a: &OpenIo, b: &OpenIo) -> bool {
    match (a, b) {
        (OpenIo::Passthrough(a), OpenIo::Passthrough(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

#[tokio::test]
async fn a_matching_local_copy_is_passed_to_the_kernel_once_per_inode() {
    let dir = TempDir::new("match");
    let w = Arc::new(FakeWorker::default());
    let bytes = data(3 * BS as usize + 5, 7);
    w.put("/held.bin", bytes.clone(), "e");
    std::fs::write(dir.0.join("held.bin"), &bytes).unwrap();
    w.local
        .lock()
        .unwrap()
        .insert("held.bin@e".into(), Ok(dir.0.join("held.bin")));
    let fs = fs(w.clone(), FsConfig::default());
    let kernel = FakeKernel::default();
    let ino = fs.lookup(1, "held.bin").await.unwrap().ino;

    let first = open_pt(&fs, ino, &kernel).await;
    assert!(first.is_passthrough());
    assert!(!first.keep_cache);
    assert_eq!(w.local_copy_calls.load(Ordering::SeqCst), 1);
    // A second open of the inode reuses its backing file without asking the worker again.
    let second = open_pt(&fs, ino, &kernel).await;
    assert!(same_backing(&first.io, &second.io));
    assert_eq!(kernel.registered.load(Ordering::SeqCst), 1);
    assert_eq!(w.local_copy_calls.load(Ordering::SeqCst), 1);
    assert_eq!(fs.passthrough_handles(ino), 2);
    // A plain open of an inode in passthrough must be passthrough too (the kernel insists).
    let plain = fs.open(ino, false, 0).await.unwrap();
    assert!(same_backing(&first.io, &plain.io));
    // The handles still read correctly should the kernel ever ask.
    assert_eq!(fs.read(first.fh, 0, 10).await.unwrap()[..], bytes[..10]);
    drop((first.io, second.io, plain.io));
    fs.release(first.fh);
    fs.release(second.fh);
    assert!(kernel.last_alive(), "held until the inode's last release");
    fs.release(plain.fh);
    assert_eq!(fs.passthrough_handles(ino), 0);
    assert!(
        !kernel.last_alive(),
        "the last release drops the backing file"
    );
}

#[tokio::test]
async fn no_copy_a_wrong_copy_or_a_silent_worker_read_through_userspace() {
    let dir = TempDir::new("fallback");
    let w = Arc::new(FakeWorker::default());
    let bytes = data(2 * BS as usize, 8);
    for name in [
        "none.bin",
        "short.bin",
        "dir.bin",
        "missing.bin",
        "down.bin",
    ] {
        w.put(&format!("/{name}"), bytes.clone(), "e");
    }
    std::fs::write(dir.0.join("short.bin"), &bytes[..100]).unwrap();
    std::fs::create_dir(dir.0.join("dir.bin")).unwrap();
    {
        let mut local = w.local.lock().unwrap();
        local.insert("short.bin@e".into(), Ok(dir.0.join("short.bin")));
        local.insert("dir.bin@e".into(), Ok(dir.0.join("dir.bin")));
        local.insert("missing.bin@e".into(), Ok(dir.0.join("missing.bin")));
        local.insert(
            "down.bin@e".into(),
            Err(ApiError::Unavailable("worker gone".into())),
        );
    }
    let fs = fs(w.clone(), FsConfig::default());
    let kernel = FakeKernel::default();
    for name in [
        "none.bin",
        "short.bin",
        "dir.bin",
        "missing.bin",
        "down.bin",
    ] {
        let ino = fs.lookup(1, name).await.unwrap().ino;
        let opened = open_pt(&fs, ino, &kernel).await;
        assert!(!opened.is_passthrough(), "{name}");
        assert_eq!(
            fs.read(opened.fh, BS - 3, 6).await.unwrap()[..],
            bytes[BS as usize - 3..BS as usize + 3],
            "{name}"
        );
        fs.release(opened.fh);
    }
    assert_eq!(kernel.registered.load(Ordering::SeqCst), 0);
    assert!(
        fs.passthrough_enabled(),
        "a bad copy does not turn passthrough off"
    );
}

#[tokio::test]
async fn a_refusing_kernel_turns_passthrough_off_without_failing_opens() {
    let dir = TempDir::new("refuse");
    let w = Arc::new(FakeWorker::default());
    let bytes = data(BS as usize, 9);
    for name in ["a.bin", "b.bin"] {
        w.put(&format!("/{name}"), bytes.clone(), "e");
        std::fs::write(dir.0.join(name), &bytes).unwrap();
        w.local
            .lock()
            .unwrap()
            .insert(format!("{name}@e"), Ok(dir.0.join(name)));
    }
    let fs = fs(w.clone(), FsConfig::default());
    let kernel = FakeKernel {
        refuse: true,
        ..FakeKernel::default()
    };
    let a = fs.lookup(1, "a.bin").await.unwrap().ino;
    let opened = fs
        .open_passthrough(a, false, 0, kernel.register())
        .await
        .unwrap();
    assert!(!opened.is_passthrough());
    assert_eq!(fs.read(opened.fh, 0, 8).await.unwrap()[..], bytes[..8]);
    assert!(!fs.passthrough_enabled());
    let calls = w.local_copy_calls.load(Ordering::SeqCst);
    let b = fs.lookup(1, "b.bin").await.unwrap().ino;
    let opened = fs
        .open_passthrough(b, false, 0, kernel.register())
        .await
        .unwrap();
    assert!(!opened.is_passthrough());
    assert_eq!(
        w.local_copy_calls.load(Ordering::SeqCst),
        calls,
        "once refused, the worker is not asked any more"
    );
}

#[tokio::test]
async fn passthrough_off_in_the_config_never_asks_the_worker() {
    let dir = TempDir::new("off");
    let w = Arc::new(FakeWorker::default());
    let bytes = data(BS as usize, 10);
    w.put("/a.bin", bytes.clone(), "e");
    std::fs::write(dir.0.join("a.bin"), &bytes).unwrap();
    w.local
        .lock()
        .unwrap()
        .insert("a.bin@e".into(), Ok(dir.0.join("a.bin")));
    let fs = fs(
        w.clone(),
        FsConfig {
            passthrough: false,
            ..FsConfig::default()
        },
    );
    let kernel = FakeKernel::default();
    let ino = fs.lookup(1, "a.bin").await.unwrap().ino;
    let opened = open_pt(&fs, ino, &kernel).await;
    assert!(!opened.is_passthrough());
    assert_eq!(w.local_copy_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_inode_keeps_one_io_mode_while_open() {
    let dir = TempDir::new("modes");
    let w = Arc::new(FakeWorker::default());
    let v1 = data(2 * BS as usize, 11);
    w.put("/f.bin", v1.clone(), "v1");
    let fs = fs(
        w.clone(),
        FsConfig {
            attr_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let kernel = FakeKernel::default();
    let ino = fs.lookup(1, "f.bin").await.unwrap().ino;

    // Open through userspace first; a local copy appearing meanwhile is not used (the kernel
    // would fail a passthrough open beside an ordinary one) and the worker is not even asked.
    let userspace = open_pt(&fs, ino, &kernel).await;
    assert!(!userspace.is_passthrough());
    std::fs::write(dir.0.join("f.bin"), &v1).unwrap();
    w.local
        .lock()
        .unwrap()
        .insert("f.bin@v1".into(), Ok(dir.0.join("f.bin")));
    let calls = w.local_copy_calls.load(Ordering::SeqCst);
    let second = open_pt(&fs, ino, &kernel).await;
    assert!(!second.is_passthrough());
    assert_eq!(w.local_copy_calls.load(Ordering::SeqCst), calls);
    fs.release(userspace.fh);
    fs.release(second.fh);

    // Once closed, the next open uses the copy.
    let pt = open_pt(&fs, ino, &kernel).await;
    assert!(pt.is_passthrough());

    // The object changes while open through passthrough: the kernel allows no second backing
    // file and no ordinary open beside it, so a new open is stale until the old one closes.
    let v2 = data(2 * BS as usize, 12);
    w.put("/f.bin", v2.clone(), "v2");
    assert!(matches!(
        fs.open_passthrough(ino, false, 0, kernel.register()).await,
        Err(FsError::Stale(_))
    ));
    assert!(matches!(
        fs.open(ino, false, 0).await,
        Err(FsError::Stale(_))
    ));
    close(&fs, pt);
    // The worker's copy is of v1: v2 is read through userspace, whole.
    let fresh = open_pt(&fs, ino, &kernel).await;
    assert!(!fresh.is_passthrough());
    assert_eq!(fs.read(fresh.fh, 0, 16).await.unwrap()[..], v2[..16]);
}

#[tokio::test]
async fn a_copy_for_the_version_last_seen_is_not_used_for_a_newer_one() {
    let dir = TempDir::new("newer");
    let w = Arc::new(FakeWorker::default());
    let v1 = data(BS as usize, 13);
    w.put("/f.bin", v1.clone(), "v1");
    std::fs::write(dir.0.join("f.bin"), &v1).unwrap();
    w.local
        .lock()
        .unwrap()
        .insert("f.bin@v1".into(), Ok(dir.0.join("f.bin")));
    let fs = fs(
        w.clone(),
        FsConfig {
            attr_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let kernel = FakeKernel::default();
    let ino = fs.lookup(1, "f.bin").await.unwrap().ino;
    // Same size, new version: the worker was asked about v1 (what the inode showed), which
    // says nothing about v2, so this open reads v2 through userspace.
    let v2 = data(BS as usize, 14);
    w.put("/f.bin", v2.clone(), "v2");
    let opened = open_pt(&fs, ino, &kernel).await;
    assert!(!opened.is_passthrough());
    assert_eq!(
        w.local_copy_calls.load(Ordering::SeqCst),
        1,
        "one call per open at most"
    );
    assert_eq!(fs.read(opened.fh, 0, 16).await.unwrap()[..], v2[..16]);
}

/// Opens `ino` for reading, through passthrough where `kernel` takes the backing file.
async fn open_pt(fs: &GranaryFs<FakeWorker>, ino: u64, kernel: &FakeKernel) -> Opened {
    fs.open_passthrough(ino, false, 0, kernel.register())
        .await
        .unwrap()
}

/// Closes `opened` as the kernel does: its I/O ends, then the handle is released.
fn close(fs: &GranaryFs<FakeWorker>, opened: Opened) {
    drop(opened.io);
    fs.release(opened.fh);
}

/// A pinned file `name` of `len` bytes, held locally at `dir/name`, looked up.
async fn pinned_file(
    fs: &GranaryFs<FakeWorker>,
    w: &FakeWorker,
    dir: &TempDir,
    name: &str,
    len: usize,
) -> (u64, Vec<u8>) {
    let bytes = data(len, len as u8);
    let path = format!("/{name}");
    w.put(&path, bytes.clone(), "p1");
    w.pin(&path);
    std::fs::write(dir.0.join(name), &bytes).unwrap();
    w.local
        .lock()
        .unwrap()
        .insert(format!("{name}@p1"), Ok(dir.0.join(name)));
    (fs.lookup(1, name).await.unwrap().ino, bytes)
}

#[tokio::test]
async fn a_pinned_file_opens_again_without_asking_the_worker() {
    let dir = TempDir::new("pinned");
    let w = Arc::new(FakeWorker::default());
    let fs = fs(w.clone(), FsConfig::default());
    let kernel = FakeKernel::default();
    let (ino, bytes) = pinned_file(&fs, &w, &dir, "p.bin", BS as usize + 3).await;
    let looked_up = w.calls();

    // First open: the entry is fresh and pinned (no stat), the worker names the copy.
    assert!(
        fs.open_now(ino, false, 0, kernel.register()).is_none(),
        "nothing known about a local copy yet"
    );
    let first = open_pt(&fs, ino, &kernel).await;
    assert!(first.is_passthrough());
    assert_eq!(
        w.calls(),
        (looked_up.0, looked_up.1 + 1),
        "one local_copy, no stat"
    );
    assert_eq!(fs.read(first.fh, 0, 10).await.unwrap()[..], bytes[..10]);
    close(&fs, first);
    assert_eq!(fs.kept_backings(), 1, "the registration outlives the close");
    assert!(kernel.last_alive());

    // Again and again: no call to the worker, no new registration, answered without waiting.
    let calls = w.calls();
    for _ in 0..3 {
        let again = fs
            .open_now(ino, false, 0, kernel.register())
            .expect("known")
            .unwrap();
        assert!(again.is_passthrough());
        assert_eq!(fs.kept_backings(), 0, "in use, not kept");
        close(&fs, again);
    }
    let again = open_pt(&fs, ino, &kernel).await;
    assert!(again.is_passthrough());
    close(&fs, again);
    assert_eq!(w.calls(), calls, "0 calls to the worker");
    assert_eq!(kernel.registered.load(Ordering::SeqCst), 1);

    // The kernel forgets the inode: its kept registration goes with it.
    fs.forget(ino, 1);
    assert_eq!(fs.kept_backings(), 0);
    assert!(!kernel.last_alive());
}

#[tokio::test]
async fn without_kept_registrations_a_pinned_file_reopens_its_remembered_copy() {
    let dir = TempDir::new("remembered");
    let w = Arc::new(FakeWorker::default());
    let fs = fs(
        w.clone(),
        FsConfig {
            kept_backings: 0,
            ..FsConfig::default()
        },
    );
    let kernel = FakeKernel::default();
    let (ino, _) = pinned_file(&fs, &w, &dir, "r.bin", 1000).await;
    let first = open_pt(&fs, ino, &kernel).await;
    assert!(first.is_passthrough());
    close(&fs, first);
    assert_eq!(fs.kept_backings(), 0);
    assert!(!kernel.last_alive(), "unregistered at the last close");
    let calls = w.calls();
    let second = fs
        .open_now(ino, false, 0, kernel.register())
        .expect("the copy is remembered")
        .unwrap();
    assert!(second.is_passthrough());
    assert_eq!(w.calls(), calls, "0 calls to the worker");
    assert_eq!(
        kernel.registered.load(Ordering::SeqCst),
        2,
        "registered again"
    );
}

#[tokio::test]
async fn a_remembered_copy_that_vanished_or_changed_is_asked_for_again() {
    let dir = TempDir::new("vanished");
    let w = Arc::new(FakeWorker::default());
    let fs = fs(
        w.clone(),
        FsConfig {
            kept_backings: 0,
            ..FsConfig::default()
        },
    );
    let kernel = FakeKernel::default();
    let (ino, bytes) = pinned_file(&fs, &w, &dir, "v.bin", 2 * BS as usize).await;
    let open_close = |expect_passthrough: bool| {
        let fs = &fs;
        let kernel = &kernel;
        async move {
            let opened = open_pt(fs, ino, kernel).await;
            assert_eq!(opened.is_passthrough(), expect_passthrough);
            fs.release(opened.fh);
        }
    };
    open_close(true).await;
    let (stats, copies) = w.calls();

    // The copy is gone (the dataset was dropped): the worker is asked, says none, and the
    // file reads through userspace, right.
    std::fs::remove_file(dir.0.join("v.bin")).unwrap();
    w.local.lock().unwrap().clear();
    assert!(fs.open_now(ino, false, 0, kernel.register()).is_none());
    let opened = open_pt(&fs, ino, &kernel).await;
    assert!(!opened.is_passthrough());
    assert_eq!(w.calls(), (stats, copies + 1));
    assert_eq!(
        fs.read(opened.fh, BS - 2, 4).await.unwrap()[..],
        bytes[BS as usize - 2..BS as usize + 2]
    );
    fs.release(opened.fh);

    // The worker loads it again elsewhere: asked again, used, remembered.
    let elsewhere = dir.0.join("v2.bin");
    std::fs::write(&elsewhere, &bytes).unwrap();
    w.local
        .lock()
        .unwrap()
        .insert("v.bin@p1".into(), Ok(elsewhere.clone()));
    open_close(true).await;
    assert_eq!(w.calls(), (stats, copies + 2));
    open_close(true).await;
    assert_eq!(w.calls(), (stats, copies + 2), "remembered");

    // Replaced under the same path by another file (same size, renamed over it as the dataset
    // store does): not the file the worker vouched for, so the worker is asked again first.
    std::fs::write(dir.0.join("v2.tmp"), &bytes).unwrap();
    std::fs::rename(dir.0.join("v2.tmp"), &elsewhere).unwrap();
    open_close(true).await;
    assert_eq!(w.calls(), (stats, copies + 3));
    // A copy of the wrong size at the remembered path is never used.
    std::fs::write(&elsewhere, &bytes[..10]).unwrap();
    open_close(false).await;
    assert_eq!(w.calls(), (stats, copies + 4));
}

#[tokio::test]
async fn an_unpinned_file_asks_the_worker_on_every_open() {
    let dir = TempDir::new("unpinned");
    let w = Arc::new(FakeWorker::default());
    let bytes = data(1000, 3);
    w.put("/u.bin", bytes.clone(), "e");
    std::fs::write(dir.0.join("u.bin"), &bytes).unwrap();
    w.local
        .lock()
        .unwrap()
        .insert("u.bin@e".into(), Ok(dir.0.join("u.bin")));
    let fs = fs(w.clone(), FsConfig::default());
    let kernel = FakeKernel::default();
    let ino = fs.lookup(1, "u.bin").await.unwrap().ino;
    for round in 1..=3 {
        let (stats, copies) = w.calls();
        assert!(fs.open_now(ino, false, 0, kernel.register()).is_none());
        let opened = open_pt(&fs, ino, &kernel).await;
        assert!(opened.is_passthrough());
        assert_eq!(
            w.calls(),
            (stats + 1, copies + 1),
            "round {round}: a stat per open"
        );
        close(&fs, opened);
        assert_eq!(fs.kept_backings(), 0, "nothing kept for an unpinned file");
        assert!(!kernel.last_alive());
    }
    // Also through userspace (plain opens): a stat per open.
    let stats = w.calls().0;
    let opened = fs.open(ino, false, 0).await.unwrap();
    assert!(fs.open_now(ino, false, 0, kernel.register()).is_none());
    fs.release(opened.fh);
    assert_eq!(w.calls().0, stats + 1);
}

#[tokio::test]
async fn a_pinned_entry_is_trusted_for_the_attribute_ttl_only() {
    let dir = TempDir::new("ttl");
    let w = Arc::new(FakeWorker::default());
    let ttl = Duration::from_millis(300);
    let fs = fs(
        w.clone(),
        FsConfig {
            attr_ttl: ttl,
            ..FsConfig::default()
        },
    );
    let kernel = FakeKernel::default();
    let (ino, _) = pinned_file(&fs, &w, &dir, "t.bin", 1000).await;
    let opened = open_pt(&fs, ino, &kernel).await;
    close(&fs, opened);
    assert_eq!(fs.kept_backings(), 1);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;

    // Past the TTL the kept registration expires (an idle mount lets go of it too)...
    fs.expire_kept_backings();
    assert_eq!(fs.kept_backings(), 0);
    assert!(!kernel.last_alive());
    // ...and the entry is stat'ed again: unpinned meanwhile, so it is not trusted any more.
    w.unpin("/t.bin");
    let (stats, _) = w.calls();
    assert!(fs.open_now(ino, false, 0, kernel.register()).is_none());
    let opened = open_pt(&fs, ino, &kernel).await;
    assert_eq!(w.calls().0, stats + 1);
    close(&fs, opened);
    assert_eq!(fs.kept_backings(), 0, "unpinned: not kept");
    let opened = open_pt(&fs, ino, &kernel).await;
    assert_eq!(w.calls().0, stats + 2, "unpinned: a stat per open");
    fs.release(opened.fh);

    // With no TTL nothing is trusted, pinned or not.
    let fs0 = GranaryFs::new(
        w.clone(),
        FsConfig {
            attr_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    w.pin("/t.bin");
    let ino = fs0.lookup(1, "t.bin").await.unwrap().ino;
    let stats = w.calls().0;
    for _ in 0..2 {
        let opened = fs0
            .open_passthrough(ino, false, 0, kernel.register())
            .await
            .unwrap();
        fs0.release(opened.fh);
    }
    assert_eq!(w.calls().0, stats + 2);
    assert_eq!(fs0.kept_backings(), 0);
}

#[tokio::test]
async fn a_pinned_entry_is_trusted_while_the_pins_epoch_holds() {
    let dir = TempDir::new("epoch");
    let w = Arc::new(FakeWorker::default());
    *w.epoch.lock().unwrap() = Some(7);
    let ttl = Duration::from_millis(300);
    let hour = Duration::from_secs(3600);
    let fs = fs(
        w.clone(),
        FsConfig {
            attr_ttl: ttl,
            pinned_ttl: hour,
            ..FsConfig::default()
        },
    );
    let kernel = FakeKernel::default();
    assert!(fs.check_pins().await.is_empty(), "nothing trusted before");
    let (ino, bytes) = pinned_file(&fs, &w, &dir, "e.bin", 1000).await;
    w.put("/plain.bin", data(10, 1), "x");
    let plain = fs.lookup(1, "plain.bin").await.unwrap();
    assert_eq!(
        fs.getattr_now(ino).unwrap().ttl,
        hour,
        "the kernel keeps it"
    );
    assert_eq!(plain.ttl, ttl, "an unpinned entry: the attribute TTL");
    let opened = open_pt(&fs, ino, &kernel).await;
    close(&fs, opened);

    // Past the attribute TTL, with the epoch unchanged: opens, attributes and the kept
    // registration need nothing from the worker but the epoch.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert!(fs.check_pins().await.is_empty());
    fs.expire_kept_backings();
    assert_eq!(fs.kept_backings(), 1, "kept while the epoch holds");
    let calls = w.calls();
    let again = fs
        .open_now(ino, false, 0, kernel.register())
        .expect("still trusted")
        .unwrap();
    assert!(again.is_passthrough());
    close(&fs, again);
    assert_eq!(w.calls(), calls, "0 calls to the worker");
    assert_eq!(kernel.registered.load(Ordering::SeqCst), 1);
    assert!(fs.getattr_now(ino).is_some());
    assert!(
        fs.getattr_now(plain.ino).is_none(),
        "an unpinned entry expired"
    );

    // The pins change: the entry is named for the kernel to drop, and trusted no more.
    w.unpin("/e.bin");
    *w.epoch.lock().unwrap() = Some(8);
    let stale = fs.check_pins().await;
    assert_eq!(
        stale,
        vec![KernelEntry {
            ino,
            parent: Some(1),
            name: "e.bin".into()
        }]
    );
    // Named once more at the next check (a lookup answered under epoch 7 may reach the kernel
    // after the first invalidation), then no more.
    assert_eq!(fs.check_pins().await, stale);
    assert!(fs.check_pins().await.is_empty());
    assert_eq!(fs.kept_backings(), 0, "kept registrations go");
    assert!(!kernel.last_alive());
    assert!(fs.open_now(ino, false, 0, kernel.register()).is_none());
    assert!(fs.getattr_now(ino).is_none());
    let opened = open_pt(&fs, ino, &kernel).await;
    assert_eq!(w.calls().0, calls.0 + 1, "asked the worker");
    assert_eq!(fs.read(opened.fh, 0, 10).await.unwrap()[..], bytes[..10]);
    close(&fs, opened);
    assert_eq!(fs.getattr_now(ino).unwrap().ttl, ttl, "unpinned now");

    // Pinned again; then the worker stops answering: trust ends at the first check one
    // attribute TTL after its last answer, the one that names the entries for the kernel.
    w.pin("/e.bin");
    assert_eq!(
        fs.getattr(ino).await.unwrap().ttl,
        ttl,
        "seen in the old epoch"
    );
    *w.epoch.lock().unwrap() = Some(9);
    assert!(fs.check_pins().await.is_empty(), "nothing was trusted in 8");
    assert_eq!(fs.lookup(1, "e.bin").await.unwrap().ttl, hour);
    w.epoch_down.store(true, Ordering::SeqCst);
    assert!(fs.check_pins().await.is_empty(), "within the TTL");
    assert!(fs.getattr_now(ino).is_some());
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert!(fs.getattr_now(ino).is_some(), "until that check");
    assert_eq!(fs.check_pins().await.len(), 1, "lapsed");
    assert_eq!(fs.check_pins().await.len(), 1, "named once more");
    assert!(fs.getattr_now(ino).is_none());

    // An entry the kernel was told to keep under an epoch, then had again without it (from a
    // listing asked for while no epoch was trusted), is still named when that epoch ends: the
    // kernel keeps it whatever the client had of it since.
    let listing = fs.opendir(1).await.unwrap();
    w.epoch_down.store(false, Ordering::SeqCst);
    assert!(fs.check_pins().await.is_empty());
    assert_eq!(fs.lookup(1, "e.bin").await.unwrap().ttl, hour);
    let mut listed = Vec::new();
    fs.readdir(1, listing, 0, true, |item| {
        listed.push((item.name.clone(), item.attr.ttl));
        true
    })
    .unwrap();
    assert!(listed.contains(&("e.bin".to_string(), ttl)), "{listed:?}");
    *w.epoch.lock().unwrap() = Some(10);
    assert_eq!(
        fs.check_pins()
            .await
            .iter()
            .map(|e| e.ino)
            .collect::<Vec<_>>(),
        vec![ino]
    );
    assert_eq!(fs.check_pins().await.len(), 1, "named once more");

    // A worker that does not track its pins: the attribute TTL, as before.
    w.epoch_down.store(false, Ordering::SeqCst);
    *w.epoch.lock().unwrap() = None;
    assert!(fs.check_pins().await.is_empty());
    assert_eq!(fs.lookup(1, "e.bin").await.unwrap().ttl, ttl);
}

#[tokio::test]
async fn a_kept_registration_never_serves_another_version() {
    let dir = TempDir::new("kept-version");
    let w = Arc::new(FakeWorker::default());
    let fs = fs(w.clone(), FsConfig::default());
    let kernel = FakeKernel::default();
    let (ino, _) = pinned_file(&fs, &w, &dir, "k.bin", 1000).await;
    let opened = open_pt(&fs, ino, &kernel).await;
    close(&fs, opened);
    assert_eq!(fs.kept_backings(), 1);

    // Pinned again at a new version (same size) with no copy here yet; a lookup shows it.
    let v2 = data(1000, 99);
    w.put("/k.bin", v2.clone(), "p2");
    assert_eq!(fs.lookup(1, "k.bin").await.unwrap().ino, ino);
    let opened = open_pt(&fs, ino, &kernel).await;
    assert!(!opened.is_passthrough(), "v1's copy is not v2");
    assert!(!kernel.last_alive(), "v1's registration is dropped");
    assert_eq!(fs.kept_backings(), 0);
    assert_eq!(fs.read(opened.fh, 0, 8).await.unwrap()[..], v2[..8]);
    fs.release(opened.fh);
}

#[tokio::test]
async fn a_kept_registration_goes_once_its_copy_is_dropped_or_replaced() {
    let dir = TempDir::new("kept-dropped");
    let w = Arc::new(FakeWorker::default());
    let fs = fs(w.clone(), FsConfig::default());
    let kernel = FakeKernel::default();
    let (ino, bytes) = pinned_file(&fs, &w, &dir, "d.bin", 3000).await;
    let open_close = |expect_passthrough: bool| {
        let fs = &fs;
        let kernel = &kernel;
        async move {
            let opened = open_pt(fs, ino, kernel).await;
            assert_eq!(opened.is_passthrough(), expect_passthrough);
            close(fs, opened);
        }
    };
    open_close(true).await;
    assert_eq!(fs.kept_backings(), 1);

    // The worker repairs the copy (a new file renamed over it): asked again, registered again.
    let copies = w.calls().1;
    std::fs::write(dir.0.join("d.tmp"), &bytes).unwrap();
    std::fs::rename(dir.0.join("d.tmp"), dir.0.join("d.bin")).unwrap();
    assert!(fs.open_now(ino, false, 0, kernel.register()).is_none());
    open_close(true).await;
    assert_eq!(w.calls().1, copies + 1);
    assert_eq!(kernel.registered.load(Ordering::SeqCst), 2);
    assert_eq!(fs.kept_backings(), 1);

    // The dataset is unpinned and its files freed: the kept registration is not used for the
    // next open (the worker is asked, has none: userspace) and is let go.
    std::fs::remove_file(dir.0.join("d.bin")).unwrap();
    w.local.lock().unwrap().clear();
    assert!(fs.open_now(ino, false, 0, kernel.register()).is_none());
    assert!(kernel.last_alive());
    open_close(false).await;
    assert_eq!(w.calls().1, copies + 2);
    assert!(!kernel.last_alive());
    assert_eq!(fs.kept_backings(), 0);
}
