//! When to try again to open something that went away (a serial device that was unplugged, a
//! log file that could not be opened, a PTY slave that could not be reopened): first after
//! the configured interval, then at doubling delays up to [`MAX_DELAY`] (or the interval, if
//! that is longer), so a device that stays away costs next to nothing.

use std::time::{Duration, Instant};

/// Default interval between the loss of a device and the first attempt to open it again.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// The delay between attempts stops doubling here.
pub const MAX_DELAY: Duration = Duration::from_secs(30);

/// A retry schedule (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reopen {
    interval: Duration,
    delay: Duration,
    next: Instant,
}

impl Reopen {
    /// A schedule whose first attempt is due `interval` after `now`.
    pub fn after(interval: Duration, now: Instant) -> Reopen {
        Reopen {
            interval,
            delay: interval,
            next: now + interval,
        }
    }

    /// Whether an attempt is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// The attempt at `now` failed: the next one comes after twice the last delay (bounded).
    pub fn failed(&mut self, now: Instant) {
        self.delay = (self.delay * 2).min(MAX_DELAY.max(self.interval));
        self.next = now + self.delay;
    }

    /// The interval the schedule started with.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_bound() {
        let t0 = Instant::now();
        let mut r = Reopen::after(Duration::from_secs(1), t0);
        assert!(!r.due(t0));
        assert!(r.due(t0 + Duration::from_secs(1)));
        let mut now = t0 + Duration::from_secs(1);
        let mut delays = Vec::new();
        for _ in 0..8 {
            r.failed(now);
            delays.push((r.next - now).as_secs());
            now = r.next;
        }
        assert_eq!(delays, [2, 4, 8, 16, 30, 30, 30, 30]);
        // An interval above the bound is kept as it is.
        let mut slow = Reopen::after(Duration::from_secs(60), t0);
        slow.failed(t0);
        assert_eq!(slow.next - t0, Duration::from_secs(60));
    }
}
