//! The targets of issue 6, each judged on ratios measured in the same run.

use super::{MIB, Report, number};
use crate::profile::Name;
use crate::workloads::Workload;
use serde::Serialize;

/// A target and whether this run meets it (`None`: a figure it needs is missing).
#[derive(Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// Workloads with four concurrent readers, over which the RSS target is judged.
const FOUR_READERS: [Workload; 3] = [
    Workload::Sequential4,
    Workload::Random4,
    Workload::SmallFiles,
];

/// The targets, or none when Granary was not measured or the sizes are too small to judge
/// (`--smoke`: its small files even fit in the epochs' cache).
pub fn evaluate(report: &Report) -> Vec<Target> {
    let granary = report.figures.iter().any(|f| f.system == "granary");
    if !granary || report.profile.name == Name::Smoke {
        return Vec::new();
    }
    let seq = Workload::Sequential1;
    let small = Workload::SmallFiles;
    let granary_cache = "hot-granary-cache";
    let ratio = |workload, mine: (&str, &str), theirs: (&str, &str), min: f64, name: &str| {
        let value = |(system, condition): (&str, &str)| {
            report
                .summary(workload, system, condition)
                .map(|s| s.value.median)
        };
        let (a, b) = (value(mine), value(theirs));
        let ratio = a.zip(b).map(|(a, b)| a / b);
        Target {
            name: name.to_string(),
            measured: match (a, b, ratio) {
                (Some(a), Some(b), Some(r)) => format!(
                    "{r:.2}x ({} vs {} {})",
                    number(a),
                    number(b),
                    workload.unit()
                ),
                _ => "not measured".into(),
            },
            met: ratio.map(|r| r >= min),
        }
    };
    let mut targets = vec![
        ratio(
            seq,
            ("granary", granary_cache),
            ("rclone", "hot-rclone-cache"),
            2.0,
            "hot sequential, from the daemon's cache: >= 2x rclone",
        ),
        ratio(
            seq,
            ("granary", granary_cache),
            ("s3fs", "hot-s3fs-cache"),
            1.0,
            "hot sequential, from the daemon's cache: >= s3fs",
        ),
        ratio(
            seq,
            ("granary", "cold"),
            ("backend", "direct"),
            0.8,
            "cold sequential >= 80% of the raw backend",
        ),
        ratio(
            seq,
            ("granary", "cold"),
            ("s3fs", "cold"),
            1.0,
            "cold sequential >= s3fs",
        ),
        ratio(
            seq,
            ("granary", "cold"),
            ("rclone", "cold"),
            1.0,
            "cold sequential >= rclone",
        ),
        ratio(
            small,
            ("granary", "hot-pagecache"),
            ("native", "hot-pagecache"),
            0.5,
            "small files hot (page cache kept) >= 50% of native",
        ),
        ratio(
            small,
            ("granary", granary_cache),
            ("native", "hot-pagecache"),
            0.5,
            "small files hot (from Granary's cache) >= 50% of native",
        ),
        ratio(
            small,
            ("granary", "cold"),
            ("s3fs", "cold"),
            3.0,
            "small files cold >= 3x s3fs",
        ),
    ];
    let epoch2 = report
        .summary(Workload::Epochs, "granary", "epoch-2")
        .and_then(|s| s.hit_ratio);
    targets.push(Target {
        name: "epochs over 2x the cache: hit ratio >= 0.45 in epoch 2".into(),
        measured: epoch2.map_or("not measured".into(), |h| {
            format!("{:.2} [{:.2}-{:.2}]", h.median, h.min, h.max)
        }),
        met: epoch2.map(|h| h.median >= 0.45),
    });
    let peak = report
        .figures
        .iter()
        .filter(|f| f.system == "granary" && FOUR_READERS.contains(&f.workload))
        .filter_map(|f| f.summary.as_ref()?.peak_rss_bytes)
        .max();
    let limit = report.granary.memory_cache_bytes + 256 * MIB;
    targets.push(Target {
        name: format!(
            "peak RSS with 4 readers <= memory cache + 256 MiB ({} MiB)",
            limit / MIB
        ),
        measured: peak.map_or("not measured".into(), |p| format!("{} MiB", p / MIB)),
        met: peak.map(|p| p <= limit),
    });
    targets
}
