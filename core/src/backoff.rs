//! How long to wait before trying again: the one backoff every retry loop uses (a file that
//! failed to load, a lost etcd session, a block read to retry).

use std::time::Duration;

/// An exponential backoff: `first` after the first failure, doubled after each further one,
/// never more than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max }
    }

    /// The wait after `failures` failures in a row (0 and 1 both give `first`).
    pub fn after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_first_up_to_max() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
        let waits: Vec<u64> = (1..=10).map(|n| b.after(n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(b.after(0), Duration::from_secs(2));
        assert_eq!(b.after(u32::MAX), Duration::from_secs(300));
        let ms = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        assert_eq!(ms.after(5), Duration::from_millis(3200));
        assert_eq!(ms.after(6), Duration::from_secs(5));
    }
}
