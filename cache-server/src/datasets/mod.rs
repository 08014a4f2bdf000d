//! The dataset store: pinned datasets' files kept whole on this node's disk, apart from the
//! evictable block cache, and the loader that fills it.
//!
//! [`Datasets`] is the store's type and its API (serving held files, progress, verification);
//! its parts live in modules of their own, each documenting its design:
//!
//! - `store`: the on-disk format (layout, index, load journals, checkpoints) and the checks of
//!   files against their CRCs;
//! - `state`: what this node keeps in memory about each dataset;
//! - `reconcile`: the loop that decides what to load and drop, and the checkpoints task;
//! - `loader`: loading files (small ones whole, large ones block by block, or copied from a
//!   peer), with retries and backoff;
//! - `io`: aligned buffers and the `O_DIRECT` writer.
//!
//! Files depend on each other one way: `io`, `store` and `state` on none of the others; this
//! file on `store` and `state`; `loader` on this file, `io`, `store` and `state`; `reconcile`
//! on this file and `store` (it starts loads through the loader's methods).

mod io;
mod loader;
mod reconcile;
mod state;
mod store;

pub use store::StoredFile;

use crate::config::DatasetSettings;
use crate::registry::{Pin, Registry};
use bytes::Bytes;
use granary_core::BlockSize;
use granary_core::dataset::{LoadState, ManifestFile, NodeProgress, holders, share};
use granary_core::object::checksum;
use granary_proto::ApiError;
use granary_proto::ObjectRef;
use state::{DatasetState, Share};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use store::{append_index, internal, read_index, tombstone, verify_file};
use tokio::sync::Notify;

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
    /// Per dataset: loaded files by path. Apart from `datasets`: this lock is held across passes
    /// over whole manifests (`rebuild_held`, `due`, `present`), and a dataset with an entry here
    /// is one with an index (what the reconcile loop frees when it is no longer pinned here).
    indexes: Mutex<HashMap<String, HashMap<String, StoredFile>>>,
    /// Per dataset: its share, load, failures, backoff and verification (see `DatasetState`).
    datasets: Mutex<HashMap<String, DatasetState>>,
    /// Bytes loaded per dataset since this process started, for the rate. Apart: taken for
    /// every block a load writes.
    loaded_bytes: Mutex<HashMap<String, (Instant, u64, f64)>>,
    /// Wakes the reconcile loop before its next tick.
    wake: Notify,
    /// Datasets with index lines not yet covered by a checkpoint. Apart: the checkpoints task
    /// takes the whole set at once.
    unsynced: Mutex<HashSet<String>>,
    /// Changes whenever `pins` does (see [`Datasets::pins_epoch`]).
    epoch: AtomicU64,
}

/// Unix seconds now (0 before 1970).
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            indexes: Mutex::new(indexes),
            datasets: Mutex::new(HashMap::new()),
            loaded_bytes: Mutex::new(HashMap::new()),
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
        for (name, state) in self.datasets.lock().expect("datasets").iter_mut() {
            if !pins.iter().any(|p| p.name == *name) {
                state.share = None;
            }
        }
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
        // Beneath the dataset's `files` directory by resolution: never through `..` or a link.
        let _ = crate::backend::beneath::remove_file(&files, &rel);
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
        if let Some(share) = self
            .datasets
            .lock()
            .expect("datasets")
            .get(&pin.name)
            .and_then(|s| s.share.as_ref())
            && share.is_of(pin)
        {
            return share.clone();
        }
        let share = Arc::new(Share::of(pin, &self.node_id));
        self.datasets
            .lock()
            .expect("datasets")
            .entry(pin.name.clone())
            .or_default()
            .share = Some(share.clone());
        share
    }

    /// This node's files of `pin` still to load now: neither loaded nor waiting out a retry
    /// backoff.
    fn due(&self, pin: &Pin) -> Vec<ManifestFile> {
        let share = self.share(pin);
        let now = Instant::now();
        let indexes = self.indexes.lock().expect("indexes");
        let index = indexes.get(&pin.name);
        let datasets = self.datasets.lock().expect("datasets");
        let waiting = datasets.get(&pin.name).map(|s| &s.backoff);
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
            .datasets
            .lock()
            .expect("datasets")
            .get(&pin.name)
            .and_then(|s| s.failure.clone().or_else(|| s.backoff_reason()));
        let loading = self
            .datasets
            .lock()
            .expect("datasets")
            .get(&pin.name)
            .is_some_and(|s| s.loading);
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
        let (verified_seq, repaired) = self
            .datasets
            .lock()
            .expect("datasets")
            .get(&pin.name)
            .map_or((0, 0), |s| (s.verified, s.repaired));
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
            verified_seq,
            repaired,
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
        self.datasets
            .lock()
            .expect("datasets")
            .entry(pin.name.clone())
            .or_default()
            .repaired += bad;
        bad
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
