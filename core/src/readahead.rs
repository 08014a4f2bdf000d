//! The sequential readahead window of one open file.
//!
//! Each read reports its offset and length; the window answers which blocks should be in flight.
//! A read that lands within the current stream (just behind where the last read ended, or inside
//! the blocks already requested ahead) is sequential: the window doubles, up to `max_blocks`
//! ahead. With no stream, only a read next to the last one (within four of its lengths, or 256
//! KiB) starts one. Any other read is a seek: the window collapses to zero blocks ahead, so random reads
//! cost exactly the blocks they touch. The kernel may deliver readahead requests slightly out of
//! order (FUSE async reads), which a tolerance of one window behind `last_end` absorbs.
//!
//! The window bounds the memory one file may hold in flight (`max_blocks * block size`); the
//! caller also holds a global byte budget and may start fewer blocks than planned.

use crate::block::BlockSize;
use std::ops::Range;

#[derive(Debug, Clone)]
pub struct Readahead {
    max_blocks: u64,
    /// Blocks fetched ahead of the current read.
    window: u64,
    /// Where the stream's furthest read ended.
    last_end: u64,
    /// The last read's length.
    last_len: u64,
}

/// How far from the last read's end a read may start and still start a stream (or four times
/// the last read's length, if more).
const START_TOLERANCE: u64 = 256 << 10;

impl Readahead {
    /// A window that grows to at most `max_blocks` blocks ahead of the reader.
    pub fn new(max_blocks: u64) -> Self {
        Readahead {
            max_blocks,
            window: 0,
            last_end: 0,
            last_len: 0,
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Records a read and returns the block indices that should be in flight for it: the blocks
    /// the read touches, then the window ahead, clipped to the object.
    pub fn on_read(&mut self, offset: u64, len: u64, bs: BlockSize, size: u64) -> Range<u64> {
        let needed = bs.indices(offset, len, size);
        // Reads anywhere within the current window, behind or ahead of the furthest read, belong
        // to the stream: the kernel sends a window's worth of async reads in any order. With no
        // stream yet (the first read, or after a seek), only a read next to the last one starts
        // one: a random reader whose reads happen to land a block apart does not.
        let tolerance = if self.window == 0 {
            self.last_len.saturating_mul(4).max(START_TOLERANCE)
        } else {
            (self.window + 1) * bs.get()
        };
        let sequential = offset.saturating_add(tolerance) >= self.last_end
            && offset <= self.last_end.saturating_add(tolerance);
        self.last_len = len;
        if sequential {
            self.window = (self.window * 2)
                .clamp(1, self.max_blocks.max(1))
                .min(self.max_blocks);
            self.last_end = self.last_end.max(offset.saturating_add(len));
        } else {
            self.window = 0;
            self.last_end = offset.saturating_add(len);
        }
        if needed.is_empty() {
            return needed;
        }
        let end = needed.end.saturating_add(self.window).min(bs.count(size));
        needed.start..end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn grows_while_sequential_and_resets_on_seek() {
        let bs = BlockSize::new(4 * MIB).unwrap();
        let size = 1 << 30;
        let mut ra = Readahead::new(8);
        assert_eq!(ra.on_read(0, MIB, bs, size), 0..2);
        assert_eq!(ra.on_read(MIB, MIB, bs, size), 0..3);
        assert_eq!(ra.on_read(2 * MIB, MIB, bs, size), 0..5);
        assert_eq!(ra.on_read(3 * MIB, MIB, bs, size), 0..9);
        assert_eq!(ra.on_read(4 * MIB, MIB, bs, size), 1..10);
        assert_eq!(ra.window(), 8);
        // A far seek: only the touched block.
        assert_eq!(ra.on_read(500 * MIB, MIB, bs, size), 125..126);
        assert_eq!(ra.window(), 0);
        // Reading on from there grows again.
        assert_eq!(ra.on_read(501 * MIB, MIB, bs, size), 125..127);
    }

    #[test]
    fn tolerates_slightly_reordered_reads() {
        let bs = BlockSize::new(4 * MIB).unwrap();
        let mut ra = Readahead::new(8);
        for i in 0..8 {
            ra.on_read(i * MIB, MIB, bs, 1 << 30);
        }
        let w = ra.window();
        // The kernel sends 9 MiB before 8 MiB.
        ra.on_read(9 * MIB, MIB, bs, 1 << 30);
        ra.on_read(8 * MIB, MIB, bs, 1 << 30);
        assert!(ra.window() >= w);
    }

    #[test]
    fn random_reads_a_block_apart_start_no_stream() {
        let bs = BlockSize::new(4 * MIB).unwrap();
        let mut ra = Readahead::new(8);
        assert_eq!(ra.on_read(100 * MIB, 64 << 10, bs, 1 << 30), 25..26);
        assert_eq!(ra.window(), 0);
        assert_eq!(ra.on_read(103 * MIB, 64 << 10, bs, 1 << 30), 25..26);
        assert_eq!(ra.window(), 0);
        // Next to the last read: a stream starts.
        ra.on_read(103 * MIB + (64 << 10), 64 << 10, bs, 1 << 30);
        assert_eq!(ra.window(), 1);
    }

    #[test]
    fn clipped_at_end_of_object() {
        let bs = BlockSize::new(4 * MIB).unwrap();
        let mut ra = Readahead::new(8);
        assert_eq!(ra.on_read(0, MIB, bs, 6 * MIB), 0..2);
        assert_eq!(ra.on_read(7 * MIB, MIB, bs, 6 * MIB), 0..0);
        let mut ra = Readahead::new(8);
        assert_eq!(ra.on_read(0, MIB, bs, 0), 0..0);
    }

    proptest! {
        /// Whatever the read pattern: the plan covers the read, starts at its first block, and
        /// never runs more than `max` blocks ahead or past the object.
        #[test]
        fn plan_is_bounded(max in 0u64..16, reads in proptest::collection::vec((0u64..(64 * MIB), 1u64..(2 * MIB)), 1..50)) {
            let bs = BlockSize::new(MIB).unwrap();
            let size = 48 * MIB;
            let mut ra = Readahead::new(max);
            for (offset, len) in reads {
                let plan = ra.on_read(offset, len, bs, size);
                let needed = bs.indices(offset, len, size);
                prop_assert!(ra.window() <= max);
                if needed.is_empty() {
                    prop_assert!(plan.is_empty());
                } else {
                    prop_assert_eq!(plan.start, needed.start);
                    prop_assert!(plan.end >= needed.end);
                    prop_assert!(plan.end <= needed.end + max);
                    prop_assert!(plan.end <= bs.count(size));
                }
            }
        }
    }
}
