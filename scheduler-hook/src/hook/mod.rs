//! The hook's view of the cluster and its decisions.
//!
//! [`HookState`] is plain data driven by the caller: the cluster watch feeds it nodes, pods and
//! PodGroup sizes; the data loop feeds it dataset views; the extender's verbs ask it questions;
//! [`HookState::reconcile`] (every half second, with `now`) moves gangs through their states
//! (`core::gang`) and returns what the driver must do in the world ([`Action`]: load a dataset
//! onto planned nodes, note a gang's phase on its pods so that the scheduler retries them, emit
//! an Event). Nothing here does I/O or reads a clock.
//!
//! GPU accounting: a node's free GPUs are its allocatable `nvidia.com/gpu` minus the requests of
//! pods bound to it (not finished) minus the GPUs other gangs hold in reservations. Pods without
//! a gang are kept off reserved GPUs, so a planned gang keeps its GPUs until it binds or its
//! reservation expires.
//!
//! Reservations are bounded: a gang is planned (and holds GPUs) only once the scheduler has
//! asked about each of its unbound members (a filter call), again after each expiry; warming
//! lasts at most [`HookConfig::max_warming`], and a released gang has the reservation TTL to
//! bind. Pods the scheduler never places (another scheduler's, or abandoned) hold nothing.

mod reconcile;
mod report;

use crate::data::DatasetView;
use crate::extender::HostPriority;
use crate::pod::{GangSource, Intent};
use granary_core::gang::{
    Gang, GangEvent, GangPhase, GangSpec, Member, Millis, NodeState, Verdict,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Settings of the hook's decisions.
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// How long a ready gang's members have to bind before its reservation is released.
    pub reservation_ttl: Duration,
    /// The node label whose value is the topology domain (zone, rack).
    pub topology_key: String,
    /// A dataset view older than this is fetched again before scoring a pod with it.
    pub data_max_age: Duration,
    /// How often a load onto a gang's nodes is asked again while the pin is elsewhere.
    pub load_retry: Duration,
    /// The longest a gang warms (holding its GPUs) before it starts without its data; a gang's
    /// `granary.io/ready-timeout` may be shorter, not longer.
    pub max_warming: Duration,
}

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            reservation_ttl: Duration::from_secs(300),
            topology_key: "topology.kubernetes.io/zone".into(),
            data_max_age: Duration::from_secs(2),
            load_retry: Duration::from_secs(5),
            max_warming: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct NodeInfo {
    gpus: u32,
    domain: Option<String>,
}

/// Something the driver must do outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Load `dataset` onto exactly `nodes`.
    Load { dataset: String, nodes: Vec<String> },
    /// Write the gang's phase on a member pod (`granary.io/gang-phase`): the scheduler retries
    /// an unschedulable pod when it changes.
    Note {
        namespace: String,
        pod: String,
        phase: String,
    },
    /// An Event on a member pod.
    Event {
        namespace: String,
        pod: String,
        reason: String,
        message: String,
    },
}

/// The answer to a filter call: candidate indexes that pass, and why the others fail.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FilterAnswer {
    pub pass: Vec<usize>,
    pub failed: BTreeMap<String, String>,
}

/// A gang as `GET /gangs` shows it.
#[derive(Debug, serde::Serialize)]
pub struct GangReport {
    pub namespace: String,
    pub name: String,
    pub source: GangSource,
    pub state: &'static str,
    pub size: usize,
    pub members: usize,
    pub bound: usize,
    pub dataset: Option<String>,
    pub min_ready_percent: u8,
    pub ready_percent: Option<f64>,
    pub plan: Option<BTreeMap<String, String>>,
    pub nodes: Vec<String>,
    pub domain: Option<String>,
    pub cached_bytes_at_plan: Option<u64>,
    pub reason: String,
    pub started_without_data: bool,
    /// Seconds since the gang was complete (all members seen), until it was released.
    pub waiting_secs: Option<f64>,
    pub reservation_expires_in_secs: Option<f64>,
}

struct GangEntry {
    gang: Gang,
    namespace: String,
    source: GangSource,
    /// When the gang last lost its reservation (expired, node gone): it is planned again only
    /// after the scheduler has asked about each unbound member since.
    gave_up_at: Option<Millis>,
}

/// The hook's state (see the module documentation).
pub struct HookState {
    config: HookConfig,
    nodes: HashMap<String, NodeInfo>,
    pods: HashMap<String, Intent>,
    /// GPUs held by bound, unfinished pods, per node.
    used: HashMap<String, u32>,
    /// `namespace/name` -> minMember, from PodGroup objects.
    pod_groups: HashMap<String, usize>,
    gangs: BTreeMap<String, GangEntry>,
    datasets: HashMap<String, (DatasetView, Millis)>,
    dataset_errors: HashMap<String, String>,
    loads_asked: HashMap<String, (Vec<String>, Millis)>,
    /// Gang wait times (complete -> released) observed since the last call, seconds.
    released: Vec<f64>,
    /// Pod key -> when the scheduler last asked about it (a filter call); only pods in `pods`.
    asked: HashMap<String, Millis>,
}

fn ms(d: Duration) -> Millis {
    d.as_millis() as Millis
}

fn gang_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("default", key))
}

impl HookState {
    pub fn new(config: HookConfig) -> HookState {
        HookState {
            config,
            nodes: HashMap::new(),
            pods: HashMap::new(),
            used: HashMap::new(),
            pod_groups: HashMap::new(),
            gangs: BTreeMap::new(),
            datasets: HashMap::new(),
            dataset_errors: HashMap::new(),
            loads_asked: HashMap::new(),
            released: Vec::new(),
            asked: HashMap::new(),
        }
    }

    pub fn config(&self) -> &HookConfig {
        &self.config
    }

    // ---- what the cluster watch feeds in ----

    pub fn set_node(&mut self, name: &str, gpus: u32, labels: &BTreeMap<String, String>) {
        let domain = labels.get(&self.config.topology_key).cloned();
        self.nodes
            .insert(name.to_string(), NodeInfo { gpus, domain });
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    /// Node names known, sorted.
    pub fn node_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.nodes.keys().cloned().collect();
        v.sort();
        v
    }

    fn account(&mut self, pod: &Intent, sign: i64) {
        if let Some(node) = &pod.node
            && !pod.finished
            && pod.gpus > 0
        {
            let e = self.used.entry(node.clone()).or_insert(0);
            *e = (*e as i64 + sign * pod.gpus as i64).max(0) as u32;
        }
    }

    pub fn set_pod(&mut self, pod: Intent) {
        if let Some(old) = self.pods.remove(&pod.key) {
            self.account(&old, -1);
        }
        self.account(&pod, 1);
        self.pods.insert(pod.key.clone(), pod);
    }

    pub fn remove_pod(&mut self, key: &str) {
        if let Some(old) = self.pods.remove(key) {
            self.account(&old, -1);
        }
        self.asked.remove(key);
    }

    /// The scheduler asked about `key` (a filter call for a pod the hook trusts).
    pub fn asked(&mut self, key: &str, now: Millis) {
        if self.pods.contains_key(key) {
            self.asked.insert(key.to_string(), now);
        }
    }

    /// Keeps only the pods in `keys` (a watch restarted from a fresh list).
    pub fn retain_pods(&mut self, keys: &std::collections::HashSet<String>) {
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|k| !keys.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove_pod(&k);
        }
    }

    pub fn set_pod_group(&mut self, namespace: &str, name: &str, min_member: Option<usize>) {
        let key = gang_key(namespace, name);
        match min_member {
            Some(n) => self.pod_groups.insert(key, n),
            None => self.pod_groups.remove(&key),
        };
    }

    // ---- what the data loop feeds in ----

    pub fn set_dataset(&mut self, view: DatasetView, now: Millis) {
        self.dataset_errors.remove(&view.name);
        self.datasets.insert(view.name.clone(), (view, now));
    }

    pub fn dataset_error(&mut self, name: &str, error: String) {
        self.dataset_errors.insert(name.to_string(), error);
    }

    /// Whether the view of `name` is missing or older than the configured age.
    pub fn dataset_stale(&self, name: &str, now: Millis) -> bool {
        self.datasets
            .get(name)
            .is_none_or(|(_, at)| now.saturating_sub(*at) > ms(self.config.data_max_age))
    }

    /// Datasets the hook needs fresh views of: those of gangs and of unbound pods.
    pub fn datasets_wanted(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .pods
            .values()
            .filter(|p| p.node.is_none() && !p.finished)
            .filter_map(|p| p.dataset.clone())
            .collect();
        v.extend(self.gangs.values().filter_map(|g| {
            (g.gang.phase != GangPhase::Bound)
                .then(|| g.gang.spec.dataset.clone())
                .flatten()
        }));
        v.sort();
        v.dedup();
        v
    }

    // ---- GPU accounting ----

    fn reserved(&self, except_gang: Option<&str>) -> HashMap<String, u32> {
        let mut out: HashMap<String, u32> = HashMap::new();
        for (key, g) in &self.gangs {
            if Some(key.as_str()) == except_gang {
                continue;
            }
            for (node, gpus) in g.gang.reservations() {
                *out.entry(node).or_insert(0) += gpus;
            }
        }
        out
    }

    fn free_gpus(&self, node: &str, alloc: u32, reserved: &HashMap<String, u32>) -> u32 {
        alloc
            .saturating_sub(self.used.get(node).copied().unwrap_or(0))
            .saturating_sub(reserved.get(node).copied().unwrap_or(0))
    }

    // ---- the extender's questions ----

    /// Which of `names` the pod may go to. `object_gpus` gives the allocatable GPUs of nodes
    /// the request carried as objects (used for nodes the watch has not seen).
    pub fn filter(
        &self,
        pod: &Intent,
        names: &[&str],
        object_gpus: &dyn Fn(usize) -> Option<u32>,
    ) -> FilterAnswer {
        let mut ans = FilterAnswer::default();
        if let Some(g) = &pod.gang {
            let key = gang_key(&pod.namespace, &g.name);
            let verdict = match self.gangs.get(&key) {
                Some(entry) => entry.gang.verdict(&pod.key),
                None => Verdict::Wait(match self.gang_size(pod) {
                    Some(size) => format!(
                        "gang {}: waiting for members ({}/{size})",
                        g.name,
                        self.members_seen(&pod.namespace, &g.name)
                    ),
                    None => format!(
                        "gang {}: size unknown: set granary.io/gang-size or create PodGroup {}",
                        g.name, g.name
                    ),
                }),
            };
            match verdict {
                Verdict::Node(planned) => {
                    for (i, n) in names.iter().enumerate() {
                        if *n == planned {
                            ans.pass.push(i);
                        } else {
                            ans.failed.insert(
                                n.to_string(),
                                format!("gang {}: member planned on {planned}", g.name),
                            );
                        }
                    }
                    if ans.pass.is_empty() {
                        for n in names {
                            ans.failed.insert(
                                n.to_string(),
                                format!(
                                    "gang {}: planned node {planned} is not among the candidates",
                                    g.name
                                ),
                            );
                        }
                    }
                }
                Verdict::Wait(reason) => {
                    for n in names {
                        ans.failed.insert(n.to_string(), reason.clone());
                    }
                }
            }
            return ans;
        }
        if pod.gpus == 0 {
            ans.pass = (0..names.len()).collect();
            return ans;
        }
        let reserved = self.reserved(None);
        for (i, n) in names.iter().enumerate() {
            let alloc = self
                .nodes
                .get(*n)
                .map(|x| x.gpus)
                .or_else(|| object_gpus(i));
            let Some(alloc) = alloc else {
                // A node the hook knows nothing of: the scheduler's own fit check decides.
                ans.pass.push(i);
                continue;
            };
            let free = self.free_gpus(n, alloc, &reserved);
            if free >= pod.gpus {
                ans.pass.push(i);
            } else {
                let held = reserved.get(*n).copied().unwrap_or(0);
                ans.failed.insert(
                    n.to_string(),
                    format!(
                        "granary: {free} of {alloc} nvidia.com/gpu free ({held} reserved for gangs), {} requested",
                        pod.gpus
                    ),
                );
            }
        }
        ans
    }

    /// Scores 0-10: a gang member's planned node 10; for a pod with a dataset, bytes of it on
    /// each node relative to the node holding the most (any byte scores at least 1).
    pub fn prioritize(&self, pod: &Intent, names: &[&str]) -> Vec<HostPriority> {
        let zero = |n: &&str| HostPriority {
            host: n.to_string(),
            score: 0,
        };
        if let Some(g) = &pod.gang
            && let Some(entry) = self.gangs.get(&gang_key(&pod.namespace, &g.name))
            && let Verdict::Node(planned) = entry.gang.verdict(&pod.key)
        {
            return names
                .iter()
                .map(|n| HostPriority {
                    host: n.to_string(),
                    score: if *n == planned {
                        crate::extender::MAX_SCORE
                    } else {
                        0
                    },
                })
                .collect();
        }
        let Some((view, _)) = pod.dataset.as_ref().and_then(|d| self.datasets.get(d)) else {
            return names.iter().map(zero).collect();
        };
        let held = view.holdings();
        let bytes: Vec<u64> = names
            .iter()
            .map(|n| held.get(n).copied().unwrap_or(0))
            .collect();
        let max = bytes.iter().copied().max().unwrap_or(0);
        names
            .iter()
            .zip(bytes)
            .map(|(n, b)| HostPriority {
                host: n.to_string(),
                score: if max == 0 {
                    0
                } else {
                    ((b as u128 * crate::extender::MAX_SCORE as u128).div_ceil(max as u128)) as i64
                },
            })
            .collect()
    }

    /// Whether `pod` may be bound to `node` now: only a pod not bound yet; a gang member only to
    /// its planned node once the gang is ready; a pod without a gang only after the scheduler
    /// asked about it within the reservation TTL, and to a node its filter passes now.
    pub fn check_bind(&self, pod: &Intent, node: &str, now: Millis) -> Result<(), String> {
        if let Some(on) = &pod.node {
            return Err(format!("pod {} is already bound to {on}", pod.key));
        }
        let Some(g) = &pod.gang else {
            let recent = self
                .asked
                .get(&pod.key)
                .is_some_and(|at| now.saturating_sub(*at) <= ms(self.config.reservation_ttl));
            if !recent {
                return Err(format!(
                    "pod {} was not filtered by this hook in the last {}: nothing reserved for it",
                    pod.key,
                    granary_core::format_duration(self.config.reservation_ttl)
                ));
            }
            let answer = self.filter(pod, &[node], &|_| None);
            return match answer.failed.get(node) {
                Some(why) => Err(format!("pod {}: {why}", pod.key)),
                None => Ok(()),
            };
        };
        let Some(entry) = self.gangs.get(&gang_key(&pod.namespace, &g.name)) else {
            return Err(format!("gang {}: not planned yet", g.name));
        };
        match entry.gang.verdict(&pod.key) {
            Verdict::Node(n) if n == node => Ok(()),
            Verdict::Node(n) => Err(format!(
                "gang {}: member planned on {n}, not {node}",
                g.name
            )),
            Verdict::Wait(reason) => Err(reason),
        }
    }

    /// A pod this hook bound (before the watch reports it).
    pub fn bound(&mut self, key: &str, node: &str, now: Millis) {
        self.asked.remove(key);
        if let Some(mut p) = self.pods.get(key).cloned() {
            p.node = Some(node.to_string());
            self.set_pod(p.clone());
            if let Some(g) = &p.gang
                && let Some(entry) = self.gangs.get_mut(&gang_key(&p.namespace, &g.name))
            {
                entry.gang.member_bound(key, node, now);
            }
        }
    }

    pub fn pod(&self, key: &str) -> Option<&Intent> {
        self.pods.get(key)
    }

    fn gang_size(&self, pod: &Intent) -> Option<usize> {
        let g = pod.gang.as_ref()?;
        g.size.or_else(|| {
            self.pod_groups
                .get(&gang_key(&pod.namespace, &g.name))
                .copied()
        })
    }

    fn members_seen(&self, namespace: &str, gang: &str) -> usize {
        self.pods
            .values()
            .filter(|p| {
                p.namespace == namespace
                    && !p.finished
                    && p.gang.as_ref().is_some_and(|g| g.name == gang)
            })
            .count()
    }
}
