//! The block cache: a memory tier (foyer's in-memory cache) over a disk tier of block files
//! (`disk.rs`), both of fixed-size object blocks.
//!
//! Keys are [`BlockKey`]s (object version fingerprint + block index), so a changed object never
//! reuses an old block. A miss is read from the disk tier, else fetched from the backend; a
//! block fetched from the backend is offered to both tiers, and the disk tier's write queue
//! slows the reader down rather than drop it. Concurrent misses on one key share one fetch.
//! Random readers ask for a range of a block (`read_range`): the disk tier reads, and the
//! backend fetches, only the 64 KiB chunks that cover it. The disk tier checks the CRC32C of
//! the chunks it reads (one check per hit); a damaged chunk is a miss and is refetched, never
//! served. A restarted worker finds its block files again.
//!
//! Which blocks each tier admits and gives up is decided in one place, [`CachePolicy`]
//! (`policy.rs`).

mod disk;
mod policy;

use crate::config::CacheSettings;
use bytes::Bytes;
use disk::DiskTier;
use foyer::{Cache, CacheBuilder, Event, EventListener, LruConfig};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use granary_core::BlockKey;
use granary_core::metrics as m;
use granary_proto::{ApiError, Block};
use policy::{Admit, CachePolicy, TierId};
use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Which tier served a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
    Backend,
    /// Fetched from the worker that owns the block.
    Peer,
}

impl Tier {
    /// What a client is told about where its block came from (a peer's block keeps the
    /// origin the peer reported).
    pub fn origin(self) -> Option<granary_proto::Origin> {
        match self {
            Tier::Memory => Some(granary_proto::Origin::Memory),
            Tier::Disk => Some(granary_proto::Origin::Disk),
            Tier::Backend => Some(granary_proto::Origin::Backend),
            Tier::Peer => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Backend => "backend",
            Tier::Peer => "peer",
        }
    }
}

/// What a block weighs against the memory tier's capacity: its bytes plus 64.
fn memory_weight(block: &Block) -> u64 {
    block.data.len() as u64 + 64
}

type Flight = Shared<BoxFuture<'static, Result<(Block, Tier), ApiError>>>;

pub struct BlockCache {
    inner: Arc<Inner>,
}

struct Inner {
    memory: Cache<u128, Block>,
    disk: Option<Arc<DiskTier>>,
    policy: Arc<CachePolicy>,
    /// Misses being served, by key: concurrent readers of one block share its fetch.
    flights: Mutex<HashMap<u128, Flight>>,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the block cache in {dir}: {message}")]
pub struct CacheOpenError {
    pub dir: String,
    pub message: String,
}

/// Tells the policy what the memory tier gave up on its own.
struct Departures(Arc<CachePolicy>);

impl EventListener for Departures {
    type Key = u128;
    type Value = Block;

    fn on_leave(&self, reason: Event, key: &u128, _value: &Block) {
        // A replaced entry is the same key, still held.
        if reason != Event::Replace {
            self.0.left(TierId::Memory, *key);
        }
    }
}

impl BlockCache {
    pub async fn open(settings: &CacheSettings) -> Result<Self, CacheOpenError> {
        let err = |message: String| CacheOpenError {
            dir: settings.dir.display().to_string(),
            message,
        };
        let (memory_bytes, disk_bytes) = (settings.memory.bytes(), settings.disk.bytes());
        let policy = Arc::new(CachePolicy::new(memory_bytes, disk_bytes));
        let memory = CacheBuilder::new(memory_bytes as usize)
            .with_name("granary-blocks")
            // One shard: the policy decides evictions for the whole tier, and foyer evicts only
            // when its count and the policy's disagree for a moment.
            .with_shards(1)
            .with_eviction_config(LruConfig {
                high_priority_pool_ratio: 0.0,
            })
            .with_weighter(|_: &u128, block: &Block| memory_weight(block) as usize)
            .with_event_listener(Arc::new(Departures(policy.clone())))
            .build();
        // The disk tier of the cache's earlier versions (foyer's regions): not readable now.
        let old = settings.dir.join("blocks");
        if old.is_dir() {
            tracing::info!(dir = %old.display(), "removing the disk tier of an earlier version");
            std::fs::remove_dir_all(&old).map_err(|e| err(e.to_string()))?;
        }
        let disk = if disk_bytes == 0 {
            None
        } else {
            let dir = settings.dir.join("block-files");
            let policy = policy.clone();
            let tier =
                tokio::task::spawn_blocking(move || DiskTier::open(&dir, policy, disk_bytes))
                    .await
                    .map_err(|e| err(e.to_string()))?
                    .map_err(|e| err(e.to_string()))?;
            Some(Arc::new(tier))
        };
        metrics::gauge!(m::CACHE_CAPACITY_BYTES, "tier" => "memory").set(memory_bytes as f64);
        metrics::gauge!(m::CACHE_CAPACITY_BYTES, "tier" => "disk").set(disk_bytes as f64);
        Ok(BlockCache {
            inner: Arc::new(Inner {
                memory,
                disk,
                policy,
                flights: Mutex::default(),
            }),
        })
    }

    /// The block at `key`, from memory, disk, or `fetch` (one fetch for concurrent misses).
    /// `fetch` makes the backend read; the block is offered to both tiers.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: BlockKey,
        fetch: F,
    ) -> Result<(Block, Tier), ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Block, ApiError>> + Send + 'static,
    {
        self.get_or_fetch_from(key, fetch, Tier::Backend).await
    }

    /// A block another worker owns: from this node's tiers, else `fetch` from its owner, one
    /// fetch for this node's concurrent readers (so an owner sends a block to a node once
    /// however many of its readers want it). The block is offered to the memory tier only,
    /// through the same frequency test as any block: blocks of other owners take at most the
    /// memory tier, and only as long as they are read more than what they would replace; the
    /// owner's disk tier keeps the lasting copy.
    pub async fn get_or_fetch_remote<F, Fut>(
        &self,
        key: BlockKey,
        fetch: F,
    ) -> Result<(Block, Tier), ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Block, ApiError>> + Send + 'static,
    {
        self.get_or_fetch_from(key, fetch, Tier::Peer).await
    }

    /// `source` is [`Tier::Backend`] or [`Tier::Peer`]: what `fetch` reads.
    async fn get_or_fetch_from<F, Fut>(
        &self,
        key: BlockKey,
        fetch: F,
        source: Tier,
    ) -> Result<(Block, Tier), ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Block, ApiError>> + Send + 'static,
    {
        let inner = &self.inner;
        inner.policy.request(key.0);
        let (block, tier) = match inner.memory_hit(key.0) {
            Some(block) => (block, Tier::Memory),
            None => {
                let flight = {
                    let mut flights = inner.flights.lock().expect("flights");
                    match flights.get(&key.0) {
                        Some(f) => f.clone(),
                        None => {
                            let fut = fetch();
                            let inner2 = inner.clone();
                            let f = async move {
                                let r = inner2.clone().miss(key.0, fut, source).await;
                                inner2.flights.lock().expect("flights").remove(&key.0);
                                r
                            }
                            .boxed()
                            .shared();
                            flights.insert(key.0, f.clone());
                            f
                        }
                    }
                };
                flight.await?
            }
        };
        count(tier, block.data.len());
        Ok((block, tier))
    }

    /// The block at `key` if this node has it (memory or disk), without fetching.
    pub async fn get_cached(&self, key: BlockKey) -> Option<(Block, Tier)> {
        let inner = &self.inner;
        inner.policy.request(key.0);
        let (block, tier) = match inner.memory_hit(key.0) {
            Some(block) => (block, Tier::Memory),
            None => (inner.disk_hit(key.0).await?, Tier::Disk),
        };
        count(tier, block.data.len());
        Some((block, tier))
    }

    /// `range` of the block at `key` (`len` bytes long), reading from the disk tier, and
    /// fetching from the backend (`fetch`, given a range of the block), only the 64 KiB chunks
    /// that cover it. For random readers: a whole block from memory is sliced; the memory tier
    /// does not take parts of blocks.
    pub async fn read_range<F, Fut>(
        &self,
        key: BlockKey,
        len: u64,
        range: Range<u64>,
        fetch: F,
    ) -> Result<(Bytes, Tier), ApiError>
    where
        F: FnOnce(Range<u64>) -> Fut,
        Fut: Future<Output = Result<Bytes, ApiError>> + Send + 'static,
    {
        let inner = &self.inner;
        if range.end > len || range.start > range.end {
            return Err(ApiError::Invalid(format!(
                "range {range:?} is outside a block of {len} bytes"
            )));
        }
        inner.policy.request(key.0);
        let slice = |data: &Bytes| data.slice(range.start as usize..range.end as usize);
        let (data, tier) = if let Some(block) = inner.memory_hit(key.0) {
            (slice(&block.data), Tier::Memory)
        } else if let Some(disk) = inner.disk.clone().filter(|d| d.has(key.0, Some(&range)))
            && let Some(read) = {
                let range = range.clone();
                tokio::task::spawn_blocking(move || disk.read(key.0, Some(range)))
                    .await
                    .ok()
                    .flatten()
            }
        {
            inner.policy.touch(TierId::Disk, key.0);
            (read.data, Tier::Disk)
        } else {
            let span = range.start / disk::CHUNK * disk::CHUNK
                ..(range.end.div_ceil(disk::CHUNK) * disk::CHUNK).min(len);
            let data = fetch(span.clone()).await?;
            if data.len() as u64 != span.end - span.start {
                return Err(ApiError::Unavailable(format!(
                    "asked the backend for {} bytes and got {}",
                    span.end - span.start,
                    data.len()
                )));
            }
            if let Some(disk) = &inner.disk {
                disk.offer(key.0, len, span.start, data.clone(), None).await;
            }
            let from = (range.start - span.start) as usize;
            (
                data.slice(from..from + (range.end - range.start) as usize),
                Tier::Backend,
            )
        };
        count(tier, data.len());
        Ok((data, tier))
    }

    /// Brings the block at `key` into the memory tier, admitted whatever the policy's counts say
    /// (a reader said it will read it soon): from memory (touched), disk or `fetch`.
    pub async fn prefetch<F, Fut>(&self, key: BlockKey, fetch: F) -> Result<Tier, ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Block, ApiError>> + Send + 'static,
    {
        let inner = &self.inner;
        if inner.memory_hit(key.0).is_some() {
            return Ok(Tier::Memory);
        }
        let (block, tier) = match inner.disk_hit(key.0).await {
            Some(block) => (block, Tier::Disk),
            None => {
                let block = fetch().await?;
                if let Some(disk) = &inner.disk {
                    disk.offer(
                        key.0,
                        block.data.len() as u64,
                        0,
                        block.data.clone(),
                        Some(block.crc32c),
                    )
                    .await;
                }
                (block, Tier::Backend)
            }
        };
        if let Admit::Yes { evict } =
            inner
                .policy
                .admit_anyway(TierId::Memory, key.0, memory_weight(&block))
        {
            for victim in evict {
                metrics::counter!(m::CACHE_EVICTIONS, "tier" => "memory").increment(1);
                inner.memory.remove(&victim);
            }
            inner.memory.insert(key.0, block);
        }
        Ok(tier)
    }

    /// Bytes held by the memory tier.
    pub fn memory_used(&self) -> u64 {
        self.inner.memory.usage() as u64
    }

    /// Writes what is queued to disk.
    pub async fn close(&self) {
        if let Some(disk) = &self.inner.disk {
            disk.flush().await;
        }
    }
}

impl Inner {
    fn memory_hit(&self, key: u128) -> Option<Block> {
        let entry = self.memory.get(&key)?;
        self.policy.touch(TierId::Memory, key);
        Some(entry.value().clone())
    }

    /// The whole block from the disk tier (its chunks checked), offered to the memory tier.
    async fn disk_hit(&self, key: u128) -> Option<Block> {
        let disk = self.disk.clone().filter(|d| d.has(key, None))?;
        let read = tokio::task::spawn_blocking(move || disk.read(key, None))
            .await
            .ok()
            .flatten()?;
        self.policy.touch(TierId::Disk, key);
        let crc32c = read
            .crc32c
            .unwrap_or_else(|| granary_core::object::checksum(&read.data));
        let block = Block {
            data: read.data,
            crc32c,
            origin: granary_proto::Origin::Unknown,
        };
        self.offer_memory(key, &block);
        Some(block)
    }

    /// A miss of the memory tier: the disk tier, else `fetch` from `source` (a backend's
    /// block is then offered to both tiers, an owner's to memory only).
    async fn miss(
        self: Arc<Self>,
        key: u128,
        fetch: impl Future<Output = Result<Block, ApiError>>,
        source: Tier,
    ) -> Result<(Block, Tier), ApiError> {
        if let Some(block) = self.disk_hit(key).await {
            return Ok((block, Tier::Disk));
        }
        let block = fetch.await?;
        self.offer_memory(key, &block);
        if source == Tier::Peer {
            return Ok((block, Tier::Peer));
        }
        if let Some(disk) = &self.disk {
            disk.offer(
                key,
                block.data.len() as u64,
                0,
                block.data.clone(),
                Some(block.crc32c),
            )
            .await;
        }
        Ok((block, Tier::Backend))
    }

    fn offer_memory(&self, key: u128, block: &Block) {
        match self.policy.admit(TierId::Memory, key, memory_weight(block)) {
            Admit::Yes { evict } => {
                metrics::counter!(m::CACHE_ADMISSIONS, "tier" => "memory", "result" => "admitted")
                    .increment(1);
                for victim in evict {
                    metrics::counter!(m::CACHE_EVICTIONS, "tier" => "memory").increment(1);
                    self.memory.remove(&victim);
                }
                self.memory.insert(key, block.clone());
            }
            Admit::No => {
                metrics::counter!(m::CACHE_ADMISSIONS, "tier" => "memory", "result" => "rejected")
                    .increment(1);
            }
        }
        metrics::gauge!(m::CACHE_USED_BYTES, "tier" => "memory")
            .set(self.policy.used(TierId::Memory) as f64);
    }
}

fn count(tier: Tier, bytes: usize) {
    metrics::counter!(m::BLOCK_READS, "tier" => tier.label()).increment(1);
    metrics::counter!(m::BLOCK_READ_BYTES, "tier" => tier.label()).increment(bytes as u64);
}
