//! What `--training` found: each system's epochs (AU, waiting, samples/s, and Granary's counter
//! deltas that explain them), the compute time and how it was chosen, the targets, the table
//! printed on stdout and the JSON written under `target/bench-results/`.

use super::loader::EpochTiming;
use super::{Sizes, System};
use crate::host::Machine;
use crate::pinned::node::{self, LoadResult};
use crate::profile::Name;
use crate::report::{Stats, aligned, number};
use crate::s3::Flavor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// Granary unpinned, epoch 2: AU at least this share of native's.
const GRANARY_TARGET: (usize, f64) = (2, 0.90);
/// Granary with the dataset pinned, every epoch: AU at least this share of native's.
const PINNED_TARGET: f64 = 0.98;

/// How Granary's counters moved during an epoch.
#[derive(Debug, Default, Serialize)]
pub struct GranaryEpoch {
    /// Successful backend GETs.
    pub backend_gets: f64,
    /// Block reads by the tier that served them (`granary_block_reads_total{tier}`).
    pub block_reads: BTreeMap<&'static str, f64>,
    /// Memory and disk block reads over all block reads.
    pub hit_ratio: Option<f64>,
    /// Read requests that reached the daemon, and their bytes: the rest of what the loaders read
    /// came from the kernel's page cache (or, pinned, through passthrough).
    pub fuse_reads: f64,
    pub fuse_read_bytes: f64,
    pub passthrough_opens: f64,
    /// `granary_fuse_stall_seconds_sum`: how long reads waited for blocks not fetched yet.
    pub stall_seconds: f64,
    /// Every counter that moved.
    pub counters: BTreeMap<String, f64>,
}

impl GranaryEpoch {
    pub fn between(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> GranaryEpoch {
        let counters = node::deltas(before, after);
        let get = |name, labels: &[(&str, &str)]| node::sum(&counters, name, labels);
        let block_reads: BTreeMap<&'static str, f64> = ["memory", "disk", "backend"]
            .into_iter()
            .map(|tier| (tier, get(node::BLOCK_READS, &[("tier", tier)])))
            .collect();
        let all = get(node::BLOCK_READS, &[]);
        let hits = block_reads["memory"] + block_reads["disk"];
        GranaryEpoch {
            backend_gets: get(node::BACKEND_REQUESTS, &[("op", "get"), ("outcome", "ok")]),
            hit_ratio: (all > 0.0).then(|| hits / all),
            block_reads,
            fuse_reads: get(node::FUSE_OPS, &[("op", "read")]),
            fuse_read_bytes: get(node::FUSE_READ_BYTES, &[]),
            passthrough_opens: get(node::PASSTHROUGH_OPENS, &[]),
            stall_seconds: get(node::STALL_SECONDS, &[]),
            counters,
        }
    }
}

/// One epoch of one system.
#[derive(Debug, Serialize)]
pub struct EpochResult {
    pub epoch: usize,
    pub seconds: f64,
    pub compute_seconds: f64,
    pub wait_seconds: f64,
    pub first_batch_wait_seconds: f64,
    /// Accelerator utilisation: compute over compute plus waiting.
    pub au: f64,
    /// Waiting over compute plus waiting (1 - AU).
    pub wait_share: f64,
    pub batches: usize,
    pub samples: u64,
    pub bytes: u64,
    pub samples_per_s: f64,
    pub mb_per_s: f64,
    /// The machine's 1-minute load average before and after the epoch.
    pub load_average: [f64; 2],
    /// For Granary's mounts.
    pub granary: Option<GranaryEpoch>,
}

impl EpochResult {
    pub fn new(
        epoch: usize,
        t: &EpochTiming,
        granary: Option<GranaryEpoch>,
        load_average: [f64; 2],
    ) -> EpochResult {
        let au = t.au();
        EpochResult {
            epoch,
            seconds: t.seconds,
            compute_seconds: t.compute_seconds,
            wait_seconds: t.wait_seconds,
            first_batch_wait_seconds: t.first_batch_wait_seconds,
            au,
            wait_share: 1.0 - au,
            batches: t.batches,
            samples: t.samples,
            bytes: t.bytes,
            samples_per_s: t.samples as f64 / t.seconds,
            mb_per_s: t.bytes as f64 / 1e6 / t.seconds,
            load_average,
            granary,
        }
    }
}

/// One system: its epochs, in order, and what stopped it if it did not finish them.
#[derive(Debug, Serialize)]
pub struct SystemResult {
    pub system: System,
    /// The pin's load, before epoch 1 (granary-pinned).
    pub load: Option<LoadResult>,
    pub epochs: Vec<EpochResult>,
    pub error: Option<String>,
}

/// The accelerator's compute time per batch and how it was chosen.
#[derive(Debug, Serialize)]
pub struct Compute {
    pub per_batch_seconds: f64,
    /// `None`: given with `--compute-ms`.
    pub calibration: Option<Calibration>,
}

/// Native's loaders with no compute, the page cache dropped before each pass.
#[derive(Debug, Serialize)]
pub struct Calibration {
    /// Samples/s of each pass.
    pub samples_per_s: Vec<f64>,
    pub median_samples_per_s: f64,
    /// The share of that median the accelerator consumes: compute per batch is the batch over
    /// `demand_share` times the median.
    pub demand_share: f64,
}

/// A target on the AU of a system relative to native's in the same epoch.
#[derive(Debug, Serialize)]
pub struct Target {
    pub system: System,
    pub epoch: usize,
    pub target: f64,
    pub au: Option<f64>,
    pub native_au: Option<f64>,
    pub ratio: Option<f64>,
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct GranaryConfig {
    pub binary: PathBuf,
    pub git: String,
    pub memory_cache_bytes: u64,
    pub disk_cache_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct TrainingReport {
    pub mode: &'static str,
    pub started_at: String,
    pub finished_at: String,
    pub profile: Name,
    #[serde(skip)]
    pub label: &'static str,
    pub s3: Flavor,
    pub machine: Machine,
    pub granary: GranaryConfig,
    pub sizes: Sizes,
    pub dataset_bytes: u64,
    /// The dataset's directory (a prefix in the bucket, a directory in each mount).
    pub dataset_dir: &'static str,
    pub compute: Option<Compute>,
    /// What happens to the kernel's caches around the epochs.
    pub page_cache: &'static str,
    pub systems: Vec<SystemResult>,
    pub targets: Vec<Target>,
    /// What went wrong outside a system's epochs (the calibration).
    pub errors: Vec<String>,
}

/// For the report: what the page cache goes through.
pub fn page_cache(drop_pages: bool) -> &'static str {
    if drop_pages {
        "dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each system's epoch 1, and \
         each sample's pages once it is read (POSIX_FADV_DONTNEED): the dataset stands for one \
         larger than the host's memory"
    } else {
        "dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each system's epoch 1 only, \
         kept between epochs (--keep-page-cache)"
    }
}

impl TrainingReport {
    /// Evaluates the targets.
    pub fn finish(&mut self) {
        let au = |system: System, epoch: usize| {
            self.systems
                .iter()
                .find(|s| s.system == system)?
                .epochs
                .iter()
                .find(|e| e.epoch == epoch)
                .map(|e| e.au)
        };
        let measured = |system| self.systems.iter().any(|s| s.system == system);
        let mut wanted = Vec::new();
        for system in [System::Granary, System::GranaryHinted] {
            if measured(system) && self.sizes.epochs >= GRANARY_TARGET.0 {
                wanted.push((system, GRANARY_TARGET.0, GRANARY_TARGET.1));
            }
        }
        if measured(System::GranaryPinned) {
            wanted
                .extend((1..=self.sizes.epochs).map(|e| (System::GranaryPinned, e, PINNED_TARGET)));
        }
        self.targets = wanted
            .into_iter()
            .map(|(system, epoch, target)| {
                let (au, native_au) = (au(system, epoch), au(System::Native, epoch));
                let ratio = au.zip(native_au).map(|(a, n)| a / n);
                Target {
                    system,
                    epoch,
                    target,
                    au,
                    native_au,
                    ratio,
                    met: ratio.map(|r| r >= target),
                }
            })
            .collect();
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = self.errors.clone();
        for s in &self.systems {
            if let Some(e) = &s.error {
                problems.push(format!("{}: {e}", s.system.name()));
            } else if s.epochs.len() != self.sizes.epochs {
                problems.push(format!(
                    "{}: {} epochs of {}",
                    s.system.name(),
                    s.epochs.len(),
                    self.sizes.epochs
                ));
            }
        }
        problems
    }

    /// Whether every system ran every epoch, every sample with the right bytes.
    pub fn all_good(&self) -> bool {
        self.compute.is_some() && !self.systems.is_empty() && self.problems().is_empty()
    }

    /// The table, the targets and any problems, for a terminal.
    pub fn render(&self) -> String {
        let z = &self.sizes;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "granary-bench --training --{}: {} samples of {} KiB ({} MiB) in {}/, {} loader threads \
             (std::fs reads, every sample's checksum\nchecked) in batches of {}, {} batches \
             outstanding per loader, {} epochs, each in a new shuffled order (the same for every \
             system).\nS3 server {}, granary {} (memory cache {} MiB, disk tier off; granary-pinned: \
             the same, the dataset pinned and loaded first),\n{} CPU cores for everything.",
            self.label,
            z.samples,
            z.sample_bytes >> 10,
            self.dataset_bytes / MIB,
            self.dataset_dir,
            z.loaders,
            z.batch_samples,
            z.prefetch_batches,
            z.epochs,
            self.s3.name(),
            self.granary.git,
            self.granary.memory_cache_bytes / MIB,
            self.machine.nproc,
        );
        match &self.compute {
            Some(c) => {
                let _ = write!(
                    out,
                    "Compute per batch (the \"GPU\", a sleep): {:.2} ms",
                    c.per_batch_seconds * 1e3
                );
                match &c.calibration {
                    Some(cal) => {
                        let s = Stats::of(cal.samples_per_s.iter().copied());
                        let _ = writeln!(
                            out,
                            ", calibrated: native's loaders with no compute read {} samples/s \
                             (median of {} passes {}, page\ncache dropped before each); the GPU \
                             consumes {:.0}% of that.",
                            number(cal.median_samples_per_s),
                            cal.samples_per_s.len(),
                            s.map_or(String::new(), |s| format!(
                                "[{}-{}]",
                                number(s.min),
                                number(s.max)
                            )),
                            cal.demand_share * 100.0
                        );
                    }
                    None => out.push_str(", given with --compute-ms.\n"),
                }
            }
            None => out.push_str("Compute per batch: not determined (see the problems below).\n"),
        }
        let _ = writeln!(out, "Page cache: {}.\n", self.page_cache);

        let header = [
            "system",
            "epoch",
            "AU",
            "vs native",
            "waiting",
            "samples/s",
            "MB/s",
            "seconds",
            "GETs",
            "blocks m/d/b",
            "hit",
            "via daemon",
            "stall s",
            "passthrough",
        ];
        let mut rows = vec![header.map(String::from).to_vec()];
        let native = self.systems.iter().find(|s| s.system == System::Native);
        for s in &self.systems {
            for e in &s.epochs {
                let native_au = native
                    .and_then(|n| n.epochs.iter().find(|n| n.epoch == e.epoch))
                    .map(|n| n.au);
                let g = e.granary.as_ref();
                let dash = || "-".to_string();
                let count =
                    |f: fn(&GranaryEpoch) -> f64| g.map_or_else(dash, |g| format!("{:.0}", f(g)));
                rows.push(vec![
                    s.system.name().to_string(),
                    e.epoch.to_string(),
                    format!("{:.3}", e.au),
                    native_au.map_or_else(dash, |n| format!("{:.2}", e.au / n)),
                    format!("{:.1}%", e.wait_share * 100.0),
                    number(e.samples_per_s),
                    number(e.mb_per_s),
                    format!("{:.2}", e.seconds),
                    count(|g| g.backend_gets),
                    g.map_or_else(dash, |g| {
                        format!(
                            "{:.0}/{:.0}/{:.0}",
                            g.block_reads["memory"],
                            g.block_reads["disk"],
                            g.block_reads["backend"]
                        )
                    }),
                    g.and_then(|g| g.hit_ratio)
                        .map_or_else(dash, |h| format!("{h:.2}")),
                    g.map_or_else(dash, |g| {
                        format!("{:.0}%", g.fuse_read_bytes / e.bytes.max(1) as f64 * 100.0)
                    }),
                    g.map_or_else(dash, |g| format!("{:.2}", g.stall_seconds)),
                    count(|g| g.passthrough_opens),
                ]);
            }
        }
        out.push_str(&aligned(&rows, &[0, 9]));
        let _ = writeln!(
            out,
            "\nAU: the GPU's compute time over compute plus waiting for the next batch; waiting = \
             1 - AU; vs native: AU over native's AU in the same\nepoch. samples/s and MB/s (10^6 \
             bytes/s): over the epoch, from starting the loaders until the last batch's compute \
             ended. Granary's counters\nover the epoch: GETs to the backend, block reads from \
             memory/disk/backend, hit = (memory + disk) / all, via daemon = bytes of FUSE reads\n\
             that reached granary over the bytes the loaders read (the rest came from the page \
             cache, or pinned, through passthrough), stall s =\ngranary_fuse_stall_seconds \
             (reads waiting for blocks not fetched yet), passthrough = opens through kernel \
             passthrough."
        );

        if !self.targets.is_empty() {
            out.push_str("\nTargets (reported, not enforced):\n");
            for t in &self.targets {
                let verdict = match t.met {
                    Some(true) => "met    ",
                    Some(false) => "NOT met",
                    None => "-      ",
                };
                let _ = writeln!(
                    out,
                    "  {verdict}  {} AU >= {:.0}% of native's in epoch {}: {}",
                    t.system.name(),
                    t.target * 100.0,
                    t.epoch,
                    match (t.ratio, t.au, t.native_au) {
                        (Some(r), Some(a), Some(n)) =>
                            format!("{:.1}% ({a:.3} vs {n:.3})", r * 100.0),
                        _ => "not measured".into(),
                    }
                );
            }
        }
        for s in &self.systems {
            if let Some(l) = &s.load {
                let _ = writeln!(
                    out,
                    "\n{} load before epoch 1: {} MiB in {:.2} s ({:.0} MB/s) until `granary \
                     dataset load --wait` exited, {:.0} backend GETs.",
                    s.system.name(),
                    l.bytes / MIB,
                    l.seconds,
                    l.mb_per_s,
                    l.backend_gets
                );
            }
        }
        let loads = self
            .systems
            .iter()
            .flat_map(|s| s.epochs.iter().flat_map(|e| e.load_average));
        let (lo, hi) = loads.fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        if hi > 0.0 {
            let _ = writeln!(
                out,
                "The machine's 1-minute load average was {lo:.1}-{hi:.1} at the starts and ends \
                 of the epochs."
            );
        }
        let problems = self.problems();
        if problems.is_empty() {
            out.push_str(
                "Every sample of every epoch had the size and checksum the generator gave it.\n",
            );
        } else {
            out.push_str("\nProblems:\n");
            for p in problems {
                let _ = writeln!(out, "  {}", p.replace('\n', "\n    "));
            }
        }
        out
    }

    /// Writes `<stamp>-training-<profile>.json` and `training-latest.json` into `dir`; returns
    /// the first.
    pub fn write_json(&self, dir: &Path, stamp: &str) -> anyhow::Result<PathBuf> {
        crate::report::write_json(dir, stamp, Some("training"), self.label, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_an_epoch_are_deltas_by_tier() {
        let reading = |memory: f64, backend: f64, gets: f64| -> BTreeMap<String, f64> {
            [
                (format!("{}{{tier=\"memory\"}}", node::BLOCK_READS), memory),
                (
                    format!("{}{{tier=\"backend\"}}", node::BLOCK_READS),
                    backend,
                ),
                (
                    format!("{}{{op=\"get\",outcome=\"ok\"}}", node::BACKEND_REQUESTS),
                    gets,
                ),
                (
                    format!(
                        "{}{{dataset=\"train\",training_job=\"\"}}",
                        node::STALL_SECONDS
                    ),
                    gets / 100.0,
                ),
            ]
            .into_iter()
            .collect()
        };
        let g = GranaryEpoch::between(&reading(10.0, 100.0, 100.0), &reading(40.0, 190.0, 190.0));
        assert_eq!(g.block_reads["memory"], 30.0);
        assert_eq!(g.block_reads["disk"], 0.0);
        assert_eq!(g.block_reads["backend"], 90.0);
        assert_eq!(g.hit_ratio, Some(0.25));
        assert_eq!(g.backend_gets, 90.0);
        assert!((g.stall_seconds - 0.9).abs() < 1e-9);
        let none = GranaryEpoch::between(&BTreeMap::new(), &BTreeMap::new());
        assert_eq!(none.hit_ratio, None);
    }
}
