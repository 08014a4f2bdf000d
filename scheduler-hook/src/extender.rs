//! The kube-scheduler extender v1 wire types (`k8s.io/kube-scheduler/extender/v1`).
//!
//! The Go types carry no JSON tags, so their fields travel with their Go names (PascalCase);
//! Go's decoder matches names case-insensitively, so lower-case spellings are accepted too.
//! Pods and Nodes are decoded only as far as the hook needs them (names, labels, annotations,
//! GPU requests, allocatable); with `nodeCacheCapable: false` each Node is also kept as the raw
//! JSON the scheduler sent, so the filter answer returns the very objects it was given.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// The Kubernetes extended resource the hook schedules.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Highest score an extender may give (`MaxExtenderPriority`).
pub const MAX_SCORE: i64 = 10;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ObjectMeta {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub requests: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub limits: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Option<Vec<Container>>,
    #[serde(default)]
    pub init_containers: Option<Vec<Container>>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub scheduler_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
}

/// A `v1.Pod`, as far as the hook reads it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpec>,
    #[serde(default)]
    pub status: Option<PodStatus>,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name
        )
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeStatus {
    #[serde(default)]
    pub allocatable: Option<BTreeMap<String, serde_json::Value>>,
}

/// A `v1.Node`, as far as the hook reads it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Node {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<NodeStatus>,
}

/// The two fields of a Node the filter reads, decoded without copying the rest (labels,
/// conditions, images are skipped): 5,000 full Nodes are ~10 MB per request.
#[derive(Deserialize)]
struct LeanNode<'a> {
    #[serde(borrow, default)]
    metadata: Option<LeanMeta<'a>>,
    #[serde(borrow, default)]
    status: Option<LeanStatus<'a>>,
}

#[derive(Deserialize)]
struct LeanMeta<'a> {
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct LeanStatus<'a> {
    #[serde(borrow, default)]
    allocatable: Option<BTreeMap<std::borrow::Cow<'a, str>, &'a RawValue>>,
}

/// A `v1.NodeList` with each item kept raw (to be returned as sent).
#[derive(Debug, Deserialize)]
pub struct RawNodeList {
    #[serde(default)]
    pub items: Option<Vec<Box<RawValue>>>,
}

/// `ExtenderArgs`: the pod and the candidate nodes (objects, or names when nodeCacheCapable).
#[derive(Debug, Deserialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod", alias = "pod")]
    pub pod: Option<Pod>,
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub nodes: Option<RawNodeList>,
    #[serde(
        rename = "NodeNames",
        alias = "nodeNames",
        alias = "nodenames",
        default
    )]
    pub node_names: Option<Vec<String>>,
}

/// The candidates of one call, decoded.
#[derive(Debug)]
pub enum Candidates {
    /// nodeCacheCapable: names only.
    Names(Vec<String>),
    /// Full objects: (name, allocatable GPUs if it says, the raw JSON to send back).
    Objects(Vec<(String, Option<u32>, Box<RawValue>)>),
}

impl Candidates {
    pub fn names(&self) -> Vec<&str> {
        match self {
            Candidates::Names(n) => n.iter().map(String::as_str).collect(),
            Candidates::Objects(o) => o.iter().map(|(n, _, _)| n.as_str()).collect(),
        }
    }
}

/// What is wrong with a request body (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("the body is not valid extender JSON: {0}")]
    Json(String),
    #[error("the body has no Pod")]
    NoPod,
    #[error("the Pod has no metadata.name")]
    NoPodName,
    #[error("Nodes.items[{index}] is not a valid Node: {error}")]
    Node { index: usize, error: String },
    #[error("Nodes.items[{index}] has no metadata.name")]
    NodeName { index: usize },
    #[error("the pod's {resource} request {value} is not a whole number")]
    Quantity { resource: String, value: String },
    #[error("annotation {key}: {error}")]
    Annotation { key: String, error: String },
}

impl ExtenderArgs {
    /// The pod and the candidates. `null` lists and missing lists are empty.
    pub fn into_parts(self) -> Result<(Pod, Candidates), BadRequest> {
        let pod = self.pod.ok_or(BadRequest::NoPod)?;
        if let Some(list) = self.nodes {
            let items = list.items.unwrap_or_default();
            let mut out = Vec::with_capacity(items.len());
            for (index, raw) in items.into_iter().enumerate() {
                let node: LeanNode =
                    serde_json::from_str(raw.get()).map_err(|e| BadRequest::Node {
                        index,
                        error: e.to_string(),
                    })?;
                let name = node
                    .metadata
                    .and_then(|m| m.name)
                    .filter(|n| !n.is_empty())
                    .ok_or(BadRequest::NodeName { index })?
                    .into_owned();
                let gpus = node
                    .status
                    .and_then(|s| s.allocatable)
                    .and_then(|a| {
                        a.get(GPU_RESOURCE)
                            .and_then(|q| serde_json::from_str::<serde_json::Value>(q.get()).ok())
                    })
                    .and_then(|q| {
                        let map = BTreeMap::from([(GPU_RESOURCE.to_string(), q)]);
                        whole_quantity(Some(&map), GPU_RESOURCE).ok().flatten()
                    });
                out.push((name, gpus, raw));
            }
            if out.is_empty()
                && let Some(names) = self.node_names
            {
                return Ok((pod, Candidates::Names(names)));
            }
            return Ok((pod, Candidates::Objects(out)));
        }
        Ok((pod, Candidates::Names(self.node_names.unwrap_or_default())))
    }
}

/// A raw `v1.NodeList` to send back.
#[derive(Debug, Serialize)]
pub struct NodeListOut {
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub items: Vec<Box<RawValue>>,
}

/// `ExtenderFilterResult`.
#[derive(Debug, Serialize, Default)]
pub struct ExtenderFilterResult {
    #[serde(rename = "Nodes")]
    pub nodes: Option<NodeListOut>,
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<String>>,
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    #[serde(rename = "Error")]
    pub error: String,
}

/// `HostPriority` (a `HostPriorityList` is a JSON array of these).
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

/// `ExtenderBindingArgs`.
#[derive(Debug, Deserialize)]
pub struct ExtenderBindingArgs {
    #[serde(rename = "PodName", alias = "podName", alias = "podname")]
    pub pod_name: String,
    #[serde(
        rename = "PodNamespace",
        alias = "podNamespace",
        alias = "podnamespace"
    )]
    pub pod_namespace: String,
    #[serde(rename = "PodUID", alias = "podUID", alias = "poduid", default)]
    pub pod_uid: String,
    #[serde(rename = "Node", alias = "node")]
    pub node: String,
}

/// `ExtenderBindingResult`.
#[derive(Debug, Serialize, Default)]
pub struct ExtenderBindingResult {
    #[serde(rename = "Error")]
    pub error: String,
}

/// A whole-number quantity of an extended resource (`"2"`, `2`); `None` when absent.
pub fn whole_quantity(
    map: Option<&BTreeMap<String, serde_json::Value>>,
    resource: &str,
) -> Result<Option<u32>, BadRequest> {
    let Some(v) = map.and_then(|m| m.get(resource)) else {
        return Ok(None);
    };
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => other.to_string(),
    };
    let bad = || BadRequest::Quantity {
        resource: resource.into(),
        value: text.clone(),
    };
    let t = text.trim();
    let (digits, mult) = match t.strip_suffix('k') {
        Some(d) => (d, 1000u64),
        None => (t, 1),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    u32::try_from(n * mult).map(Some).map_err(|_| bad())
}

/// GPUs a pod requests: the larger of its containers' sum and its largest init container
/// (requests, or limits when a container gives no request: extended resources default to them).
pub fn pod_gpus(pod: &Pod) -> Result<u32, BadRequest> {
    let Some(spec) = &pod.spec else { return Ok(0) };
    let one = |c: &Container| -> Result<u32, BadRequest> {
        let Some(r) = &c.resources else { return Ok(0) };
        Ok(match whole_quantity(r.requests.as_ref(), GPU_RESOURCE)? {
            Some(n) => n,
            None => whole_quantity(r.limits.as_ref(), GPU_RESOURCE)?.unwrap_or(0),
        })
    };
    let mut sum = 0u32;
    for c in spec.containers.iter().flatten() {
        sum = sum.saturating_add(one(c)?);
    }
    let mut init = 0u32;
    for c in spec.init_containers.iter().flatten() {
        init = init.max(one(c)?);
    }
    Ok(sum.max(init))
}

/// GPUs a node offers (`status.allocatable`), when it says.
pub fn node_gpus(node: &Node) -> Result<Option<u32>, BadRequest> {
    whole_quantity(
        node.status.as_ref().and_then(|s| s.allocatable.as_ref()),
        GPU_RESOURCE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pascal_case_names_and_null_lists() {
        let a: ExtenderArgs = serde_json::from_str(
            r#"{"Pod":{"metadata":{"name":"p","namespace":"ns"}},"Nodes":null,"NodeNames":["a","b"]}"#,
        )
        .unwrap();
        let (pod, c) = a.into_parts().unwrap();
        assert_eq!(pod.key(), "ns/p");
        assert_eq!(c.names(), vec!["a", "b"]);
        let a: ExtenderArgs = serde_json::from_str(
            r#"{"Pod":{"metadata":{"name":"p"}},"Nodes":null,"NodeNames":null}"#,
        )
        .unwrap();
        assert!(a.into_parts().unwrap().1.names().is_empty());
        let a: ExtenderArgs =
            serde_json::from_str(r#"{"Pod":{"metadata":{"name":"p"}},"Nodes":{"items":null}}"#)
                .unwrap();
        assert!(a.into_parts().unwrap().1.names().is_empty());
    }

    #[test]
    fn full_nodes_keep_their_raw_json() {
        let a: ExtenderArgs = serde_json::from_str(
            r#"{"Pod":{"metadata":{"name":"p"}},"Nodes":{"metadata":{},"items":[
                {"metadata":{"name":"n1","labels":{"zone":"a"},"uid":"u"},"spec":{"taints":[]},
                 "status":{"allocatable":{"nvidia.com/gpu":"4","cpu":"8"}}}]}}"#,
        )
        .unwrap();
        let (_, c) = a.into_parts().unwrap();
        let Candidates::Objects(o) = c else { panic!() };
        assert_eq!(o[0].0, "n1");
        assert_eq!(o[0].1, Some(4));
        assert!(o[0].2.get().contains("\"taints\""));
    }

    #[test]
    fn gpu_requests() {
        let pod: Pod = serde_json::from_str(
            r#"{"metadata":{"name":"p"},"spec":{"containers":[
                {"resources":{"requests":{"nvidia.com/gpu":"2"}}},
                {"resources":{"limits":{"nvidia.com/gpu":1}}},
                {"resources":{}}],
              "initContainers":[{"resources":{"limits":{"nvidia.com/gpu":"4"}}}]}}"#,
        )
        .unwrap();
        assert_eq!(pod_gpus(&pod).unwrap(), 4);
        let bad: Pod = serde_json::from_str(
            r#"{"metadata":{"name":"p"},"spec":{"containers":[{"resources":{"requests":{"nvidia.com/gpu":"1.5"}}}]}}"#,
        )
        .unwrap();
        assert!(matches!(pod_gpus(&bad), Err(BadRequest::Quantity { .. })));
    }

    #[test]
    fn results_are_pascal_case() {
        let r = ExtenderFilterResult {
            node_names: Some(vec!["a".into()]),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"Nodes":null,"NodeNames":["a"],"FailedNodes":{},
                "FailedAndUnresolvableNodes":{},"Error":""})
        );
        let b: ExtenderBindingArgs =
            serde_json::from_str(r#"{"PodName":"p","PodNamespace":"ns","PodUID":"u","Node":"n"}"#)
                .unwrap();
        assert_eq!((b.pod_name.as_str(), b.node.as_str()), ("p", "n"));
        let h = serde_json::to_string(&[HostPriority {
            host: "a".into(),
            score: 3,
        }])
        .unwrap();
        assert_eq!(h, r#"[{"Host":"a","Score":3}]"#);
    }
}
