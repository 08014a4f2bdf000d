//! The Kubernetes side: a client from a kubeconfig (or in-cluster), watches of Nodes, Pods and
//! PodGroups feeding [`HookState`](crate::HookState), and [`KubeCluster`], the
//! [`ClusterApi`] that creates Bindings, notes gang phases on pods and records Events.
//!
//! Only stable core/v1 objects are used (Node, Pod, pods/binding, Event), so the hook works with
//! any API server from 1.20 on. PodGroup sizes (`spec.minMember`) come from Volcano's
//! (`scheduling.volcano.sh/v1beta1`) or scheduler-plugins' (`scheduling.x-k8s.io/v1alpha1`)
//! PodGroup objects when those CRDs exist.

use crate::data::BoxFuture;
use crate::driver::{ClusterApi, Hook};
use crate::error::CallError;
use crate::extender::{GPU_RESOURCE, whole_quantity};
use crate::pod::{GANG_PHASE, intent};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Event, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// The Kubernetes API as [`ClusterApi`].
pub struct KubeCluster {
    pub client: kube::Client,
}

/// A Kubernetes API error by what it means to the hook: the status code says whether the object
/// is gone, the call refused, or the API not there.
fn err(e: kube::Error) -> CallError {
    match e {
        kube::Error::Api(s) => {
            let text = format!("{} ({})", s.message, s.reason);
            match s.code {
                404 => CallError::NotFound(text),
                400..=499 => CallError::Refused(text),
                _ => CallError::Unavailable(text),
            }
        }
        other => CallError::Unavailable(other.to_string()),
    }
}

/// A Kubernetes Pod as the hook's wire type (the fields it reads).
fn ours(pod: &Pod) -> Option<crate::extender::Pod> {
    serde_json::to_value(pod)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

impl ClusterApi for KubeCluster {
    fn get_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<crate::extender::Pod, CallError>> {
        Box::pin(async move {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let pod = pods.get(name).await.map_err(err)?;
            ours(&pod).ok_or_else(|| {
                CallError::Unavailable(format!("pod {namespace}/{name}: cannot read its JSON"))
            })
        })
    }

    fn bind<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        uid: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let binding = Binding {
                metadata: ObjectMeta {
                    name: Some(pod.to_string()),
                    namespace: Some(namespace.to_string()),
                    uid: (!uid.is_empty()).then(|| uid.to_string()),
                    ..Default::default()
                },
                target: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node.to_string()),
                    ..Default::default()
                },
            };
            pods.create_subresource::<_, serde_json::Value>(
                "binding",
                pod,
                &PostParams::default(),
                &binding,
            )
            .await
            .map(|_| ())
            .map_err(err)
        })
    }

    fn note_phase<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        phase: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({"metadata": {"annotations": {GANG_PHASE: phase}}});
            pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(err)
        })
    }

    fn event<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        reason: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            let events: Api<Event> = Api::namespaced(self.client.clone(), namespace);
            let now = Time(k8s_openapi::jiff::Timestamp::now());
            let event = Event {
                metadata: ObjectMeta {
                    generate_name: Some(format!("{pod}.granary-")),
                    namespace: Some(namespace.to_string()),
                    ..Default::default()
                },
                involved_object: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.to_string()),
                    namespace: Some(namespace.to_string()),
                    ..Default::default()
                },
                reason: Some(reason.to_string()),
                message: Some(message.to_string()),
                type_: Some("Normal".into()),
                count: Some(1),
                first_timestamp: Some(now.clone()),
                last_timestamp: Some(now),
                source: Some(k8s_openapi::api::core::v1::EventSource {
                    component: Some("granary-scheduler".into()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            events
                .create(&PostParams::default(), &event)
                .await
                .map(|_| ())
                .map_err(err)
        })
    }
}

fn node_gpus(node: &Node) -> u32 {
    whole_quantity_of(
        node.status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get(GPU_RESOURCE))
            .map(|q| q.0.as_str()),
    )
}

fn whole_quantity_of(q: Option<&str>) -> u32 {
    let Some(q) = q else { return 0 };
    let map = BTreeMap::from([(GPU_RESOURCE.to_string(), serde_json::Value::from(q))]);
    whole_quantity(Some(&map), GPU_RESOURCE)
        .ok()
        .flatten()
        .unwrap_or(0)
}

fn apply_node(hook: &Hook, node: &Node) {
    let Some(name) = node.metadata.name.as_deref() else {
        return;
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    hook.state().set_node(name, node_gpus(node), &labels);
}

fn apply_pod(hook: &Hook, pod: &Pod) {
    let Some(ours) = ours(pod) else {
        return;
    };
    match intent(&ours) {
        Ok(i) => hook.state().set_pod(i),
        Err(e) => {
            tracing::debug!(pod = %ours.key(), error = %e, "pod with bad annotations ignored")
        }
    }
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Watches Nodes into the hook's state until the stream ends (it does not: errors are retried).
pub async fn watch_nodes(client: kube::Client, hook: Arc<Hook>) {
    let api: Api<Node> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => seen.clear(),
            Ok(watcher::Event::InitApply(n)) => {
                seen.extend(n.metadata.name.clone());
                apply_node(&hook, &n);
            }
            Ok(watcher::Event::InitDone) => {
                let mut s = hook.state();
                for name in s.node_names() {
                    if !seen.contains(&name) {
                        s.remove_node(&name);
                    }
                }
            }
            Ok(watcher::Event::Apply(n)) => apply_node(&hook, &n),
            Ok(watcher::Event::Delete(n)) => {
                if let Some(name) = &n.metadata.name {
                    hook.state().remove_node(name);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "node watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Watches Pods that are not finished into the hook's state.
pub async fn watch_pods(client: kube::Client, hook: Arc<Hook>) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed");
    let mut stream = watcher(api, config).boxed();
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => seen.clear(),
            Ok(watcher::Event::InitApply(p)) => {
                seen.insert(pod_key(&p));
                apply_pod(&hook, &p);
            }
            Ok(watcher::Event::InitDone) => hook.state().retain_pods(&seen),
            Ok(watcher::Event::Apply(p)) => apply_pod(&hook, &p),
            Ok(watcher::Event::Delete(p)) => hook.state().remove_pod(&pod_key(&p)),
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The PodGroup kinds whose `spec.minMember` sizes a gang.
pub fn pod_group_kinds() -> [ApiResource; 2] {
    [
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("scheduling.volcano.sh", "v1beta1", "PodGroup"),
            "podgroups",
        ),
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("scheduling.x-k8s.io", "v1alpha1", "PodGroup"),
            "podgroups",
        ),
    ]
}

/// Watches one PodGroup kind once its CRD exists (looked for every minute until then).
pub async fn watch_pod_groups(client: kube::Client, hook: Arc<Hook>, kind: ApiResource) {
    let api: Api<DynamicObject> = Api::all_with(client, &kind);
    let mut told = false;
    while let Err(e) = api.list(&ListParams::default().limit(1)).await {
        if !told {
            tracing::info!(group = %kind.group, error = %err(e), "no PodGroups of this kind (yet); gangs of it need granary.io/gang-size");
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(g)) | Ok(watcher::Event::InitApply(g)) => {
                let min = g
                    .data
                    .pointer("/spec/minMember")
                    .and_then(|v| v.as_u64())
                    .map(|n| n as usize);
                if let (Some(ns), Some(name)) = (&g.metadata.namespace, &g.metadata.name) {
                    hook.state().set_pod_group(ns, name, min);
                }
            }
            Ok(watcher::Event::Delete(g)) => {
                if let (Some(ns), Some(name)) = (&g.metadata.namespace, &g.metadata.name) {
                    hook.state().set_pod_group(ns, name, None);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "PodGroup watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Starts every watch in the background.
pub fn spawn_watches(client: kube::Client, hook: Arc<Hook>) {
    tokio::spawn(watch_nodes(client.clone(), hook.clone()));
    tokio::spawn(watch_pods(client.clone(), hook.clone()));
    for kind in pod_group_kinds() {
        tokio::spawn(watch_pod_groups(client.clone(), hook.clone(), kind));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_gpu_quantities() {
        assert_eq!(whole_quantity_of(Some("4")), 4);
        assert_eq!(whole_quantity_of(Some("2k")), 2000);
        assert_eq!(whole_quantity_of(Some("bad")), 0);
        assert_eq!(whole_quantity_of(None), 0);
    }
}
