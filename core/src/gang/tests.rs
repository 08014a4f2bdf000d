use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

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
