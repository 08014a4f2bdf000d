//! What the hook tells about its gangs: `/gangs`, the per-phase gauge, released gangs' waits.

use super::*;

impl HookState {
    /// Wait times of gangs released since the last call (seconds from complete to release).
    pub fn take_released(&mut self) -> Vec<f64> {
        std::mem::take(&mut self.released)
    }

    /// Gangs per phase.
    pub fn gangs_by_phase(&self) -> BTreeMap<&'static str, usize> {
        let mut out: BTreeMap<&'static str, usize> =
            GangPhase::ALL.iter().map(|p| (p.as_str(), 0)).collect();
        for e in self.gangs.values() {
            *out.entry(e.gang.phase.as_str()).or_insert(0) += 1;
        }
        out
    }

    pub fn gang_reports(&self, now: Millis) -> Vec<GangReport> {
        self.gangs
            .values()
            .map(|e| {
                let g = &e.gang;
                let waiting_secs = g
                    .complete_at
                    .map(|c| g.released_at.unwrap_or(now).saturating_sub(c) as f64 / 1000.0);
                let mut reason = g.reason.clone();
                if let Some(d) = &g.spec.dataset
                    && let Some(err) = self.dataset_errors.get(d)
                {
                    if !reason.is_empty() {
                        reason.push_str("; ");
                    }
                    reason.push_str(&format!("dataset {d}: {err}"));
                }
                GangReport {
                    namespace: e.namespace.clone(),
                    name: g.spec.name.clone(),
                    source: e.source,
                    state: g.phase.as_str(),
                    size: g.spec.size,
                    members: g.members.len(),
                    bound: g.bound.len(),
                    dataset: g.spec.dataset.clone(),
                    min_ready_percent: g.spec.min_ready_percent,
                    ready_percent: g.ready_percent,
                    plan: g.plan.as_ref().map(|p| p.placements.clone()),
                    nodes: g.plan.as_ref().map(|p| p.nodes.clone()).unwrap_or_default(),
                    domain: g.plan.as_ref().and_then(|p| p.domain.clone()),
                    cached_bytes_at_plan: g.plan.as_ref().map(|p| p.cached_bytes),
                    reason,
                    started_without_data: g.started_without_data,
                    waiting_secs,
                    reservation_expires_in_secs: g
                        .expires_at
                        .filter(|_| g.phase == GangPhase::Ready)
                        .map(|e| e.saturating_sub(now) as f64 / 1000.0),
                }
            })
            .collect()
    }
}
