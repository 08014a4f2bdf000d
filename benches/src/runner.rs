//! The measuring protocol. For each system and workload: an untimed check run whose passes compare
//! every byte with the dataset, then the timed runs; each run starts a fresh instance and reads
//! the workload once per condition (cold first), with the page cache dropped where the condition
//! says, and the serving process's CPU time, peak RSS and counters read around each pass.

use crate::dataset::Dataset;
use crate::host;
use crate::profile::Profile;
use crate::progress::Progress;
use crate::report::{Figure, Sample};
use crate::systems::{Condition, System};
use crate::workloads::{self, Workload};
use serde_json::json;
use tokio::runtime::Runtime;

/// All figures of one system on one workload (none if it is not measured there): an untimed
/// checking run, then `profile.runs` timed ones, each from a fresh instance. A failure ends this
/// system's measurements on this workload and is recorded on the figure it happened in.
pub fn measure(
    system: &mut dyn System,
    workload: Workload,
    dataset: &Dataset,
    profile: &Profile,
    rt: &Runtime,
    progress: &mut Progress,
) -> Vec<Figure> {
    let conditions = workload.conditions(system.kind());
    if conditions.is_empty() {
        return Vec::new();
    }
    let name = system.name().to_string();
    let mut figures: Vec<Figure> = conditions
        .iter()
        .map(|c| Figure::new(workload, &name, c.label(&name)))
        .collect();
    let runs = profile.runs;
    'runs: for run in 0..=runs {
        let check = run == 0;
        if let Err(e) = system.start(workload) {
            figures[0].error = Some(format!("cannot start: {e:#}"));
            break;
        }
        for (i, &condition) in conditions.iter().enumerate() {
            let figure = &mut figures[i];
            let pass = Pass {
                workload,
                condition,
                run,
                check,
            };
            let result = one_pass(system, &pass, dataset, profile, rt);
            let what = if check {
                "check".to_string()
            } else {
                format!("run {run}/{runs}")
            };
            let message = format!("{} {name} {} {what}", workload.name(), figure.condition);
            let mut fields = json!({
                "workload": workload.name(), "system": name, "condition": figure.condition,
                "run": run, "check": check,
            });
            match result {
                Ok(sample) => {
                    let rate = sample.headline(workload);
                    fields["mb_per_s"] = json!(sample.mb_per_s);
                    fields["ops_per_s"] = json!(sample.ops_per_s);
                    if check {
                        figure.verified = true;
                        progress.pass(&format!("{message}: verified ({rate})"), fields);
                    } else {
                        progress.pass(&format!("{message}: {rate}"), fields);
                        figure.samples.push(sample);
                    }
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    progress.pass(&format!("{message}: FAILED: {e}"), fields);
                    figure.error = Some(e);
                    break 'runs;
                }
            }
        }
    }
    system.stop();
    figures
}

/// Which pass of a run.
struct Pass {
    workload: Workload,
    condition: Condition,
    run: usize,
    /// Whether this is the untimed pass that compares every byte.
    check: bool,
}

impl Pass {
    /// Picks the shuffles and offsets: the same for every condition of a run (a hot pass reads
    /// what the cold one did), except that every epoch has its own order.
    fn seed(&self) -> u64 {
        let epoch = match self.condition {
            Condition::Epoch(n) => u64::from(n),
            _ => 0,
        };
        (self.run as u64) << 8 | epoch
    }
}

/// One pass, with the serving process's CPU time, peak RSS and counters read around it.
fn one_pass(
    system: &dyn System,
    pass: &Pass,
    dataset: &Dataset,
    profile: &Profile,
    rt: &Runtime,
) -> anyhow::Result<Sample> {
    let job = pass.workload.job(dataset, profile, pass.seed());
    if pass.condition.drops_page_cache() {
        host::drop_caches()?;
    }
    let stats = || system.pid().map(host::ProcStats::read).transpose();
    let (before, counters_before) = (stats()?, system.counters());
    let timed = workloads::run_pass(&job, dataset, &system.access(), pass.check, rt.handle())?;
    let (after, counters_after) = (stats()?, system.counters());
    let counters = counters_after
        .into_iter()
        .map(|(k, v)| {
            let delta = v - counters_before.get(&k).copied().unwrap_or(0.0);
            (k, delta)
        })
        .filter(|(_, delta)| *delta != 0.0)
        .collect();
    Ok(Sample::new(
        &timed,
        before
            .zip(after)
            .map(|(b, a)| a.cpu_seconds - b.cpu_seconds),
        after.map(|a| a.peak_rss_bytes),
        counters,
    ))
}
