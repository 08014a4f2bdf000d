//! The dataset store's on-disk format: each dataset's index of loaded files, the journals of
//! files being loaded, the checkpoints that make the index durable, and the checks of files
//! against their CRCs.
//!
//! Layout under `<cache dir>/datasets/`:
//!
//! ```text
//! pins/<name>.json          pins, when the worker has no etcd (else they live in etcd)
//! <name>/files/<path>       a loaded file, exactly the manifest's version, whole
//! <name>/files/.<file>.loading         a file being loaded (blocks land in any order)
//! <name>/files/.<file>.loading.crcs    its journal: the version, then `<block> <crc>` per block written
//! <name>/index.jsonl        one line per loaded (or dropped) file: size, version, block CRCs
//! ```
//!
//! A file enters the index only after all its bytes are written and it is renamed into place;
//! files that complete together are appended in one write. The index is made durable behind
//! the loads, not in their way: every couple of seconds a dataset with new lines gets one
//! `syncfs` of the store's filesystem and then a checkpoint line `{"durable_bytes": N}`, synced,
//! saying that every line in the index's first N bytes names a file whose bytes were on disk.
//! When the store is opened again, lines past the last checkpoint (what completed in the seconds
//! before a crash) are believed only after their files are re-read against their CRCs. So after
//! a crash or restart the index names exactly the files that are complete; anything else under
//! `files/` is a leftover and is loaded again, resuming after the blocks its journal names (each
//! re-checked against its CRC). Every block served from the store is checked against its CRC; a
//! damaged file is dropped and loaded again.

use super::io::InStore;
use granary_core::BlockSize;
use granary_core::dataset::ManifestFile;
use granary_core::object::checksum;
use granary_proto::ApiError;
use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One loaded file, as the index records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFile {
    pub path: String,
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    /// CRC32C of each block (the cache's block size) of the file.
    pub crcs: Vec<u32>,
    /// A tombstone: the file was dropped (damaged or unpinned).
    #[serde(default)]
    pub dropped: bool,
}

impl StoredFile {
    pub(super) fn matches(&self, f: &ManifestFile) -> bool {
        self.size == f.size && self.etag == f.etag && self.version == f.version
    }
}

/// The index line saying that each line in the index's first `durable_bytes` bytes names a
/// file whose bytes, and the rename that put it in place, were on disk when it was written.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    durable_bytes: u64,
}

pub(super) fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("{what}: {e}"))
}

pub(super) fn tombstone(path: &str) -> StoredFile {
    StoredFile {
        path: path.into(),
        size: 0,
        etag: None,
        version: None,
        crcs: Vec::new(),
        dropped: true,
    }
}

/// Reads a dataset's index: the files it names, and how many of them were past the last
/// checkpoint and had to be re-read against their CRCs (those that failed are left out).
pub(super) fn read_index(
    path: &Path,
    files: &Path,
    bs: BlockSize,
) -> Result<(HashMap<String, StoredFile>, usize), ApiError> {
    let text = std::fs::read_to_string(path).map_err(|e| internal(path.display(), e))?;
    // Each file with the offset just past its line.
    let mut index: HashMap<String, (StoredFile, u64)> = HashMap::new();
    let (mut offset, mut durable) = (0, 0);
    for line in text.split_inclusive('\n') {
        offset += line.len() as u64;
        if let Ok(entry) = serde_json::from_str::<StoredFile>(line) {
            if entry.dropped {
                index.remove(&entry.path);
            } else {
                index.insert(entry.path.clone(), (entry, offset));
            }
        } else if let Ok(c) = serde_json::from_str::<Checkpoint>(line) {
            durable = durable.max(c.durable_bytes);
        }
        // Anything else is a torn last line (a crash mid-append).
    }
    let mut checked = 0;
    let index = index
        .into_iter()
        .filter(|(name, (entry, end))| {
            if *end <= durable {
                return true;
            }
            checked += 1;
            let intact = verify_file(&files.join(name), entry, bs);
            if !intact {
                tracing::warn!(index = %path.display(), file = %name, "a file loaded just before a crash is not intact; loading it again");
            }
            intact
        })
        .map(|(name, (entry, _))| (name, entry))
        .collect();
    Ok((index, checked))
}

/// Appends `lines` to the index file at `path` in one write, synced when `sync`.
pub(super) fn append_index<T: Serialize>(
    path: &Path,
    lines: &[T],
    sync: bool,
) -> Result<(), ApiError> {
    let mut text = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut text, line).expect("index lines serialize");
        text.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| internal(path.display(), e))?;
    f.write_all(&text)
        .and_then(|()| if sync { f.sync_data() } else { Ok(()) })
        .map_err(|e| internal(path.display(), e))
}

/// Makes the lines of the index in dataset directory `dir` durable (see [`Checkpoint`]).
pub(super) fn checkpoint(dir: &Path) -> Result<(), ApiError> {
    let index = dir.join("index.jsonl");
    let durable_bytes = std::fs::metadata(&index)
        .map_err(|e| internal(index.display(), e))?
        .len();
    let d = std::fs::File::open(dir).map_err(|e| internal(dir.display(), e))?;
    rustix::fs::syncfs(&d).map_err(|e| internal(format!("syncfs {}", dir.display()), e))?;
    append_index(&index, &[Checkpoint { durable_bytes }], true)
}

/// The partial file (open to read and write), its journal (open to append) and the CRC of each
/// block already written.
pub(super) type Resumed = (std::fs::File, std::fs::File, Vec<Option<u32>>);

/// A partial file being loaded and its journal.
pub(super) struct Partial {
    pub(super) tmp: InStore,
    pub(super) journal: InStore,
}

impl Partial {
    /// Opens the partial file for writing, and its journal for appending, and returns the CRC of
    /// each block (`None`: still to fetch): those the journal names (after its first line,
    /// which must be `identity`) whose bytes in the file still match. A journal of another
    /// version, or none, starts the file over.
    pub(super) fn resume(
        &self,
        identity: &str,
        bs: BlockSize,
        size: u64,
    ) -> Result<Resumed, ApiError> {
        let io = |e| internal(self.tmp.path().display(), e);
        let out = self.tmp.open(OFlags::RDWR, true).map_err(io)?;
        let mut crcs = vec![None; bs.count(size) as usize];
        let journal_path = &self.journal;
        let mut text = format!("{identity}\n");
        let earlier = journal_path.open(OFlags::RDONLY, false).and_then(|mut f| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut f, &mut text).map(|_| text)
        });
        if let Ok(journal) = earlier {
            let mut lines = journal.lines();
            if lines.next() == Some(identity) {
                let mut buf = Vec::new();
                for line in lines {
                    let Some((index, crc)) = line.split_once(' ').and_then(|(i, c)| {
                        Some((i.parse::<u64>().ok()?, u32::from_str_radix(c, 16).ok()?))
                    }) else {
                        break; // a torn last line
                    };
                    if (index as usize) < crcs.len()
                        && block_intact(&out, bs, size, index, crc, &mut buf)
                    {
                        crcs[index as usize] = Some(crc);
                        text.push_str(&format!("{index} {crc:08x}\n"));
                    }
                }
            }
        }
        if crcs.iter().all(Option::is_none) {
            out.set_len(0).map_err(io)?;
        }
        let journal_io = |e| internal(journal_path.path().display(), e);
        journal_path
            .open(OFlags::WRONLY | OFlags::TRUNC, true)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(journal_io)?;
        let journal = journal_path
            .open(OFlags::WRONLY | OFlags::APPEND, false)
            .map_err(journal_io)?;
        Ok((out, journal, crcs))
    }
}

/// Whether block `index` of `f`, a file of `size` bytes, reads back with CRC `crc` (`buf` is
/// scratch space).
fn block_intact(
    f: &std::fs::File,
    bs: BlockSize,
    size: u64,
    index: u64,
    crc: u32,
    buf: &mut Vec<u8>,
) -> bool {
    let range = bs.range(index, size);
    buf.resize((range.end - range.start) as usize, 0);
    f.read_exact_at(buf, range.start).is_ok() && checksum(buf) == crc
}

pub(super) fn verify_file(path: &Path, stored: &StoredFile, bs: BlockSize) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = Vec::new();
    f.metadata().map(|m| m.len()).ok() == Some(stored.size)
        && stored.crcs.len() as u64 == bs.count(stored.size)
        && (0..)
            .zip(&stored.crcs)
            .all(|(i, crc)| block_intact(&f, bs, stored.size, i, *crc, &mut buf))
}
