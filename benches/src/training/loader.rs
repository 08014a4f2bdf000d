//! The data loader and the simulated accelerator of `--training`, in the shape of PyTorch's
//! `DataLoader` with worker processes (what MLPerf Storage's DLIO drives):
//!
//! - the epoch's shuffled samples are cut into batches, and batch `i` goes to loader `i % L`;
//! - each loader is an OS thread that reads its batches' sample files whole, one after another,
//!   and checks each one's size and checksum (the loader's "decoding"); by default it then drops
//!   the sample's pages from the page cache, so that a dataset of this machine's size stands for
//!   one larger than its memory (MLPerf Storage requires 5x);
//! - a loader has at most `prefetch_batches` batches outstanding (loaded and not yet taken, or
//!   being loaded: PyTorch's `prefetch_factor`), so it runs ahead of the accelerator by a bounded
//!   amount;
//! - the accelerator takes the batches in order, and for each one sleeps the fixed compute time.
//!
//! The accelerator's time is then compute (its sleeps) plus waiting (blocked on the next batch);
//! accelerator utilisation (AU) is compute over both, as MLPerf Storage defines it.

use anyhow::{Context, anyhow, ensure};
use serde::Serialize;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

/// One sample file: its path relative to the dataset root, its size and the [`checksum`] of its
/// bytes, computed from the generator when the dataset was made.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub size: u64,
    pub checksum: u64,
}

/// How an epoch is read.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    /// Loader threads.
    pub loaders: usize,
    pub batch_samples: usize,
    /// Batches each loader may have outstanding (PyTorch's `prefetch_factor`), at least 1.
    pub prefetch_batches: usize,
    /// Drop each sample's pages from the page cache once it is read (`POSIX_FADV_DONTNEED`):
    /// the dataset then stands for one larger than the host's memory, as MLPerf Storage
    /// requires (5x), so every epoch reads through the system measured.
    pub drop_pages: bool,
}

/// What the accelerator saw during one epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochTiming {
    /// From the start of the epoch (loaders not started yet) until the last batch's compute ended.
    pub seconds: f64,
    /// Its sleeps, as long as they actually lasted.
    pub compute_seconds: f64,
    /// Blocked waiting for the next batch (the first batch included).
    pub wait_seconds: f64,
    /// Of `wait_seconds`: waiting for the first batch (the pipeline filling).
    pub first_batch_wait_seconds: f64,
    pub batches: usize,
    pub samples: u64,
    pub bytes: u64,
}

impl EpochTiming {
    /// Accelerator utilisation: compute over compute plus waiting.
    pub fn au(&self) -> f64 {
        let busy = self.compute_seconds + self.wait_seconds;
        if busy > 0.0 {
            self.compute_seconds / busy
        } else {
            0.0
        }
    }
}

/// Reads `order` (sample paths relative to `root`) once in batches of `shape`, with `compute` of
/// sleep per batch. Fails on the first sample that cannot be read or has wrong bytes, naming it.
pub fn run_epoch(
    root: &Path,
    order: &[&Sample],
    shape: Shape,
    compute: Duration,
) -> anyhow::Result<EpochTiming> {
    ensure!(
        shape.loaders > 0 && shape.batch_samples > 0 && shape.prefetch_batches > 0,
        "{shape:?}: loaders, batch and prefetch must be at least 1"
    );
    let batches: Vec<&[&Sample]> = order.chunks(shape.batch_samples).collect();
    let start = Instant::now();
    std::thread::scope(|scope| {
        // One queue per loader, holding what it has loaded and the accelerator has not taken;
        // with the batch it is loading, `prefetch_batches` outstanding.
        let queues: Vec<_> = (0..shape.loaders)
            .map(|loader| {
                let (tx, rx) = sync_channel(shape.prefetch_batches - 1);
                let mine: Vec<&[&Sample]> = batches
                    .iter()
                    .skip(loader)
                    .step_by(shape.loaders)
                    .copied()
                    .collect();
                scope.spawn(move || {
                    for batch in mine {
                        let loaded = load_batch(root, batch, shape.drop_pages);
                        let failed = loaded.is_err();
                        // The accelerator stopped (it hangs up), or this loader failed.
                        if tx.send(loaded).is_err() || failed {
                            return;
                        }
                    }
                });
                rx
            })
            .collect();
        let (mut compute_total, mut wait, mut first_wait) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let (mut samples, mut bytes) = (0, 0);
        for (i, batch) in batches.iter().enumerate() {
            let waiting = Instant::now();
            let loaded = queues[i % shape.loaders]
                .recv()
                .map_err(|_| anyhow!("loader {} ended early", i % shape.loaders))?;
            let waited = waiting.elapsed();
            bytes += loaded?;
            samples += batch.len() as u64;
            wait += waited;
            if i == 0 {
                first_wait = waited;
            }
            let computing = Instant::now();
            if !compute.is_zero() {
                std::thread::sleep(compute);
            }
            compute_total += computing.elapsed();
        }
        Ok(EpochTiming {
            seconds: start.elapsed().as_secs_f64(),
            compute_seconds: compute_total.as_secs_f64(),
            wait_seconds: wait.as_secs_f64(),
            first_batch_wait_seconds: first_wait.as_secs_f64(),
            batches: batches.len(),
            samples,
            bytes,
        })
        // On an error the queues go first: loaders blocked on a full queue see the hang-up and
        // end, and the scope joins them.
    })
}

/// Reads every sample of `batch` whole and checks it; the bytes read.
fn load_batch(root: &Path, batch: &[&Sample], drop_pages: bool) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut bytes = 0;
    for sample in batch {
        let path = root.join(&sample.name);
        let mut data = Vec::with_capacity(sample.size as usize);
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.read_to_end(&mut data)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if drop_pages {
            nix::fcntl::posix_fadvise(
                &file,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .with_context(|| format!("cannot drop the pages of {}", path.display()))?;
        }
        ensure!(
            data.len() as u64 == sample.size,
            "{}: read {} bytes, expected {}",
            path.display(),
            data.len(),
            sample.size
        );
        ensure!(
            checksum(&data) == sample.checksum,
            "{}: wrong bytes (checksum {:#018x}, expected {:#018x})",
            path.display(),
            checksum(&data),
            sample.checksum
        );
        bytes += data.len() as u64;
    }
    Ok(bytes)
}

/// A 64-bit checksum of `data`, several GB/s on one core: four lanes, each mixing in every fourth
/// 8-byte word with an xor, a multiply by an odd constant and a rotation (each step a bijection of
/// the lane, so any change confined to one word always changes the result), then the tail, the
/// length and the lanes folded together. Not cryptographic: it catches wrong bytes, not forgeries.
pub fn checksum(data: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |lane: u64, word: u64| (lane ^ word).wrapping_mul(K).rotate_left(29);
    let mut lanes = [1u64, 2, 3, 4];
    let mut chunks = data.chunks_exact(32);
    for chunk in &mut chunks {
        for (lane, word) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            *lane = mix(*lane, word);
        }
    }
    let mut tail = [0u8; 32];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    for (lane, word) in lanes.iter_mut().zip(tail.chunks_exact(8)) {
        *lane = mix(*lane, u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
    lanes.into_iter().fold(data.len() as u64, mix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A directory of `n` sample files of `size` bytes, removed when dropped.
    struct Samples {
        dir: PathBuf,
        samples: Vec<Sample>,
    }

    impl Samples {
        fn new(test: &str, n: usize, size: usize) -> Samples {
            let dir = std::env::temp_dir().join(format!(
                "granary-bench-loader-{test}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("train")).unwrap();
            let samples = (0..n)
                .map(|i| {
                    let name = format!("train/{i:03}.bin");
                    let data: Vec<u8> = (0..size).map(|j| (i * 7 + j) as u8).collect();
                    std::fs::write(dir.join(&name), &data).unwrap();
                    Sample {
                        name,
                        size: size as u64,
                        checksum: checksum(&data),
                    }
                })
                .collect();
            Samples { dir, samples }
        }

        fn order(&self) -> Vec<&Sample> {
            self.samples.iter().rev().collect()
        }
    }

    impl Drop for Samples {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const SHAPE: Shape = Shape {
        loaders: 3,
        batch_samples: 4,
        prefetch_batches: 2,
        drop_pages: true,
    };

    #[test]
    fn the_checksum_sees_any_changed_byte_and_the_length() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31) as u8).collect();
        let sum = checksum(&data);
        for i in [0, 7, 8, 31, 32, 500, 991, 999] {
            let mut changed = data.clone();
            changed[i] ^= 0x40;
            assert_ne!(checksum(&changed), sum, "byte {i}");
        }
        assert_ne!(checksum(&data[..999]), sum);
        assert_ne!(checksum(&[0]), checksum(&[0, 0]));
        assert_eq!(checksum(&data), sum);
    }

    #[test]
    fn an_epoch_reads_every_sample_once_and_times_the_compute() {
        let s = Samples::new("epoch", 10, 3000);
        let compute = Duration::from_millis(3);
        let t = run_epoch(&s.dir, &s.order(), SHAPE, compute).unwrap();
        // 10 samples in batches of 4: 4 + 4 + 2.
        assert_eq!((t.batches, t.samples, t.bytes), (3, 10, 30_000));
        assert!(t.compute_seconds >= 3.0 * 0.003, "{t:?}");
        assert!(t.first_batch_wait_seconds <= t.wait_seconds);
        assert!(t.compute_seconds + t.wait_seconds <= t.seconds, "{t:?}");
        assert!(t.au() > 0.0 && t.au() <= 1.0, "{t:?}");
    }

    #[test]
    fn a_wrong_byte_fails_the_epoch_and_names_the_file() {
        let s = Samples::new("wrong", 20, 100);
        let mut data = std::fs::read(s.dir.join("train/013.bin")).unwrap();
        data[50] ^= 1;
        std::fs::write(s.dir.join("train/013.bin"), &data).unwrap();
        let e = run_epoch(&s.dir, &s.order(), SHAPE, Duration::ZERO).unwrap_err();
        assert!(format!("{e:#}").contains("013.bin: wrong bytes"), "{e:#}");

        std::fs::remove_file(s.dir.join("train/002.bin")).unwrap();
        let order: Vec<&Sample> = s.samples.iter().take(5).collect();
        let e = run_epoch(&s.dir, &order, SHAPE, Duration::ZERO).unwrap_err();
        assert!(format!("{e:#}").contains("cannot open"), "{e:#}");
    }

    #[test]
    fn au_is_compute_over_compute_and_waiting() {
        let t = EpochTiming {
            seconds: 10.0,
            compute_seconds: 9.0,
            wait_seconds: 1.0,
            first_batch_wait_seconds: 0.1,
            batches: 1,
            samples: 1,
            bytes: 1,
        };
        assert_eq!(t.au(), 0.9);
    }
}
