//! What a run found: every sample, the summary of each figure (median and min-max over the
//! runs, ratios to native and to the raw backend), the issue-2 targets, the table printed on
//! stdout and the JSON written under `target/bench-results/`.

use crate::dataset::Shape;
use crate::host::Machine;
use crate::s3::Flavor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MB: f64 = 1e6;
const MIB: u64 = 1 << 20;

/// One timed pass.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub seconds: f64,
    pub bytes: u64,
    pub files: u64,
    pub mb_per_s: f64,
    pub files_per_s: f64,
    /// CPU time the serving process spent during the pass.
    pub cpu_seconds: Option<f64>,
    /// The serving process's peak RSS since it started, read after the pass.
    pub peak_rss_bytes: Option<u64>,
    /// How the system's own counters moved during the pass.
    pub counters: BTreeMap<String, f64>,
}

/// Median and range over the runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    fn of(values: impl IntoIterator<Item = f64>) -> Option<Stats> {
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

/// One figure: a workload read by a system in one condition, over several runs.
#[derive(Debug, Serialize)]
pub struct Figure {
    pub workload: &'static str,
    pub system: String,
    pub condition: String,
    pub counts_files: bool,
    /// Whether an untimed pass in this condition returned exactly the dataset's bytes.
    pub verified: bool,
    pub error: Option<String>,
    pub samples: Vec<Sample>,
    pub summary: Option<Summary>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub mb_per_s: Stats,
    pub files_per_s: Stats,
    pub cpu_seconds: Option<Stats>,
    /// Highest peak RSS over the runs.
    pub peak_rss_bytes: Option<u64>,
    /// Median MB/s over native's median: native cold for cold and direct reads, native from the
    /// page cache for hot reads.
    pub vs_native: Option<f64>,
    /// Median MB/s over the raw backend's median (the direct backend GET rate).
    pub vs_backend: Option<f64>,
}

impl Figure {
    pub fn new(
        workload: &'static str,
        counts_files: bool,
        system: &str,
        condition: String,
    ) -> Self {
        Figure {
            workload,
            system: system.to_string(),
            condition,
            counts_files,
            verified: false,
            error: None,
            samples: Vec::new(),
            summary: None,
        }
    }

    fn is(&self, system: &str, condition: &str) -> bool {
        self.system == system && self.condition == condition
    }
}

/// An issue-2 target and whether this run meets it.
#[derive(Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub measured: String,
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
pub struct Report {
    pub started_at: String,
    pub finished_at: String,
    pub profile: &'static str,
    pub runs: usize,
    pub s3: Flavor,
    pub machine: Machine,
    pub dataset: Shape,
    pub granary: GranaryConfig,
    pub figures: Vec<Figure>,
    pub targets: Vec<Target>,
}

impl Report {
    /// Summarizes every figure and evaluates the targets.
    pub fn finish(&mut self) {
        let medians: Vec<(usize, Option<f64>)> = self
            .figures
            .iter()
            .enumerate()
            .map(|(i, f)| {
                (
                    i,
                    Stats::of(f.samples.iter().map(|s| s.mb_per_s)).map(|s| s.median),
                )
            })
            .collect();
        let median_of = |workload: &str, system: &str, condition: &str| {
            medians.iter().find_map(|&(i, m)| {
                let f = &self.figures[i];
                (f.workload == workload && f.is(system, condition))
                    .then_some(m)
                    .flatten()
            })
        };
        let summaries: Vec<Option<Summary>> = self
            .figures
            .iter()
            .map(|f| {
                let mb_per_s = Stats::of(f.samples.iter().map(|s| s.mb_per_s))?;
                let native_condition = match f.condition.as_str() {
                    "cold" | "direct" => "cold",
                    _ => "hot-pagecache",
                };
                let native = median_of(f.workload, "native", native_condition);
                let backend = median_of(f.workload, "backend", "direct");
                Some(Summary {
                    mb_per_s,
                    files_per_s: Stats::of(f.samples.iter().map(|s| s.files_per_s))?,
                    cpu_seconds: Stats::of(f.samples.iter().filter_map(|s| s.cpu_seconds)),
                    peak_rss_bytes: f.samples.iter().filter_map(|s| s.peak_rss_bytes).max(),
                    vs_native: native.map(|n| mb_per_s.median / n),
                    vs_backend: backend.map(|b| mb_per_s.median / b),
                })
            })
            .collect();
        for (f, s) in self.figures.iter_mut().zip(summaries) {
            f.summary = s;
        }
        self.targets = self.evaluate_targets();
    }

    fn summary(&self, workload: &str, system: &str, condition: &str) -> Option<&Summary> {
        self.figures
            .iter()
            .find(|f| f.workload == workload && f.is(system, condition))
            .and_then(|f| f.summary.as_ref())
    }

    fn evaluate_targets(&self) -> Vec<Target> {
        if !self.figures.iter().any(|f| f.system == "granary") {
            return Vec::new();
        }
        let seq = "large-sequential";
        let ratio_target = |name: &str, condition: &str, ratio: Option<f64>, min: f64| {
            let measured = match (self.summary(seq, "granary", condition), ratio) {
                (Some(s), Some(r)) => {
                    format!("{:.0}% ({} MB/s)", r * 100.0, mbps(s.mb_per_s.median))
                }
                _ => "not measured".into(),
            };
            Target {
                name: name.to_string(),
                measured,
                met: ratio.map(|r| r >= min),
            }
        };
        let vs_native = |condition: &str| {
            self.summary(seq, "granary", condition)
                .and_then(|s| s.vs_native)
        };
        let cold_vs_backend = self
            .summary(seq, "granary", "cold")
            .and_then(|s| s.vs_backend);
        let peak = self
            .figures
            .iter()
            .filter(|f| f.system == "granary")
            .filter_map(|f| f.summary.as_ref()?.peak_rss_bytes)
            .max();
        let limit = self.granary.memory_cache_bytes + 256 * MIB;
        vec![
            ratio_target(
                "hot sequential (hot-pagecache) >= 50% of native page-cache read",
                "hot-pagecache",
                vs_native("hot-pagecache"),
                0.5,
            ),
            ratio_target(
                "hot sequential (hot-granary-cache) >= 50% of native page-cache read",
                "hot-granary-cache",
                vs_native("hot-granary-cache"),
                0.5,
            ),
            ratio_target(
                "cold sequential >= 80% of the direct backend GET rate",
                "cold",
                cold_vs_backend,
                0.8,
            ),
            Target {
                name: format!("peak RSS <= memory cache + 256 MiB ({} MiB)", limit / MIB),
                measured: peak.map_or("not measured".into(), |p| format!("{} MiB", p / MIB)),
                met: peak.map(|p| p <= limit),
            },
        ]
    }

    /// Whether every figure was measured and returned the right bytes.
    pub fn all_good(&self) -> bool {
        self.figures.iter().all(|f| f.verified && f.error.is_none())
    }

    /// The table and the targets, for a terminal.
    pub fn render(&self) -> String {
        let mut rows = vec![
            [
                "workload",
                "system",
                "condition",
                "MB/s",
                "[min-max]",
                "files/s",
                "[min-max]",
                "vs native",
                "vs backend",
                "peak RSS",
                "CPU s",
            ]
            .map(String::from)
            .to_vec(),
        ];
        let mut problems = Vec::new();
        for f in &self.figures {
            let mut row = vec![
                f.workload.to_string(),
                f.system.clone(),
                f.condition.clone(),
            ];
            match &f.summary {
                Some(s) => {
                    let files = |x: f64| format!("{x:.0}");
                    row.extend([
                        mbps(s.mb_per_s.median),
                        format!("[{}-{}]", mbps(s.mb_per_s.min), mbps(s.mb_per_s.max)),
                        if f.counts_files {
                            files(s.files_per_s.median)
                        } else {
                            "-".into()
                        },
                        if f.counts_files {
                            format!(
                                "[{}-{}]",
                                files(s.files_per_s.min),
                                files(s.files_per_s.max)
                            )
                        } else {
                            String::new()
                        },
                        s.vs_native.map_or("-".into(), |r| format!("{r:.2}")),
                        s.vs_backend.map_or("-".into(), |r| format!("{r:.2}")),
                        s.peak_rss_bytes
                            .map_or("-".into(), |b| format!("{} MiB", b / MIB)),
                        s.cpu_seconds
                            .map_or("-".into(), |c| format!("{:.2}", c.median)),
                    ]);
                }
                None => row.push("not measured".into()),
            }
            let what = format!("{} / {} / {}", f.workload, f.system, f.condition);
            if let Some(e) = &f.error {
                problems.push(format!("{what}: {}", e.replace('\n', "\n      ")));
            } else if !f.verified && !f.samples.is_empty() {
                problems.push(format!("{what}: bytes not verified"));
            }
            rows.push(row);
        }
        let mut out = format!(
            "granary-bench --{}: {} MiB file, {} files of {} KiB, S3 server {}, granary {} \
             (memory cache {} MiB)\n\n",
            self.profile,
            self.dataset.large_bytes / MIB,
            self.dataset.small_count,
            self.dataset.small_bytes >> 10,
            self.s3.name(),
            self.granary.git,
            self.granary.memory_cache_bytes / MIB,
        );
        out.push_str(&table(&rows));
        out.push_str(&format!(
            "\nMB = 10^6 bytes; median of {} runs per figure, [min-max]; every figure's bytes were \
             checked (SHA-256) in an untimed pass{}.\n",
            self.runs,
            if problems.is_empty() {
                ""
            } else {
                ", except as listed below"
            }
        ));
        if self.s3 == Flavor::Moto {
            out.push_str(
                "Note: moto reads the whole object for every ranged GET, so large-sequential cold and \
                 backend figures measure moto\n(bytes per request), not the clients: use --s3 ceph for \
                 those.\n",
            );
        }
        if !self.targets.is_empty() {
            out.push_str("\nIssue-2 targets:\n");
            for t in &self.targets {
                let verdict = match t.met {
                    Some(true) => "met",
                    Some(false) => "NOT met",
                    None => "unknown",
                };
                out.push_str(&format!("  {:<8} {}: {}\n", verdict, t.name, t.measured));
            }
        }
        if !problems.is_empty() {
            out.push_str("\nProblems:\n");
            for p in problems {
                out.push_str(&format!("  {p}\n"));
            }
        }
        out
    }

    /// Writes `<stamp>-<profile>.json` and `latest.json` into `dir`; returns the first.
    pub fn write_json(&self, dir: &Path, stamp: &str) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let text = serde_json::to_string_pretty(self)?;
        let path = dir.join(format!("{stamp}-{}.json", self.profile));
        std::fs::write(&path, &text)?;
        std::fs::write(dir.join("latest.json"), &text)?;
        Ok(path)
    }
}

fn mbps(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// Left-aligned text columns, numbers right-aligned.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if c < 3 || c == 4 || c == 6 {
                    format!("{s:<w$}", w = width[c])
                } else {
                    format!("{s:>w$}", w = width[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// MB/s of `bytes` read in `seconds`.
pub fn rate(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MB / seconds
}
