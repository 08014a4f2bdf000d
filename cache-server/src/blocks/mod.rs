//! The block cache: foyer's hybrid (memory + disk) cache of fixed-size object blocks.
//!
//! Keys are [`BlockKey`]s (object version fingerprint + block index), so a changed object never
//! reuses an old block. Values carry the CRC32C computed when the block was fetched; foyer checks
//! its own checksum on every disk read and treats a corrupt entry as a miss, and we check ours on
//! every disk hit as well, so a damaged disk block is refetched from the backend, never served.
//! Concurrent misses on one key share one fetch (`get_or_fetch`). Blocks are written to disk as
//! they are inserted, so a restarted worker finds them again in the same cache directory.
//!
//! Which blocks each tier admits and evicts is chosen in one place, `CachePolicy` (`policy.rs`).

mod policy;

use crate::config::{CacheSettings, disk_region_size};
use bytes::Bytes;
use foyer::{
    BlockEngineConfig, Code, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    RecoverMode, Source,
};
use granary_core::BlockKey;
use granary_core::metrics as m;
use granary_proto::{ApiError, Block};
use policy::CachePolicy;
use std::future::Future;
use std::io::{Read, Write};

/// Bytes of blocks buffered for writing to the disk tier (and as much again queued). When the
/// disk falls behind a cold read, blocks past this are not written: the cache stays correct, it
/// just keeps less on disk.
const DISK_WRITE_BUFFER: usize = 32 << 20;

/// A cached block: the bytes and their CRC32C.
#[derive(Debug, Clone)]
pub struct CachedBlock(pub Block);

impl Code for CachedBlock {
    fn encode(&self, writer: &mut impl Write) -> foyer::Result<()> {
        writer
            .write_all(&self.0.crc32c.to_le_bytes())
            .map_err(foyer::Error::io_error)?;
        writer
            .write_all(&(self.0.data.len() as u64).to_le_bytes())
            .map_err(foyer::Error::io_error)?;
        writer
            .write_all(&self.0.data)
            .map_err(foyer::Error::io_error)
    }

    fn decode(reader: &mut impl Read) -> foyer::Result<Self> {
        let mut header = [0u8; 12];
        reader
            .read_exact(&mut header)
            .map_err(foyer::Error::io_error)?;
        let crc32c = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(header[4..].try_into().expect("8 bytes"));
        if len > granary_core::BlockSize::MAX {
            return Err(foyer::Error::new(
                foyer::ErrorKind::Parse,
                "cached block length out of range",
            ));
        }
        let mut data = vec![0u8; len as usize];
        reader
            .read_exact(&mut data)
            .map_err(foyer::Error::io_error)?;
        Ok(CachedBlock(Block {
            data: Bytes::from(data),
            crc32c,
            origin: granary_proto::Origin::Unknown,
        }))
    }

    fn estimated_size(&self) -> usize {
        12 + self.0.data.len()
    }
}

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

fn memory_shards(memory: u64, block: u64) -> usize {
    (memory / (64 * block)).clamp(1, 16) as usize
}

pub struct BlockCache {
    cache: HybridCache<u128, CachedBlock>,
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

impl BlockCache {
    pub async fn open(settings: &CacheSettings) -> Result<Self, CacheOpenError> {
        let err = |message: String| CacheOpenError {
            dir: settings.dir.display().to_string(),
            message,
        };
        let policy = CachePolicy::current();
        let builder = HybridCacheBuilder::new()
            .with_name("granary-blocks")
            .with_policy(policy.disk_writes())
            .memory(settings.memory.bytes() as usize)
            // foyer splits the memory tier into shards of equal capacity: keep at least 64 blocks
            // per shard, or a small cache evicts blocks long before it is full.
            .with_shards(memory_shards(
                settings.memory.bytes(),
                settings.block_size.get(),
            ))
            .with_eviction_config(policy.memory_eviction())
            .with_weighter(CachePolicy::weight)
            .storage();
        let cache = if settings.disk.bytes() == 0 {
            builder.build().await
        } else {
            let dir = settings.dir.join("blocks");
            std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
            let device = FsDeviceBuilder::new(&dir)
                .with_capacity(settings.disk.bytes() as usize)
                .with_direct(true)
                .build()
                .map_err(|e| err(e.to_string()))?;
            builder
                .with_recover_mode(RecoverMode::Quiet)
                .with_engine_config(
                    BlockEngineConfig::new(device)
                        .with_admission_filter(policy.disk_admission())
                        .with_eviction_pickers(policy.disk_eviction())
                        .with_block_size(disk_region_size(settings.block_size))
                        .with_flushers(2)
                        .with_buffer_pool_size(DISK_WRITE_BUFFER)
                        .with_submit_queue_size_threshold(2 * DISK_WRITE_BUFFER),
                )
                .build()
                .await
        }
        .map_err(|e| err(e.to_string()))?;
        metrics::gauge!(m::CACHE_CAPACITY_BYTES, "tier" => "memory")
            .set(settings.memory.bytes() as f64);
        metrics::gauge!(m::CACHE_CAPACITY_BYTES, "tier" => "disk")
            .set(settings.disk.bytes() as f64);
        Ok(BlockCache { cache })
    }

    /// The block at `key`, from memory, disk, or `fetch` (one fetch for concurrent misses).
    /// `fetch` makes the backend read; it is called again if a disk copy fails its checksum.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: BlockKey,
        fetch: F,
    ) -> Result<(Block, Tier), ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Block, ApiError>> + Send + 'static,
    {
        for attempt in 0..2 {
            let fut = fetch();
            let entry = self
                .cache
                .get_or_fetch(&key.0, move || async move { fut.await.map(CachedBlock) })
                .await
                .map_err(|e| match e.downcast_ref::<ApiError>() {
                    Some(api) => api.clone(),
                    None => ApiError::Internal(format!("block cache: {e}")),
                })?;
            let tier = match entry.source() {
                Source::Memory => Tier::Memory,
                Source::Disk => Tier::Disk,
                Source::Outer => Tier::Backend,
            };
            let block = entry.value().0.clone();
            if tier == Tier::Disk && !block.verify() {
                metrics::counter!(m::BLOCK_CHECKSUM_FAILURES).increment(1);
                tracing::warn!(key = ?key, attempt, "a block from the disk cache failed its checksum; refetching");
                self.cache.remove(&key.0);
                continue;
            }
            metrics::counter!(m::BLOCK_READS, "tier" => tier.label()).increment(1);
            metrics::counter!(m::BLOCK_READ_BYTES, "tier" => tier.label())
                .increment(block.data.len() as u64);
            return Ok((block, tier));
        }
        Err(ApiError::Corrupt(format!(
            "block {key:?} failed its checksum twice"
        )))
    }

    /// The block at `key` if this node has it (memory or disk), without fetching.
    pub async fn get_cached(&self, key: BlockKey) -> Option<(Block, Tier)> {
        let entry = self.cache.get(&key.0).await.ok().flatten()?;
        let tier = if entry.source() == Source::Disk {
            Tier::Disk
        } else {
            Tier::Memory
        };
        let block = entry.value().0.clone();
        if tier == Tier::Disk && !block.verify() {
            metrics::counter!(m::BLOCK_CHECKSUM_FAILURES).increment(1);
            self.cache.remove(&key.0);
            return None;
        }
        metrics::counter!(m::BLOCK_READS, "tier" => tier.label()).increment(1);
        metrics::counter!(m::BLOCK_READ_BYTES, "tier" => tier.label())
            .increment(block.data.len() as u64);
        Some((block, tier))
    }

    /// Bytes held by the memory tier.
    pub fn memory_used(&self) -> u64 {
        self.cache.memory().usage() as u64
    }

    /// Flushes what is in flight to disk and stops the cache.
    pub async fn close(&self) {
        if let Err(e) = self.cache.close().await {
            tracing::warn!(error = %e, "closing the block cache");
        }
    }
}
