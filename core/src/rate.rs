//! A token bucket: at most `rate` operations per second on average, bursts of `burst`.
//! Pure: the caller passes `now` and sleeps for the wait it is told.

use std::time::{Duration, Instant};

/// The longest wait [`TokenBucket::try_take`] answers: the caller asks again after it, so even a
/// tiny rate never yields a duration that overflows.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// `rate` operations per second (> 0), up to `burst` (>= 1) at once.
    pub fn new(rate: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        TokenBucket {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Changes the rate and burst from now on; tokens beyond the new burst are dropped.
    pub fn set_rate(&mut self, rate: f64, burst: f64) {
        self.rate = rate.max(f64::MIN_POSITIVE);
        self.burst = burst.max(1.0);
        self.tokens = self.tokens.min(self.burst);
    }

    /// Takes one token at `now`, or says how long to wait before asking again.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / self.rate;
            Err(Duration::try_from_secs_f64(wait).map_or(MAX_WAIT, |w| w.min(MAX_WAIT)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0);
        for _ in 0..5 {
            assert!(b.try_take(t0).is_ok());
        }
        let wait = b.try_take(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(b.try_take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.try_take(t0 + Duration::from_millis(100)).is_err());
        // Over a long run the rate holds: 10 per second.
        let mut taken = 0;
        for ms in 0..10_000u64 {
            if b.try_take(t0 + Duration::from_millis(200 + ms)).is_ok() {
                taken += 1;
            }
        }
        assert!((99..=106).contains(&taken), "{taken}");
    }

    #[test]
    fn a_tiny_rate_waits_at_most_max_wait() {
        let t0 = Instant::now();
        for rate in [1e-300, f64::MIN_POSITIVE, 0.0, -1.0] {
            let mut b = TokenBucket::new(rate, 1.0);
            assert!(b.try_take(t0).is_ok());
            assert_eq!(b.try_take(t0), Err(MAX_WAIT), "{rate}");
        }
    }
}
