//! Block fetching for one open file: the blocks a read needs now plus a readahead window.
//!
//! Each open file keeps a map of in-flight (or landed) blocks, driven by
//! [`granary_core::Readahead`]: a read first asks the window which blocks should be in flight,
//! drops the blocks behind it (or everything, after a seek), starts the missing ones, and waits
//! only for those it touches. A seek with nothing in flight (a random reader) asks for the bytes
//! it reads (`CacheApi::read_range`) instead of whole blocks. Blocks ahead of the reader hold permits from a global byte budget,
//! so readahead across all open files never holds more than `readahead_total` bytes; when the
//! budget is spent, readahead shrinks rather than waits. Blocks the reader needs now are always
//! fetched. A failed block is dropped from the map so that the next read retries it.
//!
//! [`LabelSets`] gives each open file its read metrics' labels, one shared set per top directory.

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use granary_core::metrics as m;
use granary_core::{BlockSize, Readahead};
use granary_proto::{ApiError, CacheApi, ObjectRef};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

type BlockFuture = Shared<BoxFuture<'static, Result<Bytes, ApiError>>>;

/// The global readahead byte budget, counted in KiB permits.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    total_kib: usize,
}

impl Budget {
    pub fn new(total_bytes: u64) -> Self {
        let total_kib = (total_bytes >> 10).min(Semaphore::MAX_PERMITS as u64) as usize;
        Budget {
            permits: Arc::new(Semaphore::new(total_kib)),
            total_kib,
        }
    }

    fn try_take(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let kib = bytes.div_ceil(1024) as u32;
        let permit = self.permits.clone().try_acquire_many_owned(kib).ok();
        self.publish();
        permit
    }

    fn publish(&self) {
        let used = self.total_kib - self.permits.available_permits();
        metrics::gauge!(m::READAHEAD_BYTES).set((used as u64 * 1024) as f64);
    }

    /// Bytes currently held by readahead.
    pub fn used_bytes(&self) -> u64 {
        (self.total_kib - self.permits.available_permits()) as u64 * 1024
    }
}

struct Inflight {
    block: BlockFuture,
    _permit: Option<OwnedSemaphorePermit>,
}

/// The labels of a mount's read metrics: the namespace's top directory (`dataset`) and the
/// mount's `--job` (`training_job`); both low-cardinality.
#[derive(Debug, Clone, Default)]
pub struct ReadLabels {
    pub dataset: String,
    pub job: String,
}

impl ReadLabels {
    /// Reads that waited for blocks not fetched yet, and how long.
    fn stall(&self) -> metrics::Histogram {
        metrics::histogram!(
            granary_core::metrics::FUSE_STALL_SECONDS,
            "dataset" => self.dataset.clone(),
            "training_job" => self.job.clone()
        )
    }

    /// A block fetched for a reader, by where its worker found it.
    fn fetched(&self, origin: granary_proto::Origin, bytes: usize) {
        let labels = [
            ("origin", origin.label().to_string()),
            ("dataset", self.dataset.clone()),
            ("training_job", self.job.clone()),
        ];
        metrics::counter!(granary_core::metrics::FUSE_BLOCKS, &labels).increment(1);
        metrics::counter!(granary_core::metrics::FUSE_BLOCK_BYTES, &labels).increment(bytes as u64);
    }
}

/// Most distinct label sets of read metrics (one per top directory and job): past it, new
/// pods' reads count under the mount's job.
const MAX_LABEL_SETS: usize = 256;

/// A label set's key: the namespace's top directory and the opener's pod's job, if known.
type LabelKey = (String, Option<Arc<str>>);

/// The read metric labels of a mount's open files: one shared [`ReadLabels`] per top directory
/// of the namespace and job, at most `MAX_LABEL_SETS` of them kept.
#[derive(Debug)]
pub struct LabelSets {
    /// The mount's job (or pod), "" = none.
    job: String,
    /// Read metric labels by top directory and pod job.
    by_top: Mutex<HashMap<LabelKey, Arc<ReadLabels>>>,
}

impl LabelSets {
    pub fn new(job: String) -> Self {
        LabelSets {
            job,
            by_top: Mutex::new(HashMap::new()),
        }
    }

    /// Stall time by the namespace's top directory (a mount point: low cardinality) and job:
    /// `pod_job` (the opener's pod's, from the CSI driver) or else the mount's; one shared
    /// label set per pair.
    pub fn for_path(&self, path: &str, pod_job: Option<Arc<str>>) -> Arc<ReadLabels> {
        let top = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let mut labels = self.by_top.lock().expect("labels lock");
        let mut key = (top.to_string(), pod_job);
        if let Some(found) = labels.get(&key) {
            return found.clone();
        }
        // Past the bound a new pod's reads count under the mount's job: the series stay bounded.
        if labels.len() >= MAX_LABEL_SETS
            && key.1.take().is_some()
            && let Some(found) = labels.get(&key)
        {
            return found.clone();
        }
        let made = Arc::new(ReadLabels {
            dataset: top.to_string(),
            job: key.1.as_deref().unwrap_or(&self.job).to_string(),
        });
        if labels.len() < MAX_LABEL_SETS {
            labels.insert(key, made.clone());
        }
        made
    }
}

/// Blocks kept behind the current read for stragglers.
const KEEP_BEHIND: u64 = 1;

pub struct FileReader {
    object: ObjectRef,
    block_size: BlockSize,
    budget: Budget,
    labels: Arc<ReadLabels>,
    /// The readahead window's largest size, in blocks.
    max_ahead: u64,
    state: Mutex<State>,
}

struct State {
    readahead: Readahead,
    blocks: BTreeMap<u64, Inflight>,
}

impl FileReader {
    pub fn new(
        object: ObjectRef,
        block_size: BlockSize,
        max_ahead_blocks: u64,
        budget: Budget,
        labels: Arc<ReadLabels>,
    ) -> Self {
        FileReader {
            object,
            block_size,
            budget,
            labels,
            max_ahead: max_ahead_blocks,
            state: Mutex::new(State {
                readahead: Readahead::new(max_ahead_blocks),
                blocks: BTreeMap::new(),
            }),
        }
    }

    pub fn object(&self) -> &ObjectRef {
        &self.object
    }

    fn fetch<A: CacheApi>(&self, api: &Arc<A>, index: u64) -> BlockFuture {
        let api = api.clone();
        let object = self.object.clone();
        let labels = self.labels.clone();
        let task = tokio::spawn(async move {
            let block = api.read_block(&object, index).await?;
            labels.fetched(block.origin, block.data.len());
            Ok(block.data)
        });
        async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(ApiError::Internal(format!("block fetch task failed: {e}"))),
            }
        }
        .boxed()
        .shared()
    }

    /// Reads up to `len` bytes at `offset` (short at the end of the file).
    pub async fn read<A: CacheApi>(
        &self,
        api: &Arc<A>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ApiError> {
        let size = self.object.id.size;
        let bs = self.block_size;
        let needed = bs.indices(offset, len, size);
        if needed.is_empty() {
            return Ok(Bytes::new());
        }
        let waits: Option<Vec<(u64, BlockFuture)>> = 'plan: {
            let mut state = self.state.lock().expect("reader lock");
            let plan = state.readahead.on_read(offset, len, bs, size);
            if state.readahead.window() == 0
                && !needed.clone().any(|i| state.blocks.contains_key(&i))
            {
                // A seek with nothing in flight: a random reader. It gets the bytes it asked
                // for, not whole blocks (the worker fetches and reads only what covers them).
                break 'plan None;
            }
            // Keep what the stream may still read: the block just behind the plan (the kernel's
            // parallel requests arrive out of order across a block boundary) and the whole
            // window ahead (a straggler's plan ends before the blocks already in flight for
            // later reads). Dropping either made the next read fetch it again.
            let keep = plan.start.saturating_sub(KEEP_BEHIND)
                ..plan.start + (needed.end - needed.start) + self.max_ahead + 1;
            state.blocks.retain(|i, _| keep.contains(i));
            for index in plan {
                if state.blocks.contains_key(&index) {
                    continue;
                }
                let permit = if needed.contains(&index) {
                    None
                } else {
                    match self
                        .budget
                        .try_take(bs.range(index, size).end - bs.range(index, size).start)
                    {
                        Some(p) => Some(p),
                        None => break,
                    }
                };
                let block = self.fetch(api, index);
                state.blocks.insert(
                    index,
                    Inflight {
                        block,
                        _permit: permit,
                    },
                );
            }
            Some(
                needed
                    .clone()
                    .map(|i| (i, state.blocks[&i].block.clone()))
                    .collect(),
            )
        };
        let Some(waits) = waits else {
            return self.read_ranges(api, offset, len).await;
        };
        let mut parts = Vec::with_capacity(waits.len());
        let mut failure = None;
        let mut stalled = std::time::Duration::ZERO;
        for (index, wait) in waits {
            let ready = wait.peek().is_some();
            let started = std::time::Instant::now();
            let result = wait.await;
            if !ready {
                stalled += started.elapsed();
            }
            match result {
                Ok(data) => parts.push(data),
                Err(e) => {
                    self.state
                        .lock()
                        .expect("reader lock")
                        .blocks
                        .remove(&index);
                    failure.get_or_insert(e);
                }
            }
        }
        self.budget.publish();
        if !stalled.is_zero() {
            self.labels.stall().record(stalled.as_secs_f64());
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let expected_total: u64 = bs
            .spans(offset, len, size)
            .map(|s| s.within.end - s.within.start)
            .sum();
        let mut spans = bs.spans(offset, len, size);
        if parts.len() == 1 {
            let span = spans.next().expect("one span");
            return slice(&parts[0], span.within, span.index, &self.object);
        }
        let mut out = BytesMut::with_capacity(expected_total as usize);
        for (span, data) in spans.zip(&parts) {
            out.extend_from_slice(&slice(data, span.within, span.index, &self.object)?);
        }
        Ok(out.freeze())
    }
}

impl FileReader {
    /// A random read: each block's part of it read as a range, in parallel.
    async fn read_ranges<A: CacheApi>(
        &self,
        api: &Arc<A>,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ApiError> {
        let started = std::time::Instant::now();
        let spans: Vec<_> = self
            .block_size
            .spans(offset, len, self.object.id.size)
            .collect();
        let reads = spans.iter().map(|span| async {
            let (data, origin) = api
                .read_range(&self.object, span.index, span.within.clone())
                .await?;
            if data.len() as u64 != span.within.end - span.within.start {
                return Err(ApiError::Corrupt(format!(
                    "block {} of {:?}: asked for {} bytes, got {}",
                    span.index,
                    self.object.id.key,
                    span.within.end - span.within.start,
                    data.len()
                )));
            }
            self.labels.fetched(origin, data.len());
            Ok(data)
        });
        let parts = futures::future::try_join_all(reads).await?;
        self.labels.stall().record(started.elapsed().as_secs_f64());
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for part in &parts {
            out.extend_from_slice(part);
        }
        Ok(out.freeze())
    }
}

fn slice(
    data: &Bytes,
    within: std::ops::Range<u64>,
    index: u64,
    object: &ObjectRef,
) -> Result<Bytes, ApiError> {
    if within.end as usize > data.len() {
        return Err(ApiError::Corrupt(format!(
            "block {index} of {:?} has {} bytes, needed {}",
            object.id.key,
            data.len(),
            within.end
        )));
    }
    Ok(data.slice(within.start as usize..within.end as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_carry_pod_jobs_and_stay_bounded() {
        let sets = LabelSets::new("mount-job".into());
        let plain = sets.for_path("/imagenet/train/0.jpg", None);
        assert_eq!(
            (plain.dataset.as_str(), plain.job.as_str()),
            ("imagenet", "mount-job")
        );
        let pod = sets.for_path("/imagenet/x", Some(Arc::from("ns/resnet")));
        assert_eq!(pod.job, "ns/resnet");
        assert!(Arc::ptr_eq(
            &pod,
            &sets.for_path("/imagenet/y", Some(Arc::from("ns/resnet")))
        ));
        for i in 0..2 * MAX_LABEL_SETS {
            sets.for_path("/imagenet/z", Some(Arc::from(format!("ns/job-{i}"))));
        }
        assert_eq!(sets.by_top.lock().unwrap().len(), MAX_LABEL_SETS);
        let late = sets.for_path("/imagenet/z", Some(Arc::from("ns/late")));
        assert!(
            Arc::ptr_eq(&late, &plain),
            "past the bound: the mount's job"
        );
    }
}
