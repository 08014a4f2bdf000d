//! The dataset store: pinned datasets' files kept whole on this node's disk, apart from the
//! evictable block cache, and the loader that fills it.
//!
//! Layout under `<cache dir>/datasets/`:
//!
//! ```text
//! pins/<name>.json          pins, when the worker has no etcd (else they live in etcd)
//! <name>/files/<path>       a loaded file, exactly the manifest's version, whole
//! <name>/files/.<file>.loading         a file being loaded (blocks land in any order)
//! <name>/files/.<file>.loading.crcs    its journal: the version, then `<block> <crc>` per block written
//! <name>/index.jsonl        one line per loaded (or dropped) file: size, version, block CRCs
//! ```
//!
//! A file enters the index only after all its bytes are written and it is renamed into place;
//! files that complete together are appended in one write. The index is made durable behind
//! the loads, not in their way: every couple of seconds a dataset with new lines gets one
//! `syncfs` of the store's filesystem and then a checkpoint line `{"durable_bytes": N}`, synced,
//! saying that every line in the index's first N bytes names a file whose bytes were on disk.
//! When the store is opened again, lines past the last checkpoint (what completed in the seconds
//! before a crash) are believed only after their files are re-read against their CRCs. So after
//! a crash or restart the index names exactly the files that are complete; anything else under
//! `files/` is a leftover and is loaded again, resuming after the blocks its journal names (each
//! re-checked against its CRC). Every block served from the store is checked against its CRC; a
//! damaged file is dropped and loaded again.
//!
//! Each worker runs [`Datasets::run`]: every second, and at once when a pin changes (an etcd
//! watch, or this worker's own API) or a load ends, it reads the pins, drops what is no longer
//! pinned here, lapses expired pins, loads its share of every pin being loaded (each file on
//! `replicas` nodes of the pin's set by rendezvous hashing of its path; the first holder fetches
//! it from the backend in block-size ranged GETs, the others copy it from that holder over QUIC),
//! carries out verification requests, and reports its progress to the registry.
//!
//! A load keeps `load_concurrency` block reads in flight across the dataset's files (the blocks
//! of a large file are fetched in parallel; small files many at a time); each block is
//! checksummed and written at its offset on a blocking thread, with `O_DIRECT` from a small pool
//! of aligned buffers where the filesystem allows it: loading a dataset neither pays for copying
//! every byte into the page cache nor evicts the pages a running job reads from it. A file that
//! keeps failing is retried with exponential backoff (2 s doubling to 5 min), its reason shown in
//! `status`.

use crate::config::DatasetSettings;
use crate::registry::{Pin, Registry};
use bytes::Bytes;
use granary_core::BlockSize;
use granary_core::dataset::{LoadState, ManifestFile, NodeProgress, holders, share};
use granary_core::object::{checksum, checksum_append};
use granary_proto::ApiError;
use granary_proto::ObjectRef;
use memmap2::MmapMut;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, Semaphore, mpsc};

/// Files committed to the index with one write, at most.
const COMMIT_BATCH: usize = 256;
/// How often datasets with new index lines are synced and checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// The first retry of a file that failed waits this long; each failure after doubles it.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Files a load works on at once, per block read it may have in flight.
const FILES_PER_READ: usize = 4;
/// Offsets, lengths and buffer addresses of direct writes are multiples of this.
const DIRECT_ALIGN: usize = 4096;

/// One loaded file, as the index records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFile {
    pub path: String,
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    /// CRC32C of each block (the cache's block size) of the file.
    pub crcs: Vec<u32>,
    /// A tombstone: the file was dropped (damaged or unpinned).
    #[serde(default)]
    pub dropped: bool,
}

impl StoredFile {
    fn matches(&self, f: &ManifestFile) -> bool {
        self.size == f.size && self.etag == f.etag && self.version == f.version
    }
}

/// A loaded file, found by the object it is a copy of.
#[derive(Debug, Clone)]
pub struct HeldFile {
    pub dataset: String,
    pub path: PathBuf,
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    pub crcs: Arc<Vec<u32>>,
}

/// How this node fetches what it loads: from the backend, or from a peer that holds it.
pub trait Source: Send + Sync + 'static {
    /// `range` of `object` from its backend (one GET), handed to `sink` piece by piece as it
    /// arrives (the loader puts it straight into an aligned buffer).
    fn backend_range_to(
        &self,
        object: &ObjectRef,
        range: std::ops::Range<u64>,
        sink: &mut (dyn FnMut(&[u8]) + Send),
    ) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Block `index` of `object` from `node`, only if it holds it.
    fn peer_held_block(
        &self,
        node: &str,
        object: &ObjectRef,
        index: u64,
    ) -> impl Future<Output = Result<Bytes, ApiError>> + Send;

    /// Live members' node ids (this node alone without a cluster).
    fn members(&self) -> Vec<String>;
}

pub struct Datasets {
    node_id: String,
    root: PathBuf,
    block_size: BlockSize,
    pub settings: DatasetSettings,
    pub registry: Registry,
    pins: RwLock<Arc<Vec<Pin>>>,
    /// Loaded files by mount, then backend key.
    held: RwLock<HashMap<u32, HashMap<String, Arc<HeldFile>>>>,
    /// Per dataset: loaded files by path.
    indexes: Mutex<HashMap<String, HashMap<String, StoredFile>>>,
    loading: Mutex<HashSet<String>>,
    verified: Mutex<HashMap<String, u64>>,
    repaired: Mutex<HashMap<String, u64>>,
    failures: Mutex<HashMap<String, String>>,
    /// Bytes loaded per dataset since this process started, for the rate.
    loaded_bytes: Mutex<HashMap<String, (Instant, u64, f64)>>,
    /// Files that failed to load, by dataset and path.
    backoff: Mutex<HashMap<String, HashMap<String, Retry>>>,
    /// Wakes the reconcile loop before its next tick.
    wake: Notify,
    /// Datasets with index lines not yet covered by a checkpoint.
    unsynced: Mutex<HashSet<String>>,
    /// This node's share of each pin, by name.
    shares: Mutex<HashMap<String, Arc<Share>>>,
    /// Changes whenever `pins` does (see [`Datasets::pins_epoch`]).
    epoch: AtomicU64,
}

/// The files of a pin one node holds (by rendezvous hashing of their paths over the pin's
/// nodes): computed once per manifest and node set, not on every tick, as a manifest can list
/// millions of files.
struct Share {
    manifest: Arc<Vec<ManifestFile>>,
    nodes: Vec<String>,
    replicas: usize,
    /// Positions in the manifest.
    files: Vec<usize>,
    bytes: u64,
}

impl Share {
    fn of(pin: &Pin, node: &str) -> Share {
        let mut files = Vec::new();
        let mut bytes = 0;
        for (i, f) in pin.manifest.files.iter().enumerate() {
            if holders(&f.path, &pin.nodes, pin.replicas)
                .iter()
                .any(|n| *n == node)
            {
                files.push(i);
                bytes += f.size;
            }
        }
        Share {
            manifest: pin.manifest.files.clone(),
            nodes: pin.nodes.clone(),
            replicas: pin.replicas,
            files,
            bytes,
        }
    }

    fn is_of(&self, pin: &Pin) -> bool {
        Arc::ptr_eq(&self.manifest, &pin.manifest.files)
            && self.nodes == pin.nodes
            && self.replicas == pin.replicas
    }

    /// (files, bytes).
    fn totals(&self) -> (u64, u64) {
        (self.files.len() as u64, self.bytes)
    }

    fn iter(&self) -> impl Iterator<Item = &ManifestFile> {
        self.files.iter().map(|i| &self.manifest[*i])
    }
}

/// The index line saying that each line in the index's first `durable_bytes` bytes names a
/// file whose bytes, and the rename that put it in place, were on disk when it was written.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    durable_bytes: u64,
}

/// Unix seconds now (0 before 1970).
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("{what}: {e}"))
}

impl Datasets {
    /// Opens the store under `root`, reading every dataset's index (what was loaded before a
    /// restart is served at once).
    pub fn open(
        node_id: String,
        root: PathBuf,
        block_size: BlockSize,
        settings: DatasetSettings,
        registry: Registry,
    ) -> Result<Self, ApiError> {
        std::fs::create_dir_all(&root).map_err(|e| internal(root.display(), e))?;
        let mut indexes = HashMap::new();
        let mut unsynced = HashSet::new();
        for entry in std::fs::read_dir(&root).map_err(|e| internal(root.display(), e))? {
            let entry = entry.map_err(|e| internal(root.display(), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let index = entry.path().join("index.jsonl");
            if name == "pins" || !index.exists() {
                continue;
            }
            let (files, checked) = read_index(&index, &entry.path().join("files"), block_size)?;
            if checked > 0 {
                unsynced.insert(name.clone());
            }
            indexes.insert(name, files);
        }
        Ok(Datasets {
            node_id,
            root,
            block_size,
            settings,
            registry,
            pins: RwLock::new(Arc::new(Vec::new())),
            held: RwLock::new(HashMap::new()),
            shares: Mutex::new(HashMap::new()),
            indexes: Mutex::new(indexes),
            loading: Mutex::new(HashSet::new()),
            verified: Mutex::new(HashMap::new()),
            repaired: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            loaded_bytes: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            unsynced: Mutex::new(unsynced),
            // Another process's numbers never match this one's: start from the clock.
            epoch: AtomicU64::new(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
            ),
        })
    }

    /// Has the reconcile loop run now rather than at its next tick (a pin changed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The pins as last read from the registry.
    pub fn pins(&self) -> Arc<Vec<Pin>> {
        self.pins.read().expect("pins").clone()
    }

    /// A number that changes whenever the pins this node answers `stat` and `list` from
    /// change; unique to this process. A client may trust a pinned entry it was given while
    /// this was `e` for as long as it stays `e` (the manifest it came from is frozen).
    pub fn pins_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Reads the pins from the registry now and rebuilds what this node serves from them.
    pub async fn refresh(&self) -> Result<Arc<Vec<Pin>>, ApiError> {
        let pins = self.registry.pins().await?;
        let current = self.pins();
        if *current == pins {
            return Ok(current);
        }
        let pins = Arc::new(pins);
        *self.pins.write().expect("pins") = pins.clone();
        // After the new pins are in place: a client that sees the new epoch and then asks
        // gets an answer from them.
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.shares
            .lock()
            .expect("shares")
            .retain(|name, _| pins.iter().any(|p| p.name == *name));
        self.rebuild_held();
        self.wake();
        Ok(pins)
    }

    fn rebuild_held(&self) {
        let pins = self.pins();
        let indexes = self.indexes.lock().expect("indexes");
        let mut held: HashMap<u32, HashMap<String, Arc<HeldFile>>> = HashMap::new();
        for pin in pins.iter() {
            let Some(index) = indexes.get(&pin.name) else {
                continue;
            };
            for f in pin.manifest.files.iter() {
                if let Some(stored) = index.get(&f.path).filter(|s| s.matches(f)) {
                    held.entry(pin.mount).or_default().insert(
                        pin.key_of(&f.path),
                        Arc::new(HeldFile {
                            dataset: pin.name.clone(),
                            path: self.file_path(&pin.name, &f.path),
                            size: f.size,
                            etag: f.etag.clone(),
                            version: f.version.clone(),
                            crcs: Arc::new(stored.crcs.clone()),
                        }),
                    );
                }
            }
        }
        *self.held.write().expect("held") = held;
    }

    fn file_path(&self, dataset: &str, path: &str) -> PathBuf {
        self.root.join(dataset).join("files").join(path)
    }

    /// The loaded copy of exactly this version of `object`, if this node has one.
    pub fn held(&self, object: &ObjectRef) -> Option<Arc<HeldFile>> {
        let held = self.held.read().expect("held");
        let file = held.get(&object.mount)?.get(object.id.key.as_str())?;
        (file.size == object.id.size
            && file.etag == object.id.etag
            && file.version == object.id.version)
            .then(|| file.clone())
    }

    /// The pin whose manifest lists `object`, with the nodes that hold that file.
    pub fn holders_of(&self, object: &ObjectRef) -> Vec<String> {
        let pins = self.pins();
        for pin in pins.iter().filter(|p| p.mount == object.mount && p.load) {
            let prefix = if pin.root_key.is_empty() {
                String::new()
            } else {
                format!("{}/", pin.root_key.trim_end_matches('/'))
            };
            if let Some(rel) = object.id.key.strip_prefix(&prefix)
                && let Some(f) = pin.manifest.file(rel)
                && f.etag == object.id.etag
                && f.size == object.id.size
            {
                return holders(rel, &pin.nodes, pin.replicas)
                    .into_iter()
                    .cloned()
                    .collect();
            }
        }
        Vec::new()
    }

    /// Block `index` of a held file, checked against its CRC. A damaged block drops the file
    /// (it is loaded again) and answers `None`.
    pub async fn read_block(&self, file: &HeldFile, index: u64) -> Option<Bytes> {
        let range = self.block_size.range(index, file.size);
        let expected = *file.crcs.get(index as usize)?;
        let path = file.path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            f.read_exact_at(&mut buf, range.start)?;
            Ok::<_, std::io::Error>(buf)
        })
        .await
        .ok()?;
        match read {
            Ok(buf) if checksum(&buf) == expected => Some(Bytes::from(buf)),
            Ok(_) => {
                tracing::error!(dataset = %file.dataset, path = %file.path.display(), block = index, "a loaded file failed its checksum; dropping it to load it again");
                metrics::counter!(granary_core::metrics::BLOCK_CHECKSUM_FAILURES).increment(1);
                self.drop_file(&file.dataset, &file.path);
                None
            }
            Err(e) => {
                tracing::warn!(path = %file.path.display(), error = %e, "cannot read a loaded file");
                self.drop_file(&file.dataset, &file.path);
                None
            }
        }
    }

    fn drop_file(&self, dataset: &str, path: &Path) {
        let files = self.root.join(dataset).join("files");
        let Ok(rel) = path.strip_prefix(&files) else {
            return;
        };
        let rel = rel.to_string_lossy().into_owned();
        if let Err(e) = self.record(dataset, vec![tombstone(&rel)]) {
            tracing::warn!(dataset, error = %e, "cannot record a dropped file");
        }
        let _ = std::fs::remove_file(path);
        self.rebuild_held();
    }

    /// Appends `entries` to the dataset's index (one write, synced) and applies them in memory.
    fn record(&self, dataset: &str, entries: Vec<StoredFile>) -> Result<(), ApiError> {
        append_index(&self.root.join(dataset).join("index.jsonl"), &entries, true)?;
        self.apply(dataset, entries);
        Ok(())
    }

    /// Applies index entries already on disk to the in-memory index.
    fn apply(&self, dataset: &str, entries: Vec<StoredFile>) {
        let mut indexes = self.indexes.lock().expect("indexes");
        let index = indexes.entry(dataset.to_string()).or_default();
        for entry in entries {
            if entry.dropped {
                index.remove(&entry.path);
            } else {
                index.insert(entry.path.clone(), entry);
            }
        }
    }

    /// This node's share of `pin`.
    fn share(&self, pin: &Pin) -> Arc<Share> {
        if let Some(share) = self.shares.lock().expect("shares").get(&pin.name)
            && share.is_of(pin)
        {
            return share.clone();
        }
        let share = Arc::new(Share::of(pin, &self.node_id));
        self.shares
            .lock()
            .expect("shares")
            .insert(pin.name.clone(), share.clone());
        share
    }

    /// This node's files of `pin` still to load now: neither loaded nor waiting out a retry
    /// backoff.
    fn due(&self, pin: &Pin) -> Vec<ManifestFile> {
        let share = self.share(pin);
        let now = Instant::now();
        let indexes = self.indexes.lock().expect("indexes");
        let index = indexes.get(&pin.name);
        let backoff = self.backoff.lock().expect("backoff");
        let waiting = backoff.get(&pin.name);
        share
            .iter()
            .filter(|f| {
                !index
                    .and_then(|i| i.get(&f.path))
                    .is_some_and(|s| s.matches(f))
            })
            .filter(|f| {
                waiting
                    .and_then(|w| w.get(&f.path))
                    .is_none_or(|r| r.at <= now)
            })
            .cloned()
            .collect()
    }

    /// Bytes of `pin` this node holds, verified: (files, bytes).
    fn present(&self, pin: &Pin) -> (u64, u64) {
        let share = self.share(pin);
        let indexes = self.indexes.lock().expect("indexes");
        let Some(index) = indexes.get(&pin.name) else {
            return (0, 0);
        };
        share
            .iter()
            .filter(|f| index.get(&f.path).is_some_and(|s| s.matches(f)))
            .fold((0, 0), |(n, b), f| (n + 1, b + f.size))
    }

    /// Bytes this node's store holds or is to hold for all pins but `except`.
    pub fn committed(&self, pins: &[Pin], node: &str, except: &str) -> u64 {
        pins.iter()
            .filter(|p| p.name != except && p.nodes.iter().any(|n| n == node))
            .map(|p| share(&p.manifest, &p.nodes, p.replicas, node).1)
            .sum()
    }

    /// This node's report on `pin`.
    pub fn progress(&self, pin: &Pin) -> NodeProgress {
        let (files_total, bytes_total) = self.share(pin).totals();
        let (files_ready, bytes_ready) = self.present(pin);
        let failure = self
            .failures
            .lock()
            .expect("failures")
            .get(&pin.name)
            .cloned()
            .or_else(|| self.backoff_reason(&pin.name));
        let loading = self.loading.lock().expect("loading").contains(&pin.name);
        let state = if !pin.load {
            LoadState::Pending
        } else if bytes_ready >= bytes_total && files_ready >= files_total {
            LoadState::Ready
        } else if failure.is_some() && !loading {
            LoadState::Failed
        } else {
            LoadState::Loading
        };
        metrics::gauge!(granary_core::metrics::DATASET_READY_BYTES, "dataset" => pin.name.clone())
            .set(bytes_ready as f64);
        metrics::gauge!(granary_core::metrics::DATASET_WANTED_BYTES, "dataset" => pin.name.clone())
            .set(bytes_total as f64);
        let rate = self
            .loaded_bytes
            .lock()
            .expect("rates")
            .get(&pin.name)
            .map_or(0.0, |r| r.2);
        NodeProgress {
            node: self.node_id.clone(),
            state,
            files_total,
            files_ready,
            bytes_total,
            bytes_ready,
            rate: if state == LoadState::Loading {
                rate
            } else {
                0.0
            },
            reason: if state == LoadState::Ready {
                String::new()
            } else {
                failure.unwrap_or_default()
            },
            updated: now_secs(),
            verified_seq: self
                .verified
                .lock()
                .expect("verified")
                .get(&pin.name)
                .copied()
                .unwrap_or(0),
            repaired: self
                .repaired
                .lock()
                .expect("repaired")
                .get(&pin.name)
                .copied()
                .unwrap_or(0),
        }
    }

    /// Re-reads every file this node holds of `pin` and drops those whose bytes do not match
    /// their checksums. Returns how many were dropped.
    pub async fn verify(&self, pin: &Pin) -> u64 {
        let stored: Vec<StoredFile> = self
            .indexes
            .lock()
            .expect("indexes")
            .get(&pin.name)
            .map(|i| i.values().cloned().collect())
            .unwrap_or_default();
        let mut bad = 0;
        for file in stored {
            let path = self.file_path(&pin.name, &file.path);
            let bs = self.block_size;
            let check = file.clone();
            let ok = tokio::task::spawn_blocking(move || verify_file(&path, &check, bs))
                .await
                .unwrap_or(false);
            if !ok {
                tracing::error!(dataset = %pin.name, path = %file.path, "verification found a damaged file; dropping it to load it again");
                self.drop_file(&pin.name, &self.file_path(&pin.name, &file.path));
                bad += 1;
            }
        }
        *self
            .repaired
            .lock()
            .expect("repaired")
            .entry(pin.name.clone())
            .or_default() += bad;
        bad
    }

    /// Starts the reconcile loop ([`Datasets::run`]) on a runtime of its own, of
    /// `settings.load_threads` threads named `granary-load`, which runs until the process ends.
    /// Loads are bulk work: apart, they do not delay the reads the main runtime serves. And a
    /// load is one task whose GETs' connections are tasks too: on one thread they wake each
    /// other without waking and stealing across threads (on 2 CPUs beside the backend: 1.4-1.8
    /// CPU-seconds a 1.27 GiB load instead of 1.8-2.0, 21,000 context switches instead of
    /// 31,000).
    ///
    /// The runtime's blocking threads (file creates, writes, renames, checks) are at most
    /// `load_concurrency`: as many writes as blocks in flight, never one thread per block fetched
    /// and not yet written.
    pub fn start<S: Source>(self: Arc<Self>, source: Arc<S>) -> std::io::Result<()> {
        let threads = self.settings.load_threads;
        let mut builder = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        let runtime = builder
            .thread_name("granary-load")
            .max_blocking_threads(self.settings.load_concurrency)
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("granary-load".into())
            .spawn(move || runtime.block_on(self.run(source)))?;
        Ok(())
    }

    /// The reconcile loop (see the module docs); runs until the process ends.
    pub async fn run<S: Source>(self: Arc<Self>, source: Arc<S>) {
        if self.registry.shared() {
            let me = self.clone();
            tokio::spawn(async move { me.registry.watch_pins(|| me.wake()).await });
        }
        tokio::spawn(self.clone().checkpoints());
        let mut last_report: HashMap<String, (NodeProgress, Instant)> = HashMap::new();
        loop {
            if let Err(e) = self.reconcile(&source, &mut last_report).await {
                tracing::warn!(error = %e, "dataset reconcile failed; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    async fn reconcile<S: Source>(
        self: &Arc<Self>,
        source: &Arc<S>,
        last_report: &mut HashMap<String, (NodeProgress, Instant)>,
    ) -> Result<(), ApiError> {
        let pins = self.refresh().await?;
        let now = now_secs();
        for pin in pins.iter().filter(|p| p.expired(now)) {
            tracing::info!(dataset = %pin.name, tenant = %pin.tenant, "pin expired; unpinning");
            self.registry.remove(&pin.name).await?;
        }
        // Drop what is no longer pinned here: indexed datasets, and dataset directories of loads
        // that never completed a file.
        let mine: HashSet<&str> = pins
            .iter()
            .filter(|p| !p.expired(now) && p.nodes.iter().any(|n| *n == self.node_id))
            .map(|p| p.name.as_str())
            .collect();
        let mut stale: HashSet<String> = self
            .indexes
            .lock()
            .expect("indexes")
            .keys()
            .filter(|n| !mine.contains(n.as_str()))
            .cloned()
            .collect();
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            stale.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().join("files").is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "pins" && !mine.contains(n.as_str())),
            );
        }
        for name in stale {
            if self.loading.lock().expect("loading").contains(&name) {
                continue;
            }
            tracing::info!(dataset = %name, "not pinned on this node any more; freeing its files");
            self.indexes.lock().expect("indexes").remove(&name);
            self.backoff.lock().expect("backoff").remove(&name);
            self.failures.lock().expect("failures").remove(&name);
            let dir = self.root.join(&name);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            last_report.remove(&name);
            self.rebuild_held();
        }
        for pin in pins
            .iter()
            .filter(|p| !p.expired(now) && mine.contains(p.name.as_str()))
        {
            let seen = self
                .verified
                .lock()
                .expect("verified")
                .get(&pin.name)
                .copied();
            if seen.unwrap_or(0) < pin.verify_seq {
                self.verify(pin).await;
                self.verified
                    .lock()
                    .expect("verified")
                    .insert(pin.name.clone(), pin.verify_seq);
            }
            let idle = !self.loading.lock().expect("loading").contains(&pin.name);
            // (Files waiting out a backoff start no load: the tick after it ends does.)
            if pin.load && idle && !self.due(pin).is_empty() {
                self.loading
                    .lock()
                    .expect("loading")
                    .insert(pin.name.clone());
                let (me, pin, source) = (self.clone(), pin.clone(), source.clone());
                tokio::spawn(async move {
                    me.load(&pin, &source).await;
                    me.loading.lock().expect("loading").remove(&pin.name);
                    // Report the outcome now, not at the next tick.
                    me.wake();
                });
            }
            let report = self.progress(pin);
            let due = match last_report.get(&pin.name) {
                Some((prev, at)) => {
                    prev_differs(prev, &report) || at.elapsed() > Duration::from_secs(10)
                }
                None => true,
            };
            if due {
                self.registry.report(&pin.name, &report).await?;
                last_report.insert(pin.name.clone(), (report, Instant::now()));
            }
        }
        Ok(())
    }

    /// Loads this node's missing files of `pin`, but for those waiting out a retry backoff.
    async fn load<S: Source>(self: &Arc<Self>, pin: &Pin, source: &Arc<S>) {
        use futures::StreamExt;
        let missing: Vec<(ManifestFile, Vec<String>)> = self
            .due(pin)
            .into_iter()
            .map(|f| {
                let h = holders(&f.path, &pin.nodes, pin.replicas);
                (f, h.into_iter().cloned().collect())
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        tracing::info!(dataset = %pin.name, files = missing.len(), "loading");
        // A failure of the whole load (not of a file: those are in backoff) is tried again now.
        self.failures.lock().expect("failures").remove(&pin.name);
        let dir = self.root.join(&pin.name).join("files");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.fail(&pin.name, format!("cannot create {}: {e}", dir.display()));
            return;
        }
        // Files this node fetches from the backend first, copies from peers after.
        let (mut primary, replica): (Vec<_>, Vec<_>) =
            missing.into_iter().partition(|(_, h)| h[0] == self.node_id);
        primary.extend(replica);
        let in_flight = self.settings.load_concurrency;
        let limits = LoadLimits {
            reads: Semaphore::new(in_flight),
            unwritten: Semaphore::new(2 * in_flight),
            buffers: BufferPool::new(),
        };
        let (done_tx, done_rx) = mpsc::channel::<Completed>(COMMIT_BATCH);
        let fetch = async {
            futures::stream::iter(primary)
                // More files than reads in flight: a small file's opens, writes and rename
                // overlap other files' GETs.
                .for_each_concurrent(FILES_PER_READ * in_flight, |(file, holders)| {
                    let (done, limits) = (done_tx.clone(), &limits);
                    async move {
                        let mut attempt = 0;
                        let result = loop {
                            attempt += 1;
                            let loaded = self.load_file(pin, &file, &holders, source, limits);
                            match loaded.await {
                                Err(e) if attempt < 3 && retryable(&e) => {
                                    tracing::warn!(dataset = %pin.name, path = %file.path, error = %e, "load failed; retrying");
                                    tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                                }
                                other => break other,
                            }
                        };
                        match result {
                            Ok(completed) => {
                                let _ = done.send(completed).await;
                            }
                            Err(e) => self.file_failed(&pin.name, &file.path, &named(pin, e)),
                        }
                    }
                })
                .await;
            drop(done_tx);
        };
        futures::join!(fetch, self.commit_loop(&pin.name, done_rx));
    }

    fn fail(&self, dataset: &str, reason: String) {
        tracing::error!(dataset, %reason, "load failed");
        self.failures
            .lock()
            .expect("failures")
            .insert(dataset.into(), reason);
    }

    /// Puts a file that failed to load into backoff: it is tried again 2 s later, then 4, 8, ...
    /// up to 5 minutes.
    fn file_failed(&self, dataset: &str, path: &str, error: &ApiError) {
        let mut backoff = self.backoff.lock().expect("backoff");
        let retry = backoff
            .entry(dataset.to_string())
            .or_default()
            .entry(path.to_string())
            .or_insert(Retry {
                failures: 0,
                at: Instant::now(),
                reason: String::new(),
            });
        retry.failures += 1;
        let wait = RETRY_FIRST
            .saturating_mul(1 << (retry.failures - 1).min(16))
            .min(RETRY_MAX);
        retry.at = Instant::now() + wait;
        retry.reason = error.to_string();
        tracing::error!(dataset, path, error = %error, failures = retry.failures, retry_in = ?wait, "cannot load a file");
    }

    /// Why files of the dataset are waiting to be loaded again, if any are.
    fn backoff_reason(&self, dataset: &str) -> Option<String> {
        let backoff = self.backoff.lock().expect("backoff");
        backoff.get(dataset).and_then(|files| {
            let (path, first) = files.iter().min_by_key(|(_, r)| r.at)?;
            Some(format!(
                "{} file(s) failed to load; {path}: {} (failed {} time(s), next try in {} s)",
                files.len(),
                first.reason,
                first.failures,
                first.at.saturating_duration_since(Instant::now()).as_secs()
            ))
        })
    }

    /// Fetches every block of `file` the partial copy lacks (all of them, the first time), at
    /// most `reads` at once across the load, and renames the whole file into place.
    async fn load_file<S: Source>(
        &self,
        pin: &Pin,
        file: &ManifestFile,
        holders: &[String],
        source: &Arc<S>,
        limits: &LoadLimits,
    ) -> Result<Completed, ApiError> {
        let object = ObjectRef {
            mount: pin.mount,
            id: granary_core::ObjectId {
                backend: pin.backend.clone(),
                key: pin.key_of(&file.path),
                size: file.size,
                etag: file.etag.clone(),
                version: file.version.clone(),
                mtime_ns: file.mtime_ns,
            },
        };
        let target = self.file_path(&pin.name, &file.path);
        let tmp = target.with_file_name(format!(
            ".{}.loading",
            target
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        // From the first holder when it is another node and alive; else from the backend.
        let copy_from = holders
            .first()
            .filter(|h| **h != self.node_id && source.members().contains(h))
            .cloned();
        let load = FileLoad {
            object: &object,
            copy_from: copy_from.as_deref(),
            tmp,
            target: target.clone(),
        };
        let crcs = if self.block_size.count(file.size) <= 1 {
            self.load_small(&pin.name, load, source.as_ref(), limits)
                .await?
        } else {
            self.load_blocks(&pin.name, &file.path, load, source.as_ref(), limits)
                .await?
        };
        let crcs = Arc::new(crcs);
        Ok(Completed {
            entry: StoredFile {
                path: file.path.clone(),
                size: file.size,
                etag: file.etag.clone(),
                version: file.version.clone(),
                crcs: crcs.to_vec(),
                dropped: false,
            },
            mount: pin.mount,
            key: object.id.key,
            held: Arc::new(HeldFile {
                dataset: pin.name.clone(),
                path: target,
                size: file.size,
                etag: file.etag.clone(),
                version: file.version.clone(),
                crcs,
            }),
        })
    }

    /// Loads a file of one block or none: nothing to resume, so no journal; the block is fetched,
    /// then the file created, written and renamed into place in one go on a blocking thread
    /// (each hand-off to a blocking thread is two context switches, which cost more than the
    /// work for a small file). Returns the block CRCs.
    async fn load_small<S: Source>(
        &self,
        dataset: &str,
        file: FileLoad<'_>,
        source: &S,
        limits: &LoadLimits,
    ) -> Result<Vec<u32>, ApiError> {
        let FileLoad {
            object,
            copy_from,
            tmp,
            target,
        } = file;
        let size = object.id.size;
        let (fetched, permit) = match size {
            0 => (None, None),
            _ => {
                let (f, p) = self
                    .fetch_block(object, 0, copy_from, source, limits)
                    .await?;
                (Some(f), Some(p))
            }
        };
        let buffers = limits.buffers.clone();
        let crc = blocking(move || {
            let io = |e| internal(tmp.display(), e);
            // Its directory is there but for a file's first in its directory: one open.
            let out = match BlockWriter::create(&tmp, buffers.clone()) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(parent) = tmp.parent() {
                        std::fs::create_dir_all(parent).map_err(io)?;
                    }
                    BlockWriter::create(&tmp, buffers)
                }
                other => other,
            }
            .map_err(io)?;
            let crc = fetched.map(|f| f.write(&out, 0)).transpose().map_err(io)?;
            out.finish(size)
                .and_then(|()| std::fs::rename(&tmp, &target))
                .map_err(io)?;
            Ok(crc)
        })
        .await?;
        drop(permit);
        self.count_loaded(dataset, size);
        Ok(crc.into_iter().collect())
    }

    /// Loads a file of several blocks into its partial copy, resuming after the blocks its
    /// journal names, `load_concurrency` blocks at once at most, and renames it into place.
    /// Returns the block CRCs.
    async fn load_blocks<S: Source>(
        &self,
        dataset: &str,
        path: &str,
        file: FileLoad<'_>,
        source: &S,
        limits: &LoadLimits,
    ) -> Result<Vec<u32>, ApiError> {
        use futures::{StreamExt, TryStreamExt};
        let FileLoad {
            object,
            copy_from,
            tmp,
            target,
        } = file;
        // A load cut short (a crash, a restart) resumes after the blocks it had written: the
        // `.crcs` journal beside the partial file names each written block and its CRC.
        let (bs, size) = (self.block_size, object.id.size);
        let journal_path = tmp.with_extension("loading.crcs");
        let identity = serde_json::json!({
            "size": size, "etag": object.id.etag, "version": object.id.version,
            "block_size": bs.get(), "journal": 2,
        })
        .to_string();
        let partial = Partial {
            tmp: tmp.clone(),
            journal: journal_path.clone(),
        };
        let buffers = limits.buffers.clone();
        let (out, journal, mut crcs) = blocking(move || {
            let (out, journal, crcs) = partial.resume(&identity, bs, size)?;
            Ok((
                BlockWriter::resume(out, &partial.tmp, buffers),
                journal,
                crcs,
            ))
        })
        .await?;
        let resumed = crcs.iter().flatten().count();
        if resumed > 0 {
            tracing::info!(dataset, path, blocks = resumed, "resuming a partial load");
        }
        let (out, journal) = (Arc::new(out), Arc::new(Mutex::new(journal)));
        let todo: Vec<u64> = (0..crcs.len() as u64)
            .filter(|i| crcs[*i as usize].is_none())
            .collect();
        let written: Vec<(u64, u32)> = futures::stream::iter(todo)
            .map(|index| {
                let block = BlockLoad {
                    object,
                    index,
                    copy_from,
                    out: &out,
                    journal: &journal,
                };
                self.load_block(dataset, block, source, limits)
            })
            .buffer_unordered(self.settings.load_concurrency)
            .try_collect()
            .await?;
        for (index, crc) in written {
            crcs[index as usize] = Some(crc);
        }
        let crcs: Vec<u32> = crcs
            .into_iter()
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::Internal(format!("{path}: a block was not loaded")))?;
        blocking(move || {
            out.finish(size)
                .and_then(|()| std::fs::rename(&tmp, &target))
                .map_err(|e| internal(tmp.display(), e))?;
            let _ = std::fs::remove_file(journal_path);
            Ok(())
        })
        .await?;
        Ok(crcs)
    }

    /// Fetches block `index` of `object` (from the first holder `copy_from`, waiting for it to
    /// have it, else from the backend), within the load's limits on reads in flight and on
    /// blocks not yet written: the block, and the permit to hold until it is written.
    async fn fetch_block<'l, S: Source>(
        &self,
        object: &ObjectRef,
        index: u64,
        copy_from: Option<&str>,
        source: &S,
        limits: &'l LoadLimits,
    ) -> Result<(Fetched, tokio::sync::SemaphorePermit<'l>), ApiError> {
        let range = self.block_size.range(index, object.id.size);
        let mut waited = Duration::ZERO;
        let (fetched, unwritten) = loop {
            let unwritten = limits
                .unwritten
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let permit = limits
                .reads
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let fetched = match copy_from {
                Some(peer) => match source.peer_held_block(peer, object, index).await {
                    Ok(data) => Fetched::Bytes(data),
                    // The first holder has not loaded it yet: wait for it rather than fetch
                    // the bytes from the backend a second time.
                    Err(ApiError::NotFound(_)) if waited < Duration::from_secs(600) => {
                        drop((permit, unwritten));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        waited += Duration::from_secs(1);
                        continue;
                    }
                    Err(e) => {
                        tracing::info!(peer, error = %e, key = %object.id.key, "copy from the first holder failed; reading the backend");
                        from_backend(source, object, range.clone(), &limits.buffers).await?
                    }
                },
                None => from_backend(source, object, range.clone(), &limits.buffers).await?,
            };
            break (fetched, unwritten);
        };
        let len = range.end - range.start;
        if let Fetched::Bytes(data) = &fetched
            && data.len() as u64 != len
        {
            return Err(ApiError::Corrupt(format!(
                "{}: block {index} has {} bytes, expected {len}",
                object.id.key,
                data.len(),
            )));
        }
        Ok((fetched, unwritten))
    }

    /// Fetches one block ([`Datasets::fetch_block`]), writes it at its offset and journals its
    /// CRC: `(index, crc)`.
    async fn load_block<S: Source>(
        &self,
        dataset: &str,
        block: BlockLoad<'_>,
        source: &S,
        limits: &LoadLimits,
    ) -> Result<(u64, u32), ApiError> {
        let BlockLoad {
            object,
            index,
            copy_from,
            out,
            journal,
        } = block;
        let (fetched, unwritten) = self
            .fetch_block(object, index, copy_from, source, limits)
            .await?;
        let offset = self.block_size.range(index, object.id.size).start;
        let len = self.block_size.range(index, object.id.size).end - offset;
        let (out, journal) = (out.clone(), journal.clone());
        let crc = blocking(move || {
            let crc = fetched
                .write(&out, offset)
                .map_err(|e| internal("writing a loaded block", e))?;
            journal
                .lock()
                .expect("journal")
                .write_all(format!("{index} {crc:08x}\n").as_bytes())
                .map_err(|e| internal("writing a load journal", e))?;
            Ok(crc)
        })
        .await?;
        drop(unwritten);
        self.count_loaded(dataset, len);
        Ok((index, crc))
    }

    /// Commits loaded files to the index as they complete, in batches of what completed while
    /// the previous batch was syncing.
    async fn commit_loop(&self, dataset: &str, mut done: mpsc::Receiver<Completed>) {
        let mut batch = Vec::new();
        while done.recv_many(&mut batch, COMMIT_BATCH).await > 0 {
            if let Err(e) = self.commit(dataset, std::mem::take(&mut batch)).await {
                self.fail(dataset, format!("cannot record loaded files: {e}"));
            }
        }
    }

    /// Names `files` (written and renamed into place) in the index with one append, and serves
    /// them from now on; the next checkpoint makes them durable.
    async fn commit(&self, dataset: &str, files: Vec<Completed>) -> Result<(), ApiError> {
        let index = self.root.join(dataset).join("index.jsonl");
        let entries: Vec<StoredFile> = files.iter().map(|c| c.entry.clone()).collect();
        let applied = entries.clone();
        blocking(move || append_index(&index, &entries, false)).await?;
        self.unsynced
            .lock()
            .expect("unsynced")
            .insert(dataset.to_string());
        self.apply(dataset, applied);
        let bytes: u64 = files.iter().map(|c| c.entry.size).sum();
        metrics::counter!(granary_core::metrics::DATASET_LOADED_BYTES).increment(bytes);
        if let Some(waiting) = self.backoff.lock().expect("backoff").get_mut(dataset) {
            for c in &files {
                waiting.remove(&c.entry.path);
            }
        }
        // Served (and copyable by other holders) from now on.
        let mut held = self.held.write().expect("held");
        for c in files {
            held.entry(c.mount).or_default().insert(c.key, c.held);
        }
        Ok(())
    }

    /// Every [`CHECKPOINT_EVERY`], makes the index lines of each dataset that has new ones
    /// durable: notes the index's length, syncs the filesystem, appends a [`Checkpoint`].
    async fn checkpoints(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CHECKPOINT_EVERY).await;
            let due = std::mem::take(&mut *self.unsynced.lock().expect("unsynced"));
            for dataset in due {
                let dir = self.root.join(&dataset);
                if let Err(e) = blocking(move || checkpoint(&dir)).await {
                    // Gone with an unpin, or a disk error (the next commit tries again).
                    tracing::debug!(%dataset, error = %e, "cannot checkpoint the dataset index");
                }
            }
        }
    }

    fn count_loaded(&self, dataset: &str, bytes: u64) {
        let mut rates = self.loaded_bytes.lock().expect("rates");
        let (since, n, rate) = rates
            .entry(dataset.to_string())
            .or_insert((Instant::now(), 0, 0.0));
        *n += bytes;
        let elapsed = since.elapsed().as_secs_f64();
        if elapsed >= 1.0 {
            let now = *n as f64 / elapsed;
            *rate = if *rate == 0.0 {
                now
            } else {
                0.5 * *rate + 0.5 * now
            };
            *since = Instant::now();
            *n = 0;
        }
    }
}

/// A file whose bytes are all written and renamed into place, to be committed to the index.
struct Completed {
    entry: StoredFile,
    mount: u32,
    key: String,
    held: Arc<HeldFile>,
}

/// One block of a file being loaded, and where it goes.
struct BlockLoad<'a> {
    object: &'a ObjectRef,
    index: u64,
    copy_from: Option<&'a str>,
    out: &'a Arc<BlockWriter>,
    journal: &'a Arc<Mutex<std::fs::File>>,
}

/// A block fetched for loading: as a peer sent it, or read from the backend straight into an
/// aligned buffer (with its CRC, computed as it arrived).
enum Fetched {
    Bytes(Bytes),
    Buffer { buf: AlignedBuf, crc: u32 },
}

impl Fetched {
    /// Writes the block at `offset` of `out`; returns its CRC.
    fn write(self, out: &BlockWriter, offset: u64) -> std::io::Result<u32> {
        match self {
            Fetched::Bytes(data) => {
                out.write_at(&data, offset)?;
                Ok(checksum(&data))
            }
            Fetched::Buffer { buf, crc } => {
                out.write_buffer(&buf, offset)?;
                Ok(crc)
            }
        }
    }
}

/// A file to load: its object, where to copy it from, its partial copy and where it goes when
/// complete.
struct FileLoad<'a> {
    object: &'a ObjectRef,
    copy_from: Option<&'a str>,
    tmp: PathBuf,
    target: PathBuf,
}

/// Range `range` of `object` from the backend, into an aligned buffer from `pool`.
async fn from_backend<S: Source>(
    source: &S,
    object: &ObjectRef,
    range: std::ops::Range<u64>,
    pool: &Arc<BufferPool>,
) -> Result<Fetched, ApiError> {
    let mut buf = AlignedBuf::take(pool, (range.end - range.start) as usize)
        .map_err(|e| internal("mapping a load buffer", e))?;
    let (mut crc, mut at) = (0, 0);
    let region = buf.data_mut();
    let mut sink = |chunk: &[u8]| {
        // (More than the range is never stored, whatever arrives.)
        let end = (at + chunk.len()).min(region.len());
        region[at..end].copy_from_slice(&chunk[..end - at]);
        crc = checksum_append(crc, &chunk[..end - at]);
        at = end;
    };
    source.backend_range_to(object, range, &mut sink).await?;
    if at != buf.data().len() {
        return Err(ApiError::Stale(format!(
            "{}: got {at} bytes of a {}-byte range",
            object.id.key,
            buf.data().len()
        )));
    }
    Ok(Fetched::Buffer { buf, crc })
}

/// Page-aligned buffers for direct writes, reused within a load. Each is an anonymous map; one
/// of 2 MiB or more asks for transparent huge pages, so filling a fresh 4 MiB block takes two
/// page faults instead of 1,024 (65,536 fewer faults over a load's 256 MiB of buffers).
struct BufferPool {
    free: Mutex<Vec<MmapMut>>,
}

/// Transparent huge pages' size on x86-64 and arm64 (with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

impl BufferPool {
    fn new() -> Arc<BufferPool> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
        })
    }

    /// A buffer of at least `capacity` bytes: a free one that is large enough, else a new one
    /// (replacing, when there is one, a free buffer too small for it: the pool holds no more
    /// buffers than were ever in use at once).
    fn get(&self, capacity: usize) -> std::io::Result<MmapMut> {
        let mut free = self.free.lock().expect("buffers");
        if let Some(i) = free.iter().rposition(|m| m.len() >= capacity) {
            return Ok(free.swap_remove(i));
        }
        free.pop();
        drop(free);
        let huge = capacity >= HUGE_PAGE;
        let size = if huge {
            capacity.next_multiple_of(HUGE_PAGE)
        } else {
            capacity
        };
        let map = MmapMut::map_anon(size)?;
        if huge {
            // Only advice: without huge pages the buffer works the same, with more faults.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(map)
    }

    fn put(&self, map: MmapMut) {
        self.free.lock().expect("buffers").push(map);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.free.lock().expect("buffers").len()
    }
}

/// A buffer whose data starts at a page boundary and is followed by zeros up to the next
/// [`DIRECT_ALIGN`] boundary, taken from a pool and given back to it when dropped.
struct AlignedBuf {
    map: Option<MmapMut>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl AlignedBuf {
    fn take(pool: &Arc<BufferPool>, len: usize) -> std::io::Result<Self> {
        let padded = len.next_multiple_of(DIRECT_ALIGN).max(DIRECT_ALIGN);
        let mut map = pool.get(padded)?;
        map[len..padded].fill(0);
        Ok(AlignedBuf {
            map: Some(map),
            len,
            pool: pool.clone(),
        })
    }

    fn map(&self) -> &MmapMut {
        self.map
            .as_ref()
            .expect("a buffer is given back only when dropped")
    }

    fn data(&self) -> &[u8] {
        &self.map()[..self.len]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self
            .map
            .as_mut()
            .expect("a buffer is given back only when dropped")[..len]
    }

    /// The data and the zeros after it, to the alignment.
    fn padded(&self) -> &[u8] {
        &self.map()[..self.len.next_multiple_of(DIRECT_ALIGN)]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            self.pool.put(map);
        }
    }
}

/// What the files of one load share.
struct LoadLimits {
    /// Block reads (backend GETs, copies from peers) in flight.
    reads: Semaphore,
    /// Blocks fetched or being fetched and not yet written: the load's memory bound.
    unwritten: Semaphore,
    /// Aligned buffers for direct writes, reused (at most one per unwritten block).
    buffers: Arc<BufferPool>,
}

/// Writes the blocks of a file being loaded: through `O_DIRECT` from aligned buffers when the
/// filesystem takes it (see the module docs), else through the page cache.
struct BlockWriter {
    path: PathBuf,
    /// Open with `O_DIRECT`, where the filesystem allows it.
    direct: Option<std::fs::File>,
    /// Through the page cache: for what cannot go direct; opened when first needed.
    buffered: OnceLock<std::fs::File>,
    /// Whether the file may extend past its size (padded direct writes, or an earlier
    /// attempt's): then [`BlockWriter::finish`] cuts it.
    padded: AtomicBool,
    /// Aligned buffers to reuse (shared by the load's files).
    buffers: Arc<BufferPool>,
}

impl BlockWriter {
    /// Creates (or empties) `path` for the blocks of a new file, with one open: `O_DIRECT`
    /// unless the filesystem refuses it.
    fn create(path: &Path, buffers: Arc<BufferPool>) -> std::io::Result<Self> {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(true).write(true);
        let direct = options
            .clone()
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path);
        let (direct, buffered) = match direct {
            Ok(f) => (Some(f), OnceLock::new()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                (None, OnceLock::from(options.open(path)?))
            }
            Err(e) => return Err(e),
        };
        Ok(BlockWriter {
            path: path.to_path_buf(),
            direct,
            buffered,
            padded: AtomicBool::new(false),
            buffers,
        })
    }

    /// Writes the missing blocks of `buffered`, a partial file at `path` being resumed.
    fn resume(buffered: std::fs::File, path: &Path, buffers: Arc<BufferPool>) -> Self {
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        BlockWriter {
            path: path.to_path_buf(),
            direct,
            buffered: OnceLock::from(buffered),
            padded: AtomicBool::new(true),
            buffers,
        }
    }

    fn buffered(&self) -> std::io::Result<&std::fs::File> {
        if let Some(f) = self.buffered.get() {
            return Ok(f);
        }
        let f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        Ok(self.buffered.get_or_init(|| f))
    }

    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.direct.is_none() {
            return self.buffered()?.write_all_at(data, offset);
        }
        let mut buf = AlignedBuf::take(&self.buffers, data.len())?;
        buf.data_mut().copy_from_slice(data);
        self.write_buffer(&buf, offset)
    }

    fn write_buffer(&self, buf: &AlignedBuf, offset: u64) -> std::io::Result<()> {
        if let Some(direct) = &self.direct
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
        {
            // Past the end of the data, zeros up to the alignment (cut off by `finish`).
            let padded = buf.padded();
            match direct.write_all_at(padded, offset) {
                // The filesystem takes O_DIRECT opens but not these writes: the page cache.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
                Ok(()) => {
                    if padded.len() > buf.data().len() {
                        self.padded.store(true, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        self.buffered()?.write_all_at(buf.data(), offset)
    }

    /// Ends the file at `size` bytes (every block written): cuts the padding, if any.
    fn finish(&self, size: u64) -> std::io::Result<()> {
        if !self.padded.load(Ordering::Relaxed) {
            return Ok(());
        }
        match &self.direct {
            Some(f) => f.set_len(size),
            None => self.buffered()?.set_len(size),
        }
    }
}

/// A file that failed to load: failures in a row, when to try again, and why.
struct Retry {
    failures: u32,
    at: Instant,
    reason: String,
}

/// Errors worth trying again at once (the object's version is gone or the bytes are wrong: not).
fn retryable(e: &ApiError) -> bool {
    !matches!(e, ApiError::Stale(_) | ApiError::NotFound(_))
}

/// A failure to load a file of `pin`, saying when the cause may be a name pinned before names
/// were exact: the backend no longer has that key as pinned (it may have been decoded from a key
/// with `%` in it).
fn named(pin: &Pin, e: ApiError) -> ApiError {
    match e {
        ApiError::NotFound(what) | ApiError::Stale(what) if !pin.exact_names => {
            ApiError::Invalid(format!(
                "{what}: dataset {:?} was pinned before Granary kept object names exactly \
                 (names were percent-decoded); unpin it and pin it again",
                pin.name
            ))
        }
        other => other,
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("a blocking task failed: {e}")))?
}

fn prev_differs(a: &NodeProgress, b: &NodeProgress) -> bool {
    a.state != b.state
        || a.bytes_ready != b.bytes_ready
        || a.files_ready != b.files_ready
        || a.bytes_total != b.bytes_total
        || a.verified_seq != b.verified_seq
        || a.reason != b.reason
}

fn tombstone(path: &str) -> StoredFile {
    StoredFile {
        path: path.into(),
        size: 0,
        etag: None,
        version: None,
        crcs: Vec::new(),
        dropped: true,
    }
}

/// Reads a dataset's index: the files it names, and how many of them were past the last
/// checkpoint and had to be re-read against their CRCs (those that failed are left out).
fn read_index(
    path: &Path,
    files: &Path,
    bs: BlockSize,
) -> Result<(HashMap<String, StoredFile>, usize), ApiError> {
    let text = std::fs::read_to_string(path).map_err(|e| internal(path.display(), e))?;
    // Each file with the offset just past its line.
    let mut index: HashMap<String, (StoredFile, u64)> = HashMap::new();
    let (mut offset, mut durable) = (0, 0);
    for line in text.split_inclusive('\n') {
        offset += line.len() as u64;
        if let Ok(entry) = serde_json::from_str::<StoredFile>(line) {
            if entry.dropped {
                index.remove(&entry.path);
            } else {
                index.insert(entry.path.clone(), (entry, offset));
            }
        } else if let Ok(c) = serde_json::from_str::<Checkpoint>(line) {
            durable = durable.max(c.durable_bytes);
        }
        // Anything else is a torn last line (a crash mid-append).
    }
    let mut checked = 0;
    let index = index
        .into_iter()
        .filter(|(name, (entry, end))| {
            if *end <= durable {
                return true;
            }
            checked += 1;
            let intact = verify_file(&files.join(name), entry, bs);
            if !intact {
                tracing::warn!(index = %path.display(), file = %name, "a file loaded just before a crash is not intact; loading it again");
            }
            intact
        })
        .map(|(name, (entry, _))| (name, entry))
        .collect();
    Ok((index, checked))
}

/// Appends `lines` to the index file at `path` in one write, synced when `sync`.
fn append_index<T: Serialize>(path: &Path, lines: &[T], sync: bool) -> Result<(), ApiError> {
    let mut text = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut text, line).expect("index lines serialize");
        text.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| internal(path.display(), e))?;
    f.write_all(&text)
        .and_then(|()| if sync { f.sync_data() } else { Ok(()) })
        .map_err(|e| internal(path.display(), e))
}

/// Makes the lines of the index in dataset directory `dir` durable (see [`Checkpoint`]).
fn checkpoint(dir: &Path) -> Result<(), ApiError> {
    let index = dir.join("index.jsonl");
    let durable_bytes = std::fs::metadata(&index)
        .map_err(|e| internal(index.display(), e))?
        .len();
    let d = std::fs::File::open(dir).map_err(|e| internal(dir.display(), e))?;
    rustix::fs::syncfs(&d).map_err(|e| internal(format!("syncfs {}", dir.display()), e))?;
    append_index(&index, &[Checkpoint { durable_bytes }], true)
}

/// The partial file (open to read and write), its journal (open to append) and the CRC of each
/// block already written.
type Resumed = (std::fs::File, std::fs::File, Vec<Option<u32>>);

/// A partial file being loaded and its journal.
struct Partial {
    tmp: PathBuf,
    journal: PathBuf,
}

impl Partial {
    /// Opens the partial file for writing, and its journal for appending, and returns the CRC of
    /// each block (`None`: still to fetch): those the journal names (after its first line,
    /// which must be `identity`) whose bytes in the file still match. A journal of another
    /// version, or none, starts the file over.
    fn resume(&self, identity: &str, bs: BlockSize, size: u64) -> Result<Resumed, ApiError> {
        let io = |e| internal(self.tmp.display(), e);
        if let Some(parent) = self.tmp.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.tmp)
            .map_err(io)?;
        let mut crcs = vec![None; bs.count(size) as usize];
        let journal_path = &self.journal;
        let mut text = format!("{identity}\n");
        if let Ok(journal) = std::fs::read_to_string(journal_path) {
            let mut lines = journal.lines();
            if lines.next() == Some(identity) {
                let mut buf = Vec::new();
                for line in lines {
                    let Some((index, crc)) = line.split_once(' ').and_then(|(i, c)| {
                        Some((i.parse::<u64>().ok()?, u32::from_str_radix(c, 16).ok()?))
                    }) else {
                        break; // a torn last line
                    };
                    if (index as usize) < crcs.len()
                        && block_intact(&out, bs, size, index, crc, &mut buf)
                    {
                        crcs[index as usize] = Some(crc);
                        text.push_str(&format!("{index} {crc:08x}\n"));
                    }
                }
            }
        }
        if crcs.iter().all(Option::is_none) {
            out.set_len(0).map_err(io)?;
        }
        std::fs::write(journal_path, text).map_err(|e| internal(journal_path.display(), e))?;
        let journal = std::fs::OpenOptions::new()
            .append(true)
            .open(journal_path)
            .map_err(|e| internal(journal_path.display(), e))?;
        Ok((out, journal, crcs))
    }
}

/// Whether block `index` of `f`, a file of `size` bytes, reads back with CRC `crc` (`buf` is
/// scratch space).
fn block_intact(
    f: &std::fs::File,
    bs: BlockSize,
    size: u64,
    index: u64,
    crc: u32,
    buf: &mut Vec<u8>,
) -> bool {
    let range = bs.range(index, size);
    buf.resize((range.end - range.start) as usize, 0);
    f.read_exact_at(buf, range.start).is_ok() && checksum(buf) == crc
}

fn verify_file(path: &Path, stored: &StoredFile, bs: BlockSize) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = Vec::new();
    f.metadata().map(|m| m.len()).ok() == Some(stored.size)
        && stored.crcs.len() as u64 == bs.count(stored.size)
        && (0..)
            .zip(&stored.crcs)
            .all(|(i, crc)| block_intact(&f, bs, stored.size, i, *crc, &mut buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_writes_of_any_length_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let writer = BlockWriter::create(&path, BufferPool::new()).unwrap();
        // On this filesystem (ext4 under the test's temp dir) writes go around the page cache.
        let direct = writer.direct.is_some();
        let block = 64 << 10;
        let data: Vec<u8> = (0..3 * block + 123).map(|i| (i % 251) as u8).collect();
        // Out of order, the last block short; the buffers are reused.
        for i in [2, 0, 3, 1] {
            let range = i * block..((i + 1) * block).min(data.len());
            writer
                .write_at(&data[range.clone()], range.start as u64)
                .unwrap();
        }
        writer.finish(data.len() as u64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(writer.buffers.len() <= 1, "one buffer, reused");
        if direct {
            assert_eq!(writer.buffers.len(), 1);
        }
    }

    #[test]
    fn the_buffer_pool_reuses_buffers_and_keeps_no_more_than_were_in_use() {
        let pool = BufferPool::new();
        let small = AlignedBuf::take(&pool, 100).unwrap();
        assert_eq!(small.data().len(), 100);
        assert_eq!(small.padded().len(), DIRECT_ALIGN);
        assert!(small.padded()[100..].iter().all(|b| *b == 0));
        drop(small);
        assert_eq!(pool.len(), 1);
        // Too small for a 4 MiB block: replaced, not kept beside the new one.
        let mut large = AlignedBuf::take(&pool, 4 << 20).unwrap();
        assert_eq!(pool.len(), 0);
        large.data_mut().fill(9);
        drop(large);
        // A small request takes the large buffer; its tail past the data reads as zeros.
        let again = AlignedBuf::take(&pool, 10).unwrap();
        assert_eq!(pool.len(), 0);
        assert_eq!(again.data(), &[9u8; 10]);
        assert!(again.padded()[10..].iter().all(|b| *b == 0));
        let other = AlignedBuf::take(&pool, 10).unwrap();
        drop((again, other));
        assert_eq!(pool.len(), 2);
    }

    #[test]
    fn a_rewritten_file_ends_at_its_size_with_or_without_padding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let pool = BufferPool::new();
        // A longer file from an earlier attempt is emptied by create.
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        for len in [128 << 10, (128 << 10) + 5, 10] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let writer = BlockWriter::create(&path, pool.clone()).unwrap();
            writer.write_at(&data, 0).unwrap();
            writer.finish(len as u64).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "{len} bytes");
        }
    }
}
