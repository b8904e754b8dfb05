//! One number per iteration (descriptors, resident memory, threads, reconnect times), its
//! summary, and the bound that calls it flat.

use std::fmt::Write as _;

use super::usage::Usage;

/// Values of one quantity, in iteration order.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// What is measured, e.g. "backend fds".
    pub name: String,
    /// Unit printed after the numbers ("", "KiB", "ms").
    pub unit: &'static str,
    values: Vec<u64>,
}

impl Series {
    /// An empty series.
    pub fn new(name: impl Into<String>, unit: &'static str) -> Series {
        Series {
            name: name.into(),
            unit,
            values: Vec::new(),
        }
    }

    /// Appends a value.
    pub fn push(&mut self, v: u64) {
        self.values.push(v);
    }

    /// The values so far.
    pub fn values(&self) -> &[u64] {
        &self.values
    }

    /// The first value.
    pub fn first(&self) -> Option<u64> {
        self.values.first().copied()
    }

    /// The last value.
    pub fn last(&self) -> Option<u64> {
        self.values.last().copied()
    }

    /// The largest value.
    pub fn max(&self) -> Option<u64> {
        self.values.iter().max().copied()
    }

    /// The smallest value.
    pub fn min(&self) -> Option<u64> {
        self.values.iter().min().copied()
    }

    /// The median.
    pub fn median(&self) -> Option<u64> {
        let mut v = self.values.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }

    /// "name: first F, last L, min m, max M UNIT".
    pub fn summary(&self) -> String {
        let mut s = format!("{}:", self.name);
        match (self.first(), self.last(), self.min(), self.max()) {
            (Some(f), Some(l), Some(lo), Some(hi)) => {
                let _ = write!(
                    s,
                    " first {f}, last {l}, min {lo}, max {hi}, median {}{}{}",
                    self.median().unwrap_or(0),
                    if self.unit.is_empty() { "" } else { " " },
                    self.unit
                );
            }
            _ => s.push_str(" no samples"),
        }
        s
    }

    /// Flat means no value exceeds the first by more than `slack`.
    ///
    /// # Errors
    /// The first value that does, with its index, in words.
    pub fn check_flat(&self, slack: u64) -> Result<(), String> {
        let Some(first) = self.first() else {
            return Ok(());
        };
        match self.values.iter().position(|&v| v > first + slack) {
            None => Ok(()),
            Some(i) => Err(format!(
                "{} grew from {first} to {} {} by sample {} (bound: first + {slack}); all: {:?}",
                self.name,
                self.values[i],
                self.unit,
                i + 1,
                self.values
            )),
        }
    }

    /// The series as JSON: name, unit, values and the summary numbers.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name, "unit": self.unit, "first": self.first(), "last": self.last(),
            "min": self.min(), "max": self.max(), "median": self.median(), "values": self.values,
        })
    }
}

/// Descriptors, resident memory and threads of one process, sampled once per iteration.
#[derive(Clone, Debug)]
pub struct UsageSeries {
    /// Open descriptors.
    pub fds: Series,
    /// Resident memory, KiB.
    pub rss_kib: Series,
    /// Threads.
    pub threads: Series,
}

impl UsageSeries {
    /// Empty series named after `who` (e.g. "backend").
    pub fn new(who: &str) -> UsageSeries {
        UsageSeries {
            fds: Series::new(format!("{who} fds"), ""),
            rss_kib: Series::new(format!("{who} RSS"), "KiB"),
            threads: Series::new(format!("{who} threads"), ""),
        }
    }

    /// Appends one sample.
    pub fn push(&mut self, u: Usage) {
        self.fds.push(u.fds);
        self.rss_kib.push(u.rss_kib);
        self.threads.push(u.threads);
    }

    /// Checks all three against their bounds; every breach, in words.
    pub fn check_flat(&self, fd_slack: u64, rss_slack_kib: u64, thread_slack: u64) -> Vec<String> {
        [
            self.fds.check_flat(fd_slack),
            self.rss_kib.check_flat(rss_slack_kib),
            self.threads.check_flat(thread_slack),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect()
    }

    /// The three summaries, one per line.
    pub fn summary(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.fds.summary(),
            self.rss_kib.summary(),
            self.threads.summary()
        )
    }

    /// The three series as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "fds": self.fds.json(), "rss_kib": self.rss_kib.json(), "threads": self.threads.json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_within_the_slack_and_not_beyond() {
        let mut s = Series::new("fds", "");
        for v in [20, 21, 20, 22] {
            s.push(v);
        }
        assert!(s.check_flat(2).is_ok());
        s.push(23);
        let e = s.check_flat(2).unwrap_err();
        assert!(
            e.contains("grew from 20 to 23") && e.contains("sample 5"),
            "{e}"
        );
        assert_eq!(
            (s.first(), s.last(), s.max(), s.min()),
            (Some(20), Some(23), Some(23), Some(20))
        );
    }
}
