//! The report as text: one row per figure, the issue-6 targets, and whatever went wrong.

use super::{MIB, Report, number};
use crate::s3::Flavor;
use crate::workloads::Workload;

const HEADER: [&str; 14] = [
    "workload",
    "system",
    "condition",
    "value",
    "[min-max]",
    "unit",
    "MB/s",
    "p50 ms",
    "p99 ms",
    "hit",
    "vs native",
    "vs backend",
    "peak RSS",
    "CPU s",
];

/// Columns aligned left (the others are numbers, aligned right).
const LEFT: [usize; 5] = [0, 1, 2, 4, 5];

pub fn render(report: &Report) -> String {
    let mut rows = vec![HEADER.map(String::from).to_vec()];
    let mut problems = Vec::new();
    for f in &report.figures {
        let mut row = vec![
            f.workload.name().to_string(),
            f.system.clone(),
            f.condition.clone(),
        ];
        match &f.summary {
            Some(s) => {
                let opt = |x: Option<f64>| x.map_or("-".into(), number);
                let moves_data = !matches!(
                    f.workload,
                    Workload::FirstByte | Workload::Stat | Workload::List
                );
                row.extend([
                    number(s.value.median),
                    format!("[{}-{}]", number(s.value.min), number(s.value.max)),
                    f.unit.to_string(),
                    opt(moves_data.then_some(s.mb_per_s.median)),
                    opt(s.p50_ms.map(|p| p.median)),
                    opt(s.p99_ms.map(|p| p.median)),
                    s.hit_ratio
                        .map_or("-".into(), |h| format!("{:.2}", h.median)),
                    s.vs_native.map_or("-".into(), |r| format!("{r:.2}")),
                    s.vs_backend.map_or("-".into(), |r| format!("{r:.2}")),
                    s.peak_rss_bytes
                        .map_or("-".into(), |b| format!("{} MiB", b / MIB)),
                    opt(s.cpu_seconds.map(|c| c.median)),
                ]);
            }
            None => row.push("not measured".into()),
        }
        let what = format!("{} / {} / {}", f.workload.name(), f.system, f.condition);
        if let Some(e) = &f.error {
            problems.push(format!("{what}: {}", e.replace('\n', "\n      ")));
        } else if !f.verified {
            problems.push(format!("{what}: bytes not verified"));
        } else if f.samples.is_empty() {
            problems.push(format!("{what}: no timed run"));
        }
        rows.push(row);
    }
    let p = &report.profile;
    let mut out = format!(
        "granary-bench --{}: {} MiB file, {} files of {} KiB, S3 server {}, granary {} \
         (memory cache {} MiB, disk cache {} MiB; epochs: {} MiB, no disk)\n\n",
        p.label(),
        p.shape.large_bytes / MIB,
        p.shape.small_count,
        p.shape.small_bytes >> 10,
        report.s3.name(),
        report.granary.git,
        report.granary.memory_cache_bytes / MIB,
        report.granary.disk_cache_bytes / MIB,
        report.granary.epochs_memory_cache_bytes / MIB,
    );
    out.push_str(&aligned(&rows, &LEFT));
    out.push_str(&format!(
        "\nvalue: median of {} runs [min-max]; MB = 10^6 bytes; vs native / vs backend: how many \
         times faster (for first-byte: lower latency)\nthan native in the same state and than the \
         raw backend; hit: Granary's cache hits over its block reads. Every figure was checked\n\
         byte for byte in an untimed pass{}.\n",
        p.runs,
        if problems.is_empty() {
            ""
        } else {
            ", except as listed below"
        }
    ));
    if report.s3 == Flavor::Moto {
        out.push_str(
            "Note: moto reads the whole object for every ranged GET, so the large file's cold and \
             backend figures measure moto\n(bytes per request), not the clients: use --s3 ceph for \
             those.\n",
        );
    }
    if !report.targets.is_empty() {
        out.push_str("\nIssue-6 targets:\n");
        for t in &report.targets {
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

/// `rows` as columns: those in `left` (text) aligned left, the others (numbers) right.
pub fn aligned(rows: &[Vec<String>], left: &[usize]) -> String {
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
                if left.contains(&c) {
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
