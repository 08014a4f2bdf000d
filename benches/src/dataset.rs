//! The data every system reads: deterministic pseudo-random files (the same bytes on every run),
//! written once to local disk (the native copy) and uploaded to the bucket under one prefix. Any
//! range of any file can be generated again ([`expected`]), so what a system returns, whole files
//! or scattered reads alike, is checked byte for byte.

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Key prefix of the dataset in the bucket.
pub const PREFIX: &str = "bench";
/// Generation, write and multipart upload unit for the large file.
const CHUNK: usize = 8 << 20;
/// Uploads in flight.
const UPLOADS: usize = 8;

/// How much data: one large file and many small ones.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    pub large_bytes: u64,
    pub small_count: usize,
    pub small_bytes: u64,
}

/// One file of the dataset: its path relative to the dataset root (local directory, mount
/// point, or bucket prefix alike) and size.
#[derive(Debug, Clone)]
pub struct FileSpec {
    pub name: String,
    pub size: u64,
}

/// The dataset, present both under `native_root` and in the bucket under `prefix`.
#[derive(Debug)]
pub struct Dataset {
    pub prefix: String,
    pub native_root: PathBuf,
    pub large: FileSpec,
    /// Sorted by name, all in [`SMALL_DIR`].
    pub small: Vec<FileSpec>,
}

/// The directory of the small files (the one the listing workload reads).
pub const SMALL_DIR: &str = "small";

impl Dataset {
    /// Generates the files, writes them under `native_root` and uploads them to `store`.
    pub async fn create(
        shape: Shape,
        native_root: &Path,
        store: &Arc<dyn ObjectStore>,
    ) -> anyhow::Result<Dataset> {
        std::fs::create_dir_all(native_root.join(SMALL_DIR))?;
        let large = create_files(&["large.bin".into()], shape.large_bytes, native_root, store)
            .await?
            .remove(0);
        let names = (0..shape.small_count).map(|i| format!("{SMALL_DIR}/{i:05}.bin"));
        let small = create_small_files(names, shape.small_bytes, native_root, store).await?;
        Ok(Dataset {
            prefix: PREFIX.to_string(),
            native_root: native_root.to_path_buf(),
            large,
            small,
        })
    }

    /// The object key of `file`.
    pub fn key(&self, file: &FileSpec) -> ObjectPath {
        ObjectPath::from(format!("{}/{}", self.prefix, file.name))
    }

    /// Total bytes of the small files.
    pub fn small_bytes(&self) -> u64 {
        self.small.iter().map(|f| f.size).sum()
    }
}

/// Large files of `size` bytes named `names` (relative to [`PREFIX`]), generated like the
/// dataset's large file, written under `native_root` and uploaded to `store`, one after another.
pub async fn create_files(
    names: &[String],
    size: u64,
    native_root: &Path,
    store: &Arc<dyn ObjectStore>,
) -> anyhow::Result<Vec<FileSpec>> {
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        if let Some(parent) = Path::new(name).parent() {
            std::fs::create_dir_all(native_root.join(parent))?;
        }
        files.push(write_large(name, size, Some(native_root), store).await?);
    }
    Ok(files)
}

/// Files of `size` bytes named `names` (relative to [`PREFIX`], in existing directories under
/// `native_root`), each generated whole, written under `native_root` and uploaded with one PUT,
/// [`UPLOADS`] at a time; sorted by name.
pub async fn create_small_files(
    names: impl IntoIterator<Item = String>,
    size: u64,
    native_root: &Path,
    store: &Arc<dyn ObjectStore>,
) -> anyhow::Result<Vec<FileSpec>> {
    let mut files: Vec<FileSpec> = futures::stream::iter(names)
        .map(|name| write_small(name, size, native_root, store))
        .buffer_unordered(UPLOADS)
        .try_collect()
        .await?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// The same files uploaded only, with no local copy (readers check bytes with [`expected`]).
pub async fn upload_files(
    names: &[String],
    size: u64,
    store: &Arc<dyn ObjectStore>,
) -> anyhow::Result<Vec<FileSpec>> {
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        files.push(write_large(name, size, None, store).await?);
    }
    Ok(files)
}

/// Fills `buf` with the bytes of `file` from `offset`, a multiple of 8 (every read of the
/// workloads starts at one).
pub fn expected(file: &FileSpec, offset: u64, buf: &mut [u8]) {
    debug_assert_eq!(offset % 8, 0, "unaligned check of {}", file.name);
    let mut rng = Rng::for_file(&file.name);
    rng.skip(offset / 8);
    rng.fill(buf);
}

/// Generates `name` and uploads it; with a `root`, also writes it there (the native copy).
async fn write_large(
    name: &str,
    size: u64,
    root: Option<&Path>,
    store: &Arc<dyn ObjectStore>,
) -> anyhow::Result<FileSpec> {
    let mut local = match root {
        Some(root) => {
            let path = root.join(name);
            let file = std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            Some(std::io::BufWriter::with_capacity(CHUNK, file))
        }
        None => None,
    };
    let key = ObjectPath::from(format!("{PREFIX}/{name}"));
    let upload = store
        .put_multipart(&key)
        .await
        .with_context(|| format!("cannot start uploading {key}"))?;
    let mut upload = WriteMultipart::new_with_chunk_size(upload, CHUNK);
    let mut generator = Rng::for_file(name);
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        generator.fill(&mut buf[..n]);
        if let Some(local) = &mut local {
            std::io::Write::write_all(local, &buf[..n])?;
        }
        upload.wait_for_capacity(UPLOADS).await?;
        upload.write(&buf[..n]);
        left -= n as u64;
    }
    if let Some(local) = local {
        local.into_inner()?.sync_all()?;
    }
    upload
        .finish()
        .await
        .with_context(|| format!("cannot upload {key}"))?;
    Ok(FileSpec {
        name: name.to_string(),
        size,
    })
}

async fn write_small(
    name: String,
    size: u64,
    root: &Path,
    store: &Arc<dyn ObjectStore>,
) -> anyhow::Result<FileSpec> {
    let mut data = vec![0u8; size as usize];
    Rng::for_file(&name).fill(&mut data);
    let path = root.join(&name);
    std::fs::write(&path, &data).with_context(|| format!("cannot write {}", path.display()))?;
    let key = ObjectPath::from(format!("{PREFIX}/{name}"));
    store
        .put(&key, PutPayload::from(data))
        .await
        .with_context(|| format!("cannot upload {key}"))?;
    Ok(FileSpec { name, size })
}

/// The splitmix64 increment: the state after `n` numbers is the seed plus `n` of these, so the
/// generator can jump to any point of a file.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64: fast, and the same numbers on every run and machine for the same seed.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the FNV-1a hash of a file name, so each file has its own bytes.
    fn for_file(name: &str) -> Rng {
        Rng(name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        }))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }

    /// Skips `n` numbers (8 bytes of a file each).
    fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(GAMMA));
    }

    /// Fills `buf`, 8 bytes (little-endian) per number.
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_matches_the_generated_file_at_any_aligned_offset() {
        let file = FileSpec {
            name: "large.bin".into(),
            size: 4096,
        };
        let mut whole = vec![0u8; 4096];
        Rng::for_file(&file.name).fill(&mut whole);
        for (offset, len) in [(0, 4096), (8, 1), (1024, 100), (4088, 8)] {
            let mut part = vec![0u8; len];
            expected(&file, offset as u64, &mut part);
            assert_eq!(part, whole[offset..offset + len], "offset {offset}");
        }
    }
}
