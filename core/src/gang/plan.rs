//! The gang planner: every member placed, or none (see the module above).

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
