//! Rate-limited logging for events a guest (or any other untrusted peer) can cause at will.
//!
//! A guest that sends a malformed chain or a forged frame a million times a second must not
//! turn the log into a million lines a second: that would cost the host's disk and CPU and
//! drown every other message. A [`RateLimit`] lets the first few events of each interval
//! through, counts the rest, and when the next event after the interval comes, first logs how
//! many were held back ("... and 37 more in the last 10 s"). The counters of the device keep
//! the exact numbers; the log keeps the first examples and the rate.
//!
//! One [`RateLimit`] is meant per source of events (per guest port, say), so one noisy guest
//! cannot hide another's messages; [`RateLimit::standard`] gives a source the project's usual
//! rate. A source lives as long as what it names (a port, a VM), not as long as one
//! connection: a front-end that reconnects must not get a fresh burst each time. Log through
//! [`warn_limited!`](crate::warn_limited), or [`log_limited!`](crate::log_limited) at another
//! level:
//!
//! ```
//! use std::time::Duration;
//! use devshare_common::ratelimit::RateLimit;
//!
//! let limit = RateLimit::new("port vm1", 5, Duration::from_secs(10));
//! for head in 0..100u16 {
//!     // Logs chains 0 to 4; the rest are counted and summed up later.
//!     devshare_common::warn_limited!(limit, "port vm1: malformed chain {head}");
//! }
//! ```
//!
//! The clock is injectable ([`Clock`]) so tests can move time by hand.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where a [`RateLimit`] reads the time.
pub trait Clock: Send + Sync {
    /// The current instant (monotonic).
    fn now(&self) -> Instant;
}

/// The monotonic system clock ([`Instant::now`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What to do with one event, as decided by [`RateLimit::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Log this event. If `held_back` is not zero, first log that many events of the previous
    /// interval were held back, `over` long (see [`RateLimit::summary`]).
    Log {
        /// Events counted but not logged since the last logged one.
        held_back: u64,
        /// How long those events were collected over.
        over: Duration,
    },
    /// Do not log this event; it was counted.
    HoldBack,
}

/// The state of the current interval.
#[derive(Debug)]
struct Window {
    /// When the current interval began; `None` before the first event.
    start: Option<Instant>,
    /// Events logged in the current interval.
    logged: u32,
    /// Events held back since the interval began.
    held_back: u64,
}

/// Lets `burst` events per `interval` through and counts the rest. Cheap when idle (no
/// thread, no timer); thread-safe (one short lock per event).
pub struct RateLimit<C: Clock = SystemClock> {
    what: String,
    burst: u32,
    interval: Duration,
    clock: C,
    window: Mutex<Window>,
}

/// Events of one source logged per interval by [`RateLimit::standard`].
pub const STANDARD_BURST: u32 = 5;
/// The interval of [`RateLimit::standard`].
pub const STANDARD_INTERVAL: Duration = Duration::from_secs(10);

impl RateLimit<SystemClock> {
    /// `burst` events per `interval` of the system clock. `what` names the source in the
    /// held-back summary (e.g. `"port vm1"`).
    pub fn new(what: impl Into<String>, burst: u32, interval: Duration) -> Self {
        RateLimit::with_clock(what, burst, interval, SystemClock)
    }

    /// The rate every guest- or front-end-caused event of the backends is logged at:
    /// [`STANDARD_BURST`] events per [`STANDARD_INTERVAL`], then the count.
    pub fn standard(what: impl Into<String>) -> Self {
        RateLimit::new(what, STANDARD_BURST, STANDARD_INTERVAL)
    }
}

impl<C: Clock> fmt::Debug for RateLimit<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("what", &self.what)
            .field("burst", &self.burst)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl<C: Clock> RateLimit<C> {
    /// Like [`RateLimit::new`], reading the time from `clock`.
    pub fn with_clock(what: impl Into<String>, burst: u32, interval: Duration, clock: C) -> Self {
        RateLimit {
            what: what.into(),
            burst,
            interval,
            clock,
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                held_back: 0,
            }),
        }
    }

    /// Counts one event and decides whether it is logged: the first `burst` of an interval
    /// are; after that none until `interval` has passed since the interval began. The first
    /// event of a new interval carries the count of the events held back before it.
    pub fn check(&self) -> Decision {
        let now = self.clock.now();
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let start = *w.start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= self.interval {
            let held_back = std::mem::take(&mut w.held_back);
            w.start = Some(now);
            w.logged = 1;
            return Decision::Log {
                held_back,
                over: elapsed,
            };
        }
        if w.logged < self.burst {
            w.logged += 1;
            return Decision::Log {
                held_back: 0,
                over: elapsed,
            };
        }
        w.held_back += 1;
        Decision::HoldBack
    }

    /// The line that reports `held_back` events collected `over` a span, e.g.
    /// `"port vm1: ... and 37 more in the last 10 s"`.
    pub fn summary(&self, held_back: u64, over: Duration) -> Summary<'_> {
        Summary {
            what: &self.what,
            held_back,
            over,
        }
    }
}

/// The held-back count of a [`RateLimit`], formatted for the log.
#[derive(Debug)]
pub struct Summary<'a> {
    what: &'a str,
    held_back: u64,
    over: Duration,
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: ... and {} more in the last {} s",
            self.what,
            self.held_back,
            self.over.as_secs().max(1)
        )
    }
}

/// Logs a warning through a [`RateLimit`]: like `log::warn!`, but only what the limit lets
/// through, preceded by the held-back summary when there is one.
///
/// `warn_limited!(limit, "format {}", args)` where `limit` is a `RateLimit` (or a reference
/// to one). The arguments are only evaluated when the line is logged.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        $crate::log_limited!($crate::__log::Level::Warn, $limit, $($arg)+)
    };
}

/// Logs at `level` through a [`RateLimit`], like [`warn_limited!`](crate::warn_limited): for
/// events a guest can cause that are not warnings (a ring that works again after it was
/// refused, say), which must not flood the log either. The held-back summary is always a
/// warning. Events of every level share the limit they are logged through.
///
/// `log_limited!(log::Level::Info, limit, "format {}", args)`.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $limit:expr, $($arg:tt)+) => {{
        let limit = &$limit;
        if let $crate::ratelimit::Decision::Log { held_back, over } = limit.check() {
            if held_back > 0 {
                $crate::__log::warn!("{}", limit.summary(held_back, over));
            }
            $crate::__log::log!($level, $($arg)+);
        }
    }};
}

/// Like [`log_limited!`](crate::log_limited), but what the limit holds back is still logged,
/// at debug level: for routine events whose rate someone else decides (clients connecting
/// and leaving), which an operator wants to see at the usual level only at a bounded rate,
/// and someone tracing a problem wants to see every one of (`RUST_LOG=debug`).
///
/// `log_limited_or_debug!(log::Level::Info, limit, "format {}", args)`.
#[macro_export]
macro_rules! log_limited_or_debug {
    ($level:expr, $limit:expr, $($arg:tt)+) => {{
        let limit = &$limit;
        match limit.check() {
            $crate::ratelimit::Decision::Log { held_back, over } => {
                if held_back > 0 {
                    $crate::__log::warn!("{}", limit.summary(held_back, over));
                }
                $crate::__log::log!($level, $($arg)+);
            }
            $crate::ratelimit::Decision::HoldBack => $crate::__log::debug!($($arg)+),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A clock moved by hand.
    struct FakeClock {
        base: Instant,
        offset_ms: AtomicU64,
    }

    impl FakeClock {
        fn new() -> Self {
            FakeClock {
                base: Instant::now(),
                offset_ms: AtomicU64::new(0),
            }
        }

        fn advance(&self, ms: u64) {
            self.offset_ms.fetch_add(ms, Ordering::Relaxed);
        }
    }

    impl Clock for &FakeClock {
        fn now(&self) -> Instant {
            self.base + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
        }
    }

    fn logged(d: Decision) -> bool {
        matches!(d, Decision::Log { .. })
    }

    #[test]
    fn first_few_pass_then_a_count_per_interval() {
        let clock = FakeClock::new();
        let limit = RateLimit::with_clock("port g0", 3, Duration::from_secs(10), &clock);
        let first: Vec<bool> = (0..10).map(|_| logged(limit.check())).collect();
        assert_eq!(
            first,
            [true, true, true, false, false, false, false, false, false, false]
        );
        // Still inside the interval: held back.
        clock.advance(9_999);
        assert_eq!(limit.check(), Decision::HoldBack);
        // The interval is over: the next event is logged with the eight held back before it.
        clock.advance(1);
        assert_eq!(
            limit.check(),
            Decision::Log {
                held_back: 8,
                over: Duration::from_secs(10)
            }
        );
        // A new interval began with that event: two more pass, then none.
        assert_eq!(
            limit.check(),
            Decision::Log {
                held_back: 0,
                over: Duration::ZERO
            }
        );
        assert!(logged(limit.check()));
        assert_eq!(limit.check(), Decision::HoldBack);
    }

    #[test]
    fn a_quiet_spell_logs_again_with_nothing_held_back() {
        let clock = FakeClock::new();
        let limit = RateLimit::with_clock("x", 1, Duration::from_secs(10), &clock);
        assert!(logged(limit.check()));
        clock.advance(3_600_000);
        // Nothing was held back in the hour; the span covers it.
        assert_eq!(
            limit.check(),
            Decision::Log {
                held_back: 0,
                over: Duration::from_secs(3600)
            }
        );
        assert_eq!(limit.check(), Decision::HoldBack);
    }

    #[test]
    fn the_summary_line_says_what_how_many_and_over_how_long() {
        let clock = FakeClock::new();
        let limit = RateLimit::with_clock("port vm1", 5, Duration::from_secs(10), &clock);
        assert_eq!(
            limit.summary(37, Duration::from_millis(10_400)).to_string(),
            "port vm1: ... and 37 more in the last 10 s"
        );
        // Never "the last 0 s".
        assert_eq!(
            limit.summary(1, Duration::ZERO).to_string(),
            "port vm1: ... and 1 more in the last 1 s"
        );
    }

    #[test]
    fn a_burst_of_zero_logs_only_summaries() {
        let clock = FakeClock::new();
        let limit = RateLimit::with_clock("x", 0, Duration::from_secs(1), &clock);
        assert_eq!(limit.check(), Decision::HoldBack);
        assert_eq!(limit.check(), Decision::HoldBack);
        // The first event of every later interval still gets through with the count, so a
        // limit never hides events that go on.
        clock.advance(1000);
        assert_eq!(
            limit.check(),
            Decision::Log {
                held_back: 2,
                over: Duration::from_secs(1)
            }
        );
    }

    /// Keeps the lines logged from this module (other tests' lines are ignored).
    struct Capture(Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            if record.target() == module_path!() {
                let line = format!("{} {}", record.level(), record.args());
                self.0.lock().unwrap().push(line);
            }
        }
        fn flush(&self) {}
    }

    static LINES: Capture = Capture(Mutex::new(Vec::new()));

    #[test]
    fn the_macro_logs_what_passes_and_the_summary() {
        log::set_logger(&LINES).unwrap();
        log::set_max_level(log::LevelFilter::Info);
        let clock = FakeClock::new();
        let limit = RateLimit::with_clock("port g0", 2, Duration::from_secs(10), &clock);
        let mut evaluated = 0;
        for i in 0..10 {
            if i == 9 {
                clock.advance(10_000);
            }
            crate::warn_limited!(limit, "bad chain {}", {
                evaluated += 1;
                i
            });
        }
        // Arguments are evaluated only for lines that are logged.
        assert_eq!(evaluated, 3);
        // Another level shares the limit: the burst of the new interval has one line left.
        crate::log_limited!(log::Level::Info, limit, "ring usable again");
        crate::log_limited!(log::Level::Info, limit, "ring usable again, held back");
        clock.advance(10_000);
        crate::log_limited!(log::Level::Info, limit, "ring usable again, later");
        assert_eq!(
            *LINES.0.lock().unwrap(),
            [
                "WARN bad chain 0",
                "WARN bad chain 1",
                "WARN port g0: ... and 7 more in the last 10 s",
                "WARN bad chain 9",
                "INFO ring usable again",
                "WARN port g0: ... and 1 more in the last 10 s",
                "INFO ring usable again, later",
            ]
        );
    }

    #[test]
    fn the_standard_rate_is_five_per_ten_seconds() {
        let limit = RateLimit::standard("vm a");
        let logged = (0..100).filter(|_| logged(limit.check())).count();
        assert_eq!(logged, STANDARD_BURST as usize);
        assert_eq!(STANDARD_INTERVAL, Duration::from_secs(10));
        assert!(format!("{limit:?}").contains("vm a"));
    }
}
