//! `--training`: a training-shaped benchmark, measuring accelerator utilisation (AU) in the manner
//! of MLPerf Storage. The dataset is many sample files (1,000 of 1 MiB with `--quick`) under
//! `train/`, uploaded to the bucket with ordinary PUTs and written to local disk. For each system,
//! side by side in one run:
//!
//! - `native`: the local copy;
//! - `granary`: `granary up` with a memory cache of half the dataset and no disk tier;
//! - `granary-hinted`: the same, told each epoch's order as the epoch starts (`granary hint`);
//! - `granary-pinned`: the same, with `train/` pinned and loaded before epoch 1 (its files then
//!   open through kernel FUSE passthrough);
//! - `s3fs`, when installed: s3fs-fuse with its disk cache, as the other modes mount it.
//!
//! each epoch is read by loader threads in batches for a simulated accelerator that sleeps a fixed
//! compute time per batch ([`loader`]); AU is compute over compute plus waiting for data. The page
//! cache is dropped before each system's epoch 1, and each sample's pages once it is read
//! (`POSIX_FADV_DONTNEED`), so that the dataset stands for one larger than the host's memory, as
//! MLPerf Storage requires, and every epoch reads through the system measured;
//! `--keep-page-cache` lets the kernel keep what it has between epochs instead. Each epoch has its own shuffled order, the same for every
//! system. Every sample read is checked against a checksum made from the generator.
//!
//! The compute time per batch is calibrated first (unless `--compute-ms` gives it): native's
//! loaders read the dataset with no compute, page cache dropped, three times; the accelerator then
//! asks for [`DEMAND_SHARE`] of the median rate, so that native's AU is near 1 while its loaders
//! stay busy.
//!
//! Reported ([`report`]): per system and epoch, AU, the share of time waiting, samples/s, and for
//! Granary the counter deltas (backend GETs, block reads by tier, FUSE reads, passthrough opens,
//! stall time); the targets (Granary's AU in epoch 2 >= 90% of native's, pinned >= 98% in every
//! epoch), printed and not enforced. A table on stdout, JSON under `target/bench-results/`.

mod loader;
mod report;

use crate::dataset::{self, Rng};
use crate::host;
use crate::pinned::node::{Node, Spec};
use crate::profile::{Name, Profile};
use crate::progress::Progress;
use crate::s3::{Flavor, S3Conn};
use crate::systems::{Mount, System as _, Tool};
use crate::workloads::{Access, Workload};
use anyhow::{Context, bail, ensure};
use loader::{EpochTiming, Sample, Shape};
use object_store::ObjectStore;
use report::{
    Calibration, Compute, EpochResult, GranaryConfig, GranaryEpoch, SystemResult, TrainingReport,
};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::runtime::Runtime;

/// The dataset's directory under the bucket prefix, on local disk and in each mount.
const DIR: &str = "train";
/// The pinned dataset's name.
const PIN: &str = "train";
/// The share of native's no-compute rate the accelerator consumes when calibrated.
pub const DEMAND_SHARE: f64 = 0.8;
/// Calibration passes (the median is taken).
const CALIBRATION_PASSES: usize = 3;
/// Seeds of the shuffles: epoch `e` uses `SEED + e` (the same for every system), calibration pass
/// `p` uses `CALIBRATION_SEED + p`.
const SEED: u64 = 0x5eed_7a1e;
const CALIBRATION_SEED: u64 = 0x5eed_ca1b;
/// The smallest memory cache `granary up` takes (4 blocks of 4 MiB).
const MIN_MEMORY_CACHE: u64 = 16 * MIB;
const MIB: u64 = 1 << 20;

/// A system measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    Native,
    Granary,
    /// Granary told each epoch's order first (`granary hint`).
    GranaryHinted,
    GranaryPinned,
    S3fs,
}

impl System {
    const ALL: [System; 5] = [
        System::Native,
        System::Granary,
        System::GranaryHinted,
        System::GranaryPinned,
        System::S3fs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Native => "native",
            System::Granary => "granary",
            System::GranaryHinted => "granary-hinted",
            System::GranaryPinned => "granary-pinned",
            System::S3fs => "s3fs",
        }
    }

    fn installed(self) -> bool {
        self != System::S3fs || host::which("s3fs").is_some()
    }

    /// Those asked for (by name), or all that are installed, in [`System::ALL`]'s order.
    fn chosen(asked: &[String]) -> anyhow::Result<Vec<System>> {
        if asked.is_empty() {
            return Ok(System::ALL.into_iter().filter(|s| s.installed()).collect());
        }
        let mut chosen = Vec::new();
        for name in asked {
            let Some(system) = System::ALL.into_iter().find(|s| s.name() == name) else {
                let known: Vec<&str> = System::ALL.iter().map(|s| s.name()).collect();
                bail!(
                    "unknown system {name:?} with --training (known: {})",
                    known.join(", ")
                );
            };
            if !system.installed() {
                bail!("{name} is not installed (apt-get install -y {name})");
            }
            chosen.push(system);
        }
        Ok(System::ALL
            .into_iter()
            .filter(|s| chosen.contains(s))
            .collect())
    }
}

/// The dataset and the loaders, by profile.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sizes {
    pub samples: usize,
    pub sample_bytes: u64,
    pub loaders: usize,
    pub batch_samples: usize,
    /// Batches each loader may have outstanding (PyTorch's `prefetch_factor`).
    pub prefetch_batches: usize,
    pub epochs: usize,
    /// Each sample's pages dropped once read (see [`Shape::drop_pages`]); off with
    /// `--keep-page-cache`.
    pub drop_pages: bool,
}

impl Sizes {
    pub fn of(name: Name) -> Sizes {
        let (samples, sample_bytes, batch_samples, epochs) = match name {
            Name::Smoke => (40, 256 << 10, 4, 2),
            Name::Quick => (1_000, MIB, 8, 3),
            Name::Full => (4_000, MIB, 8, 3),
        };
        Sizes {
            samples,
            sample_bytes,
            loaders: 4,
            batch_samples,
            prefetch_batches: 2,
            epochs,
            drop_pages: true,
        }
    }

    pub fn dataset_bytes(&self) -> u64 {
        self.samples as u64 * self.sample_bytes
    }

    fn shape(&self) -> Shape {
        Shape {
            loaders: self.loaders,
            batch_samples: self.batch_samples,
            prefetch_batches: self.prefetch_batches,
            drop_pages: self.drop_pages,
        }
    }
}

/// What the training mode gets from the common setup (main.rs).
pub struct Setup<'a> {
    pub started: SystemTime,
    pub rt: &'a Runtime,
    pub profile: Profile,
    pub flavor: Flavor,
    pub s3: &'a S3Conn,
    pub store: &'a Arc<dyn ObjectStore>,
    /// The benchmark's work directory (removed at the end).
    pub work: &'a Path,
    pub log_dir: &'a Path,
    pub results_dir: &'a Path,
    pub granary_bin: &'a Path,
    pub git: String,
    /// `--systems`, empty for all installed.
    pub systems: &'a [String],
    /// `--compute-ms`: no calibration.
    pub compute: Option<Duration>,
    /// `--keep-page-cache`: samples' pages stay in the page cache between epochs.
    pub keep_page_cache: bool,
    pub progress: Progress,
}

/// Everything a system's epochs need.
struct Ctx<'a> {
    sizes: Sizes,
    samples: &'a [Sample],
    native_root: &'a Path,
    /// Parent of the mounts' directories.
    base: PathBuf,
    log_dir: &'a Path,
    spec: Spec<'a>,
    s3: &'a S3Conn,
    compute: Duration,
}

impl Ctx<'_> {
    /// The order of epoch `epoch`, the same for every system.
    fn order(&self, seed: u64) -> Vec<&Sample> {
        let mut order: Vec<&Sample> = self.samples.iter().collect();
        Rng::seeded(seed).shuffle(&mut order);
        order
    }
}

/// Runs the training benchmark; `Ok(false)` when it ran but a figure is missing or a sample had
/// wrong bytes.
pub fn run(setup: Setup) -> anyhow::Result<bool> {
    let Setup {
        started,
        rt,
        profile,
        flavor,
        s3,
        store,
        work,
        log_dir,
        results_dir,
        granary_bin,
        git,
        systems,
        compute,
        keep_page_cache,
        mut progress,
    } = setup;
    let systems = System::chosen(systems)?;
    let sizes = Sizes {
        drop_pages: !keep_page_cache,
        ..Sizes::of(profile.name)
    };
    let dataset_bytes = sizes.dataset_bytes();
    let memory_cache = (dataset_bytes / 2).max(MIN_MEMORY_CACHE);
    progress.note(&format!(
        "dataset: writing and uploading {DIR}/: {} files of {} KiB",
        sizes.samples,
        sizes.sample_bytes >> 10
    ));
    let native_root = work.join("native");
    let samples = rt.block_on(create_samples(sizes, &native_root, store))?;

    let ctx = Ctx {
        sizes,
        samples: &samples,
        native_root: &native_root,
        base: work.join("training"),
        log_dir,
        spec: Spec {
            bin: granary_bin,
            s3,
            source: format!("s3://{}/{}", s3.bucket, dataset::PREFIX),
            memory_cache,
            disk_cache: 0,
        },
        s3,
        compute: compute.unwrap_or_default(),
    };
    let calibrating = compute.is_none();
    let loads = usize::from(systems.contains(&System::GranaryPinned));
    progress.expect(
        usize::from(calibrating) * CALIBRATION_PASSES + systems.len() * sizes.epochs + loads,
    );

    let mut errors = Vec::new();
    let compute = match compute {
        Some(per_batch) => Some(Compute {
            per_batch_seconds: per_batch.as_secs_f64(),
            calibration: None,
        }),
        None => match calibrate(&ctx, &mut progress) {
            Ok(c) => Some(c),
            Err(e) => {
                let e = format!("calibration: {e:#}");
                progress.note(&format!("training FAILED: {e}"));
                errors.push(e);
                None
            }
        },
    };
    let mut results = Vec::new();
    if let Some(c) = &compute {
        let ctx = Ctx {
            compute: Duration::from_secs_f64(c.per_batch_seconds),
            ..ctx
        };
        for &system in &systems {
            results.push(measure(&ctx, system, &mut progress));
        }
    }
    progress.note("tearing down");

    let mut report = TrainingReport {
        mode: "training",
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        profile: profile.name,
        label: profile.label(),
        s3: flavor,
        machine: host::Machine::describe(),
        granary: GranaryConfig {
            binary: granary_bin.to_path_buf(),
            git,
            memory_cache_bytes: memory_cache,
            disk_cache_bytes: 0,
        },
        sizes,
        dataset_bytes,
        dataset_dir: DIR,
        compute,
        page_cache: report::page_cache(sizes.drop_pages),
        systems: results,
        targets: Vec::new(),
        errors,
    };
    report.finish();
    print!("{}", report.render());
    let stamp = crate::report::stamp(&report.started_at);
    let json = report.write_json(results_dir, &stamp)?;
    println!(
        "\nResults: {} (and training-latest.json beside it); logs in {}",
        json.display(),
        log_dir.display()
    );
    Ok(report.all_good())
}

/// The bytes the S3 server must hold.
pub fn data_bytes(name: Name) -> u64 {
    Sizes::of(name).dataset_bytes()
}

/// Writes and uploads `train/NNNNN.bin`, generated like every dataset of the harness; the
/// checksum of each is computed from the generator, not from what was written.
async fn create_samples(
    sizes: Sizes,
    native_root: &Path,
    store: &Arc<dyn ObjectStore>,
) -> anyhow::Result<Vec<Sample>> {
    std::fs::create_dir_all(native_root.join(DIR))?;
    let names = (0..sizes.samples).map(|i| format!("{DIR}/{i:05}.bin"));
    let files = dataset::create_small_files(names, sizes.sample_bytes, native_root, store).await?;
    let mut data = vec![0u8; sizes.sample_bytes as usize];
    Ok(files
        .into_iter()
        .map(|file| {
            dataset::expected(&file, 0, &mut data);
            Sample {
                checksum: loader::checksum(&data),
                name: file.name,
                size: file.size,
            }
        })
        .collect())
}

/// Native's loaders with no compute, the page cache dropped before each pass; the compute per
/// batch that makes the accelerator consume [`DEMAND_SHARE`] of their median rate.
fn calibrate(ctx: &Ctx, progress: &mut Progress) -> anyhow::Result<Compute> {
    let mut rates = Vec::with_capacity(CALIBRATION_PASSES);
    for pass in 1..=CALIBRATION_PASSES {
        host::drop_caches()?;
        let order = ctx.order(CALIBRATION_SEED + pass as u64);
        let t = loader::run_epoch(ctx.native_root, &order, ctx.sizes.shape(), Duration::ZERO)?;
        let rate = t.samples as f64 / t.seconds;
        progress.pass(
            &format!(
                "training calibration {pass}/{CALIBRATION_PASSES}: native, no compute: {rate:.0} samples/s"
            ),
            json!({ "mode": "training", "pass": "calibration", "run": pass, "samples_per_s": rate }),
        );
        rates.push(rate);
    }
    let median = crate::report::Stats::of(rates.iter().copied())
        .context("no calibration pass")?
        .median;
    let per_batch_seconds = ctx.sizes.batch_samples as f64 / (DEMAND_SHARE * median);
    Ok(Compute {
        per_batch_seconds,
        calibration: Some(Calibration {
            samples_per_s: rates,
            median_samples_per_s: median,
            demand_share: DEMAND_SHARE,
        }),
    })
}

/// A running system: where its files are and, for Granary, its counters.
enum Instance {
    Native,
    Granary(Node),
    Mount(Mount),
}

impl Instance {
    fn start(ctx: &Ctx, system: System) -> anyhow::Result<Instance> {
        Ok(match system {
            System::Native => Instance::Native,
            System::Granary | System::GranaryHinted | System::GranaryPinned => {
                Instance::Granary(Node::start(
                    &ctx.spec,
                    &ctx.base.join(system.name()),
                    &ctx.log_dir.join(format!("training-{}.log", system.name())),
                )?)
            }
            System::S3fs => {
                let mut mount = Mount::new(
                    Tool::S3fs,
                    ctx.s3.clone(),
                    dataset::PREFIX,
                    &ctx.base,
                    ctx.log_dir,
                );
                mount.start(Workload::SmallFiles)?;
                Instance::Mount(mount)
            }
        })
    }

    /// The directory the samples' names are relative to.
    fn root(&self, ctx: &Ctx) -> PathBuf {
        match self {
            Instance::Native => ctx.native_root.to_path_buf(),
            Instance::Granary(node) => node.mnt.clone(),
            Instance::Mount(mount) => match mount.access() {
                Access::Files(root) => root,
                Access::Store(_) => unreachable!("a mount is read as files"),
            },
        }
    }

    fn counters(&self) -> anyhow::Result<Option<BTreeMap<String, f64>>> {
        match self {
            Instance::Granary(node) => {
                node.check_running()?;
                Ok(Some(node.counters()))
            }
            Instance::Native | Instance::Mount(_) => Ok(None),
        }
    }

    fn stop(self) {
        if let Instance::Mount(mut mount) = self {
            mount.stop();
        }
    }
}

/// Every epoch of `system` (and for granary-pinned, the pin and its load first).
fn measure(ctx: &Ctx, system: System, progress: &mut Progress) -> SystemResult {
    let mut result = SystemResult {
        system,
        load: None,
        epochs: Vec::new(),
        error: None,
    };
    if let Err(e) = measure_into(ctx, &mut result, progress) {
        let e = format!("{e:#}");
        progress.note(&format!("training {} FAILED: {e}", system.name()));
        result.error = Some(e);
    }
    result
}

fn measure_into(
    ctx: &Ctx,
    result: &mut SystemResult,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let system = result.system;
    // As on a fresh node (and see pinned.rs: a load right after the deletion of thousands of
    // files is slower on ext4 without a journal while their inode-table blocks are cached).
    host::drop_caches()?;
    let instance = Instance::start(ctx, system)?;
    let root = instance.root(ctx);
    ensure!(
        root.join(DIR).is_dir(),
        "{}: no directory {DIR}",
        root.display()
    );
    if let (System::GranaryPinned, Instance::Granary(node)) = (system, &instance) {
        node.pin(PIN, &format!("/{DIR}"))?;
        let load = node.load(PIN, ctx.sizes.dataset_bytes(), ctx.sizes.sample_bytes)?;
        ensure!(
            load.stored_files == ctx.sizes.samples as u64
                && load.stored_bytes == ctx.sizes.dataset_bytes(),
            "the dataset store holds {} files, {} bytes after the load; expected {}, {}",
            load.stored_files,
            load.stored_bytes,
            ctx.sizes.samples,
            ctx.sizes.dataset_bytes()
        );
        progress.pass(
            &format!(
                "training {} load: {:.0} MB/s ({:.2} s), {} GETs",
                system.name(),
                load.mb_per_s,
                load.seconds,
                load.backend_gets
            ),
            json!({
                "mode": "training", "system": system.name(), "pass": "load",
                "mb_per_s": load.mb_per_s, "seconds": load.seconds,
            }),
        );
        result.load = Some(load);
    }

    host::drop_caches()?;
    for epoch in 1..=ctx.sizes.epochs {
        let order = ctx.order(SEED + epoch as u64);
        if let (System::GranaryHinted, Instance::Granary(node)) = (system, &instance) {
            // What a job does as an epoch starts: its sampler's order, told to the mount.
            let list: String = order.iter().map(|s| format!("{}\n", s.name)).collect();
            node.hint(&ctx.base.join(format!("order-{epoch}.txt")), &list)?;
        }
        let (before, load_before) = (instance.counters()?, host::load_average());
        let timing: EpochTiming = loader::run_epoch(&root, &order, ctx.sizes.shape(), ctx.compute)
            .with_context(|| format!("epoch {epoch}"))?;
        let after = instance.counters()?;
        let granary = before
            .zip(after)
            .map(|(b, a)| GranaryEpoch::between(&b, &a));
        let e = EpochResult::new(epoch, &timing, granary, [load_before, host::load_average()]);
        progress.pass(
            &format!(
                "training {} epoch {epoch}/{}: AU {:.3}, waiting {:.1}%, {:.0} samples/s{}",
                system.name(),
                ctx.sizes.epochs,
                e.au,
                e.wait_share * 100.0,
                e.samples_per_s,
                e.granary.as_ref().map_or(String::new(), |g| format!(
                    ", {:.0} GETs, hit ratio {}",
                    g.backend_gets,
                    g.hit_ratio.map_or("-".into(), |h| format!("{h:.2}"))
                )),
            ),
            json!({
                "mode": "training", "system": system.name(), "epoch": epoch, "au": e.au,
                "samples_per_s": e.samples_per_s,
            }),
        );
        result.epochs.push(e);
    }
    instance.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systems_are_chosen_by_name_in_a_fixed_order() {
        let asked = |names: &[&str]| {
            System::chosen(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            asked(&["granary-pinned", "native"]).unwrap(),
            [System::Native, System::GranaryPinned]
        );
        let e = asked(&["rclone"]).unwrap_err();
        assert!(format!("{e}").contains("granary-pinned"), "{e}");
        let all = asked(&[]).unwrap();
        assert_eq!(&all[..3], &System::ALL[..3]);
    }

    #[test]
    fn the_quick_dataset_is_about_a_gibibyte_in_whole_batches() {
        let s = Sizes::of(Name::Quick);
        assert_eq!(s.dataset_bytes(), 1_000 * MIB);
        for name in [Name::Smoke, Name::Quick, Name::Full] {
            let s = Sizes::of(name);
            assert_eq!(s.samples % s.batch_samples, 0, "{name:?}");
        }
    }
}
