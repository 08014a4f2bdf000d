//! Writing loaded blocks to disk: with `O_DIRECT` from a small pool of aligned buffers where
//! the filesystem allows it, else through the page cache. Loading a dataset thus neither pays
//! for copying every byte into the page cache nor evicts the pages a running job reads from it.

use crate::backend::beneath;
use memmap2::MmapMut;
use rustix::fs::OFlags;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// A file of the dataset store: `rel` (a checked key) beneath a dataset's `files` directory,
/// reached only by resolution beneath that directory (never through a symlink or `..`), so
/// no name, however odd, creates, truncates, renames or removes anything outside the store.
#[derive(Debug, Clone)]
pub(super) struct InStore {
    pub(super) root: PathBuf,
    /// `root`, opened (once for a whole load).
    dir: Arc<OwnedFd>,
    pub(super) rel: String,
}

impl InStore {
    /// `rel` beneath `root`, whose directory `dir` is (see [`InStore::open_root`]).
    pub(super) fn new(root: &Path, dir: &Arc<OwnedFd>, rel: &str) -> Self {
        InStore {
            root: root.to_path_buf(),
            dir: dir.clone(),
            rel: rel.to_string(),
        }
    }

    /// Opens `root`, to resolve files beneath it.
    #[cfg(test)]
    fn open_root(root: &Path) -> std::io::Result<Arc<OwnedFd>> {
        beneath::open_root(root).map(Arc::new)
    }

    /// The file named `name(last component)` in the same directory.
    pub(super) fn sibling(&self, name: impl FnOnce(&str) -> String) -> Self {
        let (dir, last) = match self.rel.rsplit_once('/') {
            Some((dir, last)) => (Some(dir), last),
            None => (None, self.rel.as_str()),
        };
        let name = name(last);
        InStore {
            root: self.root.clone(),
            dir: self.dir.clone(),
            rel: dir.map_or(name.clone(), |d| format!("{d}/{name}")),
        }
    }

    /// Its path, for messages and for reading what the store wrote.
    pub(super) fn path(&self) -> PathBuf {
        self.root.join(&self.rel)
    }

    /// Opens it for `flags`; `create` makes it (and its directories) when missing.
    pub(super) fn open(&self, flags: OFlags, create: bool) -> std::io::Result<std::fs::File> {
        beneath::open_file_at(&self.dir, &self.rel, flags, create)
    }

    pub(super) fn rename_to(&self, to: &InStore) -> std::io::Result<()> {
        debug_assert_eq!(self.root, to.root);
        beneath::rename_at(&self.dir, &self.rel, &to.rel)
    }

    pub(super) fn remove(&self) -> std::io::Result<()> {
        beneath::remove_file_at(&self.dir, &self.rel)
    }
}

/// Offsets, lengths and buffer addresses of direct writes are multiples of this.
const DIRECT_ALIGN: usize = 4096;

/// Page-aligned buffers for direct writes, reused within a load. Each is an anonymous map; one
/// of 2 MiB or more asks for transparent huge pages, so filling a fresh 4 MiB block takes two
/// page faults instead of 1,024 (65,536 fewer faults over a load's 256 MiB of buffers).
pub(super) struct BufferPool {
    free: Mutex<Vec<MmapMut>>,
}

/// Transparent huge pages' size on x86-64 and arm64 (with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

impl BufferPool {
    pub(super) fn new() -> Arc<BufferPool> {
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
pub(super) struct AlignedBuf {
    map: Option<MmapMut>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl AlignedBuf {
    pub(super) fn take(pool: &Arc<BufferPool>, len: usize) -> std::io::Result<Self> {
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

    pub(super) fn data(&self) -> &[u8] {
        &self.map()[..self.len]
    }

    pub(super) fn data_mut(&mut self) -> &mut [u8] {
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

/// Writes the blocks of a file being loaded: through `O_DIRECT` from aligned buffers when the
/// filesystem takes it (see the module docs), else through the page cache.
pub(super) struct BlockWriter {
    path: InStore,
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
    /// Creates (or empties) `path` (and its directories) for the blocks of a new file, with
    /// one open: `O_DIRECT` unless the filesystem refuses it.
    pub(super) fn create(path: &InStore, buffers: Arc<BufferPool>) -> std::io::Result<Self> {
        let flags = OFlags::WRONLY | OFlags::TRUNC;
        let direct = path.open(flags | OFlags::DIRECT, true);
        let (direct, buffered) = match direct {
            Ok(f) => (Some(f), OnceLock::new()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                (None, OnceLock::from(path.open(flags, true)?))
            }
            Err(e) => return Err(e),
        };
        Ok(BlockWriter {
            path: path.clone(),
            direct,
            buffered,
            padded: AtomicBool::new(false),
            buffers,
        })
    }

    /// Writes the missing blocks of `buffered`, a partial file at `path` being resumed.
    pub(super) fn resume(
        buffered: std::fs::File,
        path: &InStore,
        buffers: Arc<BufferPool>,
    ) -> Self {
        let direct = path.open(OFlags::WRONLY | OFlags::DIRECT, false).ok();
        BlockWriter {
            path: path.clone(),
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
        let f = self.path.open(OFlags::WRONLY, false)?;
        Ok(self.buffered.get_or_init(|| f))
    }

    pub(super) fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.direct.is_none() {
            return self.buffered()?.write_all_at(data, offset);
        }
        let mut buf = AlignedBuf::take(&self.buffers, data.len())?;
        buf.data_mut().copy_from_slice(data);
        self.write_buffer(&buf, offset)
    }

    pub(super) fn write_buffer(&self, buf: &AlignedBuf, offset: u64) -> std::io::Result<()> {
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
    pub(super) fn finish(&self, size: u64) -> std::io::Result<()> {
        if !self.padded.load(Ordering::Relaxed) {
            return Ok(());
        }
        match &self.direct {
            Some(f) => f.set_len(size),
            None => self.buffered()?.set_len(size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_writes_of_any_length_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let at = InStore::new(dir.path(), &InStore::open_root(dir.path()).unwrap(), "f");
        let writer = BlockWriter::create(&at, BufferPool::new()).unwrap();
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
            let at = InStore::new(dir.path(), &InStore::open_root(dir.path()).unwrap(), "f");
            let writer = BlockWriter::create(&at, pool.clone()).unwrap();
            writer.write_at(&data, 0).unwrap();
            writer.finish(len as u64).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "{len} bytes");
        }
    }
}
