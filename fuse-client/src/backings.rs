//! Passthrough backing files kept registered after their inode's last close.
//!
//! Handing a local copy to the kernel costs an open, an fstat and an ioctl on the first open of
//! an inode, and another ioctl to unregister it on the last close: for a small file read whole,
//! more than the read. A pinned file cannot change while its pin lasts, so after the last close
//! its registration is kept here, and the next open of the same version passes it to the kernel
//! again without any of that. The kernel allows that: a registered backing file belongs to the
//! connection, not to an open file, and an inode with no open file has no backing file of its
//! own, so any registered one may be named at its next open.
//!
//! Bounded both ways: at most `max` inodes (the one released longest ago goes first) and each
//! for at most `ttl` (as long as the client trusts a pinned entry without asking: the pinned TTL
//! while the worker's pins epoch is known, else the attribute TTL), after which
//! [`IdleBackings::expire`] gives it back; [`IdleBackings::clear`] gives back everything when
//! the pins change. Everything removed is returned to
//! the caller, which drops it (unregisters it: an ioctl) outside its locks. Pure logic: the
//! caller passes `now`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

struct Idle<B> {
    fingerprint: u128,
    backing: B,
    since: Instant,
    /// Which `order` item is this one's (older items of the same inode are stale).
    seq: u64,
}

/// What [`IdleBackings::take`] found for an inode.
pub enum Kept<B> {
    /// A backing file of the version asked for, kept for less than the TTL: use it.
    Reusable(B),
    /// One of another version, or kept too long: drop it.
    Unusable(B),
    None,
}

pub struct IdleBackings<B> {
    max: usize,
    ttl: Duration,
    by_ino: HashMap<u64, Idle<B>>,
    /// (inode, seq) in the order they were kept; items whose seq no longer matches are stale.
    order: VecDeque<(u64, u64)>,
    next_seq: u64,
}

impl<B> IdleBackings<B> {
    pub fn new(max: usize, ttl: Duration) -> Self {
        IdleBackings {
            max,
            ttl,
            by_ino: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    /// How long a backing may be kept from now on (also for those kept already).
    pub fn set_ttl(&mut self, ttl: Duration) {
        self.ttl = ttl;
    }

    /// Removes and returns everything kept.
    pub fn clear(&mut self) -> Vec<B> {
        self.order.clear();
        self.by_ino.drain().map(|(_, i)| i.backing).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }

    fn fresh(&self, idle: &Idle<B>, now: Instant) -> bool {
        now.saturating_duration_since(idle.since) < self.ttl
    }

    /// Whether a reusable backing file of version `fingerprint` is kept for `ino`.
    pub fn holds(&self, ino: u64, fingerprint: u128, now: Instant) -> bool {
        self.by_ino
            .get(&ino)
            .is_some_and(|i| i.fingerprint == fingerprint && self.fresh(i, now))
    }

    /// Keeps `backing` (of version `fingerprint`) for `ino`, just released. Returns what has to
    /// go: expired ones, the least recently kept beyond `max`, a previous one of `ino`, or
    /// `backing` itself when nothing may be kept.
    pub fn keep(&mut self, ino: u64, fingerprint: u128, backing: B, now: Instant) -> Vec<B> {
        let mut out = self.expire(now);
        if self.max == 0 || self.ttl.is_zero() {
            out.push(backing);
            return out;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let idle = Idle {
            fingerprint,
            backing,
            since: now,
            seq,
        };
        if let Some(previous) = self.by_ino.insert(ino, idle) {
            out.push(previous.backing);
        }
        self.order.push_back((ino, seq));
        while self.by_ino.len() > self.max {
            let Some((old, old_seq)) = self.order.pop_front() else {
                break;
            };
            if self.by_ino.get(&old).is_some_and(|i| i.seq == old_seq) {
                out.extend(self.by_ino.remove(&old).map(|i| i.backing));
            }
        }
        self.compact();
        out
    }

    /// Removes what is kept for `ino`, saying whether it can serve an open of `fingerprint`.
    pub fn take(&mut self, ino: u64, fingerprint: u128, now: Instant) -> Kept<B> {
        let Some(idle) = self.by_ino.remove(&ino) else {
            return Kept::None;
        };
        if idle.fingerprint == fingerprint && self.fresh(&idle, now) {
            Kept::Reusable(idle.backing)
        } else {
            Kept::Unusable(idle.backing)
        }
    }

    /// Removes what is kept for `ino` (its inode is gone).
    pub fn remove(&mut self, ino: u64) -> Option<B> {
        self.by_ino.remove(&ino).map(|i| i.backing)
    }

    /// Removes and returns everything kept for `ttl` or longer.
    pub fn expire(&mut self, now: Instant) -> Vec<B> {
        let mut out = Vec::new();
        while let Some(&(ino, seq)) = self.order.front() {
            match self.by_ino.get(&ino) {
                Some(i) if i.seq == seq => {
                    if self.fresh(i, now) {
                        break;
                    }
                    out.extend(self.by_ino.remove(&ino).map(|i| i.backing));
                }
                // Taken, removed or kept again since: a stale item.
                _ => {}
            }
            self.order.pop_front();
        }
        out
    }

    /// Drops stale `order` items once they outnumber the live ones (amortized O(1) per keep).
    fn compact(&mut self) {
        if self.order.len() > 2 * self.by_ino.len() + 64 {
            let by_ino = &self.by_ino;
            self.order
                .retain(|(ino, seq)| by_ino.get(ino).is_some_and(|i| i.seq == *seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn reusable<B>(k: Kept<B>) -> Option<B> {
        match k {
            Kept::Reusable(b) => Some(b),
            _ => None,
        }
    }

    #[test]
    fn a_kept_backing_serves_its_version_within_the_ttl_only() {
        let t0 = Instant::now();
        let mut idle = IdleBackings::new(10, TTL);
        assert!(idle.keep(1, 0xa, "a", t0).is_empty());
        assert!(idle.holds(1, 0xa, t0 + Duration::from_secs(29)));
        assert!(!idle.holds(1, 0xb, t0), "another version");
        assert!(!idle.holds(1, 0xa, t0 + TTL), "expired");
        assert!(!idle.holds(2, 0xa, t0), "another inode");
        assert_eq!(reusable(idle.take(1, 0xa, t0)), Some("a"));
        assert!(matches!(idle.take(1, 0xa, t0), Kept::None), "taken once");

        idle.keep(1, 0xa, "a", t0);
        assert!(matches!(idle.take(1, 0xb, t0), Kept::Unusable("a")));
        idle.keep(1, 0xa, "a", t0);
        assert!(matches!(idle.take(1, 0xa, t0 + TTL), Kept::Unusable("a")));
        assert!(idle.is_empty());
    }

    #[test]
    fn the_least_recently_kept_go_first_beyond_the_bound() {
        let t0 = Instant::now();
        let mut idle = IdleBackings::new(2, TTL);
        idle.keep(1, 1, "one", t0);
        idle.keep(2, 2, "two", t0);
        // Reopened and released again: inode 1 is now the most recent.
        assert_eq!(reusable(idle.take(1, 1, t0)), Some("one"));
        idle.keep(1, 1, "one", t0);
        assert_eq!(idle.keep(3, 3, "three", t0), vec!["two"]);
        assert_eq!(idle.len(), 2);
        assert!(idle.holds(1, 1, t0) && idle.holds(3, 3, t0));
        // A second keep of an inode returns the first.
        assert_eq!(idle.keep(3, 4, "three-b", t0), vec!["three"]);
        assert_eq!(idle.remove(1), Some("one"));
        assert_eq!(idle.remove(1), None);
    }

    #[test]
    fn expiry_returns_what_is_too_old_and_nothing_is_kept_without_a_ttl() {
        let t0 = Instant::now();
        let mut idle = IdleBackings::new(10, TTL);
        idle.keep(1, 1, "old", t0);
        idle.keep(2, 2, "new", t0 + Duration::from_secs(20));
        assert!(idle.expire(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(idle.expire(t0 + TTL), vec!["old"]);
        assert_eq!(idle.expire(t0 + Duration::from_secs(50)), vec!["new"]);
        assert!(idle.is_empty());

        let mut none = IdleBackings::new(10, Duration::ZERO);
        assert_eq!(none.keep(1, 1, "x", t0), vec!["x"]);
        let mut none = IdleBackings::new(0, TTL);
        assert_eq!(none.keep(1, 1, "x", t0), vec!["x"]);
    }

    #[test]
    fn a_new_ttl_applies_to_what_is_kept_and_clear_gives_back_everything() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut idle = IdleBackings::new(10, hour);
        idle.keep(1, 1, "a", t0);
        idle.keep(2, 2, "b", t0 + Duration::from_secs(1));
        assert!(idle.holds(1, 1, t0 + Duration::from_secs(600)));
        idle.set_ttl(TTL);
        assert!(!idle.holds(1, 1, t0 + Duration::from_secs(600)));
        assert!(matches!(idle.take(2, 2, t0 + TTL), Kept::Reusable("b")));
        assert_eq!(idle.keep(2, 2, "b", t0 + TTL), vec!["a"], "expired");
        idle.keep(3, 3, "c", t0 + TTL);
        let mut all = idle.clear();
        all.sort();
        assert_eq!(all, vec!["b", "c"]);
        assert!(idle.is_empty() && idle.expire(t0 + hour).is_empty());
    }

    #[test]
    fn reopening_one_file_over_and_over_stays_small() {
        let t0 = Instant::now();
        let mut idle = IdleBackings::new(10, TTL);
        for _ in 0..10_000 {
            assert!(idle.keep(7, 7, (), t0).is_empty());
            assert!(reusable(idle.take(7, 7, t0)).is_some());
        }
        assert!(idle.order.len() <= 64 + 2, "{}", idle.order.len());
    }
}
