//! The disk tier: one file per block under `<cache dir>/block-files/`, read and written in
//! chunks of 64 KiB.
//!
//! A block file is a header followed by the block's bytes at their own offsets, so any range of
//! the block is one `pread`:
//!
//! ```text
//! header (a multiple of 4 KiB):
//!   magic "GRNBLK02" | block length u64 | chunk size u32 | chunks u32
//!   | CRC32C of each chunk (u32 each) | presence bitmap (a bit per chunk)
//!   | 1 and the whole block's CRC32C (u32) when it was written whole, else 0 and 0
//!   | CRC32C of all the header before it (u32)
//! block bytes, at header length + their offset in the block (holes where chunks are absent)
//! ```
//!
//! A block fetched whole is written to a temporary file and renamed into place; a range fetched
//! by a random reader adds its chunks to the block's file (data first, then the header). Each
//! read checks the CRC32C of the chunks it reads, and only those: a damaged or torn chunk is a
//! miss (the file goes), never wrong bytes. A restarted worker finds its block files again.
//!
//! Writes are queued to blocking threads within a byte budget (`WRITE_QUEUE`): when the disk
//! falls behind, the reader that offers the next block waits for room; nothing offered and
//! admitted is dropped. They bypass the page cache (`O_DIRECT`, through reused aligned
//! buffers): a cold read's copy into the page cache and its writeback cost more CPU than the
//! rest of the read (47% of the daemon's, profiled), and the memory tier already holds what
//! is hot. Reads go through the page cache. Which blocks are kept, and which go to make room, is the policy's
//! choice (`policy.rs`).

use super::policy::{Admit, CachePolicy, TierId};
use bytes::Bytes;
use granary_core::metrics as m;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// The unit of presence and checksums inside a block file.
pub(crate) const CHUNK: u64 = 64 << 10;

/// Bytes of writes queued for the disk at most; a reader offering more waits for room.
const WRITE_QUEUE: u64 = 32 << 20;

const MAGIC: &[u8; 8] = b"GRNBLK02";

/// What one block file holds.
#[derive(Debug, Clone)]
struct Meta {
    len: u64,
    /// CRC32C of each chunk the file holds; `None` for a chunk not written.
    chunks: Vec<Option<u32>>,
    /// The whole block's CRC32C, when it was written whole (what a whole-block hit tells its
    /// reader without computing it again).
    whole: Option<u32>,
}

impl Meta {
    fn new(len: u64) -> Self {
        Meta {
            len,
            chunks: vec![None; len.div_ceil(CHUNK) as usize],
            whole: None,
        }
    }

    fn header_len(&self) -> u64 {
        header_len(self.chunks.len())
    }

    /// The chunks covering `range` of the block.
    fn chunks_of(&self, range: &Range<u64>) -> Range<usize> {
        (range.start / CHUNK) as usize..range.end.div_ceil(CHUNK) as usize
    }

    fn encode(&self) -> Vec<u8> {
        let n = self.chunks.len();
        let mut h = Vec::with_capacity(self.header_len() as usize);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&self.len.to_le_bytes());
        h.extend_from_slice(&(CHUNK as u32).to_le_bytes());
        h.extend_from_slice(&(n as u32).to_le_bytes());
        let mut present = vec![0u8; n.div_ceil(8)];
        for (i, c) in self.chunks.iter().enumerate() {
            h.extend_from_slice(&c.unwrap_or(0).to_le_bytes());
            if c.is_some() {
                present[i / 8] |= 1 << (i % 8);
            }
        }
        h.extend_from_slice(&present);
        h.push(self.whole.is_some() as u8);
        h.extend_from_slice(&self.whole.unwrap_or(0).to_le_bytes());
        let crc = crc32c::crc32c(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h.resize(self.header_len() as usize, 0);
        h
    }

    /// The header at the start of `file`, if it is whole and one of ours.
    fn decode(file: &File) -> Option<Meta> {
        let mut fixed = [0u8; 24];
        file.read_exact_at(&mut fixed, 0).ok()?;
        if &fixed[..8] != MAGIC {
            return None;
        }
        let len = u64::from_le_bytes(fixed[8..16].try_into().ok()?);
        let chunk = u32::from_le_bytes(fixed[16..20].try_into().ok()?) as u64;
        let n = u32::from_le_bytes(fixed[20..24].try_into().ok()?) as usize;
        if chunk != CHUNK || len > granary_core::BlockSize::MAX || n != len.div_ceil(CHUNK) as usize
        {
            return None;
        }
        let body = 24 + 4 * n + n.div_ceil(8) + 5;
        let mut h = vec![0u8; body + 4];
        file.read_exact_at(&mut h, 0).ok()?;
        let crc = u32::from_le_bytes(h[body..].try_into().ok()?);
        if crc32c::crc32c(&h[..body]) != crc {
            return None;
        }
        let present = &h[24 + 4 * n..body - 5];
        let whole = (h[body - 5] == 1)
            .then(|| u32::from_le_bytes(h[body - 4..body].try_into().expect("4 bytes")));
        let chunks = (0..n)
            .map(|i| {
                let at = 24 + 4 * i;
                (present[i / 8] & (1 << (i % 8)) != 0)
                    .then(|| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes")))
            })
            .collect();
        Some(Meta { len, chunks, whole })
    }
}

fn header_len(chunks: usize) -> u64 {
    ((24 + 4 * chunks + chunks.div_ceil(8) + 5 + 4) as u64).next_multiple_of(4096)
}

/// What a block file takes on disk, as the policy counts it: the header and the whole block
/// (a partly written file is counted as if whole).
fn weight(len: u64) -> u64 {
    header_len(len.div_ceil(CHUNK) as usize) + len.next_multiple_of(4096)
}

/// Bytes read from the tier, with the CRC32C of the whole of them when they are a whole block.
pub(crate) struct Read {
    pub data: Bytes,
    pub crc32c: Option<u32>,
}

#[derive(Debug)]
pub(crate) struct DiskTier {
    dir: PathBuf,
    policy: Arc<CachePolicy>,
    index: Mutex<HashMap<u128, Arc<Meta>>>,
    /// Whole blocks admitted and queued, not yet in their file: readable meanwhile.
    pending: Mutex<HashMap<u128, Bytes>>,
    /// Writes to one block file are serialised (a range added while the whole block lands).
    stripes: Vec<Mutex<()>>,
    /// KiB of writes queued.
    queue: Arc<Semaphore>,
    /// Aligned buffers for direct writes, reused.
    buffers: Buffers,
    /// Writes bypass the page cache (`O_DIRECT`), unless the filesystem refuses.
    direct: AtomicBool,
}

/// Bytes a direct write goes through at a time: the block is copied into page-aligned pieces
/// of this size and written piece by piece, so a writer holds one piece, not a second copy of
/// its block (a 1 MiB direct write keeps a disk as busy as a larger one).
const DIRECT_PIECE: usize = 1 << 20;

/// Page-aligned buffers of `DIRECT_PIECE` bytes (anonymous mappings) for direct writes, at most
/// `KEPT_PIECES` kept for reuse: the bytes are copied once into one, never into fresh memory.
#[derive(Debug, Default)]
struct Buffers {
    free: Mutex<Vec<memmap2::MmapMut>>,
}

/// Pieces kept for reuse, one per writer the write queue keeps busy.
const KEPT_PIECES: usize = 8;

impl Buffers {
    fn take(&self) -> std::io::Result<memmap2::MmapMut> {
        match self.free.lock().expect("buffers").pop() {
            Some(buf) => Ok(buf),
            None => memmap2::MmapMut::map_anon(DIRECT_PIECE),
        }
    }

    fn put(&self, buf: memmap2::MmapMut) {
        let mut free = self.free.lock().expect("buffers");
        if free.len() < KEPT_PIECES {
            free.push(buf);
        }
    }
}

impl DiskTier {
    /// Opens the tier in `dir` (created if missing), adopting the block files found there as
    /// far as `capacity` (bytes) allows, newest first; files that are damaged, partly written
    /// or beyond the capacity are removed.
    pub(crate) fn open(
        dir: &Path,
        policy: Arc<CachePolicy>,
        capacity: u64,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for sub in std::fs::read_dir(dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                let path = f.path();
                let key = f
                    .file_name()
                    .to_str()
                    .filter(|n| n.len() == 32)
                    .and_then(|n| u128::from_str_radix(n, 16).ok());
                let meta = key.and_then(|_| File::open(&path).ok().and_then(|f| Meta::decode(&f)));
                match (key, meta, f.metadata().and_then(|m| m.modified())) {
                    (Some(key), Some(meta), Ok(mtime)) => found.push((mtime, key, meta, path)),
                    _ => {
                        tracing::info!(path = %path.display(), "removing a damaged or unfinished block file");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut index = HashMap::new();
        let mut used = 0;
        for (_, key, meta, path) in found {
            let w = weight(meta.len);
            if used + w > capacity {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            used += w;
            policy.adopt(TierId::Disk, key, w);
            index.insert(key, Arc::new(meta));
        }
        if !index.is_empty() {
            tracing::info!(
                blocks = index.len(),
                bytes = used,
                "disk tier: found blocks from before"
            );
        }
        metrics::gauge!(m::CACHE_USED_BYTES, "tier" => "disk").set(used as f64);
        Ok(DiskTier {
            dir: dir.to_path_buf(),
            policy,
            index: Mutex::new(index),
            pending: Mutex::default(),
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
            queue: Arc::new(Semaphore::new((WRITE_QUEUE >> 10) as usize)),
            buffers: Buffers::default(),
            direct: AtomicBool::new(true),
        })
    }

    fn path(&self, key: u128) -> PathBuf {
        let name = format!("{key:032x}");
        self.dir.join(&name[..2]).join(name)
    }

    fn stripe(&self, key: u128) -> &Mutex<()> {
        &self.stripes[(key % self.stripes.len() as u128) as usize]
    }

    /// Whether the tier holds (or is writing) all of `range` of block `key` (`None`: all of
    /// it), as its index says: without touching the disk, so that a miss costs no trip to a
    /// blocking thread.
    pub(crate) fn has(&self, key: u128, range: Option<&Range<u64>>) -> bool {
        if self.pending.lock().expect("pending").contains_key(&key) {
            return true;
        }
        let index = self.index.lock().expect("index");
        index.get(&key).is_some_and(|meta| {
            let range = range.cloned().unwrap_or(0..meta.len);
            range.end <= meta.len
                && meta.chunks[meta.chunks_of(&range)]
                    .iter()
                    .all(Option::is_some)
        })
    }

    /// `range` of block `key` (`None` = all of it), if the tier holds all of it and its chunks
    /// pass their checksums. Blocking: call from a blocking thread.
    pub(crate) fn read(&self, key: u128, range: Option<Range<u64>>) -> Option<Read> {
        if let Some(data) = self.pending.lock().expect("pending").get(&key).cloned() {
            let range = range.unwrap_or(0..data.len() as u64);
            return Some(Read {
                data: data.slice(range.start as usize..range.end as usize),
                crc32c: None,
            });
        }
        let meta = self.index.lock().expect("index").get(&key).cloned()?;
        let range = range.unwrap_or(0..meta.len);
        if range.end > meta.len || range.start >= range.end {
            return None;
        }
        let chunks = meta.chunks_of(&range);
        let crcs: Vec<u32> = meta.chunks[chunks.clone()]
            .iter()
            .copied()
            .collect::<Option<_>>()?;
        let span = chunks.start as u64 * CHUNK..(chunks.end as u64 * CHUNK).min(meta.len);
        let file = match File::open(self.path(key)) {
            Ok(f) => f,
            Err(_) => {
                self.forget(key);
                return None;
            }
        };
        let mut buf = Vec::with_capacity((span.end - span.start) as usize);
        while (buf.len() as u64) < span.end - span.start {
            let at = meta.header_len() + span.start + buf.len() as u64;
            match rustix::io::pread(&file, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let whole = buf.len() as u64 == span.end - span.start
            && buf
                .chunks(CHUNK as usize)
                .zip(&crcs)
                .all(|(bytes, crc)| crc32c::crc32c(bytes) == *crc);
        if !whole {
            metrics::counter!(m::BLOCK_CHECKSUM_FAILURES).increment(1);
            tracing::warn!(
                key = format!("{key:032x}"),
                "a block file failed its checksum; dropping it"
            );
            self.forget(key);
            return None;
        }
        let data = Bytes::from(buf);
        let from = (range.start - span.start) as usize;
        Some(Read {
            data: data.slice(from..from + (range.end - range.start) as usize),
            crc32c: if range == (0..meta.len) {
                meta.whole
            } else {
                None
            },
        })
    }

    /// Drops block `key` (damaged, or gone from under us).
    fn forget(&self, key: u128) {
        let _stripe = self.stripe(key).lock().expect("stripe");
        self.index.lock().expect("index").remove(&key);
        self.policy.left(TierId::Disk, key);
        let _ = std::fs::remove_file(self.path(key));
        self.publish();
    }

    fn publish(&self) {
        metrics::gauge!(m::CACHE_USED_BYTES, "tier" => "disk")
            .set(self.policy.used(TierId::Disk) as f64);
    }

    /// Offers `data`, the bytes at `start` of block `key` (`len` bytes long; `start` a multiple
    /// of the chunk size, `data` whole chunks or up to the block's end), to the tier. If the
    /// policy admits the block, the write is queued, waiting for room in the queue when the
    /// disk is behind; it then completes in the background.
    /// `crc32c`: the whole block's, when `data` is the whole block and it is known.
    pub(crate) async fn offer(
        self: &Arc<Self>,
        key: u128,
        len: u64,
        start: u64,
        data: Bytes,
        crc32c: Option<u32>,
    ) {
        debug_assert!(start.is_multiple_of(CHUNK));
        match self.policy.admit(TierId::Disk, key, weight(len)) {
            Admit::No => {
                metrics::counter!(m::CACHE_ADMISSIONS, "tier" => "disk", "result" => "rejected")
                    .increment(1);
                return;
            }
            Admit::Yes { evict } => {
                metrics::counter!(m::CACHE_ADMISSIONS, "tier" => "disk", "result" => "admitted")
                    .increment(1);
                for victim in evict {
                    self.evict(victim);
                }
            }
        }
        let kib = (data.len() as u64).div_ceil(1024).max(1) as u32;
        let Ok(permit) = self.queue.clone().acquire_many_owned(kib).await else {
            return;
        };
        if start == 0 && data.len() as u64 == len {
            self.pending
                .lock()
                .expect("pending")
                .insert(key, data.clone());
        }
        metrics::gauge!(m::CACHE_WRITE_QUEUE_BYTES).increment((kib as u64 * 1024) as f64);
        let tier = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = tier.write(key, len, start, &data, crc32c) {
                tracing::warn!(error = %e, "cannot write a block to the disk tier");
                tier.forget(key);
            }
            tier.pending.lock().expect("pending").remove(&key);
            metrics::gauge!(m::CACHE_WRITE_QUEUE_BYTES).decrement((kib as u64 * 1024) as f64);
            tier.publish();
            drop(permit);
        });
    }

    fn evict(&self, key: u128) {
        metrics::counter!(m::CACHE_EVICTIONS, "tier" => "disk").increment(1);
        let _stripe = self.stripe(key).lock().expect("stripe");
        self.index.lock().expect("index").remove(&key);
        self.pending.lock().expect("pending").remove(&key);
        let _ = std::fs::remove_file(self.path(key));
    }

    fn write(
        &self,
        key: u128,
        len: u64,
        start: u64,
        data: &[u8],
        crc32c: Option<u32>,
    ) -> std::io::Result<()> {
        let _stripe = self.stripe(key).lock().expect("stripe");
        if !self.policy.holds(TierId::Disk, key) {
            // Evicted while its write waited: nothing to write.
            return Ok(());
        }
        let path = self.path(key);
        let old = self.index.lock().expect("index").get(&key).cloned();
        let mut meta = match &old {
            Some(m) if m.len == len => (**m).clone(),
            _ => Meta::new(len),
        };
        let first = (start / CHUNK) as usize;
        for (i, bytes) in data.chunks(CHUNK as usize).enumerate() {
            meta.chunks[first + i] = Some(crc32c::crc32c(bytes));
        }
        if start == 0 && data.len() as u64 == len {
            meta.whole = crc32c;
        }
        let (header, at) = (meta.encode(), meta.header_len() + start);
        if (start == 0 && data.len() as u64 == len) || old.is_none() {
            // A new file: written under a temporary name, then renamed into place. A whole
            // block is one write of the header and the bytes.
            std::fs::create_dir_all(path.parent().expect("a parent"))?;
            let tmp = path.with_extension("tmp");
            let file = self.open_for_write(&tmp, true)?;
            if start == 0 {
                self.write_at(&file, 0, &[&header, data])?;
            } else {
                self.write_at(&file, at, &[data])?;
                self.write_at(&file, 0, &[&header])?;
            }
            std::fs::rename(&tmp, &path)?;
        } else {
            // More chunks of a file we have: the bytes first, then the header that claims them.
            let file = self.open_for_write(&path, false)?;
            self.write_at(&file, at, &[data])?;
            self.write_at(&file, 0, &[&header])?;
        }
        self.index
            .lock()
            .expect("index")
            .insert(key, Arc::new(meta));
        Ok(())
    }

    /// A block file opened for writing (`create`: a new one), with direct I/O where the
    /// filesystem takes it.
    fn open_for_write(&self, path: &Path, create: bool) -> std::io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.write(true);
            if create {
                o.create(true).truncate(true);
            }
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        if self.direct.load(Ordering::Relaxed) {
            match open(true) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(dir = %self.dir.display(), "the disk tier's filesystem refuses direct I/O: writing through the page cache");
                    self.direct.store(false, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        open(false)
    }

    /// Writes `parts`, one after another, at `at` (a multiple of 4 KiB). With direct I/O they
    /// are copied, `DIRECT_PIECE` bytes at a time, into an aligned buffer of the pool, the last
    /// piece padded with zeros to a multiple of 4 KiB (past the block's end: nothing reads
    /// there).
    fn write_at(&self, file: &File, at: u64, parts: &[&[u8]]) -> std::io::Result<()> {
        if !self.direct.load(Ordering::Relaxed) {
            let mut off = at;
            for p in parts {
                file.write_all_at(p, off)?;
                off += p.len() as u64;
            }
            return Ok(());
        }
        let mut buf = self.buffers.take()?;
        let written = (|| {
            let mut off = at;
            let mut filled = 0;
            for p in parts {
                let mut p: &[u8] = p;
                while !p.is_empty() {
                    let n = p.len().min(DIRECT_PIECE - filled);
                    buf[filled..filled + n].copy_from_slice(&p[..n]);
                    filled += n;
                    p = &p[n..];
                    if filled == DIRECT_PIECE {
                        file.write_all_at(&buf[..], off)?;
                        off += DIRECT_PIECE as u64;
                        filled = 0;
                    }
                }
            }
            if filled > 0 {
                let padded = filled.next_multiple_of(4096);
                buf[filled..padded].fill(0);
                file.write_all_at(&buf[..padded], off)?;
            }
            Ok(())
        })();
        self.buffers.put(buf);
        written
    }

    /// Waits until every queued write is on disk.
    pub(crate) async fn flush(&self) {
        let all = (WRITE_QUEUE >> 10) as u32;
        if let Ok(p) = self.queue.acquire_many(all).await {
            drop(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(dir: &Path, capacity: u64) -> Arc<DiskTier> {
        let policy = Arc::new(CachePolicy::new(0, capacity));
        Arc::new(DiskTier::open(dir, policy, capacity).unwrap())
    }

    fn bytes(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[tokio::test]
    async fn whole_and_partial_blocks_read_back_exactly_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let t = tier(dir.path(), 64 << 20);
        let whole = bytes((1 << 20) + 1000, 1);
        let crc = crc32c::crc32c(&whole);
        t.offer(1, whole.len() as u64, 0, whole.clone(), Some(crc))
            .await;
        // A partial block: chunks 2 and 3 of 16, then chunk 15 (short, the block's end).
        let len = (1 << 20) - 5;
        let part = bytes(2 * CHUNK as usize, 2);
        t.offer(2, len, 2 * CHUNK, part.clone(), None).await;
        t.flush().await;
        let tail = bytes((len - 15 * CHUNK) as usize, 3);
        t.offer(2, len, 15 * CHUNK, tail.clone(), None).await;
        t.flush().await;

        let check = |t: &DiskTier| {
            let r = t.read(1, None).unwrap();
            assert_eq!(r.data, whole);
            assert_eq!(r.crc32c, Some(crc32c::crc32c(&whole)));
            assert_eq!(
                t.read(1, Some(70_000..200_001)).unwrap().data,
                whole.slice(70_000..200_001)
            );
            assert_eq!(
                t.read(2, Some(2 * CHUNK + 7..4 * CHUNK)).unwrap().data,
                part.slice(7..)
            );
            assert_eq!(t.read(2, Some(15 * CHUNK..len)).unwrap().data, tail);
            assert!(
                t.read(2, Some(CHUNK..3 * CHUNK)).is_none(),
                "chunk 1 was never written"
            );
            assert!(t.read(2, None).is_none());
            assert!(t.has(1, None) && t.has(2, Some(&(2 * CHUNK..4 * CHUNK))));
            assert!(!t.has(2, Some(&(0..1))) && !t.has(2, None) && !t.has(3, None));
        };
        check(&t);
        drop(t);
        check(&tier(dir.path(), 64 << 20));
    }

    #[tokio::test]
    async fn a_damaged_chunk_is_a_miss_and_the_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let t = tier(dir.path(), 64 << 20);
        let data = bytes(1 << 20, 4);
        t.offer(7, data.len() as u64, 0, data.clone(), None).await;
        t.flush().await;
        let path = t.path(7);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", header_len(16) + 5 * CHUNK + 3)
            .unwrap();
        // Chunks before the damage still read; the damaged one does not, and drops the file.
        assert_eq!(
            t.read(7, Some(0..CHUNK)).unwrap().data,
            data.slice(..CHUNK as usize)
        );
        assert!(t.read(7, Some(5 * CHUNK..5 * CHUNK + 10)).is_none());
        assert!(!path.exists());
        assert!(t.read(7, Some(0..CHUNK)).is_none());
    }

    #[tokio::test]
    async fn a_torn_header_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let t = tier(dir.path(), 64 << 20);
        t.offer(9, 1 << 20, 0, bytes(1 << 20, 5), None).await;
        t.flush().await;
        let path = t.path(9);
        drop(t);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"\0\0", 30).unwrap();
        let t = tier(dir.path(), 64 << 20);
        assert!(t.read(9, None).is_none());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn the_tier_stays_within_its_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 8 * weight(1 << 20);
        let t = tier(dir.path(), cap);
        for k in 0..20u128 {
            t.policy.request(k);
            t.offer(k, 1 << 20, 0, bytes(1 << 20, k as u8), None).await;
        }
        t.flush().await;
        let held: Vec<u128> = (0..20).filter(|k| t.read(*k, None).is_some()).collect();
        assert_eq!(held.len(), 8, "held {held:?}");
        let on_disk: u64 = walk(dir.path())
            .iter()
            .map(|p| p.metadata().unwrap().len())
            .sum();
        assert!(on_disk <= cap, "{on_disk} bytes on disk, capacity {cap}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
