//! When the lab withholds the vCPU: stall patterns and the duration syntax they use.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A stall pattern or duration that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Not a duration such as `50ms`, `1.5s` or `200us`.
    #[error("{0:?} is not a duration: write a number with a unit, e.g. 50ms, 1.5s, 200us")]
    BadDuration(String),
    /// Not one of the pattern forms.
    #[error(
        "{0:?} is not a stall pattern: use none, STALL/PERIOD (e.g. 50ms/150ms: withhold the vCPU \
         for 50 ms of every 150 ms) or random:MIN-MAX/RUNMIN-RUNMAX (e.g. random:10ms-80ms/50ms-200ms)"
    )]
    BadPattern(String),
    /// A range or period that cannot work (stall longer than its period, min above max, zero).
    #[error("impossible stall pattern {0:?}: {1}")]
    Impossible(String, &'static str),
}

/// Parses `50ms`, `1.5s`, `200us` (a unit is required so nobody guesses).
pub fn parse_duration(text: &str) -> Result<Duration, PatternError> {
    let t = text.trim();
    let bad = || PatternError::BadDuration(text.to_owned());
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let number = number.trim();
    let digits = number.bytes().filter(u8::is_ascii_digit).count();
    let points = number.bytes().filter(|&b| b == b'.').count();
    if digits == 0 || points > 1 || digits + points != number.len() {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 || value * scale > 86_400.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// Shortest stall-plus-run cycle a pattern may have: half the tick of the fastest PIT rate the
/// lab programs (5 kHz). Shorter cycles cannot show in the tick count, and would make millions
/// of stall windows a second.
pub const MIN_CYCLE: Duration = Duration::from_micros(100);

fn show(d: Duration) -> String {
    format!("{}ms", d.as_secs_f64() * 1000.0)
}

/// When, during the lab's stall phase, the vCPU is kept out of `KVM_RUN`.
#[derive(Debug, Clone, PartialEq)]
pub enum StallPattern {
    /// Never: the baseline.
    None,
    /// `stall` at the end of every `period` (run first, then stall).
    Periodic {
        /// How long each stall lasts.
        stall: Duration,
        /// Stall start to next stall start.
        period: Duration,
    },
    /// Stalls of random length in `stall_min..=stall_max`, each after a random run of
    /// `run_min..=run_max`.
    Random {
        /// Shortest stall.
        stall_min: Duration,
        /// Longest stall.
        stall_max: Duration,
        /// Shortest run between stalls.
        run_min: Duration,
        /// Longest run between stalls.
        run_max: Duration,
    },
}

/// splitmix64: a tiny, good-enough PRNG so a seed gives the same stalls for both policies.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo).mul_f64(unit)
    }
}

impl StallPattern {
    /// The stalls as `(start, end)` offsets within `duration`; every stall ends by
    /// `duration` (a last one that would not fit is cut).
    pub fn windows(&self, duration: Duration, seed: u64) -> Vec<(Duration, Duration)> {
        let mut out = Vec::new();
        match *self {
            StallPattern::None => {}
            StallPattern::Periodic { stall, period } => {
                let mut cycle_start = Duration::ZERO;
                while cycle_start + period <= duration {
                    out.push((cycle_start + period - stall, cycle_start + period));
                    cycle_start += period;
                }
            }
            StallPattern::Random {
                stall_min,
                stall_max,
                run_min,
                run_max,
            } => {
                let mut rng = SplitMix(seed);
                let mut t = Duration::ZERO;
                loop {
                    let start = t + rng.between(run_min, run_max);
                    let end = (start + rng.between(stall_min, stall_max)).min(duration);
                    if start >= duration || end <= start {
                        break;
                    }
                    out.push((start, end));
                    t = end;
                }
            }
        }
        out
    }
}

fn parse_range(text: &str) -> Option<(Duration, Duration)> {
    let (lo, hi) = text.split_once('-')?;
    Some((parse_duration(lo).ok()?, parse_duration(hi).ok()?))
}

impl FromStr for StallPattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let t = text.trim();
        let bad = || PatternError::BadPattern(text.to_owned());
        if t == "none" {
            return Ok(StallPattern::None);
        }
        if let Some(rest) = t.strip_prefix("random:") {
            let (stalls, runs) = rest.split_once('/').ok_or_else(bad)?;
            let (stall_min, stall_max) = parse_range(stalls).ok_or_else(bad)?;
            let (run_min, run_max) = parse_range(runs).ok_or_else(bad)?;
            if stall_min > stall_max || run_min > run_max {
                return Err(PatternError::Impossible(
                    text.to_owned(),
                    "a minimum is above its maximum",
                ));
            }
            if stall_max.is_zero() || run_max.is_zero() {
                return Err(PatternError::Impossible(
                    text.to_owned(),
                    "stalls and runs must be longer than zero",
                ));
            }
            if stall_min + run_min < MIN_CYCLE {
                return Err(PatternError::Impossible(
                    text.to_owned(),
                    "the shortest stall plus the shortest run must last at least 100us",
                ));
            }
            return Ok(StallPattern::Random {
                stall_min,
                stall_max,
                run_min,
                run_max,
            });
        }
        let (stall, period) = t.split_once('/').ok_or_else(bad)?;
        let stall = parse_duration(stall)?;
        let period = parse_duration(period)?;
        if stall.is_zero() || stall >= period {
            return Err(PatternError::Impossible(
                text.to_owned(),
                "the stall must be longer than zero and shorter than its period",
            ));
        }
        if period < MIN_CYCLE {
            return Err(PatternError::Impossible(
                text.to_owned(),
                "the period must last at least 100us",
            ));
        }
        Ok(StallPattern::Periodic { stall, period })
    }
}

impl fmt::Display for StallPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StallPattern::None => f.write_str("none"),
            StallPattern::Periodic { stall, period } => {
                write!(f, "{}/{}", show(stall), show(period))
            }
            StallPattern::Random {
                stall_min,
                stall_max,
                run_min,
                run_max,
            } => write!(
                f,
                "random:{}-{}/{}-{}",
                show(stall_min),
                show(stall_max),
                show(run_min),
                show(run_max)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("50ms"), Ok(ms(50)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("50").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("NaNs").is_err());
        // f64's parser also takes signs, exponents and "inf": a duration is digits, with at
        // most one decimal point.
        for bad in ["+5ms", "1e3ms", "5e-1s", "infs", ".ms", "1.2.3s", "0x10ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_duration("0.25ms"), Ok(Duration::from_micros(250)));
    }

    #[test]
    fn periodic_pattern_stalls_the_last_third_of_each_period() {
        let p: StallPattern = "50ms/150ms".parse().unwrap();
        let w = p.windows(ms(450), 0);
        assert_eq!(
            w,
            vec![(ms(100), ms(150)), (ms(250), ms(300)), (ms(400), ms(450))]
        );
        assert_eq!(p.to_string().parse::<StallPattern>().unwrap(), p);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "150ms/50ms",
            "50ms",
            "random:80ms-10ms/1ms-2ms",
            "random:1ms-2ms",
            "x/y",
        ] {
            assert!(bad.parse::<StallPattern>().is_err(), "{bad}");
        }
    }

    // Found while fuzzing the parsers: "0.001us/0.002us" parsed, and the lab then asked for
    // ten million stall windows per 20 ms (billions for its default 3 s) and ran out of memory.
    #[test]
    fn cycles_shorter_than_a_tick_are_refused() {
        for bad in [
            "0.001us/0.002us",
            "10us/50us",
            "random:0.001us-0.001us/0.001us-0.001us",
            "random:20us-1ms/0us-1ms",
        ] {
            assert!(
                matches!(
                    bad.parse::<StallPattern>(),
                    Err(PatternError::Impossible(..))
                ),
                "{bad}"
            );
        }
        for good in ["50us/100us", "random:50us-1ms/50us-1ms"] {
            let p: StallPattern = good.parse().unwrap();
            assert!(
                p.windows(Duration::from_secs(2), 1).len() <= 20_000,
                "{good}"
            );
        }
    }

    #[test]
    fn random_pattern_is_seeded_and_bounded() {
        let p: StallPattern = "random:10ms-80ms/50ms-200ms".parse().unwrap();
        let a = p.windows(Duration::from_secs(5), 7);
        assert_eq!(a, p.windows(Duration::from_secs(5), 7));
        assert_ne!(a, p.windows(Duration::from_secs(5), 8));
        assert!(!a.is_empty());
        let mut prev_end = Duration::ZERO;
        for &(s, e) in &a {
            assert!(s >= prev_end + ms(50) && e <= Duration::from_secs(5));
            assert!(e - s <= ms(80));
            prev_end = e;
        }
    }
}
