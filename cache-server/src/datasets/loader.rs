//! Loading a dataset's files onto this node's disk.
//!
//! A load keeps `load_concurrency` block reads in flight across the dataset's files (the blocks
//! of a large file are fetched in parallel; small files many at a time); each block is
//! checksummed and written at its offset on a blocking thread, with `O_DIRECT` from a small pool
//! of aligned buffers where the filesystem allows it (see `io`). A file of one block is fetched,
//! written and renamed into place in one go; a larger one is written into a partial copy with a
//! journal, so that a load cut short resumes after the blocks it had written (see `store`). The
//! first holder of a file fetches it from the backend, the others copy it from that holder. A
//! file that keeps failing is retried with exponential backoff (2 s doubling to 5 min), its
//! reason shown in `status`. Completed files are committed to the index in batches.

use super::io::{AlignedBuf, BlockWriter, BufferPool, InStore};
use super::state::Retry;
use super::store::{Partial, StoredFile, append_index, internal};
use super::{Datasets, HeldFile, Source, blocking};
use crate::registry::Pin;
use bytes::Bytes;
use granary_core::backoff::Backoff;
use granary_core::dataset::{ManifestFile, holders};
use granary_core::object::{checksum, checksum_append};
use granary_proto::{ApiError, ObjectRef};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};

/// Files committed to the index with one write, at most.
const COMMIT_BATCH: usize = 256;

/// A file that failed is tried again 2 s later, then 4, 8, ... up to every 5 minutes.
const FILE_RETRY: Backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
/// A file whose load failed with an error worth retrying at once: 0.5 s, then 1 s.
const LOAD_RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(1));
/// Files a load works on at once, per block read it may have in flight.
const FILES_PER_READ: usize = 4;

impl Datasets {
    /// Loads this node's missing files of `pin`, but for those waiting out a retry backoff.
    pub(super) async fn load<S: Source>(self: &Arc<Self>, pin: &Pin, source: &Arc<S>) {
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
        if let Some(state) = self.datasets.lock().expect("datasets").get_mut(&pin.name) {
            state.failure = None;
        }
        // (A pin from the registry is checked again: its name is a directory of the store.)
        // The dataset's `files` directory, opened once beneath the store: every file of the
        // load is resolved beneath it.
        let dir = self.root.join(&pin.name).join("files");
        let files = granary_core::dataset::check_name(&pin.name)
            .map_err(std::io::Error::other)
            .and_then(|()| {
                use crate::backend::beneath;
                let store = beneath::open_root(&self.root)?;
                let rel = format!("{}/files", pin.name);
                beneath::create_dirs_at(&store, &rel)?;
                let flags = rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY;
                beneath::open_at(&store, &rel, flags, 0, beneath::Links::None)
            });
        let files = match files {
            Ok(f) => Arc::new(std::os::fd::OwnedFd::from(f)),
            Err(e) => {
                self.fail(&pin.name, format!("cannot create {}: {e}", dir.display()));
                return;
            }
        };
        // Files this node fetches from the backend first, copies from peers after.
        let (mut primary, replica): (Vec<_>, Vec<_>) =
            missing.into_iter().partition(|(_, h)| h[0] == self.node_id);
        primary.extend(replica);
        let in_flight = self.settings.load_concurrency;
        let limits = LoadLimits {
            reads: Semaphore::new(in_flight),
            unwritten: Semaphore::new(2 * in_flight),
            buffers: BufferPool::new(),
            files,
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
                                    tokio::time::sleep(LOAD_RETRY.after(attempt)).await;
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
        self.datasets
            .lock()
            .expect("datasets")
            .entry(dataset.into())
            .or_default()
            .failure = Some(reason);
    }

    /// Puts a file that failed to load into backoff: it is tried again 2 s later, then 4, 8, ...
    /// up to 5 minutes.
    fn file_failed(&self, dataset: &str, path: &str, error: &ApiError) {
        let mut datasets = self.datasets.lock().expect("datasets");
        let retry = datasets
            .entry(dataset.to_string())
            .or_default()
            .backoff
            .entry(path.to_string())
            .or_insert(Retry {
                failures: 0,
                at: Instant::now(),
                reason: String::new(),
            });
        retry.failures += 1;
        let wait = FILE_RETRY.after(retry.failures);
        retry.at = Instant::now() + wait;
        retry.reason = error.to_string();
        tracing::error!(dataset, path, error = %error, failures = retry.failures, retry_in = ?wait, "cannot load a file");
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
        // Every name is a checked key, and reached beneath the dataset's `files` directory by
        // resolution: an odd name (`%2Ftmp%2Fx`, `..%2Fx`) is only a name in the store.
        if let Err(e) = granary_core::keys::check_key(&file.path) {
            return Err(ApiError::Invalid(format!(
                "{}: the manifest path {:?} cannot be a path: {e}",
                pin.name, file.path
            )));
        }
        let target = InStore::new(
            &self.root.join(&pin.name).join("files"),
            &limits.files,
            &file.path,
        );
        let tmp = target.sibling(|name| format!(".{name}.loading"));
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
                path: target.path(),
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
            let io = |e| internal(tmp.path().display(), e);
            let out = BlockWriter::create(&tmp, buffers).map_err(io)?;
            let crc = fetched.map(|f| f.write(&out, 0)).transpose().map_err(io)?;
            out.finish(size)
                .and_then(|()| tmp.rename_to(&target))
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
        // A pin's files were checked against each node's capacity when it was made; a file
        // larger than this node may hold at all comes from a forged record: never allocate
        // for it (resuming keeps a slot per block).
        if size > self.settings.capacity.bytes() {
            return Err(ApiError::Exhausted(format!(
                "{path}: {size} bytes is over this node's dataset capacity of {}",
                self.settings.capacity.bytes()
            )));
        }
        let journal_path = tmp.sibling(|name| format!("{name}.crcs"));
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
                .and_then(|()| tmp.rename_to(&target))
                .map_err(|e| internal(tmp.path().display(), e))?;
            let _ = journal_path.remove();
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
        if let Some(state) = self.datasets.lock().expect("datasets").get_mut(dataset) {
            for c in &files {
                state.backoff.remove(&c.entry.path);
            }
        }
        // Served (and copyable by other holders) from now on.
        let mut held = self.held.write().expect("held");
        for c in files {
            held.entry(c.mount).or_default().insert(c.key, c.held);
        }
        Ok(())
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
    tmp: InStore,
    target: InStore,
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

/// What the files of one load share.
struct LoadLimits {
    /// Block reads (backend GETs, copies from peers) in flight.
    reads: Semaphore,
    /// Blocks fetched or being fetched and not yet written: the load's memory bound.
    unwritten: Semaphore,
    /// Aligned buffers for direct writes, reused (at most one per unwritten block).
    buffers: Arc<BufferPool>,
    /// The dataset's `files` directory: every file of the load is resolved beneath it.
    files: Arc<std::os::fd::OwnedFd>,
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
