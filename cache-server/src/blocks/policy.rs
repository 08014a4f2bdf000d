//! The block cache's policy seam: which blocks each tier admits and which it gives up for them.
//! Both tiers (memory, disk) run the same rule, decided here, once:
//!
//! - Every request for a block counts once in a frequency sketch (count-min, every counter
//!   halved every eight times as many requests as the fuller tier holds blocks, so that old
//!   popularity fades).
//! - A tier with room admits every block.
//! - A full tier orders its blocks by last use (LRU) and admits a new block only if
//!   - it has been asked for at least twice more often than the block it would evict (the least
//!     recently used), or
//!   - that block has not been asked for in eight times as many requests as the tier holds
//!     blocks (LRU would have given it up long ago).
//!
//! Both spans count the blocks a tier holds, not its capacity over the block size: a tier of
//! small files holds many more entries than it has room for whole blocks.
//!
//! Why, for training: a shuffled epoch reads every block once. Under LRU, every miss of an epoch
//! over a dataset larger than the tier evicts a block that the same epoch is about to read, so
//! epoch 2 over twice the tier hits about 0.16 instead of the optimum 0.50 (a tier that keeps the
//! half it holds). Here a block read once per epoch is never asked for twice more often than
//! another (within one epoch their counts differ by at most one), so a full tier keeps what it
//! holds, and that half hits every epoch. A block that is really hot (read many times per epoch,
//! an index, a header) wins its place at once; a one-off scan never does. A tier full of blocks
//! nobody reads any more (the last job's dataset) gives them up as they go cold, and the margin
//! closes as the halving fades their counts. The figures against LRU are in
//! docs/ARCHITECTURE.md, from `policy_simulation` below.
//!
//! The memory tier is foyer's LRU cache, told to forget the victims chosen here before each
//! insert; what foyer evicts on its own is reported back (`left`). The disk tier is ours and
//! evicts exactly the victims chosen here.

use datasketches::countmin::CountMinSketch;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// The sketch's halving period and a block's cold age, in requests per block the tier holds.
const SPAN: u64 = 8;
/// The smallest number of blocks those spans count (so that a tier nearly empty is not all cold).
const MIN_BLOCKS: u64 = 128;

/// A cache tier the policy governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TierId {
    Memory = 0,
    Disk = 1,
}

/// What a tier should do with a block offered to it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Keep it, after giving up these blocks (least recently used first).
    Yes { evict: Vec<u128> },
    /// Do not keep it: it is not asked for more often than what it would displace.
    No,
}

/// The admission and eviction state of both tiers.
#[derive(Debug)]
pub(crate) struct CachePolicy {
    state: Mutex<State>,
}

struct State {
    sketch: CountMinSketch<u16>,
    /// Requests counted so far.
    tick: u64,
    since_halving: u64,
    tiers: [Resident; 2],
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("tick", &self.tick)
            .finish_non_exhaustive()
    }
}

/// The blocks one tier holds, by last use.
#[derive(Debug, Default)]
struct Resident {
    capacity: u64,
    used: u64,
    /// Ordering sequence (unique per touch), so that `by_use` never collides.
    seq: u64,
    /// key -> (use sequence, request tick of last use, weight)
    by_key: HashMap<u128, (u64, u64, u64)>,
    /// Blocks admitted for a hint (`admit_anyway`), and whether they were read since: those
    /// read are the first to go for the next hinted block, so that a hint's prefetch cycles
    /// through about its budget and leaves the rest of the tier be.
    hinted: HashMap<u128, bool>,
    /// use sequence -> key, oldest first
    by_use: BTreeMap<u64, u128>,
}

impl Resident {
    fn new(capacity: u64) -> Self {
        Resident {
            capacity,
            ..Resident::default()
        }
    }

    /// A block not asked for in this many requests is cold: any block may replace it.
    fn cold_after(&self) -> u64 {
        SPAN * (self.by_key.len() as u64).max(MIN_BLOCKS)
    }

    fn touch(&mut self, key: u128, tick: u64) -> bool {
        let Some(entry) = self.by_key.get_mut(&key) else {
            return false;
        };
        if let Some(read) = self.hinted.get_mut(&key) {
            *read = true;
        }
        self.by_use.remove(&entry.0);
        self.seq += 1;
        entry.0 = self.seq;
        entry.1 = tick;
        self.by_use.insert(self.seq, key);
        true
    }

    fn insert(&mut self, key: u128, tick: u64, weight: u64) {
        self.remove(key);
        self.seq += 1;
        self.by_key.insert(key, (self.seq, tick, weight));
        self.by_use.insert(self.seq, key);
        self.used += weight;
    }

    /// The decision for `key` when it needs none: held already (touched), or larger than the
    /// tier.
    fn settled(&mut self, key: u128, tick: u64, weight: u64) -> Option<Admit> {
        if self.by_key.contains_key(&key) {
            self.touch(key, tick);
            return Some(Admit::Yes { evict: Vec::new() });
        }
        (weight > self.capacity).then_some(Admit::No)
    }

    /// Gives up `evict` and holds `key` instead.
    fn replace(&mut self, evict: &[u128], key: u128, tick: u64, weight: u64) {
        for v in evict {
            self.remove(*v);
        }
        self.insert(key, tick, weight);
    }

    fn remove(&mut self, key: u128) -> bool {
        self.hinted.remove(&key);
        match self.by_key.remove(&key) {
            Some((seq, _, weight)) => {
                self.by_use.remove(&seq);
                self.used -= weight;
                true
            }
            None => false,
        }
    }
}

/// The sketch's item: a block key.
struct SketchKey(u128);

impl Hash for SketchKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(self.0);
    }
}

impl CachePolicy {
    /// A policy for a memory tier and a disk tier of these capacities (bytes; 0 = no such tier).
    pub(crate) fn new(memory: u64, disk: u64) -> Self {
        // Four counters per 64 KiB of the larger tier (its most entries, were they all of the
        // smallest block size), 4,096 to 1 Mi: 32 KiB to 8 MiB of counters.
        let entries = memory.max(disk) / granary_core::BlockSize::MIN;
        let buckets = (4 * entries).clamp(1 << 12, 1 << 20) as u32;
        let state = State {
            sketch: CountMinSketch::new(4, buckets),
            tick: 0,
            since_halving: 0,
            tiers: [Resident::new(memory), Resident::new(disk)],
        };
        CachePolicy {
            state: Mutex::new(state),
        }
    }

    /// Counts one request for `key` (a hit or a miss, in any tier).
    pub(crate) fn request(&self, key: u128) {
        let mut s = self.state.lock().expect("policy lock");
        s.tick += 1;
        s.since_halving += 1;
        let held = s.tiers.iter().map(|t| t.by_key.len() as u64).max();
        if s.since_halving >= SPAN * held.unwrap_or(0).max(MIN_BLOCKS) {
            s.since_halving = 0;
            s.sketch.halve();
        }
        s.sketch.update(SketchKey(key));
    }

    /// A hit in `tier`: `key` becomes its most recently used block. False if the tier does not
    /// hold it as far as the policy knows.
    pub(crate) fn touch(&self, tier: TierId, key: u128) -> bool {
        let mut s = self.state.lock().expect("policy lock");
        let tick = s.tick;
        s.tiers[tier as usize].touch(key, tick)
    }

    /// Whether `tier` should keep `key` (`weight` bytes), and what it gives up for it. A yes
    /// counts the block as held at once (the tier must store it or call [`Self::left`]).
    pub(crate) fn admit(&self, tier: TierId, key: u128, weight: u64) -> Admit {
        let mut s = self.state.lock().expect("policy lock");
        let tick = s.tick;
        let freq = s.sketch.estimate(SketchKey(key));
        let State { sketch, tiers, .. } = &mut *s;
        let t = &mut tiers[tier as usize];
        if let Some(known) = t.settled(key, tick, weight) {
            return known;
        }
        // Walk the LRU end while the block does not fit; any victim it may not displace stops
        // the walk, and nothing is evicted.
        let mut evict = Vec::new();
        let mut freed = 0;
        for (_, &victim) in t.by_use.iter() {
            if t.used - freed + weight <= t.capacity {
                break;
            }
            let (_, last, w) = t.by_key[&victim];
            let cold = tick.saturating_sub(last) > t.cold_after();
            if !cold && freq <= sketch.estimate(SketchKey(victim)).saturating_add(1) {
                return Admit::No;
            }
            evict.push(victim);
            freed += w;
        }
        t.replace(&evict, key, tick, weight);
        Admit::Yes { evict }
    }

    /// `tier` must keep `key` (a block a reader said it will read soon): admitted whatever its
    /// count, giving up blocks admitted the same way and read since first, then blocks not
    /// hinted, then hinted blocks not read yet (least recently used first in each). A hint's
    /// prefetch then cycles through about its budget and the part of the dataset the tier keeps
    /// stays: with a backend slower than the reader, fetching that part again every epoch would
    /// cost more than it saves.
    pub(crate) fn admit_anyway(&self, tier: TierId, key: u128, weight: u64) -> Admit {
        let mut s = self.state.lock().expect("policy lock");
        let tick = s.tick;
        let t = &mut s.tiers[tier as usize];
        if let Some(known) = t.settled(key, tick, weight) {
            return known;
        }
        // Hinted blocks read since first, then blocks not hinted, then hinted blocks not read
        // yet; least recently used first in each.
        let mut evict = Vec::new();
        let mut freed = 0;
        for pass in [Some(true), None, Some(false)] {
            for (_, &victim) in t.by_use.iter() {
                if t.used - freed + weight <= t.capacity {
                    break;
                }
                if t.hinted.get(&victim).copied() == pass && !evict.contains(&victim) {
                    freed += t.by_key[&victim].2;
                    evict.push(victim);
                }
            }
        }
        t.replace(&evict, key, tick, weight);
        if !evict.is_empty() {
            // A block that took another's place; one that found room is kept like any other.
            t.hinted.insert(key, false);
        }
        Admit::Yes { evict }
    }

    /// `key` left `tier` (evicted by the tier itself, removed, or failed to be stored).
    pub(crate) fn left(&self, tier: TierId, key: u128) {
        self.state.lock().expect("policy lock").tiers[tier as usize].remove(key);
    }

    /// `tier` already holds `key` (found at startup): counted without a decision.
    pub(crate) fn adopt(&self, tier: TierId, key: u128, weight: u64) {
        let mut s = self.state.lock().expect("policy lock");
        let tick = s.tick;
        s.tiers[tier as usize].insert(key, tick, weight);
    }

    /// Whether the policy counts `key` as held by `tier`.
    pub(crate) fn holds(&self, tier: TierId, key: u128) -> bool {
        self.state.lock().expect("policy lock").tiers[tier as usize]
            .by_key
            .contains_key(&key)
    }

    /// Bytes the policy counts as held by `tier`.
    pub(crate) fn used(&self, tier: TierId) -> u64 {
        self.state.lock().expect("policy lock").tiers[tier as usize].used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 1 << 20;

    /// A tier that obeys the policy, as a cache would: hits touch, misses are offered.
    struct Tier {
        policy: CachePolicy,
        held: std::collections::HashSet<u128>,
        cap: u64,
        weight: u64,
    }

    impl Tier {
        fn new(blocks: u64) -> Self {
            Tier::of(blocks, BS)
        }

        /// A tier with room for `entries` entries of `weight` bytes.
        fn of(entries: u64, weight: u64) -> Self {
            Tier {
                policy: CachePolicy::new(entries * weight, 0),
                held: Default::default(),
                cap: entries * weight,
                weight,
            }
        }

        /// One request; true on a hit.
        fn read(&mut self, key: u128) -> bool {
            self.policy.request(key);
            if self.held.contains(&key) {
                assert!(self.policy.touch(TierId::Memory, key));
                return true;
            }
            if let Admit::Yes { evict } = self.policy.admit(TierId::Memory, key, self.weight) {
                for v in evict {
                    assert!(self.held.remove(&v), "evicted a block not held");
                }
                self.held.insert(key);
            }
            assert!(self.policy.used(TierId::Memory) <= self.cap);
            assert_eq!(
                self.held.len() as u64 * self.weight,
                self.policy.used(TierId::Memory)
            );
            false
        }
    }

    /// The reference: plain LRU of the same capacity.
    struct Lru {
        cap: usize,
        order: Vec<u128>,
    }

    impl Lru {
        fn read(&mut self, key: u128) -> bool {
            let hit = match self.order.iter().position(|&k| k == key) {
                Some(i) => {
                    self.order.remove(i);
                    true
                }
                None => false,
            };
            self.order.push(key);
            if self.order.len() > self.cap {
                self.order.remove(0);
            }
            hit
        }
    }

    /// A deterministic shuffle (xorshift), so the simulation is the same on every run.
    fn shuffled(n: u64, seed: u64) -> Vec<u128> {
        let mut v: Vec<u128> = (0..n as u128).collect();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    fn epochs(
        cache: &mut dyn FnMut(u128) -> bool,
        dataset: u64,
        offset: u128,
        n: usize,
    ) -> Vec<f64> {
        (0..n)
            .map(|e| {
                let order = shuffled(dataset, e as u64 + 1 + offset as u64);
                let hits = order.iter().filter(|&&k| cache(k + offset)).count();
                hits as f64 / dataset as f64
            })
            .collect()
    }

    /// Shuffled epochs over twice the tier: the policy keeps the half it holds (optimum 0.5);
    /// LRU thrashes. The figures are printed for docs/ARCHITECTURE.md.
    #[test]
    fn policy_simulation_shuffled_epochs() {
        // (entries the tier holds, their size, dataset over tier): 4 MiB blocks, and files of
        // 128 KiB (the bench's small files: many more entries than the tier has whole blocks).
        for (cap, weight, factor) in [
            (128u64, BS, 2.0f64),
            (128, BS, 1.5),
            (128, BS, 4.0),
            (1024, BS, 2.0),
            (1000, BS / 32, 2.0),
        ] {
            let dataset = (cap as f64 * factor) as u64;
            let mut tier = Tier::of(cap, weight);
            let mut lru = Lru {
                cap: cap as usize,
                order: Vec::new(),
            };
            let ours = epochs(&mut |k| tier.read(k), dataset, 0, 5);
            let theirs = epochs(&mut |k| lru.read(k), dataset, 0, 5);
            let optimum = cap as f64 / dataset as f64;
            println!(
                "tier {cap} entries of {} KiB, dataset {factor}x: policy {ours:.2?}, LRU {theirs:.2?}, optimum {optimum:.2}",
                weight >> 10
            );
            for (e, hit) in ours.iter().enumerate().skip(1) {
                assert!(
                    *hit >= optimum * 0.94,
                    "epoch {} hit {hit:.2} < 0.94 x optimum {optimum:.2} (tier {cap}, {factor}x)",
                    e + 1
                );
            }
        }
    }

    /// A dataset that fits the tier, read once the tier is full of another job's dataset that
    /// nobody reads any more, gets in within a few epochs.
    #[test]
    fn policy_simulation_next_job() {
        let cap = 128;
        let mut tier = Tier::new(cap);
        epochs(&mut |k| tier.read(k), 2 * cap, 0, 4);
        let next = epochs(&mut |k| tier.read(k), cap / 2, 1 << 40, 12);
        println!("next job's dataset (half the tier), epochs 1-12: {next:.2?}");
        let settled = next.iter().position(|&h| h >= 0.95).map(|e| e + 1);
        assert!(
            settled.is_some_and(|e| e <= 12),
            "the next job's dataset never settled: {next:.2?}"
        );
    }

    /// A hot set read between the blocks of a long scan stays; the scan does not flush it.
    #[test]
    fn policy_simulation_scan_resistance() {
        let cap = 128;
        let mut tier = Tier::new(cap);
        let mut lru = Lru {
            cap: cap as usize,
            order: Vec::new(),
        };
        let (mut ours, mut theirs, mut n) = (0, 0, 0);
        for i in 0..20_000u128 {
            // A hot set of 96 blocks on every other request, between blocks of a scan of
            // never-repeated blocks: 191 other blocks between two reads of a hot one, too many
            // for LRU to keep it.
            let key = if i % 2 == 0 {
                (i / 2) % 96
            } else {
                1_000_000 + i
            };
            let (a, b) = (tier.read(key), lru.read(key));
            if i % 2 == 0 && i > 2_000 {
                n += 1;
                ours += a as u32;
                theirs += b as u32;
            }
        }
        let (ours, theirs) = (ours as f64 / n as f64, theirs as f64 / n as f64);
        println!("hot set under a scan: policy {ours:.2}, LRU {theirs:.2}");
        assert!(ours >= 0.95, "hot set hit {ours:.2}");
    }

    #[test]
    fn hinted_blocks_make_room_for_each_other_first() {
        let p = CachePolicy::new(4 * BS, 0);
        for k in [1, 2] {
            assert!(matches!(p.admit(TierId::Memory, k, BS), Admit::Yes { .. }));
        }
        for k in [10, 11] {
            assert_eq!(
                p.admit_anyway(TierId::Memory, k, BS),
                Admit::Yes { evict: vec![] }
            );
        }
        // Full, nothing hinted yet (10 and 11 found room: kept like any block): the least
        // recently used block goes.
        assert_eq!(
            p.admit_anyway(TierId::Memory, 12, BS),
            Admit::Yes { evict: vec![1] }
        );
        assert_eq!(
            p.admit_anyway(TierId::Memory, 13, BS),
            Admit::Yes { evict: vec![2] }
        );
        // Block 12 was read: it goes before the kept blocks and block 13, still ahead.
        p.touch(TierId::Memory, 12);
        assert_eq!(
            p.admit_anyway(TierId::Memory, 14, BS),
            Admit::Yes { evict: vec![12] }
        );
        assert!(p.holds(TierId::Memory, 10) && p.holds(TierId::Memory, 11));
        assert!(p.holds(TierId::Memory, 13) && p.holds(TierId::Memory, 14));
    }

    #[test]
    fn a_tier_with_room_admits_everything_and_a_block_too_large_never() {
        let p = CachePolicy::new(4 * BS, 0);
        for k in 0..4 {
            assert_eq!(p.admit(TierId::Memory, k, BS), Admit::Yes { evict: vec![] });
        }
        assert_eq!(p.used(TierId::Memory), 4 * BS);
        assert_eq!(p.admit(TierId::Memory, 9, 5 * BS), Admit::No);
        p.left(TierId::Memory, 0);
        assert_eq!(p.used(TierId::Memory), 3 * BS);
        assert_eq!(p.admit(TierId::Memory, 9, BS), Admit::Yes { evict: vec![] });
    }

    #[test]
    fn a_block_asked_for_often_displaces_the_least_recently_used() {
        let p = CachePolicy::new(2 * BS, 0);
        for k in [1, 2] {
            p.request(k);
            assert!(matches!(p.admit(TierId::Memory, k, BS), Admit::Yes { .. }));
        }
        p.request(2);
        p.touch(TierId::Memory, 2);
        p.request(3);
        assert_eq!(p.admit(TierId::Memory, 3, BS), Admit::No);
        p.request(3);
        p.request(3);
        assert_eq!(
            p.admit(TierId::Memory, 3, BS),
            Admit::Yes { evict: vec![1] }
        );
    }
}
