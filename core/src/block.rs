//! Block arithmetic: objects are cached in fixed-size blocks; reads are split along them.
//!
//! Block `i` of an object of `size` bytes covers `[i * bs, min((i + 1) * bs, size))`. A read of
//! `len` bytes at `offset` touches the blocks returned by [`BlockSize::spans`], clipped to the
//! object's end, so that a read past EOF yields no span and a read across the end is short.

use std::ops::Range;

/// The fixed block size of a cache, in bytes (a power of two between 64 KiB and 64 MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize(u64);

/// Why a block size is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid block size {0} bytes: it must be a power of two between 64KiB and 64MiB")]
pub struct BlockSizeError(pub u64);

/// One block's part of a read: which block, and which bytes of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpan {
    pub index: u64,
    /// Byte range inside the block.
    pub within: Range<u64>,
}

impl BlockSize {
    pub const MIN: u64 = 64 << 10;
    pub const MAX: u64 = 64 << 20;
    pub const DEFAULT: BlockSize = BlockSize(4 << 20);

    pub fn new(bytes: u64) -> Result<Self, BlockSizeError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(BlockSize(bytes))
        } else {
            Err(BlockSizeError(bytes))
        }
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// Number of blocks an object of `size` bytes has.
    pub fn count(self, size: u64) -> u64 {
        size.div_ceil(self.0)
    }

    /// The bytes of the object that block `index` holds (empty when past the end).
    pub fn range(self, index: u64, size: u64) -> Range<u64> {
        let start = index.saturating_mul(self.0).min(size);
        let end = start.saturating_add(self.0).min(size);
        start..end
    }

    /// The index of the block that holds byte `offset`.
    pub fn index_of(self, offset: u64) -> u64 {
        offset / self.0
    }

    /// The block indices a read of `len` bytes at `offset` touches in an object of `size` bytes.
    pub fn indices(self, offset: u64, len: u64, size: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return 0..0;
        }
        self.index_of(offset)..self.index_of(end - 1) + 1
    }

    /// Splits a read into per-block spans, in order, clipped to the object's end.
    pub fn spans(self, offset: u64, len: u64, size: u64) -> impl Iterator<Item = BlockSpan> {
        let end = offset.saturating_add(len).min(size);
        let bs = self.0;
        self.indices(offset, len, size).map(move |index| {
            let block_start = index * bs;
            let from = offset.max(block_start) - block_start;
            let to = end.min(block_start.saturating_add(bs)) - block_start;
            BlockSpan {
                index,
                within: from..to,
            }
        })
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn validates_block_size() {
        assert!(BlockSize::new(4 << 20).is_ok());
        assert!(BlockSize::new(64 << 10).is_ok());
        assert!(BlockSize::new(3 << 20).is_err());
        assert!(BlockSize::new(32 << 10).is_err());
        assert!(BlockSize::new(128 << 20).is_err());
        assert!(BlockSize::new(0).is_err());
    }

    #[test]
    fn edge_cases() {
        let bs = BlockSize::new(1 << 16).unwrap();
        assert_eq!(bs.count(0), 0);
        assert_eq!(bs.count(1), 1);
        assert_eq!(bs.count(1 << 16), 1);
        assert_eq!(bs.count((1 << 16) + 1), 2);
        assert_eq!(bs.spans(0, 10, 0).count(), 0);
        assert_eq!(bs.spans(100, 10, 50).count(), 0);
        let spans: Vec<_> = bs.spans((1 << 16) - 1, 2, 1 << 20).collect();
        assert_eq!(
            spans,
            vec![
                BlockSpan {
                    index: 0,
                    within: (1 << 16) - 1..1 << 16
                },
                BlockSpan {
                    index: 1,
                    within: 0..1
                }
            ]
        );
        assert_eq!(bs.range(1, (1 << 16) + 1), (1 << 16)..(1 << 16) + 1);
        assert_eq!(bs.range(5, 10), 10..10);
        assert_eq!(bs.spans(u64::MAX - 1, u64::MAX, u64::MAX).count(), 1);
    }

    proptest! {
        /// The spans of any read tile exactly the requested bytes that exist, in order.
        #[test]
        fn spans_tile_the_read(shift in 16u32..24, size in 0u64..(1 << 26), offset in 0u64..(1 << 27), len in 0u64..(1 << 25)) {
            let bs = BlockSize::new(1 << shift).unwrap();
            let end = offset.saturating_add(len).min(size);
            let mut pos = offset;
            for span in bs.spans(offset, len, size) {
                let block = bs.range(span.index, size);
                prop_assert!(span.within.start < span.within.end);
                prop_assert!(span.within.end <= block.end - block.start);
                prop_assert_eq!(block.start + span.within.start, pos);
                pos = block.start + span.within.end;
            }
            prop_assert_eq!(pos, end.max(offset));
        }

        /// Every byte of an object belongs to exactly one block.
        #[test]
        fn blocks_partition_the_object(shift in 16u32..24, size in 0u64..(1 << 26)) {
            let bs = BlockSize::new(1 << shift).unwrap();
            let mut pos = 0;
            for i in 0..bs.count(size) {
                let r = bs.range(i, size);
                prop_assert_eq!(r.start, pos);
                prop_assert!(!r.is_empty());
                pos = r.end;
            }
            prop_assert_eq!(pos, size);
            prop_assert!(bs.range(bs.count(size), size).is_empty());
        }
    }
}
