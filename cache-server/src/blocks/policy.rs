//! The block cache's policy seam: what the memory tier evicts and what a block weighs there,
//! which blocks go to the disk tier and when, and what the disk tier evicts. Each choice is made
//! here, once, and [`super::BlockCache::open`] applies it.
//!
//! Today's choices are foyer's own defaults, stated: an LRU memory tier weighed by bytes, every
//! block written to disk as it is inserted (no admission filter of ours), and the disk tier's
//! default region eviction.

use super::CachedBlock;
use foyer::{
    EvictionConfig, EvictionPicker, FifoPicker, HybridCachePolicy, InvalidRatioPicker, LruConfig,
    StorageFilter,
};

/// The block cache's admission and eviction choices.
#[derive(Debug, Clone, Copy)]
pub(super) struct CachePolicy;

impl CachePolicy {
    /// The policy the block cache runs with (there is no choice of it in the configuration).
    pub(super) fn current() -> Self {
        CachePolicy
    }

    /// How the memory tier picks what to evict: LRU, with foyer's default high-priority pool
    /// (`LruConfig::default()`, also what foyer uses when none is given).
    pub(super) fn memory_eviction(&self) -> EvictionConfig {
        LruConfig::default().into()
    }

    /// What a block weighs against the memory tier's capacity: its bytes plus 64.
    pub(super) fn weight(_key: &u128, value: &CachedBlock) -> usize {
        value.0.data.len() + 64
    }

    /// When a block is written to the disk tier: as it is inserted (not when the memory tier
    /// evicts it), so a restarted worker finds it again.
    pub(super) fn disk_writes(&self) -> HybridCachePolicy {
        HybridCachePolicy::WriteOnInsertion
    }

    /// Which blocks the disk tier admits: all (foyer's default filter, to which foyer adds its
    /// own I/O-throttle condition). Blocks past the write buffer are still not written (see
    /// `DISK_WRITE_BUFFER`).
    pub(super) fn disk_admission(&self) -> StorageFilter {
        StorageFilter::new()
    }

    /// How the disk tier picks a region to evict: one at least 80% invalid first, else the oldest
    /// (FIFO); foyer's default pickers for its block engine.
    pub(super) fn disk_eviction(&self) -> Vec<Box<dyn EvictionPicker>> {
        vec![
            Box::new(InvalidRatioPicker::new(0.8)),
            Box::<FifoPicker>::default(),
        ]
    }
}
