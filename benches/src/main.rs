//! `granary-bench`: whole-workload benchmarks of Granary's mount side by side with the native
//! local disk, the raw S3 backend and (when installed) peer FUSE tools.
//!
//! It sets everything up itself on 127.0.0.1 (an S3 server, a generated dataset in the bucket and
//! on local disk, one fresh mount per run) and tears it all down however it ends. Each figure is
//! preceded by an untimed pass that checks every byte, then measured over several runs. Results:
//! a table on stdout, JSON and a PNG chart under `target/bench-results/`. See docs/BENCHMARKS.md.
//!
//! `--cluster` measures a Granary cluster instead ([`cluster`]): 1, 2 and 3 workers, each with
//! its own client reading its own file, all at once.
//!
//! `--pinned` measures a pinned dataset instead ([`pinned`]): its load onto one node and reads of
//! it through the mount (kernel FUSE passthrough) against native disk.
//!
//! `--survival` measures what killing the FUSE server costs readers of the mount ([`survival`]):
//! no S3 server, a local source directory, readers timed without and with SIGKILLs of the server.
//!
//! `--training` measures accelerator utilisation in the manner of MLPerf Storage ([`training`]):
//! loader threads read shuffled sample files in batches for a "GPU" that sleeps per batch, several
//! epochs, native disk, Granary (unpinned and pinned) and s3fs side by side.

mod cleanup;
mod cluster;
mod dataset;
mod host;
mod pinned;
mod profile;
mod progress;
mod report;
mod runner;
mod s3;
mod survival;
mod systems;
mod training;
mod workloads;

use anyhow::{Context, bail};
use clap::{ArgGroup, Parser};
use dataset::Dataset;
use profile::Profile;
use progress::Progress;
use report::{GranaryConfig, Report};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::SystemTime;
use systems::{Mount, Native, RawBackend, System, Tool};
use workloads::Workload;

const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    about = "Benchmarks Granary's mount against native disk, the raw S3 backend and peer FUSE tools",
    group(ArgGroup::new("profile").required(true).args(["smoke", "quick", "full"]))
)]
struct Args {
    /// For CI: an 8 MiB file, 20 small files, 1 run; fails unless every system produced every
    /// figure with the right bytes.
    #[arg(long)]
    smoke: bool,
    /// A 1 GiB file, 2,000 small files, 3 runs per figure.
    #[arg(long)]
    quick: bool,
    /// A 4 GiB file, 20,000 small files, 5 runs per figure.
    #[arg(long)]
    full: bool,
    /// The S3 server holding the dataset [default: moto with --smoke, else ceph: moto reads the
    /// whole object for every ranged GET, far too slow for a 1 GiB file].
    #[arg(long, value_enum)]
    s3: Option<s3::Flavor>,
    /// Runs per figure [default: 1 with --smoke, 3 with --quick, 5 with --full].
    #[arg(long)]
    runs: Option<usize>,
    /// Systems to measure, comma-separated: native, backend, granary, s3fs, rclone
    /// [default: all of them whose tools are installed].
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Instead of the workloads, the cluster benchmark: 1, 2 and 3 `granary server` workers
    /// (etcd, mutual TLS), each with its own `granary mount --etcd` client reading its own large
    /// file at the same time; aggregate MB/s cold and hot, backend GETs per block.
    #[arg(long, conflicts_with = "systems")]
    cluster: bool,
    /// With --cluster: 1 to 4 workers as emulated hosts instead (network namespaces joined by
    /// links shaped to --link-mbit each way), each serving its own FUSE mount (`granary server
    /// --mount --no-keeper`) read by one reader; the S3 server and etcd in the root namespace.
    #[arg(long, requires = "cluster")]
    hosts: bool,
    /// With --cluster --hosts: each host's link, Mbit/s each way (`tc qdisc ... tbf`).
    #[arg(long, value_name = "MBIT", default_value_t = 1000, requires = "hosts")]
    link_mbit: u32,
    /// Instead of the workloads, the pinned-dataset benchmark: pin and load a dataset (the large
    /// file and the small files) onto one `granary up` node, timed against raw parallel GETs, then
    /// read it through the mount (kernel FUSE passthrough) and natively, cold and hot (and the
    /// small files again past the mount's attribute TTL, but with --smoke).
    #[arg(long, conflicts_with_all = ["systems", "cluster"])]
    pinned: bool,
    /// Instead of the workloads, the FUSE server survival benchmark: a local source directory
    /// mounted by `granary up` (256MiB memory cache, 4GiB disk cache), three readers (a large
    /// file, small files, mmap pages) timed in a window without kills and one with the server
    /// SIGKILLed every --kill-every seconds; throughput ratios and stalls after each kill.
    #[arg(long, conflicts_with_all = ["systems", "cluster", "pinned", "s3", "runs", "memory_cache", "disk_cache"])]
    survival: bool,
    /// Instead of the workloads, the training-shaped benchmark (MLPerf Storage's accelerator
    /// utilisation): 4 loader threads read shuffled sample files (1,000 x 1 MiB with --quick) in
    /// batches for a "GPU" that sleeps a fixed time per batch, several epochs, page cache dropped
    /// before epoch 1 only; native, granary (memory cache half the dataset, no disk tier),
    /// granary-pinned and s3fs. --systems picks among those.
    #[arg(long, conflicts_with_all = ["cluster", "pinned", "survival", "runs", "memory_cache", "disk_cache"])]
    training: bool,
    /// With --training: the GPU's compute time per batch in milliseconds [default: calibrated, so
    /// that the GPU consumes 80% of what native's loaders read with no compute].
    #[arg(long, value_name = "MS", requires = "training")]
    compute_ms: Option<f64>,
    /// With --training: keep samples' pages in the page cache between epochs [default: each
    /// sample's pages are dropped once read, standing for a dataset larger than memory].
    #[arg(long, requires = "training")]
    keep_page_cache: bool,
    /// With --survival: seconds between two kills of the FUSE server.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 3.0,
        requires = "survival"
    )]
    kill_every: f64,
    /// Granary's memory cache [default: 512MiB; with --cluster, per worker, 1.5 times one
    /// reader's file (1536MiB with --quick), so that a worker's share of the files stays in
    /// memory; with --cluster --hosts, twice one reader's file (1024MiB with --quick)].
    #[arg(long, value_parser = parse_size)]
    memory_cache: Option<u64>,
    /// Granary's disk cache (per worker with --cluster).
    #[arg(long, default_value = "8GiB", value_parser = parse_size)]
    disk_cache: u64,
    /// The granary binary to measure [default: build it now, target/release/granary].
    #[arg(long, value_name = "PATH")]
    granary_bin: Option<PathBuf>,
}

impl Args {
    fn s3(&self) -> s3::Flavor {
        self.s3.unwrap_or(if self.smoke {
            s3::Flavor::Moto
        } else {
            s3::Flavor::Ceph
        })
    }

    /// `--hosts`' link rate, if given.
    fn cluster_hosts(&self) -> cluster::Hosts {
        self.hosts.then_some(self.link_mbit)
    }

    fn profile(&self) -> Profile {
        let name = if self.smoke {
            profile::Name::Smoke
        } else if self.full {
            profile::Name::Full
        } else {
            profile::Name::Quick
        };
        Profile::new(name, self.runs)
    }
}

/// `512MiB`, `4GiB`, `1048576`.
fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 512MiB"))?;
    let unit = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(format!("{s:?}: use B, KiB, MiB or GiB")),
    };
    Ok(n * unit)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("granary-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace, found from this crate's manifest.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs the benchmark; `Ok(false)` when it ran but something was wrong (errors, bad bytes).
fn run(args: &Args) -> anyhow::Result<bool> {
    let started = SystemTime::now();
    if !(args.kill_every.is_finite() && args.kill_every > 0.0) {
        bail!(
            "--kill-every {}: expected a positive number of seconds",
            args.kill_every
        );
    }
    if let Some(ms) = args.compute_ms
        && !(ms.is_finite() && ms >= 0.0)
    {
        bail!("--compute-ms {ms}: expected milliseconds, 0 or more");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.spawn(cleanup::on_signal());
    let profile = args.profile();
    let shape = profile.shape;
    let names = if args.cluster || args.pinned || args.survival || args.training {
        Vec::new()
    } else {
        system_names(&args.systems)?
    };
    host::drop_caches()?;

    let root = workspace_root();
    let results_dir = target_dir().join("bench-results");
    // Each mode its own log directory: one run does not wipe the other's logs.
    let log_dir = results_dir.join(if args.hosts {
        "logs-cluster-hosts"
    } else if args.cluster {
        "logs-cluster"
    } else if args.pinned {
        "logs-pinned"
    } else if args.survival {
        "logs-survival"
    } else if args.training {
        "logs-training"
    } else {
        "logs"
    });
    let work = target_dir().join("bench-work");
    let flavor = args.s3();
    let s3_script = root.join("scripts/services").join(flavor.script());
    let s3_state = work.join("s3");
    let granary_bin = match &args.granary_bin {
        Some(bin) => std::fs::canonicalize(bin).with_context(|| format!("{}", bin.display()))?,
        None => build_granary(&root)?,
    };

    // One run at a time: what follows stops the S3 server and the mounts another run would use.
    let _lock = host::RunLock::acquire(&target_dir().join("bench-work.lock"))?;
    // Whatever a killed earlier run left behind, then a clean slate, removed again at the end.
    for flavor in <s3::Flavor as clap::ValueEnum>::value_variants() {
        s3::stop_server(
            &root.join("scripts/services").join(flavor.script()),
            &s3_state,
        );
    }
    host::remove_tree(&work);
    host::remove_tree(&log_dir);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&log_dir)?;
    let work = std::fs::canonicalize(&work)?;
    let _work_guard = {
        let work = work.clone();
        cleanup::register(format!("remove {}", work.display()), move || {
            host::remove_tree(&work)
        })
    };

    let mut progress = Progress::new();
    if args.survival {
        return survival::run(survival::Setup {
            started,
            profile,
            work: &work,
            log_dir: &log_dir,
            results_dir: &results_dir,
            granary_bin: &granary_bin,
            git: git_describe(&root),
            kill_every: std::time::Duration::from_secs_f64(args.kill_every),
            progress,
        });
    }
    progress.note(&format!(
        "starting {} (scripts/services/{})",
        flavor.name(),
        flavor.script()
    ));
    let data_bytes = if args.cluster {
        cluster::data_bytes(&profile, args.cluster_hosts())
    } else if args.training {
        training::data_bytes(profile.name)
    } else {
        shape.large_bytes + shape.small_count as u64 * shape.small_bytes
    };
    let server = s3::S3Server::start(flavor, &s3_script, &s3_state, data_bytes)?;
    let store = server.conn.store(16)?;
    if args.cluster {
        return cluster::run(cluster::Setup {
            started,
            rt: &rt,
            profile,
            flavor,
            s3: &server.conn,
            s3_state: &s3_state,
            store: &store,
            work: &work,
            log_dir: &log_dir,
            results_dir: &results_dir,
            granary_bin: &granary_bin,
            git: git_describe(&root),
            memory_cache: args.memory_cache,
            disk_cache: args.disk_cache,
            hosts: args.cluster_hosts(),
            progress,
        });
    }
    if args.training {
        return training::run(training::Setup {
            started,
            rt: &rt,
            profile,
            flavor,
            s3: &server.conn,
            store: &store,
            work: &work,
            log_dir: &log_dir,
            results_dir: &results_dir,
            granary_bin: &granary_bin,
            git: git_describe(&root),
            systems: &args.systems,
            compute: args
                .compute_ms
                .map(|ms| std::time::Duration::from_secs_f64(ms / 1e3)),
            keep_page_cache: args.keep_page_cache,
            progress,
        });
    }
    if args.pinned {
        return pinned::run(pinned::Setup {
            started,
            rt: &rt,
            profile,
            flavor,
            s3: &server.conn,
            work: &work,
            log_dir: &log_dir,
            results_dir: &results_dir,
            granary_bin: &granary_bin,
            git: git_describe(&root),
            memory_cache: args.memory_cache,
            disk_cache: args.disk_cache,
            progress,
        });
    }
    let memory_cache = args.memory_cache.unwrap_or(512 * MIB);
    progress.note(&format!(
        "dataset: writing and uploading a {} MiB file and {} files of {} KiB",
        shape.large_bytes / MIB,
        shape.small_count,
        shape.small_bytes >> 10
    ));
    let dataset = rt.block_on(Dataset::create(shape, &work.join("native"), &store))?;

    // The epochs read the small files: twice the memory cache (except in --smoke, whose files
    // fit in the smallest cache granary takes: 4 blocks of 4 MiB).
    let epochs_memory_cache = (dataset.small_bytes() / 2).max(16 * MIB);
    let granary = Tool::Granary {
        bin: granary_bin.clone(),
        memory_cache,
        disk_cache: args.disk_cache,
        epochs_memory_cache,
    };
    let mut systems: Vec<Box<dyn System>> = names
        .iter()
        .map(|&name| -> Box<dyn System> {
            let tool = match name {
                "native" => {
                    return Box::new(Native {
                        root: dataset.native_root.clone(),
                    });
                }
                "backend" => {
                    return Box::new(RawBackend {
                        store: store.clone(),
                    });
                }
                "s3fs" => Tool::S3fs,
                "rclone" => Tool::Rclone,
                _ => granary.clone(),
            };
            Box::new(Mount::new(
                tool,
                server.conn.clone(),
                &dataset.prefix,
                &work,
                &log_dir,
            ))
        })
        .collect();
    let passes: usize = Workload::ALL
        .iter()
        .flat_map(|w| systems.iter().map(|s| w.conditions(s.kind()).len()))
        .sum();
    progress.expect(passes * (profile.runs + 1));

    let mut figures = Vec::new();
    for workload in Workload::ALL {
        for system in systems.iter_mut() {
            figures.extend(runner::measure(
                system.as_mut(),
                workload,
                &dataset,
                &profile,
                &rt,
                &mut progress,
            ));
        }
    }
    drop(systems);
    progress.note("tearing down");

    let mut report = Report {
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        profile,
        s3: flavor,
        machine: host::Machine::describe(),
        granary: GranaryConfig {
            binary: granary_bin,
            git: git_describe(&root),
            memory_cache_bytes: memory_cache,
            disk_cache_bytes: args.disk_cache,
            epochs_memory_cache_bytes: epochs_memory_cache,
        },
        figures,
        targets: Vec::new(),
    };
    report.finish();
    print!("{}", report.render());
    let stamp = report::stamp(&report.started_at);
    let json = report.write_json(&results_dir, &stamp)?;
    let chart = results_dir.join(format!("{stamp}-{}.png", profile.label()));
    let charted = report::chart::draw(&report, &chart).and_then(|()| {
        std::fs::copy(&chart, results_dir.join("latest.png"))?;
        Ok(())
    });
    println!(
        "\nResults: {} and {} (latest.json and latest.png beside them); daemon logs in {}",
        json.display(),
        chart.display(),
        log_dir.display()
    );
    if let Err(e) = &charted {
        eprintln!("granary-bench: error: no chart: {e:#}");
    }
    Ok(report.all_good() && charted.is_ok())
}

const SYSTEMS: [&str; 5] = ["native", "backend", "granary", "s3fs", "rclone"];

/// The systems to measure: those asked for, or all whose tools are installed.
fn system_names(asked: &[String]) -> anyhow::Result<Vec<&'static str>> {
    let is_installed =
        |name: &str| !matches!(name, "s3fs" | "rclone") || host::which(name).is_some();
    if asked.is_empty() {
        return Ok(SYSTEMS.into_iter().filter(|n| is_installed(n)).collect());
    }
    asked
        .iter()
        .map(|name| {
            let known = SYSTEMS.into_iter().find(|n| n == name).with_context(|| {
                format!("unknown system {name:?} (known: {})", SYSTEMS.join(", "))
            })?;
            if !is_installed(known) {
                bail!("{known} is not installed (apt-get install -y {known})");
            }
            Ok(known)
        })
        .collect()
}

/// Builds `granary` in release mode with the cargo that runs us (a no-op when up to date).
fn build_granary(root: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("granary-bench: cargo build --release -p granary");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "granary"])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release -p granary failed ({status})");
    }
    Ok(target_dir().join("release/granary"))
}

/// The commit measured, marked `-dirty` when the tree has changes.
fn git_describe(root: &Path) -> String {
    let git = |args: &[&str]| {
        host::run_command(Command::new("git").arg("-C").arg(root).args(args)).unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).trim().to_string();
    let dirty = !git(&["status", "--porcelain"]).trim().is_empty();
    format!("{commit}{}", if dirty { "-dirty" } else { "" })
}
