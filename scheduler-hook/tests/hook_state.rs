//! `HookState` driven directly with `now`: what reconcile asks of the world when a planned node
//! disappears, a reservation expires, a ready timeout passes, and how gangs get their size from
//! PodGroups; reservations held only for pods the scheduler asks about, and always bounded.

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
    // The scheduler asks about it (a filter call).
    s.asked(&format!("ml/{name}"), 0);
}

/// A pod the watch sees but the scheduler never asks about (another scheduler's, abandoned).
fn unasked(s: &mut HookState, name: &str, gpus: u32, annotations: serde_json::Value) {
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
    // Planned again once the scheduler asks about the members again (the phase note's change
    // makes it retry them).
    assert_eq!(s.gang_reports(100)[0].state, "waiting-for-members");
    s.asked("ml/m0", 150);
    s.reconcile(160);
    assert_eq!(s.gang_reports(160)[0].state, "waiting-for-members");
    s.asked("ml/m1", 200);
    s.reconcile(200);
    assert_eq!(planned_nodes(&s), vec!["b", "c"]);
    assert_eq!(s.gang_reports(200)[0].state, "ready");
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
    // Released: the plain pod may have b now; nothing is planned until the scheduler asks
    // about the unbound member again.
    let f = s.filter(&plain, &["b", "c"], &|_| None);
    assert_eq!(f.pass, vec![0, 1]);
    s.reconcile(10_500);
    assert_eq!(s.gang_reports(10_500)[0].state, "waiting-for-members");
    s.asked("ml/m1", 11_000);
    s.reconcile(11_000);
    // Re-planned for the unbound member; m0 stays where it is bound.
    let report = &s.gang_reports(11_000)[0];
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
        s.check_bind(&m0, "a", 29_999),
        Err("gang g: data 25% ready on a".into())
    );
    let actions = s.reconcile(30_000);
    assert_eq!(
        events(&actions),
        vec![("m0".to_string(), "GangStartedWithoutData".to_string())]
    );
    assert_eq!(s.check_bind(&m0, "a", 30_000), Ok(()));
    assert!(s.gang_reports(30_000)[0].started_without_data);
}

#[test]
fn gangs_the_scheduler_never_asks_about_hold_nothing() {
    let mut s = state();
    let ann = json!({"granary.io/gang": "g", "granary.io/gang-size": "2"});
    unasked(&mut s, "x0", 4, ann.clone());
    unasked(&mut s, "x1", 4, ann);
    for now in [0, 10_000, 100_000] {
        s.reconcile(now);
        let r = &s.gang_reports(now)[0];
        assert_eq!(r.state, "waiting-for-members", "{r:?}");
        assert!(r.nodes.is_empty());
    }
    member(&mut s, "plain", 4, json!({}));
    let plain = s.pod("ml/plain").unwrap().clone();
    assert_eq!(s.filter(&plain, &["a", "b", "c"], &|_| None).pass.len(), 3);
    // One member asked about is not enough.
    s.asked("ml/x0", 100_001);
    s.reconcile(100_002);
    assert_eq!(s.gang_reports(100_002)[0].state, "waiting-for-members");
}

#[test]
fn warming_is_bounded_and_then_the_reservation_expires() {
    let mut s = HookState::new(HookConfig {
        reservation_ttl: Duration::from_secs(10),
        max_warming: Duration::from_secs(60),
        ..HookConfig::default()
    });
    s.set_node("a", 4, &BTreeMap::new());
    // No ready-timeout, and one longer than the hook allows: both end at max_warming.
    let ann = json!({"granary.io/gang": "g", "granary.io/gang-size": "1",
        "granary.io/dataset": "never"});
    member(&mut s, "m0", 2, ann);
    let ann = json!({"granary.io/gang": "h", "granary.io/gang-size": "1",
        "granary.io/dataset": "never", "granary.io/ready-timeout": "100h"});
    member(&mut s, "n0", 2, ann);
    s.reconcile(0);
    assert!(s.gang_reports(0).iter().all(|r| r.state == "warming"));
    s.reconcile(59_999);
    assert!(s.gang_reports(59_999).iter().all(|r| r.state == "warming"));
    let actions = s.reconcile(60_000);
    assert_eq!(
        events(&actions),
        vec![
            ("m0".to_string(), "GangStartedWithoutData".to_string()),
            ("n0".to_string(), "GangStartedWithoutData".to_string())
        ]
    );
    // Nobody binds: the reservation expires and nothing more is held.
    let actions = s.reconcile(70_000);
    assert_eq!(events(&actions).len(), 2, "{actions:?}");
    s.reconcile(80_000);
    for r in s.gang_reports(80_000) {
        assert_eq!(r.state, "waiting-for-members", "{r:?}");
        assert!(r.nodes.is_empty());
    }
}

#[test]
fn a_pod_without_a_gang_binds_only_after_a_recent_filter_to_a_node_that_fits() {
    let mut s = state();
    unasked(&mut s, "p", 2, json!({}));
    let p = s.pod("ml/p").unwrap().clone();
    let e = s.check_bind(&p, "a", 0).unwrap_err();
    assert!(e.contains("was not filtered by this hook"), "{e}");
    s.asked("ml/p", 1000);
    assert_eq!(s.check_bind(&p, "a", 2000), Ok(()));
    // Too late: the TTL (10 s) passed.
    let e = s.check_bind(&p, "a", 11_001).unwrap_err();
    assert!(e.contains("nothing reserved for it"), "{e}");
    // A node without the GPUs.
    s.set_node("small", 1, &BTreeMap::new());
    let e = s.check_bind(&p, "small", 2000).unwrap_err();
    assert!(e.contains("1 of 1 nvidia.com/gpu free"), "{e}");
    // Once bound, never again.
    s.bound("ml/p", "a", 2000);
    let p = s.pod("ml/p").unwrap().clone();
    assert_eq!(
        s.check_bind(&p, "b", 2001),
        Err("pod ml/p is already bound to a".into())
    );
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
