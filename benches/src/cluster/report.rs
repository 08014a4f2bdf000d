//! What the cluster benchmark found: for each cluster size, every run's passes with the counters
//! that explain them; the summary of each size (median and range over the runs, ratio to one
//! worker, backend GETs per block, blocks by tier, CPU load, peak RSS; on emulated hosts also the
//! links' use and each worker's CPU per GB), the table printed on stdout and the JSON written
//! under `target/bench-results/`.

use super::instance::{NodeReading, Reading};
use crate::host::Machine;
use crate::profile::Name;
use crate::report::{Stats, aligned, number};
use crate::s3::Flavor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MB: f64 = 1e6;
const MIB: u64 = 1 << 20;

const BACKEND_REQUESTS: &str = "granary_backend_requests_total";
const BACKEND_BYTES: &str = "granary_backend_bytes_total";
const BLOCK_READS: &str = "granary_block_reads_total";

/// One reader's share of a pass.
#[derive(Debug, Serialize)]
pub struct ReaderResult {
    pub file: String,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
}

impl ReaderResult {
    pub fn new(file: &str, bytes: u64, seconds: f64) -> ReaderResult {
        ReaderResult {
            file: file.to_string(),
            bytes,
            seconds,
            mb_per_s: bytes as f64 / MB / seconds,
        }
    }
}

/// Block reads the workers served, by tier (summed over the workers).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Tiers {
    pub memory: f64,
    pub disk: f64,
    pub peer: f64,
    pub backend: f64,
}

impl Tiers {
    fn of(workers: &[BTreeMap<String, f64>]) -> Tiers {
        let tier = |t: &str| sum(workers, BLOCK_READS, &[("tier", t)]);
        Tiers {
            memory: tier("memory"),
            disk: tier("disk"),
            peer: tier("peer"),
            backend: tier("backend"),
        }
    }

    /// The median of each tier over `all`.
    fn median(all: &[Tiers]) -> Option<Tiers> {
        let m = |get: fn(&Tiers) -> f64| Stats::of(all.iter().map(get)).map(|s| s.median);
        Some(Tiers {
            memory: m(|t| t.memory)?,
            disk: m(|t| t.disk)?,
            peer: m(|t| t.peer)?,
            backend: m(|t| t.backend)?,
        })
    }

    /// `memory/disk/peer/backend`.
    fn render(&self) -> String {
        [self.memory, self.disk, self.peer, self.backend]
            .map(|x| {
                if x.fract() == 0.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.1}")
                }
            })
            .join("/")
    }
}

/// What crossed one emulated host's link during a pass.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LinkPass {
    pub to_host_bytes: u64,
    pub from_host_bytes: u64,
    /// The busier direction's bytes over what the link carries in the pass's time (1.0: the
    /// link was full all along).
    pub use_share: f64,
}

/// One pass: every reader reading its file through its own client, all at once.
#[derive(Debug, Serialize)]
pub struct Pass {
    /// From the moment every reader was let go until the last one finished.
    pub seconds: f64,
    pub bytes: u64,
    /// Aggregate: all readers' bytes over `seconds`.
    pub mb_per_s: f64,
    pub readers: Vec<ReaderResult>,
    /// Cache blocks in the files read.
    pub blocks: u64,
    /// Successful backend GETs, all workers together.
    pub backend_gets: f64,
    pub backend_get_errors: f64,
    pub backend_bytes: f64,
    /// `backend_gets` over `blocks`.
    pub gets_per_block: f64,
    /// Block reads the workers served, by tier.
    pub block_reads: Tiers,
    /// CPU time spent during the pass by the workers (all together), the clients, etcd, the S3
    /// server and the benchmark itself (the readers).
    pub worker_cpu_seconds: f64,
    pub client_cpu_seconds: f64,
    pub etcd_cpu_seconds: f64,
    pub s3_cpu_seconds: f64,
    pub reader_cpu_seconds: f64,
    /// The machine's busy CPU time during the pass (all cores); of it, interrupts and softirqs
    /// (also in the time of the process they interrupted); time stolen by the hypervisor (not
    /// busy); and the busy time none of the above processes spent: other processes (a build
    /// next to the benchmark), the kernel's own threads.
    pub machine_busy_seconds: f64,
    pub machine_irq_seconds: f64,
    pub machine_steal_seconds: f64,
    pub other_cpu_seconds: f64,
    /// What the benchmark's processes (workers, clients, etcd, S3 server, readers) spent per GB
    /// read: unlike MB/s, it does not depend on what else the machine runs.
    pub cpu_seconds_per_gb: f64,
    /// Each worker's CPU time during the pass (w1, w2...).
    pub worker_cpu_seconds_each: Vec<f64>,
    /// All workers' CPU seconds per GB read; and each worker's over the GB its own reader read
    /// (a worker serves its reader and its peers: with equal files, the mean of these is the
    /// former).
    pub worker_cpu_seconds_per_gb: f64,
    pub worker_cpu_seconds_per_gb_each: Vec<f64>,
    /// On emulated hosts, each host's link (w1's host first), and the busiest link's use.
    pub links: Vec<LinkPass>,
    pub link_use_max: Option<f64>,
    /// The share of the machine's CPU time (all cores) that was not idle during the pass, and
    /// the share that other processes took.
    pub machine_cpu_busy: f64,
    pub other_cpu_share: f64,
    /// Each worker's counters that moved (w1, w2...), and each client's.
    pub workers: Vec<BTreeMap<String, f64>>,
    pub clients: Vec<BTreeMap<String, f64>>,
}

impl Pass {
    /// `link_mbit`: the emulated hosts' link rate (none on loopback).
    pub fn new(
        readers: Vec<ReaderResult>,
        seconds: f64,
        blocks: u64,
        before: &Reading,
        after: &Reading,
        link_mbit: Option<u32>,
    ) -> Pass {
        let workers = deltas(&before.workers, &after.workers);
        let clients = deltas(&before.clients, &after.clients);
        let cpu = |b: &[NodeReading], a: &[NodeReading]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(a, b)| a.stats.cpu_seconds - b.stats.cpu_seconds)
                .sum()
        };
        let machine = after.machine_cpu.since(&before.machine_cpu);
        let (busy, total) = (machine.busy, machine.total);
        let worker_cpu_seconds = cpu(&before.workers, &after.workers);
        let client_cpu_seconds = cpu(&before.clients, &after.clients);
        let etcd_cpu_seconds = after.etcd_cpu - before.etcd_cpu;
        let s3_cpu_seconds = after.s3_cpu - before.s3_cpu;
        let reader_cpu_seconds = after.bench_cpu - before.bench_cpu;
        let ours = worker_cpu_seconds
            + client_cpu_seconds
            + etcd_cpu_seconds
            + s3_cpu_seconds
            + reader_cpu_seconds;
        let bytes = readers.iter().map(|r| r.bytes).sum();
        let gb = |bytes: u64| (bytes as f64 / 1e9).max(f64::MIN_POSITIVE);
        let worker_cpu_seconds_each: Vec<f64> = after
            .workers
            .iter()
            .zip(&before.workers)
            .map(|(a, b)| a.stats.cpu_seconds - b.stats.cpu_seconds)
            .collect();
        let worker_cpu_seconds_per_gb_each = worker_cpu_seconds_each
            .iter()
            .zip(&readers)
            .map(|(cpu, r)| cpu / gb(r.bytes))
            .collect();
        let links: Vec<LinkPass> = after
            .links
            .iter()
            .zip(&before.links)
            .map(|(a, b)| {
                let (to, from) = (a.to_host - b.to_host, a.from_host - b.from_host);
                let capacity = link_mbit.map_or(0.0, |m| f64::from(m) * 1e6 / 8.0 * seconds);
                LinkPass {
                    to_host_bytes: to,
                    from_host_bytes: from,
                    use_share: share(to.max(from) as f64, capacity),
                }
            })
            .collect();
        let link_use_max = links.iter().map(|l| l.use_share).reduce(f64::max);
        let backend_gets = sum(
            &workers,
            BACKEND_REQUESTS,
            &[("op", "get"), ("outcome", "ok")],
        );
        Pass {
            seconds,
            bytes,
            mb_per_s: bytes as f64 / MB / seconds,
            readers,
            blocks,
            backend_gets,
            backend_get_errors: sum(
                &workers,
                BACKEND_REQUESTS,
                &[("op", "get"), ("outcome", "error")],
            ),
            backend_bytes: sum(&workers, BACKEND_BYTES, &[]),
            gets_per_block: backend_gets / blocks.max(1) as f64,
            block_reads: Tiers::of(&workers),
            worker_cpu_seconds,
            client_cpu_seconds,
            etcd_cpu_seconds,
            s3_cpu_seconds,
            reader_cpu_seconds,
            machine_busy_seconds: busy,
            machine_irq_seconds: machine.irq,
            machine_steal_seconds: machine.steal,
            other_cpu_seconds: (busy - ours).max(0.0),
            cpu_seconds_per_gb: ours / gb(bytes),
            worker_cpu_seconds_each,
            worker_cpu_seconds_per_gb: worker_cpu_seconds / gb(bytes),
            worker_cpu_seconds_per_gb_each,
            links,
            link_use_max,
            machine_cpu_busy: share(busy, total),
            other_cpu_share: share((busy - ours).max(0.0), total),
            workers,
            clients,
        }
    }
}

fn share(part: f64, total: f64) -> f64 {
    if total > 0.0 { part / total } else { 0.0 }
}

/// How each process's counters moved (those that did).
fn deltas(before: &[NodeReading], after: &[NodeReading]) -> Vec<BTreeMap<String, f64>> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| {
            a.counters
                .iter()
                .map(|(k, v)| (k.clone(), v - b.counters.get(k).copied().unwrap_or(0.0)))
                .filter(|(_, d)| *d != 0.0)
                .collect()
        })
        .collect()
}

/// The sum over `maps` of the series of metric `name` that carry every label in `labels`.
fn sum(maps: &[BTreeMap<String, f64>], name: &str, labels: &[(&str, &str)]) -> f64 {
    maps.iter()
        .flat_map(|m| m.iter())
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        // Not `sum()`: the sum of no f64 is -0.0.
        .fold(0.0, |total, (_, v)| total + v)
}

/// One run of one cluster size.
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub run: usize,
    pub cold: Pass,
    pub hot: Pass,
    /// On emulated hosts: hot again, reader i on reader i+1's file (N=1: its own), served
    /// mostly by the peers' caches over the links.
    pub peer: Option<Pass>,
    /// The untimed pass that compared every byte (first run only).
    pub check: Option<Pass>,
    /// VmHWM of each worker and client at the end of the run.
    pub worker_peak_rss_bytes: Vec<u64>,
    pub client_peak_rss_bytes: Vec<u64>,
}

impl RunResult {
    /// Backend GETs of the passes that should have sent none (hot, peer).
    fn hot_backend_gets(&self) -> f64 {
        self.hot.backend_gets + self.peer.as_ref().map_or(0.0, |p| p.backend_gets)
    }
}

/// One cluster size over all runs.
#[derive(Debug, Serialize)]
pub struct SizeResult {
    pub workers: usize,
    pub runs: Vec<RunResult>,
    /// What ended this size's runs early.
    pub error: Option<String>,
    pub summary: Option<SizeSummary>,
}

impl SizeResult {
    pub fn new(workers: usize) -> SizeResult {
        SizeResult {
            workers,
            runs: Vec::new(),
            error: None,
            summary: None,
        }
    }

    /// Whether every byte of one pass was checked.
    fn verified(&self) -> bool {
        self.runs.iter().any(|r| r.check.is_some())
    }
}

#[derive(Debug, Serialize)]
pub struct SizeSummary {
    pub cold_mb_per_s: Stats,
    pub hot_mb_per_s: Stats,
    /// The median over the median with one worker (N means perfect scaling).
    pub cold_vs_one: Option<f64>,
    pub hot_vs_one: Option<f64>,
    /// On emulated hosts: the peer pass, and its ratio to one host.
    pub peer_mb_per_s: Option<Stats>,
    pub peer_vs_one: Option<f64>,
    pub peer_link_use: Option<Stats>,
    pub peer_worker_cpu_seconds_per_gb: Option<Stats>,
    /// Backend GETs per block in the cold pass.
    pub gets_per_block: Stats,
    /// The most backend GETs of any hot pass (0 when the caches kept every block).
    pub hot_backend_gets_max: f64,
    /// Median over the runs, tier by tier.
    pub cold_block_reads: Tiers,
    pub hot_block_reads: Tiers,
    pub cold_cpu_busy: Stats,
    pub hot_cpu_busy: Stats,
    /// The share of the machine's CPU that other processes took.
    pub cold_other_cpu: Stats,
    pub hot_other_cpu: Stats,
    /// CPU seconds of the benchmark's processes per GB read.
    pub cold_cpu_seconds_per_gb: Stats,
    pub hot_cpu_seconds_per_gb: Stats,
    /// The workers' CPU seconds per GB, all together; and each worker's (median over the runs).
    pub cold_worker_cpu_seconds_per_gb: Stats,
    pub hot_worker_cpu_seconds_per_gb: Stats,
    pub hot_worker_cpu_seconds_per_gb_each: Vec<f64>,
    /// On emulated hosts: the busiest link's use.
    pub cold_link_use: Option<Stats>,
    pub hot_link_use: Option<Stats>,
    /// Highest over the runs and processes.
    pub worker_peak_rss_bytes: u64,
    pub client_peak_rss_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct GranaryConfig {
    pub binary: PathBuf,
    pub git: String,
    /// Per worker.
    pub memory_cache_bytes: u64,
    pub disk_cache_bytes: u64,
}

/// An issue's target.
#[derive(Debug, Serialize)]
pub struct Target {
    pub issue: u32,
    pub name: &'static str,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct ClusterReport {
    /// `cluster` (loopback) or `cluster-hosts` (emulated hosts).
    pub mode: &'static str,
    /// The emulated hosts' links, Mbit/s each way; none on loopback.
    pub link_mbit: Option<u32>,
    pub started_at: String,
    pub finished_at: String,
    pub profile: Name,
    pub runs: usize,
    /// The size of each reader's file.
    pub file_bytes: u64,
    pub block_bytes: u64,
    pub s3: Flavor,
    pub machine: Machine,
    pub granary: GranaryConfig,
    pub sizes: Vec<SizeResult>,
    pub targets: Vec<Target>,
}

/// Issue 22: with N hosts on links of their own, the aggregate hot throughput of 4 is at least
/// 3.5 times that of 1.
const SCALING_HOSTS: usize = 4;
const SCALING_TARGET: f64 = 3.5;

impl ClusterReport {
    /// Summarizes every size and judges the target.
    pub fn finish(&mut self) {
        for size in &mut self.sizes {
            size.summary = summarize(&size.runs);
        }
        let one = self
            .sizes
            .iter()
            .find(|s| s.workers == 1)
            .and_then(|s| s.summary.as_ref())
            .map(|s| {
                (
                    s.cold_mb_per_s.median,
                    s.hot_mb_per_s.median,
                    s.peer_mb_per_s.as_ref().map(|p| p.median),
                )
            });
        for summary in self.sizes.iter_mut().filter_map(|s| s.summary.as_mut()) {
            summary.cold_vs_one = one.map(|(cold, _, _)| summary.cold_mb_per_s.median / cold);
            summary.hot_vs_one = one.map(|(_, hot, _)| summary.hot_mb_per_s.median / hot);
            summary.peer_vs_one = match (one.and_then(|o| o.2), &summary.peer_mb_per_s) {
                (Some(one), Some(peer)) => Some(peer.median / one),
                _ => None,
            };
        }
        self.targets = self.judge().into_iter().collect();
        if self.link_mbit.is_some() {
            self.targets.extend(self.judge_scaling(false));
            self.targets.extend(self.judge_scaling(true));
        }
    }

    /// Issue 22: aggregate hot MB/s with 4 hosts over that with 1 (of the peer pass with
    /// `peer`).
    fn judge_scaling(&self, peer: bool) -> Option<Target> {
        let of = |n: usize| {
            self.sizes
                .iter()
                .find(|s| s.workers == n)
                .and_then(|s| s.summary.as_ref())
        };
        let (one, four) = (of(1)?, of(SCALING_HOSTS)?);
        let (ratio, four_mb, one_mb) = if peer {
            (
                four.peer_vs_one?,
                four.peer_mb_per_s.as_ref()?.median,
                one.peer_mb_per_s.as_ref()?.median,
            )
        } else {
            (
                four.hot_vs_one?,
                four.hot_mb_per_s.median,
                one.hot_mb_per_s.median,
            )
        };
        Some(Target {
            issue: 22,
            name: if peer {
                "the same, peer pass (each reader on another reader's file)"
            } else {
                "aggregate hot throughput of 4 hosts >= 3.5x that of 1"
            },
            measured: format!(
                "{ratio:.2}x ({} MB/s with 4, {} MB/s with 1)",
                number(four_mb),
                number(one_mb)
            ),
            met: Some(ratio >= SCALING_TARGET),
        })
    }

    /// Exactly one backend GET per block in every cold pass, none in any hot pass.
    fn judge(&self) -> Option<Target> {
        let passes: Vec<(usize, &RunResult)> = self
            .sizes
            .iter()
            .flat_map(|s| s.runs.iter().map(move |r| (s.workers, r)))
            .collect();
        if passes.is_empty() {
            return None;
        }
        let off: Vec<String> = passes
            .iter()
            .filter(|(_, r)| {
                r.cold.backend_gets != r.cold.blocks as f64 || r.hot_backend_gets() > 0.0
            })
            .map(|(n, r)| {
                format!(
                    "N={n} run {}: {} GETs for {} blocks cold, {} hot",
                    r.run,
                    r.cold.backend_gets,
                    r.cold.blocks,
                    r.hot_backend_gets()
                )
            })
            .collect();
        let measured = if off.is_empty() {
            format!(
                "1.00 in every cold pass ({} passes), 0 GETs in every hot pass",
                passes.len()
            )
        } else {
            off.join("; ")
        };
        Some(Target {
            issue: 3,
            name: "exactly 1 backend GET per block across the cluster",
            measured,
            met: Some(off.is_empty()),
        })
    }

    /// Whether every size ran every run with no error and its bytes checked.
    pub fn all_good(&self) -> bool {
        self.sizes
            .iter()
            .all(|s| s.error.is_none() && s.runs.len() == self.runs && s.verified())
    }

    /// The table, the target and any problems, for a terminal.
    pub fn render(&self) -> String {
        let hosts = self.link_mbit.is_some();
        let mut header = vec![
            if hosts { "hosts" } else { "workers" },
            "cold MB/s",
            "[min-max]",
            "hot MB/s",
            "[min-max]",
            "cold vs 1",
            "hot vs 1",
        ];
        if hosts {
            header.extend(["peer MB/s", "[min-max]", "peer vs 1"]);
        }
        header.extend([
            "GETs/block",
            "hot GETs",
            "cold tiers m/d/p/b",
            "hot tiers m/d/p/b",
        ]);
        if hosts {
            header.push("link use cold/hot/peer");
        }
        header.extend(["CPU busy cold/hot", "others' CPU", "CPU s/GB"]);
        if hosts {
            header.extend(["worker s/GB cold/hot/peer", "hot s/GB each worker"]);
        }
        header.push("peak RSS worker");
        if !hosts {
            header.push("peak RSS client");
        }
        let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
        let mut problems = Vec::new();
        for size in &self.sizes {
            let mut row = vec![size.workers.to_string()];
            match &size.summary {
                Some(s) => {
                    let range = |st: &Stats| format!("[{}-{}]", number(st.min), number(st.max));
                    let ratio = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}"));
                    row.extend([
                        number(s.cold_mb_per_s.median),
                        range(&s.cold_mb_per_s),
                        number(s.hot_mb_per_s.median),
                        range(&s.hot_mb_per_s),
                        ratio(s.cold_vs_one),
                        ratio(s.hot_vs_one),
                    ]);
                    if hosts {
                        match &s.peer_mb_per_s {
                            Some(p) => row.extend([number(p.median), range(p)]),
                            None => row.extend(["-".into(), "-".into()]),
                        }
                        row.push(ratio(s.peer_vs_one));
                    }
                    row.extend([
                        if s.gets_per_block.min == s.gets_per_block.max {
                            format!("{:.2}", s.gets_per_block.median)
                        } else {
                            format!(
                                "{:.2} [{:.2}-{:.2}]",
                                s.gets_per_block.median, s.gets_per_block.min, s.gets_per_block.max
                            )
                        },
                        format!("{:.0}", s.hot_backend_gets_max),
                        s.cold_block_reads.render(),
                        s.hot_block_reads.render(),
                    ]);
                    if hosts {
                        let pct = |st: &Option<Stats>| {
                            st.as_ref()
                                .map_or("-".into(), |st| format!("{:.0}%", st.median * 100.0))
                        };
                        row.push(format!(
                            "{}/{}/{}",
                            pct(&s.cold_link_use),
                            pct(&s.hot_link_use),
                            pct(&s.peer_link_use)
                        ));
                    }
                    row.extend([
                        format!(
                            "{:.0}%/{:.0}%",
                            s.cold_cpu_busy.median * 100.0,
                            s.hot_cpu_busy.median * 100.0
                        ),
                        format!(
                            "{:.0}%/{:.0}%",
                            s.cold_other_cpu.median * 100.0,
                            s.hot_other_cpu.median * 100.0
                        ),
                        format!(
                            "{:.1}/{:.1}",
                            s.cold_cpu_seconds_per_gb.median, s.hot_cpu_seconds_per_gb.median
                        ),
                    ]);
                    if hosts {
                        row.push(format!(
                            "{:.1}/{:.1}/{}",
                            s.cold_worker_cpu_seconds_per_gb.median,
                            s.hot_worker_cpu_seconds_per_gb.median,
                            s.peer_worker_cpu_seconds_per_gb
                                .as_ref()
                                .map_or("-".into(), |p| format!("{:.1}", p.median))
                        ));
                        row.push(
                            s.hot_worker_cpu_seconds_per_gb_each
                                .iter()
                                .map(|x| format!("{x:.1}"))
                                .collect::<Vec<_>>()
                                .join("/"),
                        );
                    }
                    row.push(format!("{} MiB", s.worker_peak_rss_bytes / MIB));
                    if !hosts {
                        row.push(format!("{} MiB", s.client_peak_rss_bytes / MIB));
                    }
                }
                None => row.push("not measured".into()),
            }
            rows.push(row);
            let what = format!("N={}", size.workers);
            if let Some(e) = &size.error {
                problems.push(format!("{what}: {}", e.replace('\n', "\n      ")));
            } else if !size.verified() {
                problems.push(format!("{what}: bytes not verified"));
            }
        }
        let setting = match self.link_mbit {
            None => format!(
                "--cluster --{}: per worker count N, N clients each reading its own {} MiB file at \
                 once",
                self.profile_label(),
                self.file_bytes / MIB
            ),
            Some(mbit) => format!(
                "--cluster --hosts --{}: N emulated hosts (network namespaces, links of {mbit} \
                 Mbit/s each way), each a worker serving its own mount read by one reader, {} MiB \
                 per reader, all at once",
                self.profile_label(),
                self.file_bytes / MIB
            ),
        };
        let mut out = format!(
            "granary-bench {setting}; S3 server {}, granary {}\n(per worker: memory cache {} MiB, \
             disk cache {} MiB, {} MiB blocks), {} CPU cores for everything\n\n",
            self.s3.name(),
            self.granary.git,
            self.granary.memory_cache_bytes / MIB,
            self.granary.disk_cache_bytes / MIB,
            self.block_bytes / MIB,
            self.machine.nproc,
        );
        out.push_str(&aligned(&rows, &[2, 4]));
        if hosts {
            out.push_str(
                "\nOn emulated hosts: each worker serves its own mount (no clients); peer: hot again, \
                 reader i on reader i+1's file, so that\nall but the reader's worker's share comes \
                 from the peers' caches over the links (N=1: its own file); hot GETs counts the \
                 peer pass too;\nlink use: the busiest link's busier direction over \
                 what it carries in the pass's time (median); \
                 worker s/GB: all workers' CPU seconds per GB read, cold/hot/peer; each worker: its\nCPU \
                 seconds in the hot pass over the GB its own reader read (w1/w2/...). The S3 server's \
                 CPU includes the forwarder to it.",
            );
        }
        out.push_str(&format!(
            "\nMB/s: all readers' bytes over the time from their common start until the last one \
             finished (10^6 bytes), median of {} run(s) [min-max];\nvs 1: over the median with one \
             worker (N would be perfect scaling). cold: fresh workers, page cache dropped; hot: \
             page cache\ndropped, served by the workers' caches. GETs/block: backend GETs of all \
             workers in the cold pass over the blocks read; hot GETs:\nthe most in any hot pass. \
             tiers: block reads the workers served from memory/disk/peer/backend (median per \
             pass).\nCPU busy: the machine's non-idle CPU share during the pass (S3 server, etcd, \
             workers, clients and readers share it); others' CPU: the\nshare of the machine's CPU \
             taken by processes that are not part of the benchmark (another build, kernel threads); CPU \
             s/GB: CPU seconds the\nbenchmark's processes spent per GB read, cold/hot (the \
             machine's ceiling is its core count over this).\nEvery byte was checked against the dataset \
             in an untimed pass of the first run{}.\n",
            self.runs,
            if problems.is_empty() {
                ""
            } else {
                ", except as listed below"
            }
        ));
        if !self.targets.is_empty() {
            out.push_str("\nTargets:\n");
        }
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "unknown",
            };
            out.push_str(&format!(
                "  {verdict:<8} issue {}: {}: {}\n",
                t.issue, t.name, t.measured
            ));
        }
        if !problems.is_empty() {
            out.push_str("\nProblems:\n");
            for p in problems {
                out.push_str(&format!("  {p}\n"));
            }
        }
        out
    }

    fn profile_label(&self) -> &'static str {
        match self.profile {
            Name::Smoke => "smoke",
            Name::Quick => "quick",
            Name::Full => "full",
        }
    }

    /// Writes `<stamp>-cluster-<profile>.json` and `cluster-latest.json` into `dir`; returns the
    /// first.
    pub fn write_json(&self, dir: &Path, stamp: &str, profile: &str) -> anyhow::Result<PathBuf> {
        crate::report::write_json(dir, stamp, Some(self.mode), profile, self)
    }
}

fn summarize(runs: &[RunResult]) -> Option<SizeSummary> {
    let stats = |get: fn(&RunResult) -> f64| Stats::of(runs.iter().map(get));
    let max_rss = |get: fn(&RunResult) -> &Vec<u64>| {
        runs.iter()
            .flat_map(|r| get(r).iter().copied())
            .max()
            .unwrap_or(0)
    };
    let link_use = |get: fn(&RunResult) -> Option<f64>| Stats::of(runs.iter().filter_map(get));
    let workers = runs
        .first()
        .map_or(0, |r| r.hot.worker_cpu_seconds_per_gb_each.len());
    let hot_each = (0..workers)
        .map(|i| {
            Stats::of(
                runs.iter()
                    .filter_map(|r| r.hot.worker_cpu_seconds_per_gb_each.get(i).copied()),
            )
            .map_or(0.0, |s| s.median)
        })
        .collect();
    let cold_tiers: Vec<Tiers> = runs.iter().map(|r| r.cold.block_reads).collect();
    let hot_tiers: Vec<Tiers> = runs.iter().map(|r| r.hot.block_reads).collect();
    Some(SizeSummary {
        cold_mb_per_s: stats(|r| r.cold.mb_per_s)?,
        hot_mb_per_s: stats(|r| r.hot.mb_per_s)?,
        cold_vs_one: None,
        hot_vs_one: None,
        gets_per_block: stats(|r| r.cold.gets_per_block)?,
        hot_backend_gets_max: runs
            .iter()
            .map(RunResult::hot_backend_gets)
            .fold(0.0, f64::max),
        peer_mb_per_s: Stats::of(runs.iter().filter_map(|r| Some(r.peer.as_ref()?.mb_per_s))),
        peer_vs_one: None,
        peer_link_use: Stats::of(runs.iter().filter_map(|r| r.peer.as_ref()?.link_use_max)),
        peer_worker_cpu_seconds_per_gb: Stats::of(
            runs.iter()
                .filter_map(|r| Some(r.peer.as_ref()?.worker_cpu_seconds_per_gb)),
        ),
        cold_block_reads: Tiers::median(&cold_tiers)?,
        hot_block_reads: Tiers::median(&hot_tiers)?,
        cold_cpu_busy: stats(|r| r.cold.machine_cpu_busy)?,
        hot_cpu_busy: stats(|r| r.hot.machine_cpu_busy)?,
        cold_other_cpu: stats(|r| r.cold.other_cpu_share)?,
        hot_other_cpu: stats(|r| r.hot.other_cpu_share)?,
        cold_cpu_seconds_per_gb: stats(|r| r.cold.cpu_seconds_per_gb)?,
        hot_cpu_seconds_per_gb: stats(|r| r.hot.cpu_seconds_per_gb)?,
        cold_worker_cpu_seconds_per_gb: stats(|r| r.cold.worker_cpu_seconds_per_gb)?,
        hot_worker_cpu_seconds_per_gb: stats(|r| r.hot.worker_cpu_seconds_per_gb)?,
        hot_worker_cpu_seconds_per_gb_each: hot_each,
        cold_link_use: link_use(|r| r.cold.link_use_max),
        hot_link_use: link_use(|r| r.hot.link_use_max),
        worker_peak_rss_bytes: max_rss(|r| &r.worker_peak_rss_bytes),
        client_peak_rss_bytes: max_rss(|r| &r.client_peak_rss_bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_series_of_a_metric_with_the_labels_asked_for() {
        let worker = |gets: f64, errors: f64| -> BTreeMap<String, f64> {
            [
                (
                    format!("{BACKEND_REQUESTS}{{op=\"get\",outcome=\"ok\"}}"),
                    gets,
                ),
                (
                    format!("{BACKEND_REQUESTS}{{op=\"get\",outcome=\"error\"}}"),
                    errors,
                ),
                (
                    format!("{BACKEND_REQUESTS}{{op=\"list\",outcome=\"ok\"}}"),
                    7.0,
                ),
                (format!("{BACKEND_REQUESTS}_other{{op=\"get\"}}"), 100.0),
            ]
            .into_iter()
            .collect()
        };
        let workers = [worker(100.0, 1.0), worker(156.0, 0.0)];
        let ok = [("op", "get"), ("outcome", "ok")];
        assert_eq!(sum(&workers, BACKEND_REQUESTS, &ok), 256.0);
        assert_eq!(sum(&workers, BACKEND_REQUESTS, &[("op", "get")]), 257.0);
        assert_eq!(sum(&workers, BACKEND_REQUESTS, &[]), 271.0);
        let none = sum(&workers, BLOCK_READS, &[]);
        assert!(none == 0.0 && none.is_sign_positive(), "{none}");
    }
}
