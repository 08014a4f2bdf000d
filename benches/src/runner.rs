//! The measuring protocol. For each system and workload: an untimed check run whose passes hash
//! every byte, then the timed runs; each run starts a fresh instance and reads the workload once
//! per condition of the system (cold first), with the page cache dropped where the condition
//! says, and the serving process's CPU time, peak RSS and counters read around each pass.

use crate::dataset::Dataset;
use crate::host;
use crate::progress::Progress;
use crate::report::{self, Figure, Sample};
use crate::systems::{Condition, System};
use crate::workloads::{self, Workload};
use serde_json::json;
use tokio::runtime::Runtime;

/// All figures of one system on one workload: an untimed checking run, then `runs` timed ones,
/// each from a fresh instance. A failure ends this system's measurements on this workload and is
/// recorded on the figure it happened in.
pub fn measure(
    system: &mut dyn System,
    workload: Workload,
    dataset: &Dataset,
    runs: usize,
    rt: &Runtime,
    progress: &mut Progress,
) -> Vec<Figure> {
    let name = system.name().to_string();
    let conditions = system.conditions();
    let mut figures: Vec<Figure> = conditions
        .iter()
        .map(|c| {
            Figure::new(
                workload.name(),
                workload.counts_files(),
                &name,
                c.label(&name),
            )
        })
        .collect();
    'runs: for run in 0..=runs {
        let check = run == 0;
        if let Err(e) = system.start() {
            figures[0].error = Some(format!("cannot start: {e:#}"));
            break;
        }
        for (i, &condition) in conditions.iter().enumerate() {
            let figure = &mut figures[i];
            let result = one_pass(system, workload, dataset, condition, run, check, rt);
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
                    let rate = format!("{:.0} MB/s", sample.mb_per_s);
                    fields["mb_per_s"] = json!(sample.mb_per_s);
                    if check {
                        figure.verified = true;
                        progress.pass(&format!("{message}: bytes ok ({rate})"), fields);
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

/// One pass in `condition` (hashing every byte if `check`), with the serving process's CPU time,
/// peak RSS and counters read around it.
fn one_pass(
    system: &dyn System,
    workload: Workload,
    dataset: &Dataset,
    condition: Condition,
    run: usize,
    check: bool,
    rt: &Runtime,
) -> anyhow::Result<Sample> {
    if condition.drops_page_cache() {
        host::drop_caches()?;
    }
    let stats = || system.pid().map(host::ProcStats::read).transpose();
    let (before, counters_before) = (stats()?, system.counters());
    let pass = workloads::run_pass(
        workload,
        dataset,
        &system.access(),
        run as u64,
        check,
        rt.handle(),
    )?;
    let (after, counters_after) = (stats()?, system.counters());
    let counters = counters_after
        .into_iter()
        .map(|(k, v)| {
            let delta = v - counters_before.get(&k).copied().unwrap_or(0.0);
            (k, delta)
        })
        .filter(|(_, delta)| *delta != 0.0)
        .collect();
    Ok(Sample {
        seconds: pass.seconds,
        bytes: pass.bytes,
        files: pass.files,
        mb_per_s: report::rate(pass.bytes, pass.seconds),
        files_per_s: pass.files as f64 / pass.seconds,
        cpu_seconds: before
            .zip(after)
            .map(|(b, a)| a.cpu_seconds - b.cpu_seconds),
        peak_rss_bytes: after.map(|a| a.peak_rss_bytes),
        counters,
    })
}
