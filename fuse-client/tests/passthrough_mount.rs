//! FUSE passthrough through a real kernel mount (run as root, as the whole suite is): a small
//! fake worker whose files are real temp files and which names a local copy for some of them.
//! A file with a matching copy is read by the kernel from the copy (no read request reaches
//! Granary); a file without one, or with a copy of the wrong size, is read through userspace;
//! every byte is right either way.

use granary_core::metrics as m;
use granary_core::{BlockSize, ObjectId};
use granary_fuse_client::{FsConfig, GranaryFs, Mounted, mount};
use granary_proto::{ApiError, Block, CacheApi, Entry, EntryKind, Info, ObjectRef};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const BS: u64 = 4 << 20;

// ---- a process-wide counter recorder (the adapter records on runtime threads) ----

#[derive(Default)]
struct Counters(Mutex<HashMap<Key, Arc<AtomicU64>>>);

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut map = self.0.lock().unwrap();
        Counter::from_arc(map.entry(key.clone()).or_default().clone())
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn counters() -> &'static Counters {
    static C: OnceLock<&'static Counters> = OnceLock::new();
    C.get_or_init(|| {
        let c: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(c).expect("the only recorder");
        c
    })
}

/// Sum of a counter over the label sets that contain every label in `labels`.
fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    counters()
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.name() == name)
        .filter(|(k, _)| {
            labels
                .iter()
                .all(|(n, v)| k.labels().any(|l| l.key() == *n && l.value() == *v))
        })
        .map(|(_, c)| c.load(Ordering::Relaxed))
        .sum()
}

fn fuse_reads() -> u64 {
    counter(m::FUSE_OPS, &[("op", "read")])
}

fn passthrough_opens() -> u64 {
    counter(m::FUSE_PASSTHROUGH_OPENS, &[])
}

// ---- a worker whose files are real files ----

struct Source {
    file: PathBuf,
    size: u64,
    etag: String,
    /// What `local_copy` answers for this file's version.
    local: Option<PathBuf>,
    /// Answered as a pinned dataset's file.
    pinned: bool,
}

#[derive(Default)]
struct FileWorker {
    files: Mutex<BTreeMap<String, Source>>,
    /// Block reads by object key.
    block_reads: Mutex<HashMap<String, u64>>,
    /// stat and local_copy calls.
    calls: AtomicU64,
    /// The pins epoch it gives (`None`: not tracked).
    epoch: Mutex<Option<u64>>,
}

impl FileWorker {
    fn add(&self, name: &str, file: &Path, local: Option<&Path>) {
        let size = std::fs::metadata(file).unwrap().len();
        self.files.lock().unwrap().insert(
            name.to_string(),
            Source {
                file: file.to_path_buf(),
                size,
                etag: "v1".into(),
                local: local.map(Path::to_path_buf),
                pinned: false,
            },
        );
    }

    fn pin(&self, name: &str) {
        self.files.lock().unwrap().get_mut(name).unwrap().pinned = true;
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The object gets a new version (same bytes) and the worker a new answer for it.
    fn change(&self, name: &str, etag: &str, local: Option<&Path>) {
        let mut files = self.files.lock().unwrap();
        let source = files.get_mut(name).unwrap();
        source.etag = etag.to_string();
        source.local = local.map(Path::to_path_buf);
    }

    fn block_reads(&self, name: &str) -> u64 {
        self.block_reads
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    fn entry(name: &str, source: &Source) -> Entry {
        let size = source.size;
        Entry {
            name: name.to_string(),
            kind: EntryKind::File,
            size,
            mtime_ns: 0,
            object: Some(ObjectRef {
                mount: 0,
                id: ObjectId {
                    backend: "test".into(),
                    key: name.to_string(),
                    size,
                    etag: Some(source.etag.clone()),
                    version: None,
                    mtime_ns: 0,
                },
            }),
            pinned: source.pinned,
            owner: None,
        }
    }
}

impl CacheApi for FileWorker {
    fn info(&self) -> Info {
        Info {
            node_id: "test".into(),
            block_size: BlockSize::new(BS).unwrap(),
            memory_capacity: 0,
            disk_capacity: 0,
            stats: Default::default(),
        }
    }

    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if path == "/" {
            return Ok(Entry {
                name: String::new(),
                kind: EntryKind::Dir,
                size: 0,
                mtime_ns: 0,
                object: None,
                pinned: false,
                owner: None,
            });
        }
        let name = path.trim_start_matches('/');
        let files = self.files.lock().unwrap();
        let source = files
            .get(name)
            .ok_or_else(|| ApiError::NotFound(path.into()))?;
        Ok(Self::entry(name, source))
    }

    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        if path != "/" {
            return Err(ApiError::NotFound(path.into()));
        }
        let files = self.files.lock().unwrap();
        Ok(Arc::new(
            files.iter().map(|(name, s)| Self::entry(name, s)).collect(),
        ))
    }

    async fn read_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        *self
            .block_reads
            .lock()
            .unwrap()
            .entry(object.id.key.clone())
            .or_default() += 1;
        let path = {
            let files = self.files.lock().unwrap();
            let source = files
                .get(&object.id.key)
                .ok_or_else(|| ApiError::NotFound(object.id.key.clone()))?;
            if object.id.etag.as_ref() != Some(&source.etag) {
                return Err(ApiError::Stale(object.id.key.clone()));
            }
            source.file.clone()
        };
        let range = BlockSize::new(BS).unwrap().range(index, object.id.size);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        std::fs::File::open(&path)
            .and_then(|f| f.read_exact_at(&mut buf, range.start))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(Block::new(buf.into()))
    }

    async fn pins_epoch(&self) -> Result<Option<u64>, ApiError> {
        Ok(*self.epoch.lock().unwrap())
    }

    async fn local_copy(&self, object: &ObjectRef) -> Result<Option<PathBuf>, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let files = self.files.lock().unwrap();
        Ok(files
            .get(&object.id.key)
            .filter(|s| object.id.etag.as_ref() == Some(&s.etag))
            .and_then(|s| s.local.clone()))
    }
}

// ---- helpers ----

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("granary-passthrough-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unmounts when dropped, also when the test fails (lazily if still busy).
struct MountGuard(Option<Mounted>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(mounted) = self.0.take() {
            let dir = mounted.dir().to_path_buf();
            if let Err(e) = mounted.unmount() {
                eprintln!("unmounting {}: {e}", dir.display());
                let _ = Command::new("umount").arg("-l").arg(&dir).status();
            }
        }
    }
}

fn write_pattern(path: &Path, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect();
    std::fs::write(path, data).unwrap();
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// sha256 of a file read through a read-only shared mapping (Python's mmap).
fn sha256_mmap(path: &Path) -> String {
    let script = "import hashlib, mmap, sys\n\
                  f = open(sys.argv[1], 'rb')\n\
                  m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n\
                  print(hashlib.sha256(m[:]).hexdigest())";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mmap {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs blocking file work off the runtime (the mount is served by this runtime).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// The tests here read process-wide counters: one at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn mount_over(
    worker: Arc<FileWorker>,
    config: FsConfig,
    mnt: &Path,
) -> (Arc<GranaryFs<FileWorker>>, MountGuard) {
    let fs = Arc::new(GranaryFs::new(worker, config));
    let mounted = mount(fs.clone(), mnt, "granary-passthrough-test").expect("mount");
    (fs, MountGuard(Some(mounted)))
}

/// Waits until the kernel has released every handle of `ino` (release is asynchronous).
async fn released(fs: &GranaryFs<FileWorker>, ino: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs.passthrough_handles(ino) > 0 {
        assert!(Instant::now() < deadline, "handles of {ino} never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_held_locally_is_read_by_the_kernel_from_its_copy() {
    held_locally(false).await;
}

/// The scheduling policy (`/proc/<tid>/stat` field 41) of each of this process's `fuse-ring-*`
/// threads.
fn ring_thread_policies() -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("fuse-ring-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
        // Fields after the command's closing parenthesis start at field 3.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = after.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        found.push((comm.to_string(), policy));
    }
    found
}

/// The same over FUSE-over-io_uring (where the kernel has it; else it runs on /dev/fuse again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_held_locally_is_read_by_the_kernel_from_its_copy_over_io_uring() {
    held_locally(true).await;
}

async fn held_locally(io_uring: bool) {
    let _serial = serial().await;
    counters();
    let src = TempDir::new("src");
    let mnt = TempDir::new("mnt");
    // held.bin: its own file is the verified local copy. plain.bin: no copy. wrong.bin: the
    // worker names a copy of the wrong size (and wrong bytes), which must not be used.
    let held = src.path().join("held.bin");
    let plain = src.path().join("plain.bin");
    let wrong = src.path().join("wrong.bin");
    let wrong_copy = src.path().join("wrong-copy.bin");
    write_pattern(&held, (9 << 20) + 123, 1);
    write_pattern(&plain, (5 << 20) + 7, 2);
    write_pattern(&wrong, (3 << 20) + 1, 3);
    write_pattern(&wrong_copy, 3 << 20, 4);
    let worker = Arc::new(FileWorker::default());
    worker.add("held.bin", &held, Some(&held));
    worker.add("plain.bin", &plain, None);
    worker.add("wrong.bin", &wrong, Some(&wrong_copy));
    let (fs, guard) = mount_over(
        worker.clone(),
        FsConfig {
            io_uring,
            ..FsConfig::default()
        },
        mnt.path(),
    );
    let queues = guard.0.as_ref().unwrap().io_uring_queues();
    // Expected whenever the kernel has FUSE over io_uring and we are root (the mount turns the
    // module's parameter on): a mount that failed to turn it on, or to start its rings, fails
    // here rather than passing over /dev/fuse.
    let kernel_has_it = Path::new("/sys/module/fuse/parameters/enable_uring").exists()
        && std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    assert_eq!(
        queues > 0,
        io_uring && kernel_has_it,
        "io_uring asked: {io_uring}, queues: {queues}"
    );
    // Each ring thread runs in SCHED_BATCH (its wake-up does not preempt the opener).
    let policies = ring_thread_policies();
    assert_eq!(policies.len(), queues, "one thread per ring: {policies:?}");
    for (name, policy) in &policies {
        assert_eq!(*policy, libc::SCHED_BATCH as u32, "{name}'s policy");
    }

    // The held file: read by the kernel from the copy, none of it through Granary.
    let (reads, opens) = (fuse_reads(), passthrough_opens());
    let through = mnt.path().join("held.bin");
    assert_eq!(
        sha256(&through),
        sha256(&held),
        "held.bin through the mount"
    );
    let bytes = blocking({
        let through = through.clone();
        move || std::fs::read(through).unwrap()
    })
    .await;
    assert_eq!(bytes, std::fs::read(&held).unwrap());
    assert_eq!(
        passthrough_opens() - opens,
        2,
        "both opens went through passthrough"
    );
    assert_eq!(fuse_reads() - reads, 0, "no FUSE read request for held.bin");
    assert_eq!(
        worker.block_reads("held.bin"),
        0,
        "no block read for held.bin"
    );
    // mmap of a passthrough file maps the copy.
    assert_eq!(sha256_mmap(&through), sha256(&held), "mmap of held.bin");
    assert_eq!(fuse_reads() - reads, 0);
    assert_eq!(worker.block_reads("held.bin"), 0);

    // Two handles at once share the inode's one backing file; random preads through both are
    // right.
    let ino = std::fs::metadata(&through).unwrap().ino();
    let (reads, opens) = (fuse_reads(), passthrough_opens());
    let ok = blocking({
        let (through, held) = (through.clone(), held.clone());
        move || {
            let a = std::fs::File::open(&through).unwrap();
            let b = std::fs::File::open(&through).unwrap();
            let reference = std::fs::File::open(&held).unwrap();
            for (i, offset) in [0u64, 4 << 20, (9 << 20) + 100, 12345]
                .into_iter()
                .enumerate()
            {
                let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
                let file = if i % 2 == 0 { &a } else { &b };
                let n = file.read_at(&mut x, offset).unwrap();
                let k = reference.read_at(&mut y, offset).unwrap();
                if n != k || x[..n] != y[..k] {
                    return false;
                }
            }
            true
        }
    })
    .await;
    assert!(ok, "preads through two passthrough handles");
    assert_eq!(passthrough_opens() - opens, 2);
    assert_eq!(fuse_reads() - reads, 0);
    released(&fs, ino).await;

    // The file without a copy reads through userspace.
    let (reads, opens) = (fuse_reads(), passthrough_opens());
    assert_eq!(
        sha256(&mnt.path().join("plain.bin")),
        sha256(&plain),
        "plain.bin through the mount"
    );
    assert!(fuse_reads() > reads, "plain.bin is read through Granary");
    assert_eq!(passthrough_opens(), opens);
    assert!(worker.block_reads("plain.bin") > 0);

    // A copy of the wrong size is not used: userspace, right bytes.
    let (reads, opens) = (fuse_reads(), passthrough_opens());
    assert_eq!(
        sha256(&mnt.path().join("wrong.bin")),
        sha256(&wrong),
        "wrong.bin through the mount"
    );
    assert!(fuse_reads() > reads, "wrong.bin is read through Granary");
    assert_eq!(
        passthrough_opens(),
        opens,
        "the wrong-size copy is not used"
    );
    assert!(
        fs.passthrough_enabled(),
        "a bad copy does not turn passthrough off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inode_open_in_one_mode_is_opened_again_in_that_mode() {
    let _serial = serial().await;
    counters();
    let src = TempDir::new("modes-src");
    let mnt = TempDir::new("modes-mnt");
    let held = src.path().join("held.bin");
    let plain = src.path().join("plain.bin");
    write_pattern(&held, (2 << 20) + 9, 7);
    write_pattern(&plain, (2 << 20) + 11, 8);
    let worker = Arc::new(FileWorker::default());
    worker.add("held.bin", &held, Some(&held));
    worker.add("plain.bin", &plain, None);
    let (fs, _guard) = mount_over(worker.clone(), FsConfig::default(), mnt.path());
    let (held_mnt, plain_mnt) = (mnt.path().join("held.bin"), mnt.path().join("plain.bin"));

    // plain.bin is open through userspace when a copy appears: the kernel would fail a
    // passthrough open beside it (EIO), so the next open stays in userspace and works.
    let opens = passthrough_opens();
    let first = std::fs::File::open(&plain_mnt).unwrap();
    worker.change("plain.bin", "v1", Some(&plain));
    let same = blocking({
        let (plain_mnt, plain) = (plain_mnt.clone(), plain.clone());
        move || std::fs::read(plain_mnt).unwrap() == std::fs::read(plain).unwrap()
    })
    .await;
    assert!(same, "a second open beside a userspace one reads right");
    assert_eq!(passthrough_opens(), opens);
    drop(first);
    // Release reaches the filesystem asynchronously; until it does, opens stay in userspace.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(sha256(&plain_mnt), sha256(&plain));
        if passthrough_opens() > opens {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy is never used after close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ino = std::fs::metadata(&plain_mnt).unwrap().ino();
    released(&fs, ino).await;

    // held.bin changes while open through passthrough: the kernel allows neither a second
    // backing file nor an ordinary open beside it, so a new open is ESTALE (never the old
    // bytes under the new version, never EIO) until the old handle closes.
    let open = std::fs::File::open(&held_mnt).unwrap();
    worker.change("held.bin", "v2", None);
    let err = std::fs::File::open(&held_mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    let mut buf = vec![0u8; 100];
    open.read_exact_at(&mut buf, 1000).unwrap();
    drop(open);
    let ino = std::fs::metadata(&held_mnt).unwrap().ino();
    released(&fs, ino).await;
    let (reads, opens) = (fuse_reads(), passthrough_opens());
    assert_eq!(sha256(&held_mnt), sha256(&held));
    assert!(
        fuse_reads() > reads,
        "v2 has no copy: read through userspace"
    );
    assert_eq!(passthrough_opens(), opens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_pinned_file_reopens_without_asking_the_worker() {
    let _serial = serial().await;
    counters();
    let src = TempDir::new("pinned-src");
    let mnt = TempDir::new("pinned-mnt");
    let held = src.path().join("held.bin");
    write_pattern(&held, (1 << 20) + 17, 9);
    let worker = Arc::new(FileWorker::default());
    worker.add("held.bin", &held, Some(&held));
    worker.pin("held.bin");
    let (fs, _guard) = mount_over(worker.clone(), FsConfig::default(), mnt.path());
    let through = mnt.path().join("held.bin");

    // The first open asks the worker where the copy is; the last close keeps its registration.
    assert_eq!(sha256(&through), sha256(&held));
    let ino = std::fs::metadata(&through).unwrap().ino();
    released(&fs, ino).await;
    assert_eq!(fs.kept_backings(), 1);

    // Then: every open passes the kept registration to the kernel again (the kernel takes a
    // registered backing file for an inode whose last file was closed), no call to the worker,
    // no read request, right bytes; close(2) succeeds (flush: ENOSYS, never sent again).
    let (calls, reads, opens) = (worker.calls(), fuse_reads(), passthrough_opens());
    // os.close raises if close(2) fails.
    let script = "import hashlib, os, sys\n\
                  want = hashlib.sha256(open(sys.argv[2], 'rb').read()).hexdigest()\n\
                  for _ in range(20):\n\
                  \x20   fd = os.open(sys.argv[1], os.O_RDONLY)\n\
                  \x20   data = b''\n\
                  \x20   while chunk := os.read(fd, 1 << 20): data += chunk\n\
                  \x20   os.close(fd)\n\
                  \x20   assert hashlib.sha256(data).hexdigest() == want\n\
                  print('ok')";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&through)
        .arg(&held)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "20 opens of the pinned file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(passthrough_opens() - opens, 20);
    assert_eq!(fuse_reads(), reads);
    assert_eq!(worker.calls(), calls, "no call to the worker");
    released(&fs, ino).await;
    assert_eq!(fs.kept_backings(), 1);
    assert_eq!(
        sha256_mmap(&through),
        sha256(&held),
        "mmap of the pinned file"
    );
    assert_eq!(fuse_reads(), reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_entry_outlives_the_attribute_ttl_until_the_pins_change() {
    pinned_epoch(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_entry_outlives_the_attribute_ttl_until_the_pins_change_over_io_uring() {
    pinned_epoch(true).await;
}

/// Opens of a pinned file past the attribute TTL ask the worker nothing while its pins epoch
/// holds (the kernel keeps the entry); when the epoch changes, the mount tells the kernel, and
/// the next stat and read see the new version.
async fn pinned_epoch(io_uring: bool) {
    let _serial = serial().await;
    counters();
    let src = TempDir::new("epoch-src");
    let mnt = TempDir::new("epoch-mnt");
    let v1 = src.path().join("v1.bin");
    let v2 = src.path().join("v2.bin");
    write_pattern(&v1, (1 << 20) + 5, 21);
    write_pattern(&v2, (2 << 20) + 9, 22);
    let worker = Arc::new(FileWorker::default());
    worker.add("data.bin", &v1, Some(&v1));
    worker.pin("data.bin");
    *worker.epoch.lock().unwrap() = Some(1);
    let attr_ttl = Duration::from_secs(1);
    let config = FsConfig {
        attr_ttl,
        pinned_ttl: Duration::from_secs(3600),
        io_uring,
        ..FsConfig::default()
    };
    let (fs, _guard) = mount_over(worker.clone(), config, mnt.path());
    // The mount polls the epoch once a second; have it known before the first lookup.
    assert!(fs.check_pins().await.is_empty());
    let through = mnt.path().join("data.bin");
    assert_eq!(sha256(&through), sha256(&v1));
    let ino = std::fs::metadata(&through).unwrap().ino();
    released(&fs, ino).await;

    // Well past the attribute TTL: no lookup, no open, no stat reaches the worker.
    tokio::time::sleep(2 * attr_ttl + Duration::from_millis(500)).await;
    let calls = worker.calls();
    for _ in 0..5 {
        assert_eq!(sha256(&through), sha256(&v1));
    }
    assert_eq!(std::fs::metadata(&through).unwrap().len(), (1 << 20) + 5);
    assert_eq!(worker.calls(), calls, "the pinned entry is trusted");

    // The object changes but the pins do not (a pin's manifest is frozen): still v1.
    worker.add("data.bin", &v2, Some(&v2));
    worker.change("data.bin", "v2", Some(&v2));
    worker.pin("data.bin");
    tokio::time::sleep(2 * attr_ttl).await;
    assert_eq!(std::fs::metadata(&through).unwrap().len(), (1 << 20) + 5);
    assert_eq!(sha256(&through), sha256(&v1));

    // The pins change: within a poll or two the kernel has dropped the entry; stat and
    // read show v2.
    let invalidated = counter(m::FUSE_KERNEL_INVALIDATIONS, &[]);
    *worker.epoch.lock().unwrap() = Some(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&through).unwrap().len() != (2 << 20) + 9 {
        assert!(Instant::now() < deadline, "the kernel still shows v1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sha256(&through), sha256(&v2));
    assert!(worker.calls() > calls, "asked the worker again");
    assert!(counter(m::FUSE_KERNEL_INVALIDATIONS, &[]) > invalidated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_off_reads_everything_through_userspace() {
    let _serial = serial().await;
    counters();
    let src = TempDir::new("off-src");
    let mnt = TempDir::new("off-mnt");
    let held = src.path().join("held.bin");
    write_pattern(&held, (2 << 20) + 5, 5);
    let worker = Arc::new(FileWorker::default());
    worker.add("held.bin", &held, Some(&held));
    let config = FsConfig {
        passthrough: false,
        ..FsConfig::default()
    };
    let (_fs, _guard) = mount_over(worker.clone(), config, mnt.path());
    let (reads, opens) = (fuse_reads(), passthrough_opens());
    assert_eq!(sha256(&mnt.path().join("held.bin")), sha256(&held));
    assert!(fuse_reads() > reads);
    assert_eq!(passthrough_opens(), opens);
    assert!(worker.block_reads("held.bin") > 0);
}

/// Hot sequential read throughput, passthrough against the userspace path, for a 256 MiB file
/// (release build: `cargo test --release -p granary-fuse-client --test passthrough_mount --
/// --ignored --nocapture`). Prints figures; asserts only that bytes are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn measure_passthrough_against_userspace() {
    let _serial = serial().await;
    counters();
    let src = TempDir::new("measure-src");
    let mnt = TempDir::new("measure-mnt");
    let held = src.path().join("held.bin");
    let plain = src.path().join("plain.bin");
    write_pattern(&held, 256 << 20, 6);
    std::fs::copy(&held, &plain).unwrap();
    let worker = Arc::new(FileWorker::default());
    worker.add("held.bin", &held, Some(&held));
    worker.add("plain.bin", &plain, None);
    let (_fs, _guard) = mount_over(worker, FsConfig::default(), mnt.path());
    let dd = |path: &Path, extra: &[&str]| -> String {
        let out = Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["of=/dev/null", "bs=1M"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        text.lines().last().unwrap_or_default().to_string()
    };
    let drop_pages = |path: &Path| {
        Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["iflag=nocache", "count=0"])
            .output()
            .unwrap();
    };
    let (held_mnt, plain_mnt) = (mnt.path().join("held.bin"), mnt.path().join("plain.bin"));
    let results = blocking(move || {
        // Warm the source files' page cache (the backing file and what the fake worker reads).
        dd(&held, &[]);
        dd(&plain, &[]);
        let native = dd(&held, &[]);
        dd(&held_mnt, &[]);
        let passthrough = dd(&held_mnt, &[]);
        dd(&plain_mnt, &[]);
        let kept = dd(&plain_mnt, &[]);
        drop_pages(&plain_mnt);
        let userspace = dd(&plain_mnt, &[]);
        vec![
            ("native file, hot", native),
            ("passthrough, backing file hot", passthrough),
            ("userspace, FUSE page cache hot (FOPEN_KEEP_CACHE)", kept),
            ("userspace, FUSE page cache dropped, source hot", userspace),
        ]
    })
    .await;
    for (what, line) in results {
        println!("{what:55} {line}");
    }
    assert_eq!(
        sha256(&mnt.path().join("held.bin")),
        sha256(&src.path().join("held.bin"))
    );
}
