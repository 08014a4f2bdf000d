//! The workloads (what is read, in which order, by how many readers) and one timed pass of a
//! workload against a system's data: files under a directory (native disk or a mount), or the S3
//! API itself. A checking pass also hashes every file and compares it with the dataset: a
//! benchmark of wrong bytes is worthless.

use crate::dataset::{Dataset, FileSpec, Rng};
use anyhow::{Context, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::runtime::Handle;

/// Buffer of one `read(2)` from a file (what `dd bs=1M` does).
const READ_BYTES: usize = 1 << 20;
/// Range of one GET of the large file from the backend...
const RANGE_BYTES: u64 = 8 << 20;
/// ...and how many are in flight.
const RANGES_IN_FLIGHT: usize = 8;
/// Readers (threads, or GETs in flight) of the small-files workload.
const SMALL_FILE_READERS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// The large file, start to end, by one reader.
    LargeSequential,
    /// Every small file, whole, in shuffled order, by [`SMALL_FILE_READERS`] readers.
    SmallFiles,
}

impl Workload {
    pub const ALL: [Workload; 2] = [Workload::LargeSequential, Workload::SmallFiles];

    pub fn name(self) -> &'static str {
        match self {
            Workload::LargeSequential => "large-sequential",
            Workload::SmallFiles => "small-files",
        }
    }

    /// Whether files per second means something here (it does not for one file).
    pub fn counts_files(self) -> bool {
        self == Workload::SmallFiles
    }

    pub fn files(self, dataset: &Dataset) -> &[FileSpec] {
        match self {
            Workload::LargeSequential => &dataset.large,
            Workload::SmallFiles => &dataset.small,
        }
    }

    /// The files in reading order for pass number `pass` (a different shuffle for each pass,
    /// the same for every system).
    fn order(self, dataset: &Dataset, pass: u64) -> Vec<&FileSpec> {
        let mut files: Vec<&FileSpec> = self.files(dataset).iter().collect();
        if self == Workload::SmallFiles {
            // Fisher-Yates.
            let mut rng = Rng::seeded(pass);
            for i in (1..files.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                files.swap(i, j);
            }
        }
        files
    }
}

/// How a system's data is read.
pub enum Access {
    /// As files under a directory that mirrors the dataset (native copy or a mount point).
    Files(PathBuf),
    /// Through the S3 API, with no cache in between.
    Store(Arc<dyn ObjectStore>),
}

/// What one pass read, and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    pub bytes: u64,
    pub files: u64,
    pub seconds: f64,
}

/// Reads the whole workload once through `access`. With `check`, also compares every file's
/// SHA-256 with the dataset's (slower: never timed). Either way, a file of the wrong size fails.
pub fn run_pass(
    workload: Workload,
    dataset: &Dataset,
    access: &Access,
    pass: u64,
    check: bool,
    rt: &Handle,
) -> anyhow::Result<Pass> {
    let files = workload.order(dataset, pass);
    let start = Instant::now();
    let bytes = match access {
        Access::Files(root) => {
            let readers = match workload {
                Workload::LargeSequential => 1,
                Workload::SmallFiles => SMALL_FILE_READERS,
            };
            read_files(root, &files, readers, check)?
        }
        Access::Store(store) => {
            rt.block_on(get_objects(workload, dataset, store, &files, check))?
        }
    };
    Ok(Pass {
        bytes,
        files: files.len() as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `readers` threads take the next file from `files` until none is left.
fn read_files(
    root: &Path,
    files: &[&FileSpec],
    readers: usize,
    check: bool,
) -> anyhow::Result<u64> {
    let next = AtomicUsize::new(0);
    let reader = || -> anyhow::Result<u64> {
        let mut buf = vec![0u8; READ_BYTES];
        let mut total = 0;
        while let Some(file) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
            total += read_file(&root.join(&file.name), file, &mut buf, check)?;
        }
        Ok(total)
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..readers).map(|_| s.spawn(reader)).collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a reader thread panicked"))
            .sum()
    })
}

fn read_file(path: &Path, file: &FileSpec, buf: &mut [u8], check: bool) -> anyhow::Result<u64> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = check.then(Sha256::new);
    let mut total = 0u64;
    loop {
        let n = f
            .read(buf)
            .with_context(|| format!("cannot read {} at {total}", path.display()))?;
        if n == 0 {
            break;
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
        total += n as u64;
    }
    verify(&path.display().to_string(), file, total, hasher)?;
    Ok(total)
}

async fn get_objects(
    workload: Workload,
    dataset: &Dataset,
    store: &Arc<dyn ObjectStore>,
    files: &[&FileSpec],
    check: bool,
) -> anyhow::Result<u64> {
    match workload {
        Workload::LargeSequential => {
            let mut total = 0;
            for file in files {
                total += get_in_ranges(dataset, store, file, check).await?;
            }
            Ok(total)
        }
        Workload::SmallFiles => {
            futures::stream::iter(files)
                .map(|file| get_whole(dataset, store, file, check))
                .buffer_unordered(SMALL_FILE_READERS)
                .try_fold(0, |total, n| async move { Ok(total + n) })
                .await
        }
    }
}

/// The object in [`RANGE_BYTES`] ranged GETs, [`RANGES_IN_FLIGHT`] at a time, consumed in order.
async fn get_in_ranges(
    dataset: &Dataset,
    store: &Arc<dyn ObjectStore>,
    file: &FileSpec,
    check: bool,
) -> anyhow::Result<u64> {
    let key = dataset.key(file);
    let ranges = (0..file.size)
        .step_by(RANGE_BYTES as usize)
        .map(|start| start..(start + RANGE_BYTES).min(file.size));
    let mut parts = futures::stream::iter(ranges)
        .map(|range| store.get_range(&key, range))
        .buffered(RANGES_IN_FLIGHT);
    let mut hasher = check.then(Sha256::new);
    let mut total = 0u64;
    while let Some(part) = parts
        .try_next()
        .await
        .with_context(|| format!("GET {key}"))?
    {
        if let Some(h) = hasher.as_mut() {
            h.update(&part);
        }
        total += part.len() as u64;
    }
    verify(key.as_ref(), file, total, hasher)?;
    Ok(total)
}

async fn get_whole(
    dataset: &Dataset,
    store: &Arc<dyn ObjectStore>,
    file: &FileSpec,
    check: bool,
) -> anyhow::Result<u64> {
    let key = dataset.key(file);
    let data = async { store.get(&key).await?.bytes().await }
        .await
        .with_context(|| format!("GET {key}"))?;
    verify(
        key.as_ref(),
        file,
        data.len() as u64,
        check.then(|| Sha256::new_with_prefix(&data)),
    )?;
    Ok(data.len() as u64)
}

fn verify(what: &str, file: &FileSpec, size: u64, hasher: Option<Sha256>) -> anyhow::Result<()> {
    ensure!(
        size == file.size,
        "{what}: read {size} bytes, expected {}",
        file.size
    );
    if let Some(h) = hasher {
        let got: [u8; 32] = h.finalize().into();
        if got != file.sha256 {
            bail!(
                "{what}: wrong bytes: SHA-256 {} instead of {}",
                hex(&got),
                hex(&file.sha256)
            );
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
