//! A steady rate without spinning, and reproducible randomness for the kill points.

use std::time::{Duration, Instant};

/// A token bucket: `take(n)` answers how long to wait before `n` more units may go, keeping
/// the long-run rate at `per_second` with bursts of at most one `burst`.
#[derive(Debug)]
pub struct Pacer {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    /// `per_second` units per second (0: unlimited), bursts up to `burst` units.
    pub fn new(per_second: u64, burst: u64) -> Pacer {
        Pacer {
            per_second: per_second as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: Instant::now(),
        }
    }

    /// Takes `n` units if they are there: None; otherwise how long until they are.
    pub fn take(&mut self, n: u64) -> Option<Duration> {
        if self.per_second == 0.0 {
            return None;
        }
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_second).min(self.burst.max(n as f64));
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            None
        } else {
            Some(Duration::from_secs_f64(
                (n as f64 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// xorshift64*: small, seeded, good enough to scatter kill points.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator; the same seed gives the same sequence.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A duration uniformly in `[0, max)`.
    pub fn below(&mut self, max: Duration) -> Duration {
        let us = max.as_micros() as u64;
        if us == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.next_u64() % us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_lets_a_burst_through_then_asks_to_wait() {
        let mut p = Pacer::new(1000, 10);
        assert!(p.take(10).is_none());
        let wait = p.take(10).expect("must wait");
        assert!(wait <= Duration::from_millis(10), "{wait:?}");
        assert!(Pacer::new(0, 1).take(1 << 40).is_none());
    }

    #[test]
    fn rng_is_reproducible_and_bounded() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let x = a.below(Duration::from_millis(5));
            assert_eq!(x, b.below(Duration::from_millis(5)));
            assert!(x < Duration::from_millis(5));
        }
    }
}
