//! `--cluster`: the cluster benchmark (issue 3) on 127.0.0.1. For N = 1, 2, 3 workers: a fresh
//! cluster ([`instance`]: its own etcd, N `granary server` workers with empty caches, N `granary
//! mount --etcd` clients) and N readers, reader i reading its own file (a distinct object of the
//! profile's large-file size) start to end through client i, all at the same time. Each client
//! reads every block from the worker that owns it, so the N files' blocks spread over all N
//! workers. Passes of one run, each with the page cache dropped first:
//!
//! - `cold`: the workers have just started, so every block comes from the backend, once;
//! - `hot`: the same reads again, served from the workers' caches;
//! - in the first run of each N only, an untimed `check` pass that compares every byte read with
//!   the dataset.
//!
//! Around each pass it reads every worker's and client's counters (backend GETs, block reads by
//! tier), CPU time and peak RSS, and the machine's CPU load. Runs interleave the sizes (run 1:
//! N = 1, 2, 3, then run 2...) so that drift on a shared machine spreads over every N. The report
//! ([`report`]): a table on stdout, JSON under `target/bench-results/`.
//!
//! `--cluster --hosts` (issue 22): N = 1 to 4 workers, each alone in an emulated host
//! ([`netns`]: a network namespace whose link to the others is shaped to `--link-mbit` each
//! way), each serving a FUSE mount in its own process (`granary server --mount --no-keeper`),
//! reader i reading through worker i's mount. etcd listens on the bridge, and the S3 server,
//! which listens on 127.0.0.1 only, is reached through a forwarder ([`forward`]). Besides the
//! above, it reads what crossed each link and reports each worker's CPU time.

mod forward;
mod instance;
mod netns;
mod report;

use crate::dataset::{self, FileSpec};
use crate::host;
use crate::profile::Profile;
use crate::progress::Progress;
use crate::s3::{Flavor, S3Conn};
use anyhow::{Context, bail};
use instance::{Instance, Layout, Spec};
use object_store::ObjectStore;
use report::{ClusterReport, GranaryConfig, Pass, ReaderResult, RunResult, SizeResult};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Instant, SystemTime};
use tokio::runtime::Runtime;

/// Cluster sizes, in the order each run measures them: on loopback, and on emulated hosts.
const SIZES: &[usize] = &[1, 2, 3];
const HOST_SIZES: &[usize] = &[1, 2, 3, 4];
/// The cache block (written into the workers' config, so blocks read are counted right).
const BLOCK_BYTES: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

/// `--hosts`: emulated hosts, their links shaped to this many Mbit/s each way; `None`: loopback.
pub type Hosts = Option<u32>;

fn sizes(hosts: Hosts) -> &'static [usize] {
    if hosts.is_some() { HOST_SIZES } else { SIZES }
}

fn max_size(hosts: Hosts) -> usize {
    sizes(hosts).iter().copied().max().unwrap_or(1)
}

/// Each reader's file: the profile's large file; on emulated hosts at most 512 MiB with
/// `--quick` (4 files, 4 workers' caches and Ceph's memstore on one machine) and 2 GiB with
/// `--full`.
fn file_bytes(profile: &Profile, hosts: Hosts) -> u64 {
    let large = profile.shape.large_bytes;
    match (hosts, profile.name) {
        (None, _) | (Some(_), crate::profile::Name::Smoke) => large,
        (Some(_), crate::profile::Name::Quick) => large.min(512 * MIB),
        (Some(_), crate::profile::Name::Full) => large.min(2048 * MIB),
    }
}

/// The bytes the S3 server must hold: one file per reader of the largest cluster.
pub fn data_bytes(profile: &Profile, hosts: Hosts) -> u64 {
    max_size(hosts) as u64 * file_bytes(profile, hosts)
}

/// What the cluster mode gets from the common setup (main.rs).
pub struct Setup<'a> {
    pub started: SystemTime,
    pub rt: &'a Runtime,
    pub profile: Profile,
    pub flavor: Flavor,
    pub s3: &'a S3Conn,
    /// The S3 server's state directory (its pid files).
    pub s3_state: &'a Path,
    pub store: &'a Arc<dyn ObjectStore>,
    /// The benchmark's work directory (removed at the end).
    pub work: &'a Path,
    pub log_dir: &'a Path,
    pub results_dir: &'a Path,
    pub granary_bin: &'a Path,
    pub git: String,
    /// Per worker; `None`: one and a half files (at least 4 blocks).
    pub memory_cache: Option<u64>,
    /// Per worker.
    pub disk_cache: u64,
    pub hosts: Hosts,
    pub progress: Progress,
}

/// Runs the cluster benchmark; `Ok(false)` when it ran but a figure is missing or a byte was
/// wrong.
pub fn run(setup: Setup) -> anyhow::Result<bool> {
    let Setup {
        started,
        rt,
        profile,
        flavor,
        s3,
        s3_state,
        store,
        work,
        log_dir,
        results_dir,
        granary_bin,
        git,
        memory_cache,
        disk_cache,
        hosts,
        mut progress,
    } = setup;
    let file_bytes = file_bytes(&profile, hosts);
    let mode = if hosts.is_some() {
        "cluster-hosts"
    } else {
        "cluster"
    };
    // Each worker owns about one file's worth of blocks whatever N is (N files over N workers);
    // on emulated hosts it also keeps what its own mount fetched from peers: the rest of its
    // reader's file and, after the peer pass, of the next one.
    let memory_cache = memory_cache.unwrap_or(match hosts {
        None => (file_bytes + file_bytes / 2).max(4 * BLOCK_BYTES),
        Some(_) => (3 * file_bytes).max(4 * BLOCK_BYTES),
    });

    let names: Vec<String> = (1..=max_size(hosts))
        .map(|i| format!("cluster/reader-{i}.bin"))
        .collect();
    progress.note(&format!(
        "dataset: writing and uploading {} files of {} MiB",
        names.len(),
        file_bytes / MIB
    ));
    let files = rt.block_on(dataset::upload_files(&names, file_bytes, store))?;

    let base = work.join("cluster");
    std::fs::create_dir_all(&base)?;
    // Emulated hosts: the network, and the S3 server forwarded to the bridge. Dropped (removed)
    // after the last cluster.
    let (network, forwarder) = match hosts {
        None => (None, None),
        Some(link_mbit) => {
            progress.note(&format!(
                "emulated hosts: {} network namespaces, links of {link_mbit} Mbit/s each way",
                max_size(hosts)
            ));
            let network = netns::Network::create(max_size(hosts), link_mbit)?;
            let target = s3_addr(&s3.endpoint)?;
            let forwarder = forward::Forwarder::start(
                SocketAddr::new(netns::Network::gateway().into(), 0),
                target,
            )?;
            (Some(network), Some(forwarder))
        }
    };
    let s3_for_workers = match &forwarder {
        None => s3.clone(),
        Some(f) => S3Conn {
            endpoint: format!("http://{}", f.addr),
            ..s3.clone()
        },
    };
    // etcd's certificate names the address it listens on: 127.0.0.1 (in every dev certificate)
    // or the bridge's.
    let etcd_cert = match hosts {
        None => "etcd".to_string(),
        Some(_) => netns::Network::gateway().to_string(),
    };
    let spec = Spec {
        bin: granary_bin.to_path_buf(),
        etcd: etcd_binary()?,
        config: write_worker_config(&base, s3)?,
        tls: dev_certs(granary_bin, &base.join("tls"), max_size(hosts), &etcd_cert)?,
        etcd_cert,
        s3: s3_for_workers,
        s3_pids: host::pids_under(s3_state),
        s3_forwarder_tid: forwarder.as_ref().map(|f| f.tid),
        memory_cache,
        disk_cache,
    };
    let layout = match &network {
        None => Layout::Loopback,
        Some(network) => Layout::Hosts(network),
    };

    let runs = profile.runs;
    let size_list = sizes(hosts);
    let passes = if hosts.is_some() { 3 } else { 2 };
    progress.expect(runs * size_list.len() * passes + size_list.len());
    let mut sizes: Vec<SizeResult> = size_list.iter().copied().map(SizeResult::new).collect();
    for run in 1..=runs {
        for size in sizes.iter_mut().filter(|s| s.error.is_none()) {
            let n = size.workers;
            let check = run == 1;
            match one_run(
                &spec,
                layout,
                n,
                run,
                runs,
                check,
                &files[..n],
                &base,
                log_dir,
                mode,
                &mut progress,
            ) {
                Ok(result) => size.runs.push(result),
                Err(e) => {
                    let e = format!("run {run}: {e:#}");
                    progress.note(&format!("cluster N={n} FAILED: {e}"));
                    size.error = Some(e);
                }
            }
        }
    }
    progress.note("tearing down");
    drop(forwarder);
    drop(network);

    let mut report = ClusterReport {
        mode,
        link_mbit: hosts,
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        profile: profile.name,
        runs,
        file_bytes,
        block_bytes: BLOCK_BYTES,
        s3: flavor,
        machine: host::Machine::describe(),
        granary: GranaryConfig {
            binary: granary_bin.to_path_buf(),
            git,
            memory_cache_bytes: memory_cache,
            disk_cache_bytes: disk_cache,
        },
        sizes,
        targets: Vec::new(),
    };
    report.finish();
    print!("{}", report.render());
    let stamp = crate::report::stamp(&report.started_at);
    let json = report.write_json(results_dir, &stamp, profile.label())?;
    println!(
        "\nResults: {} (and {mode}-latest.json beside it); logs in {}",
        json.display(),
        log_dir.display()
    );
    Ok(report.all_good())
}

/// One run of a cluster of `n`: start it, the cold and hot passes (and the check pass), peak
/// RSS, stop it.
#[allow(clippy::too_many_arguments)]
fn one_run(
    spec: &Spec,
    layout: Layout,
    n: usize,
    run: usize,
    runs: usize,
    check: bool,
    files: &[FileSpec],
    base: &Path,
    log_dir: &Path,
    mode: &str,
    progress: &mut Progress,
) -> anyhow::Result<RunResult> {
    let label = format!("n{n}-run{run}");
    let link_mbit = match layout {
        Layout::Loopback => None,
        Layout::Hosts(network) => Some(network.link_mbit),
    };
    let cluster = Instance::start(spec, layout, n, &base.join(&label), log_dir, &label)?;
    let mounts = cluster.mounts();
    if mounts.len() != n {
        bail!("{n} workers but {} mounts to read from", mounts.len());
    }
    // Reader i reads file i + shift through mount i.
    let reads = |shift: usize| -> Vec<(PathBuf, &FileSpec)> {
        (0..n)
            .map(|i| {
                let f = &files[(i + shift) % n];
                (mounts[i].join("data").join(&f.name), f)
            })
            .collect()
    };
    let blocks: u64 = files.iter().map(|f| f.size.div_ceil(BLOCK_BYTES)).sum();
    let mut pass = |what: &str, shift: usize, check: bool| -> anyhow::Result<Pass> {
        let result = one_pass(&cluster, &reads(shift), blocks, check, link_mbit);
        let message = format!("cluster N={n} {what} run {run}/{runs}");
        let mut fields = json!({
            "mode": mode, "workers": n, "pass": what, "run": run, "check": check,
        });
        match &result {
            Ok(p) => {
                fields["mb_per_s"] = json!(p.mb_per_s);
                fields["gets_per_block"] = json!(p.gets_per_block);
                fields["cpu_busy"] = json!(p.machine_cpu_busy);
                fields["link_use"] = json!(p.link_use_max);
                let links = p.link_use_max.map_or(String::new(), |u| {
                    format!(", busiest link {:.0}% used", u * 100.0)
                });
                progress.pass(
                    &format!(
                        "{message}: {:.0} MB/s aggregate, {:.2} backend GETs per block, CPU {:.0}% busy{links}{}",
                        p.mb_per_s,
                        p.gets_per_block,
                        p.machine_cpu_busy * 100.0,
                        if check { ", bytes verified" } else { "" }
                    ),
                    fields,
                );
            }
            Err(e) => progress.pass(&format!("{message}: FAILED: {e:#}"), fields),
        }
        result
    };
    let cold = pass("cold", 0, false)?;
    let hot = pass("hot", 0, false)?;
    // On emulated hosts, the hot pass is served by each reader's own worker (the in-process
    // mount kept the blocks it fetched from peers in the cold pass): the same again with
    // reader i on the next reader's file, which its worker holds only its share of, so the
    // rest comes from the peers' memory over the links.
    let peer = match layout {
        Layout::Hosts(_) => Some(pass("peer", 1, false)?),
        Layout::Loopback => None,
    };
    let checked = if check {
        Some(pass("check", 0, true)?)
    } else {
        None
    };
    let end = cluster.read()?;
    let rss =
        |nodes: &[instance::NodeReading]| nodes.iter().map(|r| r.stats.peak_rss_bytes).collect();
    Ok(RunResult {
        run,
        cold,
        hot,
        peer,
        check: checked,
        worker_peak_rss_bytes: rss(&end.workers),
        client_peak_rss_bytes: rss(&end.clients),
    })
}

/// Drops the page cache, then every reader reads its file whole through its own client, all
/// starting together; the cluster is read before and after. With `check`, every byte is
/// compared with the dataset.
fn one_pass(
    cluster: &Instance,
    reads: &[(PathBuf, &FileSpec)],
    blocks: u64,
    check: bool,
    link_mbit: Option<u32>,
) -> anyhow::Result<Pass> {
    host::drop_caches()?;
    cluster.check_running()?;
    let before = cluster.read()?;
    let start = Barrier::new(reads.len() + 1);
    let (wall, readers) = std::thread::scope(|s| {
        let threads: Vec<_> = reads
            .iter()
            .map(|(path, file)| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    let t = Instant::now();
                    let bytes = crate::workloads::read_whole(path, file, check)?;
                    let seconds = t.elapsed().as_secs_f64();
                    Ok::<_, anyhow::Error>(ReaderResult::new(&file.name, bytes, seconds))
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        let readers: Vec<anyhow::Result<ReaderResult>> = threads
            .into_iter()
            .map(|t| t.join().expect("a reader thread panicked"))
            .collect();
        (t.elapsed().as_secs_f64(), readers)
    });
    let readers = readers.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let after = cluster.read()?;
    cluster.check_running()?;
    for (r, (_, file)) in readers.iter().zip(reads) {
        if r.bytes != file.size {
            bail!("{} read {} bytes of {}", file.name, r.bytes, file.size);
        }
    }
    Ok(Pass::new(readers, wall, blocks, &before, &after, link_mbit))
}

/// The `etcd` binary, installed with `scripts/services/etcd.sh install` (Debian's etcd-server)
/// when missing.
fn etcd_binary() -> anyhow::Result<PathBuf> {
    if let Some(etcd) = host::which("etcd") {
        return Ok(etcd);
    }
    let script = crate::workspace_root().join("scripts/services/etcd.sh");
    host::run_command(Command::new("bash").arg(&script).arg("install"))?;
    host::which("etcd").context("scripts/services/etcd.sh install did not put etcd on PATH")
}

/// `granary certs`: a development CA and certificates for `workers` workers (`w1`...), the
/// clients (`client`) and etcd (`etcd_cert`: `etcd`, or the IP address it listens on, which its
/// certificate must name), in `dir`.
fn dev_certs(
    granary: &Path,
    dir: &Path,
    workers: usize,
    etcd_cert: &str,
) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new(granary);
    cmd.arg("certs").arg("--out").arg(dir);
    cmd.args((1..=workers).map(|i| format!("w{i}")));
    cmd.args(["client", etcd_cert]);
    host::run_command(&mut cmd)?;
    if !dir.join("ca.pem").is_file() {
        bail!("granary certs wrote no {}", dir.join("ca.pem").display());
    }
    Ok(dir.to_path_buf())
}

/// The address in an `http://HOST:PORT` endpoint.
fn s3_addr(endpoint: &str) -> anyhow::Result<SocketAddr> {
    let rest = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("S3 endpoint {endpoint:?}: expected http://HOST:PORT"))?;
    rest.trim_end_matches('/')
        .parse()
        .with_context(|| format!("S3 endpoint {endpoint:?}: expected http://IP:PORT"))
}

/// The config every worker shares: the bucket's dataset mounted at `/data`, the block size.
/// Node id, addresses, etcd, TLS and caches come as flags; S3 credentials from `AWS_*`.
fn write_worker_config(dir: &Path, s3: &S3Conn) -> anyhow::Result<PathBuf> {
    let path = dir.join("worker.toml");
    std::fs::write(
        &path,
        format!(
            "# granary-bench --cluster: what every worker shares; the rest comes as flags.\n\
             [cache]\nblock_size = \"{}MiB\"\n\n\
             [[mount]]\npath = \"/data\"\nsource = \"s3://{}/{}\"\n",
            BLOCK_BYTES / MIB,
            s3.bucket,
            dataset::PREFIX
        ),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
