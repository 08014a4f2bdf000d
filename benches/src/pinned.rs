//! `--pinned`: the pinned-dataset benchmark (issue 4) on 127.0.0.1. The dataset is one large file
//! and many 128 KiB files under `pinned/` in the bucket (and on local disk, the native copy). Each
//! run:
//!
//! 1. the backend's raw parallel GET throughput over the same objects ([`backend`]), 8 and 16
//!    GETs in flight, with no Granary running;
//! 2. a fresh `granary up` node ([`node`]: empty cache directory and dataset store, its worker API
//!    and metrics on free ports); `granary dataset pin` of `/pinned`, then `granary dataset load
//!    --wait`, timed from the call until `status --json` says ready at 100%;
//! 3. in the first run only, an untimed pass through the mount that compares every byte;
//! 4. the reads, each through the mount (where the loaded files open with kernel FUSE
//!    passthrough) and from the native copy, cold (page cache dropped) then hot (right after an
//!    untimed read): the large file start to end, and every small file in a shuffled order with
//!    one reader and with four. Around each pass through the mount: the node's counters
//!    (passthrough opens, FUSE reads, backend GETs) and CPU time;
//! 5. the node's peak RSS, then it is stopped.
//!
//! The report ([`report`]): a table on stdout with each figure, its reference (native, or the raw
//! GETs for the load), the ratio and the target; JSON under `target/bench-results/`.

mod backend;
pub mod node;
mod report;

use crate::dataset::{self, Dataset, FileSpec, Rng, Shape};
use crate::host;
use crate::profile::{Name, Profile};
use crate::progress::Progress;
use crate::s3::{Flavor, S3Conn};
use crate::workloads::{Access, Job, Timed, run_pass};
use anyhow::{Context, ensure};
use node::{Node, Spec};
use object_store::ObjectStore;
use report::{
    AFTER_TTL, CheckResult, Condition, DatasetShape, GranaryConfig, GranaryDelta, PassResult,
    PinnedReport, RunResult, Workload,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::runtime::Runtime;

/// The dataset's directory under the bucket prefix, as seen in the mount (the pinned path).
const DIR: &str = "pinned";
/// The dataset's name.
const NAME: &str = "bench";
/// Granary's default cache block: the load's GET size, and the raw GETs' range size.
const BLOCK_BYTES: u64 = 4 << 20;
/// GETs in flight in the raw passes.
const RAW_IN_FLIGHT: [usize; 3] = [8, 16, 32];
const MIB: u64 = 1 << 20;

/// What the pinned mode gets from the common setup (main.rs).
pub struct Setup<'a> {
    pub started: SystemTime,
    pub rt: &'a Runtime,
    pub profile: Profile,
    pub flavor: Flavor,
    pub s3: &'a S3Conn,
    /// The benchmark's work directory (removed at the end).
    pub work: &'a Path,
    pub log_dir: &'a Path,
    pub results_dir: &'a Path,
    pub granary_bin: &'a Path,
    pub git: String,
    /// `None`: 512 MiB.
    pub memory_cache: Option<u64>,
    pub disk_cache: u64,
    pub progress: Progress,
}

/// Everything a run needs.
struct Ctx<'a> {
    rt: &'a Runtime,
    dataset: &'a Dataset,
    store: &'a Arc<dyn ObjectStore>,
    spec: Spec<'a>,
    base: PathBuf,
    log: PathBuf,
    runs: usize,
    /// Whether to read the small files once more after the attribute TTL ([`AFTER_TTL`]).
    after_ttl: bool,
}

/// Runs the pinned-dataset benchmark; `Ok(false)` when it ran but a figure is missing, a byte
/// was wrong or the mount did not use passthrough.
pub fn run(setup: Setup) -> anyhow::Result<bool> {
    let Setup {
        started,
        rt,
        profile,
        flavor,
        s3,
        work,
        log_dir,
        results_dir,
        granary_bin,
        git,
        memory_cache,
        disk_cache,
        mut progress,
    } = setup;
    let memory_cache = memory_cache.unwrap_or(512 * MIB);
    let shape = profile.shape;
    // Its own client, with a connection for every GET in flight.
    let store = s3.store(RAW_IN_FLIGHT.into_iter().max().unwrap_or(16))?;
    progress.note(&format!(
        "dataset: writing and uploading {DIR}/: a {} MiB file and {} files of {} KiB",
        shape.large_bytes / MIB,
        shape.small_count,
        shape.small_bytes >> 10
    ));
    let dataset = rt.block_on(create_dataset(shape, &work.join("native"), &store))?;
    let total_bytes = shape.large_bytes + dataset.small_bytes();
    let blocks = std::iter::once(&dataset.large)
        .chain(&dataset.small)
        .map(|f| f.size.div_ceil(BLOCK_BYTES))
        .sum();

    let runs = profile.runs;
    // The smoke profile (in CI) does not wait out the TTL.
    let after_ttl = profile.name != Name::Smoke;
    let ctx = Ctx {
        rt,
        dataset: &dataset,
        store: &store,
        spec: Spec {
            bin: granary_bin,
            s3,
            source: format!("s3://{}/{}", s3.bucket, dataset::PREFIX),
            memory_cache,
            disk_cache,
        },
        base: work.join("pinned"),
        log: log_dir.join("pinned-granary.log"),
        runs,
        after_ttl,
    };
    // Per run: the raw passes, the load, each workload's conditions x 2 systems; in the first
    // run, the raw GETs' check and the mount's check.
    let reads: usize = Workload::ALL
        .iter()
        .map(|w| w.conditions(after_ttl).len() * 2)
        .sum();
    progress.expect(runs * (RAW_IN_FLIGHT.len() + 2 + reads) + 2);
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for run in 1..=runs {
        match one_run(&ctx, run, &mut progress) {
            Ok(r) => results.push(r),
            Err(e) => {
                let e = format!("run {run}: {e:#}");
                progress.note(&format!("pinned FAILED: {e}"));
                errors.push(e);
            }
        }
    }
    progress.note("tearing down");

    let mut report = PinnedReport {
        mode: "pinned",
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        profile: profile.name,
        runs_wanted: runs,
        s3: flavor,
        machine: host::Machine::describe(),
        granary: GranaryConfig {
            binary: granary_bin.to_path_buf(),
            git,
            memory_cache_bytes: memory_cache,
            disk_cache_bytes: disk_cache,
        },
        dataset: DatasetShape {
            pin_path: format!("/{DIR}"),
            large_bytes: shape.large_bytes,
            small_count: shape.small_count,
            small_bytes: shape.small_bytes,
            total_bytes,
            blocks,
        },
        raw_in_flight: RAW_IN_FLIGHT.to_vec(),
        raw_range_bytes: BLOCK_BYTES,
        after_ttl,
        runs: results,
        errors,
        rows: Vec::new(),
        passthrough: Default::default(),
        peak_rss_after_load_bytes: 0,
        peak_rss_bytes: 0,
    };
    report.finish();
    print!("{}", report.render());
    let stamp = crate::report::stamp(&report.started_at);
    let json = report.write_json(results_dir, &stamp)?;
    println!(
        "\nResults: {} (and pinned-latest.json beside it); logs in {}",
        json.display(),
        log_dir.display()
    );
    Ok(report.all_good())
}

/// The dataset under [`DIR`]: `large.bin` of the profile's large size and `small/NNNNN.bin`,
/// generated like the workloads' files, written under `native_root` and uploaded.
async fn create_dataset(
    shape: Shape,
    native_root: &Path,
    store: &Arc<dyn ObjectStore>,
) -> anyhow::Result<Dataset> {
    let large = dataset::create_files(
        &[format!("{DIR}/large.bin")],
        shape.large_bytes,
        native_root,
        store,
    )
    .await?
    .remove(0);
    std::fs::create_dir_all(native_root.join(DIR).join("small"))?;
    let names = (0..shape.small_count).map(|i| format!("{DIR}/small/{i:05}.bin"));
    let small = dataset::create_small_files(names, shape.small_bytes, native_root, store).await?;
    Ok(Dataset {
        prefix: dataset::PREFIX.to_string(),
        native_root: native_root.to_path_buf(),
        large,
        small,
    })
}

/// `files` in a random order, from `seed`.
fn shuffled(files: &[FileSpec], seed: u64) -> Vec<&FileSpec> {
    let mut files: Vec<&FileSpec> = files.iter().collect();
    Rng::seeded(seed).shuffle(&mut files);
    files
}

fn one_run(ctx: &Ctx, run: usize, progress: &mut Progress) -> anyhow::Result<RunResult> {
    let Ctx {
        rt,
        dataset,
        store,
        spec,
        base,
        log,
        runs,
        after_ttl,
    } = ctx;
    let (runs, dataset) = (*runs, *dataset);
    let all: Vec<&FileSpec> = std::iter::once(&dataset.large)
        .chain(&dataset.small)
        .collect();
    let total: u64 = all.iter().map(|f| f.size).sum();
    let load_average_start = host::load_average();

    // 1. The backend alone (the first run's first pass also checks the bytes, untimed).
    let mut raw = Vec::new();
    for (i, in_flight) in RAW_IN_FLIGHT.into_iter().enumerate() {
        if run == 1 && i == 0 {
            let p = rt.block_on(backend::parallel_get(
                dataset,
                &all,
                store,
                in_flight,
                BLOCK_BYTES,
                true,
            ))?;
            progress.pass(
                &format!(
                    "pinned raw GETs check: {} GETs, {} MiB, bytes verified",
                    p.gets,
                    p.bytes / MIB
                ),
                json!({ "mode": "pinned", "pass": "raw-check", "gets": p.gets }),
            );
            raw.push(p);
        }
        let p = rt.block_on(backend::parallel_get(
            dataset,
            &all,
            store,
            in_flight,
            BLOCK_BYTES,
            false,
        ))?;
        progress.pass(
            &format!(
                "pinned raw GETs, {in_flight} in flight, run {run}/{runs}: {:.0} MB/s",
                p.mb_per_s
            ),
            json!({
                "mode": "pinned", "pass": "raw", "in_flight": in_flight, "run": run,
                "mb_per_s": p.mb_per_s,
            }),
        );
        raw.push(p);
    }

    // How fast one file loads at best: the large file alone, one block-sized GET at a time (as
    // the load fetches each file).
    let p = rt.block_on(backend::parallel_get(
        dataset,
        &all[..1],
        store,
        1,
        BLOCK_BYTES,
        false,
    ))?;
    progress.pass(
        &format!(
            "pinned raw GETs of the large file, 1 in flight, run {run}/{runs}: {:.0} MB/s",
            p.mb_per_s
        ),
        json!({
            "mode": "pinned", "pass": "raw-large", "in_flight": 1, "run": run,
            "mb_per_s": p.mb_per_s,
        }),
    );
    let raw_large = p;

    // 2. A fresh node: pin, load. Every load starts with nothing cached, as on a fresh node;
    // on ext4 without a journal this also matters for another reason: the inode-table blocks
    // of inodes deleted in the last minutes (the previous benchmark's cleanup), while cached,
    // make each file created skip those inodes one by one, which cost the first load of a
    // benchmark up to 1.4 CPU-seconds more than the others (ext4's `recently_deleted`).
    host::drop_caches()?;
    let node = Node::start(spec, &base.join(format!("run-{run}")), log)?;
    let listed: Vec<String> = std::fs::read_dir(&node.mnt)
        .and_then(|entries| {
            entries
                .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .with_context(|| format!("cannot list {}", node.mnt.display()))?;
    ensure!(
        node.mnt.join(DIR).is_dir(),
        "the mount shows {listed:?}, no directory {DIR}"
    );
    node.pin(NAME, &format!("/{DIR}"))?;
    let load = node.load(NAME, total, dataset.large.size)?;
    progress.pass(
        &format!(
            "pinned load run {run}/{runs}: {:.0} MB/s until ready ({:.2} s), transfer {} MB/s, {} GETs",
            load.mb_per_s,
            load.seconds,
            load.transfer_mb_per_s
                .map_or("?".into(), |m| format!("{m:.0}")),
            load.backend_gets
        ),
        json!({
            "mode": "pinned", "pass": "load", "run": run, "mb_per_s": load.mb_per_s,
            "seconds": load.seconds, "transfer_mb_per_s": load.transfer_mb_per_s,
            "backend_gets": load.backend_gets,
        }),
    );
    let peak_rss_after_load_bytes = node.stats()?.peak_rss_bytes;

    let mount = Access::Files(node.mnt.clone());
    let native = Access::Files(dataset.native_root.clone());
    let handle = rt.handle();

    // 3. Every byte through the mount, from disk.
    let check = if run == 1 {
        host::drop_caches()?;
        let before = Reading::take(&node)?;
        let jobs = [
            Job::Sequential {
                file: &dataset.large,
                readers: 1,
            },
            Job::WholeFiles {
                files: dataset.small.iter().collect(),
                readers: 4,
            },
        ];
        let mut bytes = 0;
        for job in &jobs {
            bytes += run_pass(job, dataset, &mount, true, handle)?.outcome.bytes;
        }
        let granary = before.delta(&Reading::take(&node)?);
        progress.pass(
            &format!(
                "pinned check: every byte through the mount verified; {} passthrough opens, {} FUSE reads",
                granary.passthrough_opens, granary.fuse_reads
            ),
            json!({
                "mode": "pinned", "pass": "check", "passthrough_opens": granary.passthrough_opens,
                "fuse_reads": granary.fuse_reads,
            }),
        );
        Some(CheckResult {
            bytes,
            files: all.len() as u64,
            granary,
        })
    } else {
        None
    };

    // 4. The reads; which system goes first alternates between runs.
    let order = shuffled(&dataset.small, 0x5eed_0000 + run as u64);
    let systems: [(&'static str, &Access); 2] = if run % 2 == 1 {
        [("native", &native), ("granary", &mount)]
    } else {
        [("granary", &mount), ("native", &native)]
    };
    // One timed pass, with the node's counters around it for the mount's.
    let mut timed_pass =
        |job: &Job, (workload, condition), (system, access): (&'static str, &Access)| {
            let before = match system {
                "granary" => Some(Reading::take(&node)?),
                _ => None,
            };
            let timed = run_pass(job, dataset, access, false, handle)?;
            let granary = match before {
                Some(before) => Some(before.delta(&Reading::take(&node)?)),
                None => None,
            };
            let pass = PassResult::new(workload, system, condition, &timed, granary);
            report_pass(progress, &pass, run, runs);
            anyhow::Ok(pass)
        };
    let mut passes = Vec::new();
    for workload in Workload::ALL {
        let job = match workload {
            Workload::Sequential => Job::Sequential {
                file: &dataset.large,
                readers: 1,
            },
            Workload::SmallFiles1 | Workload::SmallFiles4 => Job::WholeFiles {
                files: order.clone(),
                readers: workload.readers(),
            },
        };
        for condition in [Condition::Cold, Condition::Hot] {
            for (system, access) in systems {
                match condition {
                    Condition::Cold => host::drop_caches()?,
                    Condition::Hot | Condition::AfterTtl => {
                        run_pass(&job, dataset, access, false, handle)?;
                    }
                }
                passes.push(timed_pass(&job, (workload, condition), (system, access))?);
            }
        }
        // The next epoch of a training job: the files warm in the page cache, read again past
        // the mount's attribute TTL (pinned entries outlast it while the pins are unchanged).
        // One wait for both systems.
        if workload
            .conditions(*after_ttl)
            .contains(&Condition::AfterTtl)
        {
            for (_, access) in systems {
                run_pass(&job, dataset, access, false, handle)?;
            }
            std::thread::sleep(AFTER_TTL);
            for (system, access) in systems {
                let condition = Condition::AfterTtl;
                passes.push(timed_pass(&job, (workload, condition), (system, access))?);
            }
        }
    }
    node.check_running()?;
    let peak_rss_bytes = node.stats()?.peak_rss_bytes;
    drop(node);
    Ok(RunResult {
        run,
        load_average: [load_average_start, host::load_average()],
        raw,
        raw_large,
        load,
        check,
        passes,
        peak_rss_after_load_bytes,
        peak_rss_bytes,
    })
}

fn report_pass(progress: &mut Progress, p: &PassResult, run: usize, runs: usize) {
    let value = match p.workload {
        Workload::Sequential => format!("{:.0} MB/s", p.mb_per_s),
        _ => format!("{:.0} files/s", p.files_per_s),
    };
    let extra = p.granary.as_ref().map_or(String::new(), |g| {
        format!(
            ", {} passthrough opens, {} FUSE reads",
            g.passthrough_opens, g.fuse_reads
        )
    });
    progress.pass(
        &format!(
            "pinned {} {} {} run {run}/{runs}: {value}{extra}",
            p.workload.name(),
            p.condition.name(),
            p.system
        ),
        json!({
            "mode": "pinned", "workload": p.workload, "condition": p.condition,
            "system": p.system, "run": run, "mb_per_s": p.mb_per_s,
            "files_per_s": p.files_per_s,
            "passthrough_opens": p.granary.as_ref().map(|g| g.passthrough_opens),
            "fuse_reads": p.granary.as_ref().map(|g| g.fuse_reads),
        }),
    );
}

impl PassResult {
    fn new(
        workload: Workload,
        system: &'static str,
        condition: Condition,
        timed: &Timed,
        granary: Option<GranaryDelta>,
    ) -> PassResult {
        let files = match workload {
            Workload::Sequential => 1,
            Workload::SmallFiles1 | Workload::SmallFiles4 => timed.outcome.ops,
        };
        PassResult {
            workload,
            system,
            condition,
            seconds: timed.seconds,
            bytes: timed.outcome.bytes,
            files,
            mb_per_s: timed.outcome.bytes as f64 / 1e6 / timed.seconds,
            files_per_s: files as f64 / timed.seconds,
            granary,
        }
    }
}

/// The node's counters and CPU time at one moment.
struct Reading {
    counters: BTreeMap<String, f64>,
    cpu_seconds: f64,
}

impl Reading {
    fn take(node: &Node) -> anyhow::Result<Reading> {
        node.check_running()?;
        Ok(Reading {
            counters: node.counters(),
            cpu_seconds: node.stats()?.cpu_seconds,
        })
    }

    fn delta(&self, after: &Reading) -> GranaryDelta {
        let counters = node::deltas(&self.counters, &after.counters);
        let get = |name, labels: &[(&str, &str)]| node::sum(&counters, name, labels);
        GranaryDelta {
            cpu_seconds: after.cpu_seconds - self.cpu_seconds,
            passthrough_opens: get(node::PASSTHROUGH_OPENS, &[]),
            fuse_reads: get(node::FUSE_OPS, &[("op", "read")]),
            fuse_read_bytes: get(node::FUSE_READ_BYTES, &[]),
            backend_gets: get(node::BACKEND_REQUESTS, &[("op", "get"), ("outcome", "ok")]),
            counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shuffle_is_a_permutation_that_depends_on_the_seed() {
        let files: Vec<FileSpec> = (0..50)
            .map(|i| FileSpec {
                name: format!("{i}"),
                size: 1,
            })
            .collect();
        let names = |seed| -> Vec<&str> {
            shuffled(&files, seed)
                .into_iter()
                .map(|f| f.name.as_str())
                .collect()
        };
        let mut sorted = names(1);
        sorted.sort_by_key(|n| n.parse::<u32>().unwrap());
        assert_eq!(
            sorted,
            files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(names(1), names(1));
        assert_ne!(names(1), names(2));
    }
}
