//! The limits of what the filesystem keeps for the kernel: open handles (`FsConfig::max_handles`)
//! and inodes (`FsConfig::max_inodes`, kept by asking the kernel to drop the least used).

use super::{FsError, GranaryFs};
use crate::inodes::KernelEntry;
use granary_proto::CacheApi;
use std::time::{Duration, Instant};

impl<A: CacheApi> GranaryFs<A> {
    /// Whether another handle may be opened (`FsConfig::max_handles`).
    pub(super) fn room_for_a_handle(&self) -> Result<(), FsError> {
        let open = self.files.lock().expect("files lock").len()
            + self.dirs.lock().expect("dirs lock").len();
        if open >= self.config.max_handles {
            return Err(FsError::TooManyOpen(open));
        }
        Ok(())
    }

    /// Entries to ask the kernel to drop so that the inode table gets back under
    /// `FsConfig::max_inodes` (a tenth below it), least recently used first, none open. The
    /// kernel forgets those it is not using, and they leave the table. Counted.
    pub fn excess_entries(&self) -> Vec<KernelEntry> {
        let mut inodes = self.inodes.lock().expect("inode lock");
        let len = inodes.len();
        metrics::gauge!(granary_core::metrics::FUSE_INODES).set(len as f64);
        if len <= self.config.max_inodes {
            return Vec::new();
        }
        let target = self.config.max_inodes - self.config.max_inodes / 10;
        let shed = inodes.least_used(
            len - target,
            |ino| self.modes.is_open(ino),
            Instant::now(),
            Duration::from_secs(60),
        );
        metrics::counter!(granary_core::metrics::FUSE_INODES_SHED).increment(shed.len() as u64);
        shed
    }
}
