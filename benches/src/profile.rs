//! How much work a run does: the dataset's shape and the size of each workload, for `--smoke`
//! (CI: tiny, one run, only checks that every system works), `--quick` and `--full` (the sizes of
//! issue 6).

use crate::dataset::Shape;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Name {
    Smoke,
    Quick,
    Full,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Profile {
    pub name: Name,
    pub shape: Shape,
    /// Timed runs per figure (after the checking run).
    pub runs: usize,
    /// 256 KiB reads per pass of the random workloads (all readers together).
    pub random_reads: usize,
    /// Files whose first byte one pass of the first-byte workload reads.
    pub first_byte_files: usize,
}

impl Profile {
    pub fn new(name: Name, runs: Option<usize>) -> Profile {
        let small_bytes = 128 << 10;
        let (large_bytes, small_count, default_runs, random_reads, first_byte_files) = match name {
            Name::Smoke => (8 << 20, 20, 1, 32, 20),
            Name::Quick => (1 << 30, 2_000, 3, 512, 200),
            Name::Full => (4 << 30, 20_000, 5, 2_048, 1_000),
        };
        Profile {
            name,
            shape: Shape {
                large_bytes,
                small_count,
                small_bytes,
            },
            runs: runs.unwrap_or(default_runs).max(1),
            random_reads,
            first_byte_files,
        }
    }

    pub fn label(self) -> &'static str {
        match self.name {
            Name::Smoke => "smoke",
            Name::Quick => "quick",
            Name::Full => "full",
        }
    }
}
