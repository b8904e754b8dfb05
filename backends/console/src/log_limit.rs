//! Warnings a guest can trigger at will (malformed chains, bad control messages, kicks on
//! queues it should not use) are let through in bursts: at most [`BURST`] per [`WINDOW`] per
//! source. The rest are counted, and the count is reported with the next warning let through,
//! so a hostile guest cannot flood the log and nothing goes unmentioned.

use std::time::{Duration, Instant};

/// Warnings let through per window.
pub const BURST: u32 = 10;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The state of one source of warnings.
#[derive(Debug)]
pub struct LogLimit {
    window_start: Instant,
    sent: u32,
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit {
            window_start: Instant::now(),
            sent: 0,
            suppressed: 0,
        }
    }
}

impl LogLimit {
    /// Whether the next warning may be logged: `Some(n)` with the number of warnings held
    /// back before it, or None (it is counted).
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.sent = 0;
        }
        if self.sent >= BURST {
            self.suppressed += 1;
            return None;
        }
        self.sent += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// `log::warn!` through a [`LogLimit`].
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(held) = $limit.allow() {
            if held > 0 {
                log::warn!("{} ({held} similar warnings not logged)", format_args!($($arg)+));
            } else {
                log::warn!($($arg)+);
            }
        }
    };
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_counts() {
        let mut l = LogLimit::default();
        for _ in 0..BURST {
            assert_eq!(l.allow(), Some(0));
        }
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        // A new window reports what was held back.
        l.window_start -= WINDOW;
        assert_eq!(l.allow(), Some(2));
        assert_eq!(l.allow(), Some(0));
    }
}
