//! One gang's state, from waiting for its members to bound (see the module above).

use super::plan::*;
use serde::Serialize;
use std::collections::BTreeMap;

/// Where a gang is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GangPhase {
    /// Fewer than `size` members exist.
    WaitingForMembers,
    /// Complete, but the members do not fit on the free GPUs (the reason says why).
    Unschedulable,
    /// Planned, GPUs reserved, the dataset loading onto the planned nodes.
    Warming,
    /// Planned and the data ready (or the ready timeout passed): members may bind.
    Ready,
    /// Every member is bound.
    Bound,
}

impl GangPhase {
    pub const ALL: [GangPhase; 5] = [
        GangPhase::WaitingForMembers,
        GangPhase::Unschedulable,
        GangPhase::Warming,
        GangPhase::Ready,
        GangPhase::Bound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GangPhase::WaitingForMembers => "waiting-for-members",
            GangPhase::Unschedulable => "unschedulable",
            GangPhase::Warming => "warming",
            GangPhase::Ready => "ready",
            GangPhase::Bound => "bound",
        }
    }
}

/// What a gang asks of its pods' scheduling, and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GangSpec {
    pub name: String,
    /// Members that must exist before the gang is planned.
    pub size: usize,
    pub dataset: Option<String>,
    /// Percent of the dataset's bytes on the planned nodes needed before members bind (0-100).
    pub min_ready_percent: u8,
    /// After this long warming, the gang starts anyway.
    pub ready_timeout: Option<Millis>,
}

/// Something a transition did that the driver should tell the world about (a Kubernetes Event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GangEvent {
    /// The data was not ready by the ready timeout; the gang was released without it.
    StartedWithoutData { percent: u8 },
    /// Members were not all bound by the reservation's expiry: the reservation was released.
    ReservationExpired { bound: usize, members: usize },
    /// A planned node disappeared: the plan was dropped.
    NodeGone { node: String },
}

/// The decision for one member's filter call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Only this node.
    Node(String),
    /// No node yet, with the reason.
    Wait(String),
}

/// One gang's state (see the module documentation).
#[derive(Debug, Clone, Serialize)]
pub struct Gang {
    pub spec: GangSpec,
    pub members: BTreeMap<String, Member>,
    pub phase: GangPhase,
    pub plan: Option<GangPlan>,
    /// Why the gang is not placed (unschedulable) or what it last gave up (expiry, node gone).
    pub reason: String,
    /// Pod -> node, for members bound.
    pub bound: BTreeMap<String, String>,
    /// Percent of the dataset ready on the planned nodes (last observed).
    pub ready_percent: Option<f64>,
    /// Released by the ready timeout rather than by the data.
    pub started_without_data: bool,
    pub first_seen: Millis,
    pub complete_at: Option<Millis>,
    pub planned_at: Option<Millis>,
    pub released_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub bound_at: Option<Millis>,
}

impl Gang {
    pub fn new(spec: GangSpec, now: Millis) -> Gang {
        Gang {
            spec,
            members: BTreeMap::new(),
            phase: GangPhase::WaitingForMembers,
            plan: None,
            reason: String::new(),
            bound: BTreeMap::new(),
            ready_percent: None,
            started_without_data: false,
            first_seen: now,
            complete_at: None,
            planned_at: None,
            released_at: None,
            expires_at: None,
            bound_at: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn is_complete(&self) -> bool {
        self.members.len() >= self.spec.size
    }

    /// Adds or updates a member (an unbound pod of the gang).
    pub fn upsert_member(&mut self, member: Member, now: Millis) {
        let is_new = !self.members.contains_key(&member.pod);
        let changed = self.members.get(&member.pod) != Some(&member);
        if changed && self.plan.is_some() && (self.phase != GangPhase::Bound || is_new) {
            // A new member (a replacement pod of a bound gang too), or a member's request
            // changed under the plan: plan again (the unbound members; bound ones stay).
            self.drop_plan();
        }
        self.members.insert(member.pod.clone(), member);
        if self.is_complete() && self.complete_at.is_none() {
            self.complete_at = Some(now);
        }
    }

    /// A member pod is gone. An unbound gang drops its plan (it is planned again when complete).
    pub fn remove_member(&mut self, pod: &str) {
        if self.members.remove(pod).is_none() {
            return;
        }
        let was_bound = self.bound.remove(pod).is_some();
        if self.phase != GangPhase::Bound && !was_bound {
            self.drop_plan();
        }
        if !self.is_complete() && self.phase != GangPhase::Bound {
            self.complete_at = None;
        }
    }

    fn drop_plan(&mut self) {
        self.plan = None;
        self.phase = GangPhase::WaitingForMembers;
        self.ready_percent = None;
        self.started_without_data = false;
        self.planned_at = None;
        self.released_at = None;
        self.expires_at = None;
    }

    /// Complete and not planned: the driver should call [`plan_gang`] and [`Gang::planned`].
    pub fn needs_plan(&self) -> bool {
        self.is_complete()
            && matches!(
                self.phase,
                GangPhase::WaitingForMembers | GangPhase::Unschedulable
            )
    }

    /// The members still to be placed (not bound).
    pub fn unbound_members(&self) -> Vec<Member> {
        self.members
            .values()
            .filter(|m| !self.bound.contains_key(&m.pod))
            .cloned()
            .collect()
    }

    /// Records the planner's answer. `ttl` is how long members have to bind once released.
    pub fn planned(&mut self, result: Result<GangPlan, PlanError>, now: Millis, ttl: Millis) {
        match result {
            Ok(plan) => {
                self.plan = Some(plan);
                self.planned_at = Some(now);
                self.reason.clear();
                if self.spec.dataset.is_some() && self.spec.min_ready_percent > 0 {
                    self.phase = GangPhase::Warming;
                } else {
                    self.release(now, ttl);
                }
            }
            Err(e) => {
                self.plan = None;
                self.phase = GangPhase::Unschedulable;
                self.reason = e.to_string();
            }
        }
    }

    fn release(&mut self, now: Millis, ttl: Millis) {
        self.phase = GangPhase::Ready;
        self.released_at = Some(now);
        self.expires_at = Some(now.saturating_add(ttl));
    }

    /// The dataset's readiness on the planned nodes (percent of their bytes present). Releases
    /// the gang when it reaches the ready percent, or when the ready timeout has passed.
    pub fn observe_data(&mut self, percent: f64, now: Millis, ttl: Millis) -> Option<GangEvent> {
        if self.phase != GangPhase::Warming {
            return None;
        }
        self.ready_percent = Some(percent);
        if percent >= self.spec.min_ready_percent as f64 {
            self.release(now, ttl);
            return None;
        }
        self.check_ready_timeout(now, ttl)
    }

    fn check_ready_timeout(&mut self, now: Millis, ttl: Millis) -> Option<GangEvent> {
        let (Some(timeout), Some(planned)) = (self.spec.ready_timeout, self.planned_at) else {
            return None;
        };
        if self.phase == GangPhase::Warming && now >= planned.saturating_add(timeout) {
            self.started_without_data = true;
            self.release(now, ttl);
            let percent = self.ready_percent.unwrap_or(0.0).clamp(0.0, 100.0) as u8;
            return Some(GangEvent::StartedWithoutData { percent });
        }
        None
    }

    /// Time passes: the ready timeout and the reservation's expiry.
    pub fn tick(&mut self, now: Millis, ttl: Millis) -> Option<GangEvent> {
        if let Some(e) = self.check_ready_timeout(now, ttl) {
            return Some(e);
        }
        if self.phase == GangPhase::Ready && self.expires_at.is_some_and(|e| now >= e) {
            let event = GangEvent::ReservationExpired {
                bound: self.bound.len(),
                members: self.members.len(),
            };
            self.drop_plan();
            self.reason = format!(
                "reservation expired with {} of {} members bound",
                self.bound.len(),
                self.members.len()
            );
            return Some(event);
        }
        None
    }

    /// A member was bound to `node`.
    pub fn member_bound(&mut self, pod: &str, node: &str, now: Millis) {
        if !self.members.contains_key(pod) {
            return;
        }
        self.bound.insert(pod.to_string(), node.to_string());
        if self.is_complete() && self.members.keys().all(|p| self.bound.contains_key(p)) {
            self.phase = GangPhase::Bound;
            self.bound_at.get_or_insert(now);
        }
    }

    /// A node is gone: a plan that used it for an unbound member is dropped (planned again).
    pub fn node_removed(&mut self, node: &str) -> Option<GangEvent> {
        if self.phase == GangPhase::Bound {
            return None;
        }
        let uses = self.plan.as_ref().is_some_and(|p| {
            p.placements
                .iter()
                .any(|(pod, n)| n == node && !self.bound.contains_key(pod))
        });
        if !uses {
            return None;
        }
        self.drop_plan();
        self.reason = format!("planned node {node} disappeared; planning again");
        Some(GangEvent::NodeGone {
            node: node.to_string(),
        })
    }

    /// GPUs the gang holds on each node for members not bound yet (planned, warming or ready).
    pub fn reservations(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        let Some(plan) = &self.plan else {
            return out;
        };
        if !matches!(self.phase, GangPhase::Warming | GangPhase::Ready) {
            return out;
        }
        for (pod, node) in &plan.placements {
            if self.bound.contains_key(pod) {
                continue;
            }
            if let Some(m) = self.members.get(pod) {
                *out.entry(node.clone()).or_insert(0) += m.gpus;
            }
        }
        out
    }

    /// What `pod`'s filter call gets: its planned node once the gang is ready, else why not.
    pub fn verdict(&self, pod: &str) -> Verdict {
        let name = &self.spec.name;
        match self.phase {
            GangPhase::WaitingForMembers => {
                let mut s = format!(
                    "gang {name}: waiting for members ({}/{})",
                    self.members.len(),
                    self.spec.size
                );
                if !self.reason.is_empty() {
                    s.push_str(&format!("; {}", self.reason));
                }
                Verdict::Wait(s)
            }
            GangPhase::Unschedulable => {
                Verdict::Wait(format!("gang {name}: does not fit: {}", self.reason))
            }
            GangPhase::Warming => {
                let nodes = self
                    .plan
                    .as_ref()
                    .map(|p| p.nodes.join(","))
                    .unwrap_or_default();
                let pct = self.ready_percent.unwrap_or(0.0).clamp(0.0, 100.0).floor();
                Verdict::Wait(format!("gang {name}: data {pct:.0}% ready on {nodes}"))
            }
            GangPhase::Ready | GangPhase::Bound => {
                match self.plan.as_ref().and_then(|p| p.placements.get(pod)) {
                    Some(node) => Verdict::Node(node.clone()),
                    None => Verdict::Wait(format!("gang {name}: pod {pod} is not in the plan")),
                }
            }
        }
    }
}

/// Percent of `ready` of `total` bytes, exact at the ends: 100 only when every byte is there.
pub fn ready_percent(ready: u64, total: u64) -> f64 {
    if total == 0 {
        return 100.0;
    }
    if ready >= total {
        return 100.0;
    }
    (ready as f64 * 100.0 / total as f64).min(99.999)
}
