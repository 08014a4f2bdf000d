//! Placement: which workers own a block.
//!
//! Rendezvous (highest-random-weight) hashing: every live member scores every block key with a
//! hash of (member id, key); the `r` highest scores own the block, in order (the first is the
//! primary, the rest are replicas and failover candidates). A member that leaves moves only the
//! blocks it owned; a member that joins takes about 1/N of the blocks, from every other member
//! evenly. No table is stored: any node with the same member list computes the same owners.
//! Placement can be restricted to a subset of nodes (a dataset pinned to the nodes a job runs on).

use crate::object::BlockKey;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Checks a node id: it names the node's certificate, so it must be a DNS name (what Kubernetes
/// node names are): 1-253 ASCII letters, digits, `-` and `.`, in labels of 1-63 that neither
/// start nor end with `-`.
pub fn check_node_id(id: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("node id {id:?} {why}"));
    if id.is_empty() || id.len() > 253 {
        return bad("must be 1-253 characters");
    }
    for label in id.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("must be dot-separated labels of 1-63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("may hold only ASCII letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("has a label starting or ending with '-'");
        }
    }
    Ok(())
}

/// A member's stable identity as placement sees it.
pub trait Member {
    fn id(&self) -> &str;
}

impl Member for String {
    fn id(&self) -> &str {
        self
    }
}

impl Member for &str {
    fn id(&self) -> &str {
        self
    }
}

fn score(member: &str, key: BlockKey) -> u64 {
    let k = key.0;
    xxh3_64_with_seed(member.as_bytes(), (k as u64) ^ ((k >> 64) as u64))
}

/// The `r` owners of `key` among `members`, best first (fewer when there are fewer members).
/// Ties (practically impossible) break by member id, so every node agrees.
pub fn owners<M: Member>(key: BlockKey, members: &[M], r: usize) -> Vec<&M> {
    let mut scored: Vec<(u64, &M)> = members.iter().map(|m| (score(m.id(), key), m)).collect();
    let r = r.min(scored.len());
    if r == 0 {
        return Vec::new();
    }
    scored.select_nth_unstable_by(r - 1, |a, b| {
        b.0.cmp(&a.0).then_with(|| a.1.id().cmp(b.1.id()))
    });
    scored.truncate(r);
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id().cmp(b.1.id())));
    scored.into_iter().map(|(_, m)| m).collect()
}

/// Whom to ask for a block, in order: its owners, then every other member.
#[derive(Debug, PartialEq, Eq)]
pub struct AskOrder<'a, M> {
    /// The `r` owners, best first, but the member `local` first when it is one of them (its
    /// copy costs no network).
    pub owners: Vec<&'a M>,
    /// Every other member, in `members`' order: a reader's last resort before failing.
    pub others: Vec<&'a M>,
}

impl<'a, M> AskOrder<'a, M> {
    /// Owners, then the others: the whole failover order of a reader.
    pub fn all(&self) -> impl Iterator<Item = &'a M> + '_ {
        self.owners.iter().chain(&self.others).copied()
    }
}

/// The failover order for `key` (see [`AskOrder`]). A client asks down `all()` while the error
/// it gets is worth retrying elsewhere (`granary_proto::ApiError::worth_retrying_elsewhere`); a
/// worker that is no owner asks only `owners`, then reads the backend itself.
pub fn ask_order<'a, M: Member>(
    key: BlockKey,
    members: &'a [M],
    r: usize,
    local: Option<&str>,
) -> AskOrder<'a, M> {
    let mut owners = owners(key, members, r);
    if let Some(local) = local {
        // Stable: the other owners keep their rank.
        owners.sort_by_key(|m| m.id() != local);
    }
    let others = members
        .iter()
        .filter(|m| !owners.iter().any(|o| o.id() == m.id()))
        .collect();
    AskOrder { owners, others }
}

/// The owners of `key` among the members whose ids `allowed` accepts (a pinned node set).
pub fn owners_within<M: Member>(
    key: BlockKey,
    members: &[M],
    r: usize,
    allowed: impl Fn(&str) -> bool,
) -> Vec<&M> {
    let subset: Vec<&M> = members.iter().filter(|m| allowed(m.id())).collect();
    owners(key, &subset, r).into_iter().copied().collect()
}

impl<M: Member> Member for &M {
    fn id(&self) -> &str {
        (**self).id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn node_ids_are_certificate_names() {
        for ok in ["w1", "node-a.example", "ip-10-0-0-1.ec2.internal", "W1"] {
            assert!(check_node_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "../x",
            "w1\n",
            &"a".repeat(64),
        ] {
            assert!(check_node_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ask_order_puts_the_local_owner_first_then_the_other_owners_then_everyone_else() {
        let m = members(6);
        let k = key(7);
        let ranked: Vec<&String> = owners(k, &m, 3);
        let plain = ask_order(k, &m, 3, None);
        assert_eq!(plain.owners, ranked);
        assert_eq!(plain.others.len(), 3);
        assert!(plain.others.iter().all(|o| !ranked.contains(o)));
        assert_eq!(plain.all().count(), 6);
        // The local member first when it owns the block; the others keep their rank.
        let local = ranked[2].as_str();
        let mine = ask_order(k, &m, 3, Some(local));
        assert_eq!(mine.owners, vec![ranked[2], ranked[0], ranked[1]]);
        // A local member that owns nothing changes nothing.
        let outsider = plain.others[0].as_str();
        assert_eq!(ask_order(k, &m, 3, Some(outsider)), plain);
    }

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn key(i: u64) -> BlockKey {
        BlockKey::new(0xfeed, i)
    }

    #[test]
    fn owners_are_distinct_ordered_and_deterministic() {
        let m = members(5);
        for i in 0..1000 {
            let o = owners(key(i), &m, 3);
            assert_eq!(o.len(), 3);
            assert!(o[0] != o[1] && o[1] != o[2] && o[0] != o[2]);
            assert_eq!(o, owners(key(i), &m, 3));
            // Order of the member list does not matter.
            let mut rev = m.clone();
            rev.reverse();
            assert_eq!(
                owners(key(i), &rev, 3)
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>(),
                o.into_iter().cloned().collect::<Vec<_>>()
            );
        }
        assert!(owners(key(1), &Vec::<String>::new(), 2).is_empty());
        assert_eq!(owners(key(1), &members(2), 5).len(), 2);
    }

    #[test]
    fn load_is_even() {
        let m = members(4);
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            let o = owners(key(i), &m, 1)[0];
            counts[m.iter().position(|x| x == o).unwrap()] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn restricted_to_a_node_set() {
        let m = members(6);
        for i in 0..500 {
            let o = owners_within(key(i), &m, 2, |id| id == "node-1" || id == "node-4");
            assert_eq!(o.len(), 2);
            assert!(o.iter().all(|x| *x == "node-1" || *x == "node-4"));
        }
    }

    proptest! {
        /// A member leaving moves exactly the blocks it owned; nothing else changes owner.
        #[test]
        fn leaving_moves_only_its_blocks(n in 2usize..12, gone in 0usize..12, seed in any::<u128>()) {
            let m = members(n);
            let gone = gone % n;
            let rest: Vec<String> = m.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, x)| x.clone()).collect();
            for i in 0..300 {
                let k = BlockKey::new(seed, i);
                let before = owners(k, &m, 1)[0].clone();
                let after = owners(k, &rest, 1)[0].clone();
                if before != m[gone] {
                    prop_assert_eq!(before, after);
                }
            }
        }

        /// A member joining takes about 1/(N+1) of the blocks, and only ever takes: no block
        /// moves between two old members.
        #[test]
        fn joining_takes_a_fair_share(n in 1usize..10, seed in any::<u128>()) {
            let m = members(n);
            let mut grown = m.clone();
            grown.push("newcomer".into());
            let total = 2000;
            let mut moved = 0;
            for i in 0..total {
                let k = BlockKey::new(seed, i);
                let before = owners(k, &m, 1)[0].clone();
                let after = owners(k, &grown, 1)[0].clone();
                if before != after {
                    prop_assert_eq!(after.as_str(), "newcomer");
                    moved += 1;
                }
            }
            let expected = total as f64 / (n + 1) as f64;
            prop_assert!((moved as f64) > expected * 0.7 && (moved as f64) < expected * 1.3, "moved {} of {}, expected ~{}", moved, total, expected);
        }
    }
}
