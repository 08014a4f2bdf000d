//! `HookState` driven directly with `now`: what reconcile asks of the world when a planned node
//! disappears, a reservation expires, a ready timeout passes, and how gangs get their size from
//! PodGroups.

use granary_scheduler_hook::data::{DatasetView, NodeBytes};
use granary_scheduler_hook::extender::Pod;
use granary_scheduler_hook::hook::Action;
use granary_scheduler_hook::pod::intent;
use granary_scheduler_hook::{HookConfig, HookState};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

fn state() -> HookState {
    let mut s = HookState::new(HookConfig {
        reservation_ttl: Duration::from_secs(10),
        ..HookConfig::default()
    });
    for n in ["a", "b", "c"] {
        s.set_node(n, 4, &BTreeMap::new());
    }
    s
}

fn member(s: &mut HookState, name: &str, gpus: u32, annotations: serde_json::Value) {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ml", "annotations": annotations},
        "spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]}
    }))
    .unwrap();
    s.set_pod(intent(&p).unwrap());
}

fn events(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event { pod, reason, .. } => Some((pod.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

fn planned_nodes(s: &HookState) -> Vec<String> {
    s.gang_reports(0)[0].nodes.clone()
}

#[test]
fn a_planned_node_that_disappears_is_replaced() {
    let mut s = state();
    let ann = json!({"granary.io/gang": "g", "granary.io/gang-size": "2"});
    member(&mut s, "m0", 4, ann.clone());
    member(&mut s, "m1", 4, ann);
    s.reconcile(0);
    let first = planned_nodes(&s);
    assert_eq!(first, vec!["a", "b"]);
    s.remove_node("a");
    let actions = s.reconcile(100);
    assert_eq!(
        events(&actions),
        vec![
            ("m0".to_string(), "GangNodeGone".to_string()),
            ("m1".to_string(), "GangNodeGone".to_string())
        ]
    );
    assert_eq!(planned_nodes(&s), vec!["b", "c"], "planned again at once");
    assert_eq!(s.gang_reports(0)[0].state, "ready");
}

#[test]
fn members_not_bound_by_the_expiry_release_the_whole_reservation() {
    let mut s = state();
    let ann = json!({"granary.io/gang": "g", "granary.io/gang-size": "2"});
    member(&mut s, "m0", 4, ann.clone());
    member(&mut s, "m1", 4, ann);
    s.reconcile(0);
    s.bound("ml/m0", "a", 1000);
    // A plain pod cannot have the reserved GPUs of b.
    member(&mut s, "plain", 1, json!({}));
    let plain = s.pod("ml/plain").unwrap().clone();
    let f = s.filter(&plain, &["b", "c"], &|_| None);
    assert_eq!(f.pass, vec![1]);
    let actions = s.reconcile(9_999);
    assert!(events(&actions).is_empty());
    let actions = s.reconcile(10_000);
    assert_eq!(
        events(&actions),
        vec![
            ("m0".to_string(), "GangReservationExpired".to_string()),
            ("m1".to_string(), "GangReservationExpired".to_string())
        ]
    );
    // Re-planned for the unbound member at once; m0 stays where it is bound.
    let report = &s.gang_reports(10_000)[0];
    assert_eq!(report.state, "ready");
    assert_eq!(report.bound, 1);
    assert_eq!(report.plan.as_ref().unwrap().len(), 1);
}

#[test]
fn the_ready_timeout_starts_a_gang_without_its_data() {
    let mut s = state();
    let ann = json!({"granary.io/gang": "g", "granary.io/gang-size": "1",
        "granary.io/dataset": "ds", "granary.io/ready-timeout": "30s"});
    member(&mut s, "m0", 2, ann);
    let actions = s.reconcile(0);
    assert!(actions.contains(&Action::Load {
        dataset: "ds".into(),
        nodes: vec!["a".into()]
    }));
    s.set_dataset(
        DatasetView {
            name: "ds".into(),
            nodes: vec!["a".into()],
            load: true,
            per_node: BTreeMap::from([(
                "a".to_string(),
                NodeBytes {
                    ready: 25,
                    total: 100,
                    state: "loading".into(),
                },
            )]),
        },
        1,
    );
    let actions = s.reconcile(29_999);
    assert!(events(&actions).is_empty());
    let m0 = s.pod("ml/m0").unwrap().clone();
    assert_eq!(
        s.check_bind(&m0, "a"),
        Err("gang g: data 25% ready on a".into())
    );
    let actions = s.reconcile(30_000);
    assert_eq!(
        events(&actions),
        vec![("m0".to_string(), "GangStartedWithoutData".to_string())]
    );
    assert_eq!(s.check_bind(&m0, "a"), Ok(()));
    assert!(s.gang_reports(30_000)[0].started_without_data);
}

#[test]
fn pod_group_gangs_take_their_size_from_the_pod_group() {
    let mut s = state();
    member(
        &mut s,
        "v0",
        1,
        json!({"scheduling.k8s.io/group-name": "vg"}),
    );
    let v0 = s.pod("ml/v0").unwrap().clone();
    s.reconcile(0);
    let f = s.filter(&v0, &["a"], &|_| None);
    assert_eq!(
        f.failed["a"],
        "gang vg: size unknown: set granary.io/gang-size or create PodGroup vg"
    );
    s.set_pod_group("ml", "vg", Some(2));
    s.reconcile(1);
    let f = s.filter(&v0, &["a"], &|_| None);
    assert_eq!(f.failed["a"], "gang vg: waiting for members (1/2)");
    member(
        &mut s,
        "v1",
        1,
        json!({"scheduling.k8s.io/group-name": "vg"}),
    );
    s.reconcile(2);
    let f = s.filter(&v0, &["a", "b"], &|_| None);
    assert_eq!(f.pass.len(), 1, "{f:?}");
    let notes: Vec<Action> = s.reconcile(3);
    assert!(
        notes.iter().any(
            |a| matches!(a, Action::Note { pod, phase, .. } if pod == "v1" && phase == "ready")
        )
    );
}
