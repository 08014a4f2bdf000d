//! What the hook asks of the cache cluster: how many bytes of a dataset each node holds, and
//! loading a pinned dataset onto exactly the nodes a gang was planned on. The `granary scheduler`
//! command implements [`DataSource`] with the workers' Datasets gRPC client; tests use fakes.

use crate::error::CallError;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One node's share of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeBytes {
    /// Bytes present and verified.
    pub ready: u64,
    /// Bytes the node is to hold.
    pub total: u64,
    /// `pending`, `loading`, `ready` or `failed`.
    pub state: String,
}

/// A dataset's placement and readiness, as the cache cluster reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DatasetView {
    pub name: String,
    /// The pin's node set.
    pub nodes: Vec<String>,
    /// Whether the cluster has been asked to load it onto that set.
    pub load: bool,
    /// Per node (of the set, and of earlier sets still reporting).
    pub per_node: BTreeMap<String, NodeBytes>,
}

impl DatasetView {
    /// Bytes of the dataset present on `node`, when it is in the pin's node set (a node that
    /// left the set is freeing its files).
    pub fn bytes_on(&self, node: &str) -> u64 {
        if !self.nodes.iter().any(|n| n == node) {
            return 0;
        }
        self.per_node.get(node).map_or(0, |n| n.ready)
    }

    /// Bytes present per node of the pin's node set (for scoring many nodes at once).
    pub fn holdings(&self) -> std::collections::HashMap<&str, u64> {
        self.nodes
            .iter()
            .map(|n| (n.as_str(), self.per_node.get(n).map_or(0, |b| b.ready)))
            .collect()
    }

    /// Whether the pin is being loaded onto exactly `nodes`.
    pub fn loading_onto(&self, nodes: &[String]) -> bool {
        let mut a = self.nodes.clone();
        let mut b = nodes.to_vec();
        a.sort();
        a.dedup();
        b.sort();
        b.dedup();
        self.load && a == b
    }

    /// Percent of the bytes `nodes` must hold that they hold (100 only when every byte is there);
    /// `None` when the pin is not loading onto exactly `nodes`. A node that has not reported yet
    /// counts as holding nothing of an unknown share.
    pub fn percent_on(&self, nodes: &[String]) -> Option<f64> {
        if !self.loading_onto(nodes) {
            return None;
        }
        let (mut ready, mut total, mut missing) = (0u64, 0u64, false);
        for n in nodes {
            match self.per_node.get(n) {
                Some(b) => {
                    ready += b.ready.min(b.total);
                    total += b.total;
                    missing |= b.state == "pending" && b.total > b.ready;
                }
                None => missing = true,
            }
        }
        let p = granary_core::gang::ready_percent(ready, total);
        Some(if missing {
            if total == 0 { 0.0 } else { p.min(99.0) }
        } else {
            p
        })
    }
}

/// The cache cluster, as the hook needs it.
pub trait DataSource: Send + Sync + 'static {
    /// The dataset's placement and per-node readiness.
    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<DatasetView, CallError>>;
    /// Loads the pinned dataset onto exactly `nodes` (the pin's node set becomes `nodes`).
    fn load<'a>(
        &'a self,
        name: &'a str,
        nodes: Vec<String>,
    ) -> BoxFuture<'a, Result<DatasetView, CallError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(nodes: &[&str], load: bool, per: &[(&str, u64, u64, &str)]) -> DatasetView {
        DatasetView {
            name: "d".into(),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            load,
            per_node: per
                .iter()
                .map(|(n, r, t, s)| {
                    (
                        n.to_string(),
                        NodeBytes {
                            ready: *r,
                            total: *t,
                            state: s.to_string(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn percent_only_on_the_exact_node_set() {
        let nodes = vec!["a".to_string(), "b".to_string()];
        let v = view(
            &["b", "a"],
            true,
            &[("a", 50, 100, "loading"), ("b", 100, 100, "ready")],
        );
        assert_eq!(v.percent_on(&nodes), Some(75.0));
        assert_eq!(v.bytes_on("b"), 100);
        assert_eq!(v.bytes_on("c"), 0);
        let left = view(
            &["a"],
            true,
            &[("a", 1, 1, "ready"), ("b", 100, 100, "ready")],
        );
        assert_eq!(left.bytes_on("b"), 0, "b left the set");
        assert_eq!(v.percent_on(&["a".to_string()]), None);
        let not_loading = view(&["a", "b"], false, &[]);
        assert_eq!(not_loading.percent_on(&nodes), None);
        let unreported = view(&["a", "b"], true, &[("a", 10, 10, "ready")]);
        assert_eq!(unreported.percent_on(&nodes), Some(99.0));
        let none_reported = view(&["a", "b"], true, &[]);
        assert_eq!(none_reported.percent_on(&nodes), Some(0.0));
        let done = view(
            &["a", "b"],
            true,
            &[("a", 10, 10, "ready"), ("b", 0, 0, "ready")],
        );
        assert_eq!(done.percent_on(&nodes), Some(100.0));
    }
}
