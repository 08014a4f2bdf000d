//! Moving gangs along: membership from the pods seen, node loss, data readiness, expiry and
//! planning, and the [`Action`]s each step asks of the driver.

use super::*;

impl HookState {
    /// Gang membership from the pods seen, node loss, data readiness, expiry and planning.
    pub fn reconcile(&mut self, now: Millis) -> Vec<Action> {
        let ttl = ms(self.config.reservation_ttl);
        let mut actions = Vec::new();

        // Membership.
        let mut groups: BTreeMap<String, Vec<&Intent>> = BTreeMap::new();
        for p in self.pods.values() {
            if let Some(g) = &p.gang
                && !p.finished
            {
                groups
                    .entry(gang_key(&p.namespace, &g.name))
                    .or_default()
                    .push(p);
            }
        }
        let mut specs: BTreeMap<String, (GangSpec, GangSource, String, Vec<Intent>)> =
            BTreeMap::new();
        for (key, mut members) in groups {
            members.sort_by(|a, b| a.key.cmp(&b.key));
            let first = members[0];
            let Some(size) = self.gang_size(first) else {
                continue;
            };
            let g = first.gang.as_ref().expect("grouped by gang");
            let spec = GangSpec {
                name: g.name.clone(),
                size,
                dataset: first.dataset.clone(),
                min_ready_percent: first.min_ready_percent,
                ready_timeout: Some(ms(first
                    .ready_timeout
                    .unwrap_or(self.config.max_warming)
                    .min(self.config.max_warming))),
            };
            specs.insert(
                key,
                (
                    spec,
                    g.source,
                    first.namespace.clone(),
                    members.into_iter().cloned().collect(),
                ),
            );
        }
        self.gangs.retain(|k, _| specs.contains_key(k));
        for (key, (spec, source, namespace, members)) in specs {
            let entry = self.gangs.entry(key).or_insert_with(|| GangEntry {
                gang: Gang::new(spec.clone(), now),
                namespace,
                source,
                gave_up_at: None,
            });
            if entry.gang.spec != spec {
                entry.gang = Gang::new(spec, now);
            }
            let present: Vec<String> = members.iter().map(|m| m.key.clone()).collect();
            let gone: Vec<String> = entry
                .gang
                .members
                .keys()
                .filter(|k| !present.contains(k))
                .cloned()
                .collect();
            for k in gone {
                entry.gang.remove_member(&k);
            }
            for m in &members {
                entry.gang.upsert_member(
                    Member {
                        pod: m.key.clone(),
                        gpus: m.gpus,
                    },
                    now,
                );
                if let Some(node) = &m.node
                    && entry.gang.bound.get(&m.key) != Some(node)
                {
                    entry.gang.member_bound(&m.key, node, now);
                }
            }
        }

        // Lost nodes, data readiness, time.
        let keys: Vec<String> = self.gangs.keys().cloned().collect();
        for key in &keys {
            let mut events = Vec::new();
            {
                let nodes = &self.nodes;
                let datasets = &self.datasets;
                let entry = self.gangs.get_mut(key).expect("listed");
                let was = entry.gang.phase;
                let lost: Vec<String> = entry
                    .gang
                    .plan
                    .as_ref()
                    .map(|p| {
                        p.nodes
                            .iter()
                            .filter(|n| !nodes.contains_key(*n))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                for n in lost {
                    events.extend(entry.gang.node_removed(&n));
                }
                if entry.gang.phase == GangPhase::Warming
                    && let (Some(plan), Some(d)) = (&entry.gang.plan, &entry.gang.spec.dataset)
                {
                    let pct = datasets
                        .get(d)
                        .and_then(|(v, _)| v.percent_on(&plan.nodes))
                        .unwrap_or(0.0);
                    events.extend(entry.gang.observe_data(pct, now, ttl));
                }
                events.extend(entry.gang.tick(now, ttl));
                if was != GangPhase::Ready
                    && entry.gang.phase == GangPhase::Ready
                    && let Some(c) = entry.gang.complete_at
                {
                    self.released.push(now.saturating_sub(c) as f64 / 1000.0);
                }
            }
            for e in events {
                if matches!(
                    e,
                    GangEvent::ReservationExpired { .. } | GangEvent::NodeGone { .. }
                ) && let Some(entry) = self.gangs.get_mut(key)
                {
                    entry.gave_up_at = Some(now);
                }
                actions.extend(self.event_actions(key, e));
            }
        }

        // Planning, oldest complete gang first.
        let mut order: Vec<(Millis, String)> = self
            .gangs
            .iter()
            .filter(|(_, e)| e.gang.needs_plan() && self.all_asked(e))
            .map(|(k, e)| (e.gang.complete_at.unwrap_or(now), k.clone()))
            .collect();
        order.sort();
        for (_, key) in order {
            let reserved = self.reserved(Some(&key));
            let entry = &self.gangs[&key];
            let view = entry
                .gang
                .spec
                .dataset
                .as_ref()
                .and_then(|d| self.datasets.get(d))
                .map(|(v, _)| v.holdings())
                .unwrap_or_default();
            let mut nodes: Vec<NodeState> = self
                .nodes
                .iter()
                .map(|(name, info)| NodeState {
                    name: name.clone(),
                    free_gpus: self.free_gpus(name, info.gpus, &reserved),
                    domain: info.domain.clone(),
                    dataset_bytes: view.get(name.as_str()).copied().unwrap_or(0),
                })
                .collect();
            nodes.sort_by(|a, b| a.name.cmp(&b.name));
            let members = entry.gang.unbound_members();
            let result = granary_core::gang::plan_gang(&members, &nodes);
            let entry = self.gangs.get_mut(&key).expect("listed");
            entry.gang.planned(result, now, ttl);
            if entry.gang.phase == GangPhase::Ready
                && let Some(c) = entry.gang.complete_at
            {
                self.released.push(now.saturating_sub(c) as f64 / 1000.0);
            }
        }

        // Loads onto the planned nodes of warming gangs.
        let retry = ms(self.config.load_retry);
        for entry in self.gangs.values() {
            let (Some(plan), Some(d)) = (&entry.gang.plan, &entry.gang.spec.dataset) else {
                continue;
            };
            if entry.gang.phase != GangPhase::Warming {
                continue;
            }
            let in_place = self
                .datasets
                .get(d)
                .is_some_and(|(v, _)| v.loading_onto(&plan.nodes));
            let asked = self
                .loads_asked
                .get(d)
                .is_some_and(|(n, at)| n == &plan.nodes && now.saturating_sub(*at) < retry);
            if !in_place && !asked {
                self.loads_asked
                    .insert(d.clone(), (plan.nodes.clone(), now));
                actions.push(Action::Load {
                    dataset: d.clone(),
                    nodes: plan.nodes.clone(),
                });
            }
        }

        // Phase notes on member pods (a change makes the scheduler retry them).
        for entry in self.gangs.values() {
            let phase = entry.gang.phase.as_str();
            for pod in entry.gang.members.keys() {
                if entry.gang.bound.contains_key(pod) {
                    continue;
                }
                if self.pods.get(pod).and_then(|p| p.phase_note.as_deref()) != Some(phase) {
                    let (ns, name) = split_key(pod);
                    actions.push(Action::Note {
                        namespace: ns.to_string(),
                        pod: name.to_string(),
                        phase: phase.to_string(),
                    });
                }
            }
        }
        actions
    }

    /// Whether the scheduler asked about every unbound member since the gang last gave up its
    /// reservation.
    fn all_asked(&self, entry: &GangEntry) -> bool {
        entry.gang.unbound_members().iter().all(|m| {
            self.asked
                .get(&m.pod)
                .is_some_and(|at| entry.gave_up_at.is_none_or(|g| *at >= g))
        })
    }

    fn event_actions(&self, key: &str, e: GangEvent) -> Vec<Action> {
        let Some(entry) = self.gangs.get(key) else {
            return Vec::new();
        };
        let name = &entry.gang.spec.name;
        let (reason, message) = match e {
            GangEvent::StartedWithoutData { percent } => (
                "GangStartedWithoutData",
                format!(
                    "gang {name}: ready timeout passed with the data {percent}% ready; starting anyway"
                ),
            ),
            GangEvent::ReservationExpired { bound, members } => (
                "GangReservationExpired",
                format!(
                    "gang {name}: {bound} of {members} members bound by the reservation's expiry; released, planning again"
                ),
            ),
            GangEvent::NodeGone { node } => (
                "GangNodeGone",
                format!("gang {name}: planned node {node} disappeared; planning again"),
            ),
        };
        entry
            .gang
            .members
            .keys()
            .map(|pod| {
                let (ns, p) = split_key(pod);
                Action::Event {
                    namespace: ns.to_string(),
                    pod: p.to_string(),
                    reason: reason.to_string(),
                    message: message.clone(),
                }
            })
            .collect()
    }
}
