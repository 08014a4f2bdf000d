//! One `granary up` node on 127.0.0.1 (its own cache directory, mount point, worker API and
//! metrics ports, log) and what the benchmark asks of it through the CLI: `granary dataset pin`,
//! `load --wait`, `status --json`. Everything is stopped when the [`Node`] is dropped (the daemon
//! first, which unmounts, then the fallback unmount, then its directory is removed); on an error
//! or Ctrl-C the cleanup guards do the same.

use crate::cleanup::{self, Guard};
use crate::host::{self, Daemon, ProcStats};
use crate::s3::S3Conn;
use crate::systems::scrape;
use anyhow::{Context, bail, ensure};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the mount gets to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a load may take before the benchmark gives up.
const LOAD_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often the load is watched: the metrics endpoint and whether `load --wait` exited...
const METRICS_EVERY: Duration = Duration::from_millis(50);
/// ...and `granary dataset status --json` (a process and a gRPC call each: on 2 cores, polling
/// it every 100 ms took CPU from the load it was timing), to fail early.
const STATUS_EVERY: Duration = Duration::from_secs(2);

pub const BACKEND_REQUESTS: &str = "granary_backend_requests_total";
pub const BACKEND_BYTES: &str = "granary_backend_bytes_total";
pub const FUSE_OPS: &str = "granary_fuse_ops_total";
pub const FUSE_READ_BYTES: &str = "granary_fuse_read_bytes_total";
pub const PASSTHROUGH_OPENS: &str = "granary_fuse_passthrough_opens_total";
pub const LOADED_BYTES: &str = "granary_dataset_loaded_bytes_total";
pub const BLOCK_READS: &str = "granary_block_reads_total";
/// The total of `granary_fuse_stall_seconds`: how long reads waited for blocks not fetched yet.
pub const STALL_SECONDS: &str = "granary_fuse_stall_seconds_sum";

/// The counters read around every pass and during the load.
const COUNTERS: &[&str] = &[
    BACKEND_REQUESTS,
    BACKEND_BYTES,
    BLOCK_READS,
    FUSE_OPS,
    FUSE_READ_BYTES,
    PASSTHROUGH_OPENS,
    LOADED_BYTES,
    STALL_SECONDS,
];

/// What the node runs with.
pub struct Spec<'a> {
    pub bin: &'a Path,
    pub s3: &'a S3Conn,
    /// `s3://bucket/prefix`.
    pub source: String,
    pub memory_cache: u64,
    pub disk_cache: u64,
}

/// A running `granary up`. Fields drop in declaration order.
pub struct Node {
    daemon: Daemon,
    _unmount: Guard,
    _empty: Guard,
    bin: PathBuf,
    pub mnt: PathBuf,
    pub cache: PathBuf,
    api: SocketAddr,
    metrics: SocketAddr,
}

/// How one load went: from the `load` call until `status --json` said ready at 100%.
#[derive(Debug, Serialize)]
pub struct LoadResult {
    /// The dataset's bytes (what the node must hold).
    pub bytes: u64,
    /// From the `load` call until `status --json` first said `ready`, 100%.
    pub seconds: f64,
    /// `bytes` over `seconds`.
    pub mb_per_s: f64,
    /// From the first backend GET of the load until the node's loaded-bytes counter reached
    /// `bytes` (sampled every 25 ms): the transfer alone, without the worker's reconcile loop
    /// (which notices a load request and reports readiness once a second).
    pub transfer_seconds: Option<f64>,
    pub transfer_mb_per_s: Option<f64>,
    /// Seconds from the `load` call until the first backend GET.
    pub start_delay_seconds: Option<f64>,
    /// Seconds from the `load` call until the large file was complete (the first sample in which
    /// the loaded-bytes counter rose by at least its size: files count when complete).
    pub large_file_done_seconds: Option<f64>,
    /// Every 250 ms of the load: [seconds since the `load` call, bytes of complete files, backend
    /// GETs so far].
    pub timeline: Vec<[f64; 3]>,
    /// Backend GETs and bytes the load took.
    pub backend_gets: f64,
    pub backend_get_errors: f64,
    pub backend_bytes: f64,
    /// CPU time of the granary process during the load.
    pub granary_cpu_seconds: f64,
    /// How many `status --json` calls were made while waiting.
    pub status_polls: usize,
    /// The JSON progress lines `load --wait` printed on stderr: how many, and the last one.
    pub progress_lines: usize,
    pub last_progress: Option<serde_json::Value>,
    /// Files and bytes found in the node's dataset store afterwards.
    pub stored_files: u64,
    pub stored_bytes: u64,
}

impl Node {
    /// Starts `granary up` over `spec.source`, everything under `dir`, logging to `log`; returns
    /// once the mount is up. When the node stops, its files are emptied, not deleted
    /// ([`host::empty_tree`]): the benchmark's work directory goes at its end.
    pub fn start(spec: &Spec, dir: &Path, log: &Path) -> anyhow::Result<Node> {
        host::remove_tree(dir);
        let empty = {
            let dir = dir.to_path_buf();
            cleanup::register(format!("empty {}", dir.display()), move || {
                host::empty_tree(&dir)
            })
        };
        let (mnt, cache) = (dir.join("mnt"), dir.join("cache"));
        for d in [&mnt, &cache] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let unmount = {
            let mnt = mnt.clone();
            cleanup::register(format!("unmount {}", mnt.display()), move || {
                host::unmount_all_under(&mnt)
            })
        };
        let (api, metrics) = (host::free_local_addr()?, host::free_local_addr()?);
        let mut cmd = Command::new(spec.bin);
        cmd.arg("up")
            .args(["--source", &spec.source])
            .arg("--mount")
            .arg(&mnt)
            .arg("--cache-dir")
            .arg(&cache)
            .args(["--memory-cache", &spec.memory_cache.to_string()])
            .args(["--disk-cache", &spec.disk_cache.to_string()])
            .args(["--listen", &api.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .envs(spec.s3.aws_env());
        let daemon = Daemon::spawn("granary up", cmd, log)?;
        // The CLI contract: this line on stdout once the mount is ready.
        let line = format!("mounted at {}", mnt.display());
        daemon.wait_until(&format!("'{line}'"), START_TIMEOUT, || {
            daemon.log_text().contains(&line)
        })?;
        if !host::is_mounted(&mnt) {
            bail!("granary said '{line}' but nothing is mounted there");
        }
        Ok(Node {
            daemon,
            _unmount: unmount,
            _empty: empty,
            bin: spec.bin.to_path_buf(),
            mnt,
            cache,
            api,
            metrics,
        })
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Fails (with the end of its log) if the daemon has exited.
    pub fn check_running(&self) -> anyhow::Result<()> {
        self.daemon.check_running()
    }

    pub fn stats(&self) -> anyhow::Result<ProcStats> {
        ProcStats::read(self.pid()).context("cannot read /proc of granary up")
    }

    pub fn counters(&self) -> BTreeMap<String, f64> {
        scrape(self.metrics, COUNTERS)
    }

    /// `granary dataset --server API ARGS...`, quiet logs.
    fn dataset_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["dataset", "--server", &self.api.to_string()])
            .args(args)
            .env("GRANARY_LOG", "warn");
        cmd
    }

    /// `granary hint --mount MNT FILE`, with `list` (paths relative to the mount) written to
    /// `file` first.
    pub fn hint(&self, file: &Path, list: &str) -> anyhow::Result<()> {
        std::fs::write(file, list).with_context(|| format!("cannot write {}", file.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("hint")
            .arg("--mount")
            .arg(&self.mnt)
            .arg(file)
            .env("GRANARY_LOG", "warn");
        host::run_command(&mut cmd)?;
        Ok(())
    }

    /// `granary dataset pin NAME --path PATH`.
    pub fn pin(&self, name: &str, path: &str) -> anyhow::Result<()> {
        host::run_command(&mut self.dataset_command(&["pin", name, "--path", path]))?;
        Ok(())
    }

    /// `granary dataset status NAME --json`.
    pub fn status(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let text = host::run_command(&mut self.dataset_command(&["status", name, "--json"]))?;
        serde_json::from_str(&text)
            .with_context(|| format!("granary dataset status --json printed {text:?}"))
    }

    /// `granary dataset load NAME --wait`, timed from the call until it exits saying the dataset
    /// is ready (checked with `status --json`: ready at 100%); the metrics endpoint is sampled
    /// meanwhile to time the transfer.
    pub fn load(&self, name: &str, bytes: u64, large_bytes: u64) -> anyhow::Result<LoadResult> {
        let before = self.counters();
        let cpu_before = self.stats()?.cpu_seconds;
        let start = Instant::now();
        let mut child = self
            .dataset_command(&["load", name, "--wait", "--timeout", "30m"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run granary dataset load")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let progress = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        let delta = |now: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]| {
            sum(now, name, labels) - sum(&before, name, labels)
        };
        let gets = [("op", "get"), ("outcome", "ok")];
        let (mut first_get, mut transferred, mut large_done) = (None, None, None);
        let (mut timeline, mut last_loaded): (Vec<[f64; 3]>, f64) = (Vec::new(), 0.0);
        let mut last_status = start - STATUS_EVERY;
        let mut polls = 0;
        let (ready, exit) = loop {
            if let Some(exit) = child.try_wait()? {
                break (start.elapsed().as_secs_f64(), exit);
            }
            let now = self.counters();
            let at = start.elapsed().as_secs_f64();
            if first_get.is_none() && delta(&now, BACKEND_REQUESTS, &gets) > 0.0 {
                first_get = Some(at);
            }
            let loaded = delta(&now, LOADED_BYTES, &[]);
            if transferred.is_none() && loaded >= bytes as f64 {
                transferred = Some(at);
            }
            if large_done.is_none() && loaded - last_loaded >= large_bytes as f64 {
                large_done = Some(at);
            }
            last_loaded = loaded;
            if timeline
                .last()
                .is_none_or(|[t, _, _]: &[f64; 3]| at - t >= 0.25)
            {
                timeline.push([at, loaded, delta(&now, BACKEND_REQUESTS, &gets)]);
            }
            if last_status.elapsed() >= STATUS_EVERY {
                last_status = Instant::now();
                polls += 1;
                let status = self.status(name)?;
                let state = status["state"].as_str().unwrap_or_default();
                if state == "failed" {
                    bail!("loading {name} failed: {status}");
                }
            }
            self.check_running()?;
            if start.elapsed() > LOAD_TIMEOUT {
                bail!("{name} not ready after {LOAD_TIMEOUT:?}");
            }
            std::thread::sleep(METRICS_EVERY);
        };
        let after = self.counters();
        // `load --wait` may exit before a sample saw the last bytes counted: then the transfer
        // ended at the latest when it exited.
        if transferred.is_none() && delta(&after, LOADED_BYTES, &[]) >= bytes as f64 {
            transferred = Some(ready);
        }
        let cpu = self.stats()?.cpu_seconds - cpu_before;
        let lines = progress.join().unwrap_or_default();
        if !exit.success() {
            bail!(
                "granary dataset load --wait failed ({exit}):\n{}",
                lines.join("\n")
            );
        }
        polls += 1;
        let status = self.status(name)?;
        ensure!(
            status["state"] == "ready" && status["percent"].as_f64() == Some(100.0),
            "granary dataset load --wait exited but the dataset is not ready at 100%: {status}"
        );
        let progress: Vec<serde_json::Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let (stored_files, stored_bytes) = stored(&self.cache.join("datasets").join(name));
        let transfer_seconds = first_get.zip(transferred).map(|(a, b)| b - a);
        Ok(LoadResult {
            bytes,
            seconds: ready,
            mb_per_s: bytes as f64 / 1e6 / ready,
            transfer_seconds,
            transfer_mb_per_s: transfer_seconds.map(|s| bytes as f64 / 1e6 / s.max(1e-9)),
            start_delay_seconds: first_get,
            large_file_done_seconds: large_done,
            timeline,
            backend_gets: delta(&after, BACKEND_REQUESTS, &gets),
            backend_get_errors: delta(
                &after,
                BACKEND_REQUESTS,
                &[("op", "get"), ("outcome", "error")],
            ),
            backend_bytes: delta(&after, BACKEND_BYTES, &[]),
            granary_cpu_seconds: cpu,
            status_polls: polls,
            progress_lines: progress.len(),
            last_progress: progress.last().cloned(),
            stored_files,
            stored_bytes,
        })
    }
}

/// Files and bytes of the complete files in a dataset's store (`<dir>/files/`, not counting
/// `.loading` leftovers).
fn stored(dir: &Path) -> (u64, u64) {
    fn walk(dir: &Path, files: &mut u64, bytes: &mut u64) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                walk(&entry.path(), files, bytes);
            } else if !entry.file_name().to_string_lossy().starts_with('.') {
                *files += 1;
                *bytes += meta.len();
            }
        }
    }
    let (mut files, mut bytes) = (0, 0);
    walk(&dir.join("files"), &mut files, &mut bytes);
    (files, bytes)
}

/// The sum of the series of metric `name` in `counters` that carry every label in `labels`.
pub fn sum(counters: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    counters
        .iter()
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

/// How each counter moved between two readings (those that did).
pub fn deltas(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_labels_and_diffs_readings() {
        let reading = |gets: f64| -> BTreeMap<String, f64> {
            [
                (
                    format!("{BACKEND_REQUESTS}{{op=\"get\",outcome=\"ok\"}}"),
                    gets,
                ),
                (
                    format!("{BACKEND_REQUESTS}{{op=\"list\",outcome=\"ok\"}}"),
                    3.0,
                ),
                (format!("{FUSE_OPS}{{op=\"read\"}}"), 0.0),
            ]
            .into_iter()
            .collect()
        };
        let (before, after) = (reading(10.0), reading(266.0));
        assert_eq!(
            sum(
                &after,
                BACKEND_REQUESTS,
                &[("op", "get"), ("outcome", "ok")]
            ),
            266.0
        );
        assert_eq!(sum(&after, BACKEND_REQUESTS, &[]), 269.0);
        let none = sum(&after, PASSTHROUGH_OPENS, &[]);
        assert!(none == 0.0 && none.is_sign_positive());
        let moved = deltas(&before, &after);
        assert_eq!(moved.len(), 1);
        assert_eq!(
            moved[&format!("{BACKEND_REQUESTS}{{op=\"get\",outcome=\"ok\"}}")],
            256.0
        );
    }
}
