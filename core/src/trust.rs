//! The FUSE client's pins-epoch trust rules: when a pinned entry is trusted without asking the
//! worker, which TTL the kernel gets for an entry, and what to drop when an epoch ends.
//!
//! An entry the worker answered from a pinned dataset's frozen manifest cannot change version
//! while the pin lasts, so the client trusts it instead of asking the worker (outside pins every
//! open asks: close-to-open consistency). For how long: while the worker's pins epoch is the one
//! the client knew when it asked for the entry ([`Seen`]), and the kernel is told to keep such
//! entries for the pinned TTL ([`Ttls::kernel`]); when the epoch changes, the entries the kernel
//! keeps under it must be dropped ([`EpochCheck::to_invalidate`]). A worker that does not track
//! its pins, or does not answer, gets the attribute TTL.
//!
//! [`PinsView`] is what the client knows of the worker's epoch, advanced at each poll by
//! [`PinsView::answered`] and [`PinsView::check`]. Pure logic: the caller passes `now` and holds
//! the locks.

use std::time::{Duration, Instant};

/// When an inode's entry was last had from the worker, and the worker's pins epoch the client
/// knew before asking (the worker's `pins_epoch`): a pinned entry is trusted while that epoch
/// holds, any other for the attribute TTL after `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub at: Instant,
    pub epoch: Option<u64>,
}

/// A pinned entry had in the epoch still known (`known`): trusted, and kept by the kernel, for
/// as long as the epoch holds.
pub fn pinned_in_known_epoch(pinned: bool, seen: Seen, known: Option<u64>) -> bool {
    pinned && seen.epoch.is_some() && seen.epoch == known
}

/// The mount's two TTLs: `attr`, how long the kernel (and the client) may trust attributes and
/// entries; `pinned`, how long the kernel may keep a pinned entry while the pins epoch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttls {
    pub attr: Duration,
    pub pinned: Duration,
}

/// How long the kernel may keep an entry, and the pins epoch it is then kept under (to be named
/// for the kernel to drop when that epoch ends), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelTtl {
    pub ttl: Duration,
    pub kept_under: Option<u64>,
}

impl Ttls {
    /// How long the kernel keeps a pinned entry trusted under a known epoch: at least `attr`.
    pub fn pinned_ttl(&self) -> Duration {
        self.pinned.max(self.attr)
    }

    /// How long the kernel may keep an entry (`pinned` or not), had as `seen`, with `known` the
    /// pins epoch known now; an entry given the pinned TTL is kept under its epoch.
    pub fn kernel(&self, pinned: bool, seen: Seen, known: Option<u64>) -> KernelTtl {
        match known {
            Some(epoch) if pinned_in_known_epoch(pinned, seen, known) => KernelTtl {
                ttl: self.pinned_ttl(),
                kept_under: Some(epoch),
            },
            _ => KernelTtl {
                ttl: self.attr,
                kept_under: None,
            },
        }
    }

    /// Whether an entry, had as `seen`, may be used without asking the worker again. `now` is
    /// read only when the epoch does not decide.
    pub fn fresh(
        &self,
        pinned: bool,
        seen: Seen,
        known: Option<u64>,
        now: impl FnOnce() -> Instant,
    ) -> bool {
        pinned_in_known_epoch(pinned, seen, known)
            || now().saturating_duration_since(seen.at) < self.attr
    }

    /// How long a passthrough registration kept for a pinned file may outlive its last close:
    /// as long as the client trusts a pinned entry without asking (the pinned TTL while an epoch
    /// is known, else the attribute TTL).
    pub fn kept_registrations(&self, known: Option<u64>) -> Duration {
        match known {
            Some(_) => self.pinned_ttl(),
            None => self.attr,
        }
    }
}

/// What the client knows of the worker's pins epoch.
#[derive(Debug, Default)]
pub struct PinsView {
    epoch: Option<u64>,
    /// When the worker last answered.
    checked: Option<Instant>,
    /// The epoch known at the last check: pinned entries had in it are trusted, and the kernel
    /// may keep them, until a check finds it changed or lapsed.
    trusted: Option<u64>,
    /// The epoch that ended at the last check, if one did: its entries are named once more.
    retired: Option<u64>,
}

/// What a check of the pins epoch found ([`PinsView::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochCheck {
    /// The epoch known now (the worker answered within the attribute TTL), trusted from now on.
    pub known: Option<u64>,
    /// The epoch trusted until now, if it is no longer the one known: its entries are trusted no
    /// more, and the kernel must drop those it keeps.
    pub ended: Option<u64>,
    /// The epoch that ended at the check before, if one did: its entries are named once more (an
    /// answer decided under the old epoch may reach the kernel after the first invalidation).
    pub again: Option<u64>,
}

impl EpochCheck {
    /// The epochs whose kept entries the kernel must drop now: `ended`, then `again`.
    pub fn to_invalidate(&self) -> impl Iterator<Item = u64> {
        [self.ended, self.again].into_iter().flatten()
    }
}

impl PinsView {
    /// Takes the worker's answer (its epoch, `None` if it does not track its pins) at `now`.
    pub fn answered(&mut self, epoch: Option<u64>, now: Instant) {
        self.epoch = epoch;
        self.checked = Some(now);
    }

    /// The epoch, if the worker answered within `ttl`.
    pub fn known(&self, now: Instant, ttl: Duration) -> Option<u64> {
        self.checked
            .filter(|at| now.saturating_duration_since(*at) < ttl)
            .and(self.epoch)
    }

    /// The pins epoch pinned entries are trusted under, as the last check left it (the client
    /// stops trusting at the check that tells the kernel to drop them, not before).
    pub fn trusted(&self) -> Option<u64> {
        self.trusted
    }

    /// Ends a check at `now` (after [`PinsView::answered`], if the worker answered): the epoch
    /// known with the attribute TTL `ttl` becomes the trusted one; the one trusted before ends
    /// if it differs.
    pub fn check(&mut self, now: Instant, ttl: Duration) -> EpochCheck {
        let known = self.known(now, ttl);
        let ended = std::mem::replace(&mut self.trusted, known).filter(|e| Some(*e) != known);
        let again = std::mem::replace(&mut self.retired, ended);
        EpochCheck {
            known,
            ended,
            again,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn ttls() -> Ttls {
        Ttls {
            attr: 30 * SEC,
            pinned: 3600 * SEC,
        }
    }

    fn seen(at: Instant, epoch: Option<u64>) -> Seen {
        Seen { at, epoch }
    }

    #[test]
    fn a_pinned_entry_is_trusted_only_in_the_epoch_it_was_had_in() {
        let t0 = Instant::now();
        assert!(pinned_in_known_epoch(true, seen(t0, Some(7)), Some(7)));
        assert!(!pinned_in_known_epoch(false, seen(t0, Some(7)), Some(7)));
        assert!(!pinned_in_known_epoch(true, seen(t0, Some(7)), Some(8)));
        assert!(!pinned_in_known_epoch(true, seen(t0, Some(7)), None));
        assert!(
            !pinned_in_known_epoch(true, seen(t0, None), None),
            "no epoch"
        );
    }

    #[test]
    fn the_kernel_keeps_a_trusted_pinned_entry_for_the_pinned_ttl_under_its_epoch() {
        let t0 = Instant::now();
        let t = ttls();
        assert_eq!(
            t.kernel(true, seen(t0, Some(7)), Some(7)),
            KernelTtl {
                ttl: 3600 * SEC,
                kept_under: Some(7)
            }
        );
        let attr = KernelTtl {
            ttl: 30 * SEC,
            kept_under: None,
        };
        assert_eq!(t.kernel(false, seen(t0, Some(7)), Some(7)), attr);
        assert_eq!(t.kernel(true, seen(t0, Some(6)), Some(7)), attr);
        assert_eq!(t.kernel(true, seen(t0, None), None), attr);
        let short = Ttls {
            attr: 30 * SEC,
            pinned: SEC,
        };
        assert_eq!(short.pinned_ttl(), 30 * SEC, "at least the attribute TTL");
        assert_eq!(short.kernel(true, seen(t0, Some(7)), Some(7)).ttl, 30 * SEC);
    }

    #[test]
    fn an_entry_is_fresh_while_its_epoch_holds_or_for_the_attribute_ttl() {
        let t0 = Instant::now();
        let t = ttls();
        let later = || t0 + 31 * SEC;
        assert!(t.fresh(true, seen(t0, Some(7)), Some(7), later));
        assert!(!t.fresh(true, seen(t0, Some(7)), Some(8), later));
        assert!(!t.fresh(false, seen(t0, Some(7)), Some(7), later));
        assert!(t.fresh(false, seen(t0, None), None, || t0 + 29 * SEC));
        assert!(
            t.fresh(false, seen(t0 + SEC, None), None, || t0),
            "clock behind"
        );
        let mut read = false;
        assert!(t.fresh(true, seen(t0, Some(7)), Some(7), || {
            read = true;
            t0
        }));
        assert!(!read, "the epoch decides: no clock read");
        assert_eq!(t.kept_registrations(Some(1)), 3600 * SEC);
        assert_eq!(t.kept_registrations(None), 30 * SEC);
    }

    #[test]
    fn an_epoch_that_changes_is_named_at_that_check_and_the_next() {
        let t0 = Instant::now();
        let ttl = 30 * SEC;
        let mut pins = PinsView::default();
        let check = |pins: &mut PinsView, answer: Option<Option<u64>>, at: Duration| {
            if let Some(epoch) = answer {
                pins.answered(epoch, t0 + at);
            }
            pins.check(t0 + at, ttl)
        };
        let c = check(&mut pins, Some(Some(7)), SEC);
        assert_eq!((c.known, c.ended, c.again), (Some(7), None, None));
        assert_eq!(pins.trusted(), Some(7));
        assert_eq!(check(&mut pins, Some(Some(7)), 2 * SEC).ended, None);
        let c = check(&mut pins, Some(Some(8)), 3 * SEC);
        assert_eq!((c.known, c.ended, c.again), (Some(8), Some(7), None));
        assert_eq!(c.to_invalidate().collect::<Vec<_>>(), [7]);
        let c = check(&mut pins, Some(Some(8)), 4 * SEC);
        assert_eq!((c.ended, c.again), (None, Some(7)), "named once more");
        assert_eq!(c.to_invalidate().collect::<Vec<_>>(), [7]);
        let c = check(&mut pins, Some(Some(8)), 5 * SEC);
        assert_eq!(c.to_invalidate().count(), 0);
        assert_eq!(pins.trusted(), Some(8));
    }

    #[test]
    fn an_epoch_lapses_one_attribute_ttl_after_the_last_answer() {
        let t0 = Instant::now();
        let ttl = 30 * SEC;
        let mut pins = PinsView::default();
        pins.answered(Some(9), t0);
        assert_eq!(pins.check(t0, ttl).known, Some(9));
        assert_eq!(pins.known(t0 + 29 * SEC, ttl), Some(9));
        let c = pins.check(t0 + 29 * SEC, ttl);
        assert_eq!((c.known, c.ended), (Some(9), None), "within the TTL");
        let c = pins.check(t0 + 30 * SEC, ttl);
        assert_eq!((c.known, c.ended), (None, Some(9)), "lapsed");
        assert_eq!(pins.trusted(), None);
        assert_eq!(pins.check(t0 + 31 * SEC, ttl).again, Some(9));

        // A worker that does not track its pins: nothing is ever trusted.
        let mut untracked = PinsView::default();
        untracked.answered(None, t0);
        let c = untracked.check(t0, ttl);
        assert_eq!((c.known, c.ended, c.again), (None, None, None));
    }
}
