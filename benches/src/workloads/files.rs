//! A job read as files under a directory (the native copy or a mount point), with plain
//! `pread(2)`s of at most 1 MiB (what `dd bs=1M` does), one thread per reader.

use super::{Job, Outcome, RANDOM_BYTES, share, verify};
use crate::dataset::FileSpec;
use anyhow::{Context, ensure};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Buffer of one read.
const READ_BYTES: usize = 1 << 20;

pub fn run(job: &Job, root: &Path, check: bool) -> anyhow::Result<Outcome> {
    let path = |file: &FileSpec| root.join(&file.name);
    match job {
        Job::Sequential { file, readers } => {
            let bytes = in_threads(*readers, |i| {
                let f = open(&path(file))?;
                let range = share(file.size, i, *readers, READ_BYTES as u64);
                read_range(&f, &path(file), file, range, check)
            })?;
            Ok(Outcome {
                bytes,
                ops: 1,
                latencies: Vec::new(),
            })
        }
        Job::Random {
            file,
            offsets,
            readers,
        } => {
            // Each reader opens the file itself (fio's numjobs).
            let next = AtomicUsize::new(0);
            let latencies = Mutex::new(Vec::with_capacity(offsets.len()));
            let bytes = in_threads(*readers, |_| {
                let f = open(&path(file))?;
                let mut total = 0;
                while let Some(&offset) = offsets.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let start = Instant::now();
                    let range = offset..offset + RANDOM_BYTES;
                    total += read_range(&f, &path(file), file, range, check)?;
                    let took = start.elapsed().as_secs_f64();
                    latencies.lock().expect("a reader panicked").push(took);
                }
                Ok(total)
            })?;
            Ok(Outcome {
                bytes,
                ops: offsets.len() as u64,
                latencies: latencies.into_inner().expect("a reader panicked"),
            })
        }
        Job::WholeFiles { files, readers } => {
            let bytes = each_in_threads(files, *readers, |file| {
                let f = open(&path(file))?;
                read_range(&f, &path(file), file, 0..file.size, check)
            })?;
            Ok(Outcome {
                bytes,
                ops: files.len() as u64,
                latencies: Vec::new(),
            })
        }
        Job::FirstBytes { files } => {
            let latencies = timed_each(files, |file| {
                let mut byte = [0u8; 1];
                let f = open(&path(file))?;
                let n = f
                    .read_at(&mut byte, 0)
                    .with_context(|| format!("cannot read {}", path(file).display()))?;
                ensure!(
                    n == 1,
                    "{}: read {n} bytes, expected 1",
                    path(file).display()
                );
                verify(&path(file).display().to_string(), file, 0, &byte)
            })?;
            Ok(Outcome {
                bytes: files.len() as u64,
                ops: files.len() as u64,
                latencies,
            })
        }
        Job::Stat { files } => {
            let latencies = timed_each(files, |file| {
                let size = std::fs::metadata(path(file))
                    .with_context(|| format!("cannot stat {}", path(file).display()))?
                    .len();
                ensure!(
                    size == file.size,
                    "{}: size {size}, expected {}",
                    path(file).display(),
                    file.size
                );
                Ok(())
            })?;
            Ok(Outcome {
                bytes: 0,
                ops: files.len() as u64,
                latencies,
            })
        }
        Job::List { dir, files } => {
            let dir = root.join(dir);
            let names = std::fs::read_dir(&dir)
                .and_then(|entries| {
                    entries
                        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                        .collect::<std::io::Result<BTreeSet<String>>>()
                })
                .with_context(|| format!("cannot list {}", dir.display()))?;
            let expected: BTreeSet<String> = files
                .iter()
                .filter_map(|f| Some(f.name.rsplit_once('/')?.1.to_string()))
                .collect();
            ensure!(
                names == expected,
                "{}: listed {} entries, {} of them expected; expected {}",
                dir.display(),
                names.len(),
                names.intersection(&expected).count(),
                expected.len()
            );
            Ok(Outcome {
                bytes: 0,
                ops: names.len() as u64,
                latencies: Vec::new(),
            })
        }
    }
}

/// Reads `file` whole from `path`, start to end, as one reader of `sequential-1` does; with
/// `check`, compares every byte with the dataset. Returns the bytes read.
pub fn read_whole(path: &Path, file: &FileSpec, check: bool) -> anyhow::Result<u64> {
    let f = open(path)?;
    read_range(&f, path, file, 0..file.size, check)
}

fn open(path: &Path) -> anyhow::Result<File> {
    File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// Reads `range` of `file` (open as `f`) in [`READ_BYTES`] reads; fails on a short read and,
/// with `check`, on a wrong byte.
fn read_range(
    f: &File,
    path: &Path,
    file: &FileSpec,
    range: std::ops::Range<u64>,
    check: bool,
) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; READ_BYTES.min((range.end - range.start) as usize)];
    let mut offset = range.start;
    while offset < range.end {
        let want = buf.len().min((range.end - offset) as usize);
        let n = f
            .read_at(&mut buf[..want], offset)
            .with_context(|| format!("cannot read {} at {offset}", path.display()))?;
        ensure!(
            n > 0,
            "{}: end of file at {offset}, expected {} bytes",
            path.display(),
            file.size
        );
        if check {
            verify(&path.display().to_string(), file, offset, &buf[..n])?;
        }
        offset += n as u64;
    }
    Ok(range.end - range.start)
}

/// Runs `reader(i)` for `i` in `0..readers`, each on its own thread; sums what they return.
fn in_threads(
    readers: usize,
    reader: impl Fn(usize) -> anyhow::Result<u64> + Sync,
) -> anyhow::Result<u64> {
    std::thread::scope(|s| {
        let reader = &reader;
        let threads: Vec<_> = (0..readers).map(|i| s.spawn(move || reader(i))).collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a reader thread panicked"))
            .sum()
    })
}

/// `readers` threads take the next item until none is left; sums what `each` returns.
fn each_in_threads<T: Sync>(
    items: &[T],
    readers: usize,
    each: impl Fn(&T) -> anyhow::Result<u64> + Sync,
) -> anyhow::Result<u64> {
    let next = AtomicUsize::new(0);
    in_threads(readers, |_| {
        let mut total = 0;
        while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            total += each(item)?;
        }
        Ok(total)
    })
}

/// Runs `each` on every item in order; the time each took, in seconds.
fn timed_each<T>(
    items: &[T],
    mut each: impl FnMut(&T) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    items
        .iter()
        .map(|item| {
            let start = Instant::now();
            each(item)?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect()
}
