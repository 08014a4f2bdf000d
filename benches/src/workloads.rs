//! The workloads: what one pass reads, in which order and by how many readers ([`Job`]), which
//! systems and cache conditions it is measured in, and which figure sums it up. How a job is
//! read is in [`files`] (a directory: native disk or a mount) and [`objects`] (the S3 API).

mod files;
mod objects;

pub use files::read_whole;

use crate::dataset::{self, Dataset, FileSpec, Rng, SMALL_DIR};
use crate::profile::Profile;
use crate::systems::{Condition, Kind};
use anyhow::bail;
use object_store::ObjectStore;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::runtime::Handle;

/// Size of one read of the random workloads (fio's `bs=256k`; offsets aligned to it).
pub const RANDOM_BYTES: u64 = 256 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// The large file start to end, by one reader.
    Sequential1,
    /// The large file by four readers, each reading a quarter start to end.
    Sequential4,
    /// [`RANDOM_BYTES`] reads at random aligned offsets of the large file, one reader.
    Random1,
    /// The same with four readers.
    Random4,
    /// Every small file, whole, in shuffled order, by four readers (an ImageNet-like epoch).
    SmallFiles,
    /// Open a file not read yet and read its first byte, one file after another.
    FirstByte,
    /// `stat` of every small file, one after another.
    Stat,
    /// A full listing of the small files' directory.
    List,
    /// Two epochs over the small files, each in its own shuffled order, four readers; Granary's
    /// memory cache holds half of them and its disk tier is off, so its counters show how much of
    /// the second epoch its eviction policy keeps.
    Epochs,
}

/// The figure a workload is summed up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Bytes per second.
    MbPerS,
    /// Operations (reads, files, stats, entries) per second.
    OpsPerS,
    /// Median latency of one operation (lower is better).
    P50Ms,
}

impl Workload {
    pub const ALL: [Workload; 9] = [
        Workload::Sequential1,
        Workload::Sequential4,
        Workload::Random1,
        Workload::Random4,
        Workload::SmallFiles,
        Workload::FirstByte,
        Workload::Stat,
        Workload::List,
        Workload::Epochs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Sequential1 => "sequential-1",
            Workload::Sequential4 => "sequential-4",
            Workload::Random1 => "random-1",
            Workload::Random4 => "random-4",
            Workload::SmallFiles => "small-files",
            Workload::FirstByte => "first-byte",
            Workload::Stat => "stat",
            Workload::List => "list",
            Workload::Epochs => "epochs",
        }
    }

    /// Concurrent readers.
    pub fn readers(self) -> usize {
        match self {
            Workload::Sequential1
            | Workload::Random1
            | Workload::FirstByte
            | Workload::Stat
            | Workload::List => 1,
            Workload::Sequential4 | Workload::Random4 | Workload::SmallFiles | Workload::Epochs => {
                4
            }
        }
    }

    pub fn metric(self) -> Metric {
        match self {
            Workload::Sequential1 | Workload::Sequential4 => Metric::MbPerS,
            Workload::FirstByte => Metric::P50Ms,
            _ => Metric::OpsPerS,
        }
    }

    /// The unit of [`Workload::metric`].
    pub fn unit(self) -> &'static str {
        match self {
            Workload::Sequential1 | Workload::Sequential4 => "MB/s",
            Workload::Random1 | Workload::Random4 => "IOPS",
            Workload::SmallFiles | Workload::Epochs => "files/s",
            Workload::FirstByte => "ms p50",
            Workload::Stat => "stats/s",
            Workload::List => "entries/s",
        }
    }

    /// The conditions a system of `kind` is measured in, in order; none: not measured.
    pub fn conditions(self, kind: Kind) -> &'static [Condition] {
        const EPOCHS: &[Condition] = &[Condition::Epoch(1), Condition::Epoch(2)];
        match (self, kind) {
            // The metadata workloads have no S3 API equivalent worth comparing; the epochs
            // measure Granary's eviction policy (native disk is the reference).
            (Workload::Stat | Workload::List | Workload::Epochs, Kind::Backend) => &[],
            (Workload::Epochs, Kind::Native | Kind::Granary) => EPOCHS,
            (Workload::Epochs, Kind::Peer) => &[],
            (_, Kind::Backend) => &[Condition::Direct],
            (_, Kind::Native) => &[Condition::Cold, Condition::HotPageCache],
            (_, Kind::Granary | Kind::Peer) => &[
                Condition::Cold,
                Condition::HotPageCache,
                Condition::HotDaemonCache,
            ],
        }
    }

    /// What one pass reads. `seed` picks the shuffles and offsets: the same for every system.
    pub fn job<'a>(self, dataset: &'a Dataset, profile: &Profile, seed: u64) -> Job<'a> {
        let readers = self.readers();
        let mut rng = Rng::seeded(seed);
        let large = &dataset.large;
        match self {
            Workload::Sequential1 | Workload::Sequential4 => Job::Sequential {
                file: large,
                readers,
            },
            Workload::Random1 | Workload::Random4 => {
                let slots = (large.size / RANDOM_BYTES).max(1);
                let offsets = (0..profile.random_reads)
                    .map(|_| rng.next_u64() % slots * RANDOM_BYTES)
                    .collect();
                Job::Random {
                    file: large,
                    offsets,
                    readers,
                }
            }
            Workload::SmallFiles | Workload::Epochs => Job::WholeFiles {
                files: shuffled(&dataset.small, &mut rng),
                readers,
            },
            Workload::FirstByte => {
                let mut files = shuffled(&dataset.small, &mut rng);
                files.truncate(profile.first_byte_files);
                Job::FirstBytes { files }
            }
            Workload::Stat => Job::Stat {
                files: shuffled(&dataset.small, &mut rng),
            },
            Workload::List => Job::List {
                dir: SMALL_DIR,
                files: &dataset.small,
            },
        }
    }
}

/// `files` in a random order.
fn shuffled<'a>(files: &'a [FileSpec], rng: &mut Rng) -> Vec<&'a FileSpec> {
    let mut files: Vec<&FileSpec> = files.iter().collect();
    rng.shuffle(&mut files);
    files
}

/// The reads of one pass, decided before it is timed.
pub enum Job<'a> {
    /// `file` in `readers` contiguous shares, each read start to end by its own reader.
    Sequential { file: &'a FileSpec, readers: usize },
    /// [`RANDOM_BYTES`] at each offset; the readers take the next offset until none is left.
    Random {
        file: &'a FileSpec,
        offsets: Vec<u64>,
        readers: usize,
    },
    /// Each file whole; the readers take the next file until none is left.
    WholeFiles {
        files: Vec<&'a FileSpec>,
        readers: usize,
    },
    /// Open each file and read one byte, one after another.
    FirstBytes { files: Vec<&'a FileSpec> },
    /// The size of each file, one after another.
    Stat { files: Vec<&'a FileSpec> },
    /// The names in `dir`, which must be exactly `files`.
    List {
        dir: &'static str,
        files: &'a [FileSpec],
    },
}

/// How a system's data is read.
pub enum Access {
    /// As files under a directory that mirrors the dataset (native copy or a mount point).
    Files(PathBuf),
    /// Through the S3 API, with no cache in between.
    Store(Arc<dyn ObjectStore>),
}

/// What a job read: bytes, operations (reads, files, stats or entries) and, where each
/// operation is timed, their latencies in seconds.
#[derive(Debug, Default)]
pub struct Outcome {
    pub bytes: u64,
    pub ops: u64,
    pub latencies: Vec<f64>,
}

/// What a timed pass read, and how long it took.
#[derive(Debug)]
pub struct Timed {
    pub outcome: Outcome,
    pub seconds: f64,
}

/// Reads `job` once through `access`. Every read checks its length, and every stat or listing
/// its sizes or names; with `check`, every byte read is also compared with the dataset (slower:
/// never timed).
pub fn run_pass(
    job: &Job,
    dataset: &Dataset,
    access: &Access,
    check: bool,
    rt: &Handle,
) -> anyhow::Result<Timed> {
    let start = Instant::now();
    let outcome = match access {
        Access::Files(root) => files::run(job, root, check)?,
        Access::Store(store) => rt.block_on(objects::run(job, dataset, store, check))?,
    };
    Ok(Timed {
        outcome,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Fails unless `data`, read from `what` at `offset`, is what the dataset holds there.
fn verify(what: &str, file: &FileSpec, offset: u64, data: &[u8]) -> anyhow::Result<()> {
    let mut want = vec![0u8; data.len()];
    dataset::expected(file, offset, &mut want);
    if let Some(i) = data.iter().zip(&want).position(|(a, b)| a != b) {
        bail!(
            "{what}: wrong bytes at offset {} (read {:#04x}, expected {:#04x})",
            offset + i as u64,
            data[i],
            want[i]
        );
    }
    Ok(())
}

/// The share of `size` bytes that reader `i` of `readers` reads: contiguous, starting at a
/// multiple of `align`.
fn share(size: u64, i: usize, readers: usize, align: u64) -> std::ops::Range<u64> {
    let start = |i: usize| (size * i as u64 / readers as u64) / align * align;
    start(i)..if i + 1 == readers { size } else { start(i + 1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_file_once_on_aligned_boundaries() {
        for (size, readers, align) in [(1 << 30, 4, 1 << 20), (8 << 20, 4, 8 << 20), (10, 3, 1)] {
            let shares: Vec<_> = (0..readers)
                .map(|i| share(size, i, readers, align))
                .collect();
            assert_eq!(shares[0].start, 0);
            assert_eq!(shares[readers - 1].end, size);
            for pair in shares.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert_eq!(pair[1].start % align, 0);
            }
        }
    }

    #[test]
    fn a_shuffle_is_a_permutation_and_depends_on_the_seed() {
        let files: Vec<FileSpec> = (0..100)
            .map(|i| FileSpec {
                name: format!("{SMALL_DIR}/{i:05}.bin"),
                size: 1,
            })
            .collect();
        let order = |seed| -> Vec<String> {
            shuffled(&files, &mut Rng::seeded(seed))
                .into_iter()
                .map(|f| f.name.clone())
                .collect()
        };
        let mut sorted = order(1);
        sorted.sort();
        assert_eq!(
            sorted,
            files.iter().map(|f| f.name.clone()).collect::<Vec<_>>()
        );
        assert_eq!(order(1), order(1));
        assert_ne!(order(1), order(2));
    }

    #[test]
    fn only_granary_and_native_read_the_epochs_and_the_backend_has_no_metadata() {
        assert_eq!(Workload::Epochs.conditions(Kind::Granary).len(), 2);
        assert_eq!(Workload::Epochs.conditions(Kind::Native).len(), 2);
        assert!(Workload::Epochs.conditions(Kind::Peer).is_empty());
        assert!(Workload::Stat.conditions(Kind::Backend).is_empty());
        assert!(Workload::List.conditions(Kind::Backend).is_empty());
        assert_eq!(
            Workload::Random4.conditions(Kind::Backend),
            [Condition::Direct]
        );
    }
}
