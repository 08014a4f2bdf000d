//! Gangs: planning a whole group of pods at once, and the state a gang goes through until every
//! member is bound.
//!
//! **Planning** ([`plan_gang`]) takes the members (GPUs each), and the nodes as the scheduler
//! hook sees them (free GPUs = allocatable minus bound pods minus other gangs' reservations, the
//! node's topology domain, bytes of the gang's dataset already on it) and places every member or
//! none. Among the node sets that fit, it prefers, in this order:
//!
//! 1. the fewest nodes (a training job's collective traffic stays inside as few machines as possible);
//! 2. nodes in one topology domain (zone, rack: the configured label);
//! 3. the most dataset bytes already on the chosen nodes (less to warm before the job starts).
//!
//! Exact bin packing is NP-hard; the planner is exact when members ask for the same number of
//! GPUs (the usual case: one pod per GPU group) and uses best-fit decreasing otherwise. For every
//! candidate pool (each topology domain, then all nodes) it finds the smallest `k` for which the
//! `k` nodes with the most free GPUs fit the gang, then chooses `k` nodes greedily by cached
//! bytes, keeping a node only if the set can still be completed to one that fits. It never
//! over-commits a node and never returns part of a gang (property-tested below).
//!
//! **State** ([`Gang`]): `WaitingForMembers` until `size` members exist; then planned (its
//! GPUs reserved) and `Warming` while the dataset loads onto the planned nodes (or
//! `Unschedulable`, with the reason, when it does not fit); `Ready` when the data on the planned
//! nodes reaches the gang's ready percent (or its ready timeout passes: it starts anyway, and
//! says so); `Bound` when every member is bound. A `Ready` gang whose members are not all bound
//! by the reservation's expiry is released whole and planned again; so is a gang whose planned
//! node disappears. Time is an argument (`now`, milliseconds on any monotonic clock): nothing here
//! reads a clock.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

/// One pod of a gang, as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// `namespace/name`.
    pub pod: String,
    pub gpus: u32,
}

/// A node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeState {
    pub name: String,
    /// GPUs no bound pod and no other gang's reservation holds.
    pub free_gpus: u32,
    /// The value of the topology label (zone, rack), if the node has it.
    pub domain: Option<String>,
    /// Bytes of the gang's dataset already on this node.
    pub dataset_bytes: u64,
}

/// Where each member of a gang goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GangPlan {
    /// Pod -> node.
    pub placements: BTreeMap<String, String>,
    /// The distinct nodes used, sorted.
    pub nodes: Vec<String>,
    /// The topology domain when every node of the plan is in the same one.
    pub domain: Option<String>,
    /// Dataset bytes already on the plan's nodes when it was made.
    pub cached_bytes: u64,
}

/// Why a gang cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the gang has no members to place")]
    NoMembers,
    #[error(
        "{members} pods need {needed} GPUs ({largest} on the largest pod); {free} GPUs are free on {nodes} nodes, at most {most} on one node"
    )]
    DoesNotFit {
        members: usize,
        needed: u64,
        largest: u32,
        free: u64,
        nodes: usize,
        most: u32,
    },
}

/// Best-fit decreasing of `demands` (sorted descending) into `caps`: the index of the node each
/// demand goes to, or `None` when one does not fit. Zero demands go to node 0.
fn best_fit(demands: &[u32], caps: &[u32]) -> Option<Vec<usize>> {
    let mut left = caps.to_vec();
    let mut out = Vec::with_capacity(demands.len());
    for &d in demands {
        if d == 0 {
            out.push(0);
            continue;
        }
        let mut best: Option<usize> = None;
        for (i, &l) in left.iter().enumerate() {
            if l >= d && best.is_none_or(|b| l < left[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        left[b] -= d;
        out.push(b);
    }
    Some(out)
}

/// A feasible choice of nodes in one pool: indexes into the pool, and each demand's node.
struct Choice {
    nodes: Vec<usize>,
    assign: Vec<usize>,
}

fn plan_in_pool(demands: &[u32], pool: &[&NodeState]) -> Option<Choice> {
    if pool.is_empty() {
        return None;
    }
    let needed: u64 = demands.iter().map(|&d| d as u64).sum();
    let free: u64 = pool.iter().map(|n| n.free_gpus as u64).sum();
    if free < needed {
        return None;
    }
    // Pool indexes by free GPUs (most first), then bytes, then name.
    let mut by_cap: Vec<usize> = (0..pool.len()).collect();
    by_cap.sort_by(|&a, &b| {
        let (x, y) = (pool[a], pool[b]);
        y.free_gpus
            .cmp(&x.free_gpus)
            .then(y.dataset_bytes.cmp(&x.dataset_bytes))
            .then(x.name.cmp(&y.name))
    });
    let fits = |set: &[usize]| -> Option<Vec<usize>> {
        let caps: Vec<u32> = set.iter().map(|&i| pool[i].free_gpus).collect();
        best_fit(demands, &caps)
    };
    // The fewest nodes: the smallest prefix of by_cap that fits (no set of fewer nodes has more
    // free GPUs, so none smaller can fit when demands are uniform).
    let mut k = 1;
    let mut sum = 0u64;
    for &i in &by_cap {
        sum += pool[i].free_gpus as u64;
        if sum >= needed {
            break;
        }
        k += 1;
    }
    let k = loop {
        if k > by_cap.len() {
            return None;
        }
        if fits(&by_cap[..k]).is_some() {
            break k;
        }
        k += 1;
    };
    // k nodes with the most cached bytes, keeping only choices that can still be completed.
    let mut by_bytes: Vec<usize> = (0..pool.len()).collect();
    by_bytes.sort_by(|&a, &b| {
        let (x, y) = (pool[a], pool[b]);
        y.dataset_bytes
            .cmp(&x.dataset_bytes)
            .then(y.free_gpus.cmp(&x.free_gpus))
            .then(x.name.cmp(&y.name))
    });
    let mut chosen: Vec<usize> = Vec::with_capacity(k);
    let complete = |chosen: &[usize]| -> Vec<usize> {
        let mut set = chosen.to_vec();
        set.extend(
            by_cap
                .iter()
                .filter(|i| !chosen.contains(i))
                .take(k - chosen.len()),
        );
        set
    };
    for &c in &by_bytes {
        if chosen.len() == k {
            break;
        }
        if pool[c].free_gpus == 0 && demands.iter().all(|&d| d > 0) {
            continue;
        }
        chosen.push(c);
        if fits(&complete(&chosen)).is_none() {
            chosen.pop();
        }
    }
    let nodes = complete(&chosen);
    let assign = fits(&nodes)?;
    Some(Choice { nodes, assign })
}

/// Places every member of a gang on `nodes`, or none (see the module documentation).
pub fn plan_gang(members: &[Member], nodes: &[NodeState]) -> Result<GangPlan, PlanError> {
    if members.is_empty() {
        return Err(PlanError::NoMembers);
    }
    // Members by GPUs, largest first (then name, so plans are deterministic).
    let mut order: Vec<&Member> = members.iter().collect();
    order.sort_by(|a, b| b.gpus.cmp(&a.gpus).then(a.pod.cmp(&b.pod)));
    let demands: Vec<u32> = order.iter().map(|m| m.gpus).collect();

    let mut domains: BTreeMap<&str, Vec<&NodeState>> = BTreeMap::new();
    for n in nodes {
        if let Some(d) = &n.domain {
            domains.entry(d.as_str()).or_default().push(n);
        }
    }
    let mut pools: Vec<Vec<&NodeState>> = domains.into_values().collect();
    pools.push(nodes.iter().collect());

    // (nodes used, not one domain, -bytes, node names): the smallest wins.
    type Rank = (usize, bool, std::cmp::Reverse<u64>, Vec<String>);
    let mut best: Option<(Rank, GangPlan)> = None;
    for pool in &pools {
        let Some(choice) = plan_in_pool(&demands, pool) else {
            continue;
        };
        let used: BTreeSet<usize> = choice.assign.iter().map(|&a| choice.nodes[a]).collect();
        // Zero-GPU members went to the choice's first node, which the set always uses.
        let names: Vec<String> = {
            let mut v: Vec<String> = used.iter().map(|&i| pool[i].name.clone()).collect();
            v.sort();
            v
        };
        let domain_values: BTreeSet<Option<&String>> =
            used.iter().map(|&i| pool[i].domain.as_ref()).collect();
        let domain = match domain_values.iter().next() {
            Some(Some(d)) if domain_values.len() == 1 => Some((*d).clone()),
            _ => None,
        };
        let cached: u64 = used.iter().map(|&i| pool[i].dataset_bytes).sum();
        let placements = order
            .iter()
            .zip(&choice.assign)
            .map(|(m, &a)| (m.pod.clone(), pool[choice.nodes[a]].name.clone()))
            .collect();
        let rank = (
            names.len(),
            domain.is_none(),
            std::cmp::Reverse(cached),
            names.clone(),
        );
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((
                rank,
                GangPlan {
                    placements,
                    nodes: names,
                    domain,
                    cached_bytes: cached,
                },
            ));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| PlanError::DoesNotFit {
        members: members.len(),
        needed: demands.iter().map(|&d| d as u64).sum(),
        largest: demands[0],
        free: nodes.iter().map(|n| n.free_gpus as u64).sum(),
        nodes: nodes.len(),
        most: nodes.iter().map(|n| n.free_gpus).max().unwrap_or(0),
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, free: u32, domain: Option<&str>, bytes: u64) -> NodeState {
        NodeState {
            name: name.into(),
            free_gpus: free,
            domain: domain.map(Into::into),
            dataset_bytes: bytes,
        }
    }

    fn members(n: usize, gpus: u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                pod: format!("ns/p{i}"),
                gpus,
            })
            .collect()
    }

    #[test]
    fn fewest_nodes_first_then_bytes() {
        let nodes = vec![
            node("a", 4, None, 0),
            node("b", 4, None, 500),
            node("c", 8, None, 0),
            node("d", 4, None, 900),
        ];
        // 4 x 2 GPUs fit on c alone: one node beats the bytes on b and d.
        let p = plan_gang(&members(4, 2), &nodes).unwrap();
        assert_eq!(p.nodes, vec!["c"]);
        // 6 x 2 = 12 GPUs: two nodes (c + one 4), the one with the most bytes (d).
        let p = plan_gang(&members(6, 2), &nodes).unwrap();
        assert_eq!(p.nodes, vec!["c", "d"]);
        assert_eq!(p.cached_bytes, 900);
    }

    #[test]
    fn most_bytes_among_equal_node_counts() {
        let nodes = vec![
            node("w1", 4, None, 0),
            node("w2", 4, None, 300),
            node("w3", 4, None, 200),
            node("w4", 4, None, 0),
        ];
        let p = plan_gang(&members(4, 2), &nodes).unwrap();
        assert_eq!(p.nodes, vec!["w2", "w3"]);
        assert_eq!(p.cached_bytes, 500);
        let on: Vec<&String> = p.placements.values().collect();
        assert_eq!(on.iter().filter(|n| n.as_str() == "w2").count(), 2);
    }

    #[test]
    fn one_domain_beats_bytes_across_domains() {
        let nodes = vec![
            node("a1", 4, Some("a"), 1000),
            node("b1", 4, Some("b"), 1000),
            node("b2", 4, Some("b"), 0),
        ];
        let p = plan_gang(&members(4, 2), &nodes).unwrap();
        assert_eq!(p.nodes, vec!["b1", "b2"]);
        assert_eq!(p.domain.as_deref(), Some("b"));
    }

    #[test]
    fn too_big_a_gang_is_refused_whole() {
        let nodes: Vec<NodeState> = (1..=4)
            .map(|i| node(&format!("w{i}"), 4, None, 0))
            .collect();
        let e = plan_gang(&members(5, 4), &nodes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "5 pods need 20 GPUs (4 on the largest pod); 16 GPUs are free on 4 nodes, at most 4 on one node"
        );
        // Enough GPUs in all, but no node has 3 free.
        let nodes = vec![node("a", 2, None, 0), node("b", 2, None, 0)];
        assert!(plan_gang(&members(1, 3), &nodes).is_err());
        assert_eq!(plan_gang(&[], &nodes), Err(PlanError::NoMembers));
    }

    #[test]
    fn mixed_requests_and_zero_gpu_members() {
        let nodes = vec![node("a", 8, None, 0), node("b", 4, None, 10)];
        let mut ms = vec![
            Member {
                pod: "ns/big".into(),
                gpus: 6,
            },
            Member {
                pod: "ns/small".into(),
                gpus: 4,
            },
            Member {
                pod: "ns/launcher".into(),
                gpus: 0,
            },
        ];
        let p = plan_gang(&ms, &nodes).unwrap();
        assert_eq!(p.placements["ns/big"], "a");
        assert_eq!(p.placements["ns/small"], "b");
        assert_eq!(p.placements.len(), 3);
        ms.truncate(1);
        ms[0].gpus = 0;
        let p = plan_gang(&ms, &nodes).unwrap();
        assert_eq!(p.nodes, vec!["b"], "a GPU-less gang goes where the data is");
    }

    fn spec(size: usize, dataset: bool) -> GangSpec {
        GangSpec {
            name: "g".into(),
            size,
            dataset: dataset.then(|| "ds".into()),
            min_ready_percent: 100,
            ready_timeout: None,
        }
    }

    fn four_nodes() -> Vec<NodeState> {
        (1..=4)
            .map(|i| node(&format!("w{i}"), 4, None, 0))
            .collect()
    }

    #[test]
    fn lifecycle_waiting_warming_ready_bound() {
        let mut g = Gang::new(spec(2, true), 0);
        for m in members(1, 2) {
            g.upsert_member(m, 10);
        }
        assert!(!g.needs_plan());
        assert_eq!(
            g.verdict("ns/p0"),
            Verdict::Wait("gang g: waiting for members (1/2)".into())
        );
        for m in members(2, 2) {
            g.upsert_member(m, 20);
        }
        assert!(g.needs_plan());
        assert_eq!(g.complete_at, Some(20));
        let plan = plan_gang(&g.unbound_members(), &four_nodes()).unwrap();
        g.planned(Ok(plan), 30, 1000);
        assert_eq!(g.phase, GangPhase::Warming);
        assert_eq!(g.reservations().values().sum::<u32>(), 4);
        assert_eq!(g.observe_data(63.4, 40, 1000), None);
        assert_eq!(
            g.verdict("ns/p0"),
            Verdict::Wait("gang g: data 63% ready on w1".into())
        );
        g.observe_data(100.0, 50, 1000);
        assert_eq!(g.phase, GangPhase::Ready);
        assert_eq!(g.expires_at, Some(1050));
        assert_eq!(g.verdict("ns/p1"), Verdict::Node("w1".into()));
        g.member_bound("ns/p0", "w1", 60);
        assert_eq!(g.reservations().values().sum::<u32>(), 2);
        g.member_bound("ns/p1", "w1", 70);
        assert_eq!(g.phase, GangPhase::Bound);
        assert_eq!(g.bound_at, Some(70));
        assert!(g.reservations().is_empty());
        assert_eq!(g.tick(5000, 1000), None, "a bound gang never expires");
    }

    #[test]
    fn a_replacement_pod_of_a_bound_gang_is_planned() {
        let mut g = Gang::new(spec(2, false), 0);
        for m in members(2, 2) {
            g.upsert_member(m, 0);
        }
        g.planned(plan_gang(&g.unbound_members(), &four_nodes()), 0, 1000);
        g.member_bound("ns/p0", "w1", 1);
        g.member_bound("ns/p1", "w1", 2);
        assert_eq!(g.phase, GangPhase::Bound);
        // The same members seen again change nothing.
        for m in members(2, 2) {
            g.upsert_member(m, 3);
        }
        assert_eq!(g.phase, GangPhase::Bound);
        // p1 fails and its controller makes p2.
        g.remove_member("ns/p1");
        assert_eq!(g.phase, GangPhase::Bound);
        g.upsert_member(
            Member {
                pod: "ns/p2".into(),
                gpus: 2,
            },
            4,
        );
        assert!(g.needs_plan());
        assert_eq!(g.unbound_members().len(), 1);
        g.planned(plan_gang(&g.unbound_members(), &four_nodes()), 5, 1000);
        assert!(matches!(g.verdict("ns/p2"), Verdict::Node(_)));
    }

    #[test]
    fn unschedulable_then_planned_when_room_appears() {
        let mut g = Gang::new(spec(5, false), 0);
        for m in members(5, 4) {
            g.upsert_member(m, 0);
        }
        g.planned(plan_gang(&g.unbound_members(), &four_nodes()), 1, 100);
        assert_eq!(g.phase, GangPhase::Unschedulable);
        assert!(g.reservations().is_empty());
        match g.verdict("ns/p3") {
            Verdict::Wait(r) => assert!(r.starts_with("gang g: does not fit: 5 pods need 20 GPUs")),
            v => panic!("{v:?}"),
        }
        assert!(g.needs_plan());
        let mut nodes = four_nodes();
        nodes.push(node("w5", 4, None, 0));
        g.planned(plan_gang(&g.unbound_members(), &nodes), 2, 100);
        assert_eq!(g.phase, GangPhase::Ready, "no dataset: released at once");
    }

    #[test]
    fn reservation_expiry_releases_the_whole_gang() {
        let mut g = Gang::new(spec(2, false), 0);
        for m in members(2, 2) {
            g.upsert_member(m, 0);
        }
        g.planned(plan_gang(&g.unbound_members(), &four_nodes()), 100, 1000);
        g.member_bound("ns/p0", "w1", 200);
        assert_eq!(g.tick(1099, 1000), None);
        assert_eq!(
            g.tick(1100, 1000),
            Some(GangEvent::ReservationExpired {
                bound: 1,
                members: 2
            })
        );
        assert_eq!(g.phase, GangPhase::WaitingForMembers);
        assert!(g.reservations().is_empty());
        assert!(g.needs_plan(), "planned again");
        assert_eq!(g.unbound_members().len(), 1, "only the unbound member");
    }

    #[test]
    fn ready_timeout_starts_without_data() {
        let mut s = spec(1, true);
        s.ready_timeout = Some(500);
        let mut g = Gang::new(s, 0);
        g.upsert_member(members(1, 1).remove(0), 0);
        g.planned(plan_gang(&g.unbound_members(), &four_nodes()), 0, 1000);
        assert_eq!(g.observe_data(10.0, 499, 1000), None);
        assert_eq!(
            g.observe_data(12.0, 500, 1000),
            Some(GangEvent::StartedWithoutData { percent: 12 })
        );
        assert_eq!(g.phase, GangPhase::Ready);
        assert!(g.started_without_data);
    }

    #[test]
    fn planned_node_gone_or_member_gone_drops_the_plan() {
        let mut g = Gang::new(spec(2, true), 0);
        for m in members(2, 4) {
            g.upsert_member(m, 0);
        }
        g.planned(plan_gang(&g.unbound_members(), &four_nodes()), 0, 1000);
        let planned = g.plan.as_ref().unwrap().nodes.clone();
        assert_eq!(g.node_removed("elsewhere"), None);
        assert!(matches!(
            g.node_removed(&planned[0]),
            Some(GangEvent::NodeGone { .. })
        ));
        assert!(g.needs_plan());
        g.planned(plan_gang(&g.unbound_members(), &four_nodes()), 1, 1000);
        g.remove_member("ns/p1");
        assert_eq!(g.phase, GangPhase::WaitingForMembers);
        assert!(g.plan.is_none());
        assert!(!g.needs_plan());
    }

    #[test]
    fn percent_is_exact_at_the_ends() {
        assert_eq!(ready_percent(0, 0), 100.0);
        assert_eq!(ready_percent(10, 10), 100.0);
        assert!(ready_percent(999_999_999, 1_000_000_000) < 100.0);
        assert_eq!(ready_percent(0, 10), 0.0);
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeState>> {
        prop::collection::vec((0u32..9, 0u8..4, 0u64..1000), 1..12).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (free, d, bytes))| NodeState {
                    name: format!("n{i:02}"),
                    free_gpus: free,
                    domain: (d < 3).then(|| format!("z{d}")),
                    dataset_bytes: bytes,
                })
                .collect()
        })
    }

    fn arb_members() -> impl Strategy<Value = Vec<Member>> {
        prop::collection::vec(0u32..5, 1..10).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, gpus)| Member {
                    pod: format!("ns/m{i}"),
                    gpus,
                })
                .collect()
        })
    }

    proptest! {
        /// Never over-commits a node, never places part of a gang, only uses nodes it was given.
        #[test]
        fn never_overcommits_never_partial(nodes in arb_nodes(), ms in arb_members()) {
            match plan_gang(&ms, &nodes) {
                Ok(plan) => {
                    prop_assert_eq!(plan.placements.len(), ms.len());
                    let mut used: BTreeMap<&str, u32> = BTreeMap::new();
                    for m in &ms {
                        let n = plan.placements.get(&m.pod);
                        prop_assert!(n.is_some(), "{} not placed", m.pod);
                        *used.entry(n.unwrap().as_str()).or_default() += m.gpus;
                    }
                    for (name, gpus) in used {
                        let n = nodes.iter().find(|n| n.name == name);
                        prop_assert!(n.is_some());
                        prop_assert!(gpus <= n.unwrap().free_gpus, "{} over-committed", name);
                    }
                    let mut distinct: Vec<String> = plan.placements.values().cloned().collect();
                    distinct.sort();
                    distinct.dedup();
                    prop_assert_eq!(distinct, plan.nodes);
                }
                Err(PlanError::DoesNotFit { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        /// With uniform requests the planner finds a plan whenever one exists, on the fewest nodes.
        #[test]
        fn uniform_gangs_fit_when_they_can_on_the_fewest_nodes(
            nodes in arb_nodes(), n in 1usize..10, g in 1u32..5
        ) {
            let ms = members(n, g);
            let mut slots: Vec<usize> = nodes.iter().map(|x| (x.free_gpus / g) as usize).collect();
            slots.sort_unstable_by(|a, b| b.cmp(a));
            let total: usize = slots.iter().sum();
            let result = plan_gang(&ms, &nodes);
            if total < n {
                prop_assert!(result.is_err());
            } else {
                let plan = result.unwrap();
                let mut k = 0;
                let mut acc = 0;
                while acc < n { acc += slots[k]; k += 1; }
                prop_assert_eq!(plan.nodes.len(), k);
            }
        }

        /// A gang's reservations plus its bound members never exceed its plan, whatever happens.
        #[test]
        fn state_machine_keeps_reservations_within_the_plan(
            nodes in arb_nodes(), ms in arb_members(), steps in prop::collection::vec(0u8..5, 0..20)
        ) {
            let mut g = Gang::new(GangSpec { name: "g".into(), size: ms.len(), dataset: Some("d".into()),
                min_ready_percent: 100, ready_timeout: Some(50) }, 0);
            for m in &ms { g.upsert_member(m.clone(), 0); }
            let mut now = 0;
            for s in steps {
                now += 20;
                match s {
                    0 => if g.needs_plan() { g.planned(plan_gang(&g.unbound_members(), &nodes), now, 100); },
                    1 => { g.observe_data(100.0, now, 100); }
                    2 => { g.tick(now, 100); }
                    3 => {
                        let first = g.plan.as_ref().and_then(|p| p.placements.iter().next());
                        if let Some((pod, node)) = first.map(|(a, b)| (a.clone(), b.clone()))
                            && g.phase == GangPhase::Ready
                        {
                            g.member_bound(&pod, &node, now);
                        }
                    }
                    _ => { let n = nodes[0].name.clone(); g.node_removed(&n); }
                }
                let res = g.reservations();
                for (node, gpus) in &res {
                    let free = nodes.iter().find(|n| &n.name == node).unwrap().free_gpus;
                    prop_assert!(*gpus <= free);
                }
                if g.phase == GangPhase::Ready || g.phase == GangPhase::Warming {
                    prop_assert!(g.plan.is_some());
                }
            }
        }
    }
}
