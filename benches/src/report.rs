//! What a run found: every sample, the summary of each figure (median and min-max over the runs,
//! ratios to native and to the raw backend), the issue-6 targets ([`targets`]), the table printed
//! on stdout ([`table`]), the chart ([`chart`]) and the JSON written under
//! `target/bench-results/`.

pub mod chart;
mod table;
mod targets;

use crate::host::Machine;
use crate::profile::Profile;
use crate::s3::Flavor;
use crate::workloads::{Metric, Timed, Workload};
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use table::aligned;
pub use targets::Target;

const MB: f64 = 1e6;
const MIB: u64 = 1 << 20;

/// Granary's block reads by tier, from which a hit ratio is computed.
const BLOCK_READS: &str = "granary_block_reads_total";

/// One timed pass.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub seconds: f64,
    pub bytes: u64,
    /// Reads, files, stats or entries, depending on the workload.
    pub ops: u64,
    pub mb_per_s: f64,
    pub ops_per_s: f64,
    /// Latency percentiles of the workloads that time each operation.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// CPU time the serving process spent during the pass.
    pub cpu_seconds: Option<f64>,
    /// The serving process's peak RSS since it started, read after the pass.
    pub peak_rss_bytes: Option<u64>,
    /// How the system's own counters moved during the pass.
    pub counters: BTreeMap<String, f64>,
    /// Block reads served from Granary's cache (memory or disk) over all its block reads.
    pub hit_ratio: Option<f64>,
}

impl Sample {
    pub fn new(
        pass: &Timed,
        cpu_seconds: Option<f64>,
        peak_rss_bytes: Option<u64>,
        counters: BTreeMap<String, f64>,
    ) -> Sample {
        let o = &pass.outcome;
        let mut latencies = o.latencies.clone();
        latencies.sort_by(f64::total_cmp);
        let percentile = |p: f64| {
            let last = latencies.len().checked_sub(1)?;
            Some(latencies[(p * last as f64).round() as usize] * 1e3)
        };
        Sample {
            seconds: pass.seconds,
            bytes: o.bytes,
            ops: o.ops,
            mb_per_s: o.bytes as f64 / MB / pass.seconds,
            ops_per_s: o.ops as f64 / pass.seconds,
            p50_ms: percentile(0.5),
            p99_ms: percentile(0.99),
            cpu_seconds,
            peak_rss_bytes,
            hit_ratio: hit_ratio(&counters),
            counters,
        }
    }

    /// The figure that sums up `metric`.
    pub fn value(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::MbPerS => Some(self.mb_per_s),
            Metric::OpsPerS => Some(self.ops_per_s),
            Metric::P50Ms => self.p50_ms,
        }
    }

    /// The figure with its unit, for progress lines.
    pub fn headline(&self, workload: Workload) -> String {
        let value = self.value(workload.metric()).map_or("-".into(), number);
        let hits = self
            .hit_ratio
            .map_or(String::new(), |h| format!(", hit ratio {h:.2}"));
        format!("{value} {}{hits}", workload.unit())
    }
}

/// Cache hits over all block reads, from the deltas of [`BLOCK_READS`] by tier.
fn hit_ratio(counters: &BTreeMap<String, f64>) -> Option<f64> {
    let reads = |tier: &str| {
        counters
            .get(&format!("{BLOCK_READS}{{tier=\"{tier}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    let hits = reads("memory") + reads("disk");
    let all = hits + reads("backend");
    (all > 0.0).then(|| hits / all)
}

/// Median and range over the runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stats> {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

impl Serialize for Workload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One figure: a workload read by a system in one condition, over several runs.
#[derive(Debug, Serialize)]
pub struct Figure {
    pub workload: Workload,
    pub system: String,
    pub condition: String,
    pub metric: Metric,
    pub unit: &'static str,
    /// Whether an untimed pass in this condition returned exactly the dataset's bytes (sizes and
    /// names for the metadata workloads).
    pub verified: bool,
    pub error: Option<String>,
    pub samples: Vec<Sample>,
    pub summary: Option<Summary>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    /// The workload's [`Metric`].
    pub value: Stats,
    pub mb_per_s: Stats,
    pub ops_per_s: Stats,
    pub p50_ms: Option<Stats>,
    pub p99_ms: Option<Stats>,
    pub hit_ratio: Option<Stats>,
    pub cpu_seconds: Option<Stats>,
    /// Highest peak RSS over the runs.
    pub peak_rss_bytes: Option<u64>,
    /// How much faster than native (above 1: faster): the median over native's median (the
    /// inverse for a latency), native in the matching state (see [`native_condition`]).
    pub vs_native: Option<f64>,
    /// The same against the raw backend (the direct backend rate).
    pub vs_backend: Option<f64>,
}

impl Figure {
    pub fn new(workload: Workload, system: &str, condition: String) -> Self {
        Figure {
            workload,
            system: system.to_string(),
            condition,
            metric: workload.metric(),
            unit: workload.unit(),
            verified: false,
            error: None,
            samples: Vec::new(),
            summary: None,
        }
    }

    fn is(&self, workload: Workload, system: &str, condition: &str) -> bool {
        self.workload == workload && self.system == system && self.condition == condition
    }

    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.samples.iter().filter_map(|s| s.value(self.metric))
    }

    /// Whether it was measured, with the right bytes and no error.
    fn good(&self) -> bool {
        self.verified && self.error.is_none() && !self.samples.is_empty()
    }
}

/// The native condition a figure in `condition` is compared with: cold for cold and direct
/// reads, the page cache for every hot read, the same epoch for an epoch.
fn native_condition(condition: &str) -> &str {
    match condition {
        "cold" | "direct" => "cold",
        c if c.starts_with("epoch-") => c,
        _ => "hot-pagecache",
    }
}

#[derive(Debug, Serialize)]
pub struct GranaryConfig {
    pub binary: PathBuf,
    pub git: String,
    pub memory_cache_bytes: u64,
    pub disk_cache_bytes: u64,
    /// The memory cache of the epochs workload (half the small files; no disk tier).
    pub epochs_memory_cache_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub started_at: String,
    pub finished_at: String,
    pub profile: Profile,
    pub s3: Flavor,
    pub machine: Machine,
    pub granary: GranaryConfig,
    pub figures: Vec<Figure>,
    pub targets: Vec<Target>,
}

impl Report {
    /// Summarizes every figure and evaluates the targets.
    pub fn finish(&mut self) {
        let median = |workload: Workload, system: &str, condition: &str| {
            let f = self
                .figures
                .iter()
                .find(|f| f.is(workload, system, condition))?;
            Some(Stats::of(f.values())?.median)
        };
        let summaries: Vec<Option<Summary>> = self
            .figures
            .iter()
            .map(|f| {
                let value = Stats::of(f.values())?;
                let speedup = |reference: f64| match f.metric {
                    Metric::P50Ms => reference / value.median,
                    _ => value.median / reference,
                };
                let native = median(f.workload, "native", native_condition(&f.condition));
                let backend = median(f.workload, "backend", "direct");
                let stats =
                    |get: fn(&Sample) -> Option<f64>| Stats::of(f.samples.iter().filter_map(get));
                Some(Summary {
                    value,
                    mb_per_s: stats(|s| Some(s.mb_per_s))?,
                    ops_per_s: stats(|s| Some(s.ops_per_s))?,
                    p50_ms: stats(|s| s.p50_ms),
                    p99_ms: stats(|s| s.p99_ms),
                    hit_ratio: stats(|s| s.hit_ratio),
                    cpu_seconds: stats(|s| s.cpu_seconds),
                    peak_rss_bytes: f.samples.iter().filter_map(|s| s.peak_rss_bytes).max(),
                    vs_native: native.map(speedup),
                    vs_backend: backend.map(speedup),
                })
            })
            .collect();
        for (f, s) in self.figures.iter_mut().zip(summaries) {
            f.summary = s;
        }
        self.targets = targets::evaluate(self);
    }

    fn summary(&self, workload: Workload, system: &str, condition: &str) -> Option<&Summary> {
        self.figures
            .iter()
            .find(|f| f.is(workload, system, condition))
            .and_then(|f| f.summary.as_ref())
    }

    /// Whether every figure was measured and returned the right bytes.
    pub fn all_good(&self) -> bool {
        self.figures.iter().all(Figure::good)
    }

    /// The table, the targets and any problems, for a terminal.
    pub fn render(&self) -> String {
        table::render(self)
    }

    /// Writes `<stamp>-<profile>.json` and `latest.json` into `dir`; returns the first.
    pub fn write_json(&self, dir: &Path, stamp: &str) -> anyhow::Result<PathBuf> {
        write_json(dir, stamp, None, self.profile.label(), self)
    }
}

/// The file-name stamp of a report that started at `started_at` (RFC 3339): its digits and
/// letters, `20261129T082854Z`.
pub fn stamp(started_at: &str) -> String {
    started_at
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

/// Writes `report` as JSON into `dir` twice: `<stamp>-<mode>-<profile>.json` (returned) and
/// `<mode>-latest.json`, which the next report of the same mode replaces. The workloads have no
/// mode: `<stamp>-<profile>.json` and `latest.json`.
pub fn write_json(
    dir: &Path,
    stamp: &str,
    mode: Option<&str>,
    profile: &str,
    report: &impl Serialize,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(report)?;
    let mode = mode.map_or(String::new(), |m| format!("{m}-"));
    let path = dir.join(format!("{stamp}-{mode}{profile}.json"));
    std::fs::write(&path, &text)?;
    std::fs::write(dir.join(format!("{mode}latest.json")), &text)?;
    Ok(path)
}

/// A figure with three significant digits or so: 12345, 123, 12.3, 1.23, 0.123.
pub fn number(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 1.0 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_counts_memory_and_disk_over_all_block_reads() {
        let counters: BTreeMap<String, f64> = [("memory", 30.0), ("disk", 10.0), ("backend", 60.0)]
            .into_iter()
            .map(|(tier, n)| (format!("{BLOCK_READS}{{tier=\"{tier}\"}}"), n))
            .collect();
        assert_eq!(hit_ratio(&counters), Some(0.4));
        assert_eq!(hit_ratio(&BTreeMap::new()), None);
    }

    #[test]
    fn percentiles_and_rates_of_a_pass() {
        let timed = Timed {
            outcome: crate::workloads::Outcome {
                bytes: 4_000_000,
                ops: 100,
                latencies: (1..=100).rev().map(|ms| ms as f64 / 1e3).collect(),
            },
            seconds: 2.0,
        };
        let s = Sample::new(&timed, None, None, BTreeMap::new());
        assert_eq!(s.mb_per_s, 2.0);
        assert_eq!(s.ops_per_s, 50.0);
        assert_eq!(s.p50_ms.map(f64::round), Some(51.0));
        assert_eq!(s.p99_ms.map(f64::round), Some(99.0));
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        let s = Stats::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stats::of([4.0, 1.0]).unwrap().median, 2.5);
        assert!(Stats::of([]).is_none());
    }
}
