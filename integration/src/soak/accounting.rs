//! Holding what a reader received against what a writer sent: the verdict on every byte.
//!
//! [`account`] takes the reader's [`Run`]s (from a [`LineCheck`](super::lines::LineCheck)) and
//! the writer's [`Session`]s: a run may only begin where a session begins (a gap inside a
//! session would be a loss with no kill to explain it), the bytes between runs must be
//! unaccepted tails of sessions (or bytes never written), and runs must not overlap (a
//! duplicate).

use super::lines::{Run, Session, LINE_LEN};

/// What became of one session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionOutcome {
    /// Bytes written.
    pub written: u64,
    /// Bytes certainly accepted by the backend.
    pub accepted: u64,
    /// Bytes that reached the reader.
    pub delivered: u64,
    /// Bytes that did not (written - delivered).
    pub lost: u64,
    /// Of those, bytes the backend had accepted: each one is a broken promise, unless the
    /// backend counted it as dropped (a console keeps the newest bytes when its buffer is full).
    pub lost_accepted: u64,
}

/// The verdict of [`account`]: what arrived, and what should not have happened.
#[derive(Clone, Debug, Default)]
pub struct Accounting {
    /// One entry per judged session, in order.
    pub sessions: Vec<SessionOutcome>,
    /// Stretches `[start, end)` that arrived a second time.
    pub duplicates: Vec<(u64, u64)>,
    /// Offsets where data resumed after a gap although no session starts there (a gap inside
    /// a session: a loss with no reconnect to explain it).
    pub resumed_inside: Vec<u64>,
    /// Offsets up to which data arrived beyond anything written.
    pub beyond: Vec<u64>,
    /// With `complete`: bytes of the last session that never arrived.
    pub last_missing: u64,
}

impl Accounting {
    /// Sums of all judged sessions.
    pub fn total(&self) -> SessionOutcome {
        self.sessions
            .iter()
            .fold(SessionOutcome::default(), |a, s| SessionOutcome {
                written: a.written + s.written,
                accepted: a.accepted + s.accepted,
                delivered: a.delivered + s.delivered,
                lost: a.lost + s.lost,
                lost_accepted: a.lost_accepted + s.lost_accepted,
            })
    }

    /// Bytes that arrived more than once.
    pub fn duplicated(&self) -> u64 {
        self.duplicates.iter().map(|(a, b)| b - a).sum()
    }

    /// The repeats the backend owns up to: a backend killed during a write to its client
    /// sends that write again (at most `each_max` bytes) and counts it. When no duplicate is
    /// longer than `each_max` and all of them together are at most `counted` (what the
    /// backend processes counted as sent again), they are that promise kept and no longer
    /// [`Accounting::violations`]; otherwise each one stays a violation. Returns the bytes
    /// admitted.
    pub fn admit_counted_repeats(&mut self, counted: u64, each_max: u64) -> u64 {
        let total = self.duplicated();
        if total == 0 || total > counted || self.duplicates.iter().any(|(a, b)| b - a > each_max) {
            return 0;
        }
        self.duplicates.clear();
        total
    }

    /// Every broken promise, in words, when the backend reported `counted_drops` bytes
    /// dropped (what a full console buffer discards, counted: not a silent loss).
    pub fn violations(&self, counted_drops: u64) -> Vec<String> {
        let mut v = Vec::new();
        for (a, b) in &self.duplicates {
            v.push(format!(
                "bytes {a}..{b} (lines {}..) arrived twice (duplicate)",
                a / LINE_LEN as u64
            ));
        }
        for at in &self.beyond {
            v.push(format!(
                "data up to offset {at} arrived, beyond anything written"
            ));
        }
        let lost = self.total().lost_accepted;
        if lost > counted_drops {
            v.push(format!(
                "{} accepted bytes never arrived ({lost} missing, {counted_drops} counted as \
                 dropped by the backend); sessions: {}",
                lost - counted_drops,
                self.sessions
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.lost_accepted > 0)
                    .map(|(i, s)| format!(
                        "#{i} lost {} of {} accepted",
                        s.lost_accepted, s.accepted
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if counted_drops == 0 {
            for at in &self.resumed_inside {
                v.push(format!(
                    "data resumed at offset {at} (line {}), where no session starts: a gap \
                     inside a session",
                    at / LINE_LEN as u64
                ));
            }
        }
        if self.last_missing > 0 {
            v.push(format!(
                "{} bytes of the last session never arrived, with no kill after them",
                self.last_missing
            ));
        }
        v
    }
}

fn overlap(a: (u64, u64), b: (u64, u64)) -> u64 {
    a.1.min(b.1).saturating_sub(a.0.max(b.0))
}

/// Holds the reader's `runs` against the writer's `sessions` (see the module docs). Only
/// closed sessions are judged, plus the last one when `complete` (the writer has stopped and
/// the reader has everything it will get): then it must have arrived whole.
pub fn account(sessions: &[Session], runs: &[Run], complete: bool) -> Accounting {
    let mut acc = Accounting::default();
    for (k, r) in runs.iter().enumerate() {
        let prev_end = if k > 0 { runs[k - 1].end } else { 0 };
        if k > 0 && r.start < prev_end {
            acc.duplicates.push((r.start, prev_end.min(r.end)));
        } else if !sessions.iter().any(|s| s.start() == r.start) {
            acc.resumed_inside.push(r.start);
        }
        // The open session may not have noted its last write yet.
        let within = sessions
            .iter()
            .any(|s| s.start() <= r.end && (r.end <= s.end() || !s.closed));
        if r.end > r.start && !within {
            acc.beyond.push(r.end);
        }
    }
    let last = sessions.len().saturating_sub(1);
    for (i, s) in sessions.iter().enumerate() {
        let judged = s.closed || (complete && i == last);
        if !judged {
            continue;
        }
        let range = (s.start(), s.end());
        let delivered: u64 = runs.iter().map(|r| overlap((r.start, r.end), range)).sum();
        let accepted_range = (s.start(), s.start() + s.accepted.min(s.written));
        let covered: u64 = runs
            .iter()
            .map(|r| overlap((r.start, r.end), accepted_range))
            .sum();
        let outcome = SessionOutcome {
            written: s.written,
            accepted: s.accepted,
            delivered,
            lost: s.written.saturating_sub(delivered),
            lost_accepted: s.accepted.min(s.written).saturating_sub(covered),
        };
        if complete && i == last {
            acc.last_missing = outcome.lost;
        }
        acc.sessions.push(outcome);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::lines::tests::{lines, session};
    use crate::soak::lines::{line, LineCheck};
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_torn_tail_then_the_next_session_is_an_allowed_loss() {
        // Session 0 wrote lines 0..100 (3200 bytes), 3000 accepted; 3010 arrived (torn in
        // line 94). Session 1 starts at line 100.
        let mut data = lines(0, 100);
        data.truncate(3010);
        data.extend(lines(100, 150));
        let mut c = LineCheck::new(None);
        c.feed(&data);
        assert!(c.errors().is_empty(), "{:?}", c.errors());
        let runs = c.runs(true);
        assert_eq!(
            runs,
            vec![
                Run {
                    start: 0,
                    end: 3010
                },
                Run {
                    start: 3200,
                    end: 4800
                }
            ]
        );
        let sessions = [session(0, 3200, 3000), session(100, 1600, 1600)];
        let acc = account(&sessions, &runs, true);
        assert!(acc.violations(0).is_empty(), "{:?}", acc.violations(0));
        assert_eq!(acc.sessions[0].lost, 190);
        assert_eq!(acc.sessions[0].lost_accepted, 0);
    }

    #[test]
    fn losing_accepted_bytes_is_a_violation() {
        let mut data = lines(0, 100);
        data.truncate(2000);
        data.extend(lines(100, 101));
        let mut c = LineCheck::new(None);
        c.feed(&data);
        let acc = account(
            &[session(0, 3200, 3000), session(100, 32, 32)],
            &c.runs(true),
            true,
        );
        assert_eq!(acc.sessions[0].lost_accepted, 1000);
        assert_eq!(acc.violations(0).len(), 1, "{:?}", acc.violations(0));
        // The same loss, counted by the backend as dropped, is no silent loss.
        assert!(
            acc.violations(1000).is_empty(),
            "{:?}",
            acc.violations(1000)
        );
    }

    #[test]
    fn a_gap_inside_a_session_is_a_violation() {
        let mut data = lines(0, 10);
        data.extend(lines(20, 30));
        let mut c = LineCheck::new(None);
        c.feed(&data);
        let acc = account(&[session(0, 960, 0)], &c.runs(true), true);
        assert!(
            acc.violations(0).iter().any(|v| v.contains("gap inside")),
            "{:?}",
            acc.violations(0)
        );
    }

    #[test]
    fn a_repeated_stretch_is_a_duplicate() {
        // Lines 0..10, then 5..12 again (a replay of bytes already delivered).
        let mut data = lines(0, 10);
        data.extend(lines(5, 12));
        let mut c = LineCheck::new(None);
        c.feed(&data);
        assert!(c.errors().is_empty(), "{:?}", c.errors());
        let acc = account(&[session(0, 12 * 32, 12 * 32)], &c.runs(true), true);
        assert_eq!((acc.duplicates.len(), acc.duplicated()), (1, 5 * 32));
        assert_eq!(acc.violations(0).len(), 1, "{:?}", acc.violations(0));
        // A repeat the backend counted, within the bound, is the promise kept; one it did
        // not count (or longer than the bound) stays a violation.
        for (counted, each_max, admitted) in [(0, 4096, 0), (159, 4096, 0), (160, 159, 0)] {
            let mut a = acc.clone();
            assert_eq!(a.admit_counted_repeats(counted, each_max), admitted);
            assert_eq!(a.violations(0).len(), 1, "{:?}", a.violations(0));
        }
        let mut a = acc.clone();
        assert_eq!(a.admit_counted_repeats(160, 4096), 160);
        assert!(a.violations(0).is_empty(), "{:?}", a.violations(0));
        // The same stream with a torn duplicate: 10 lines + half of line 10, then 10 again.
        let mut data = lines(0, 11);
        data.truncate(10 * 32 + 5);
        data.extend(lines(10, 12));
        let mut c = LineCheck::new(None);
        c.feed(&data);
        let acc = account(&[session(0, 12 * 32, 12 * 32)], &c.runs(true), true);
        assert_eq!((acc.duplicates.len(), acc.duplicated()), (1, 5));
    }

    #[test]
    fn short_fragments_are_placed_by_session_starts() {
        // Session 0 (lines 0..50) delivered 40 lines and 10 bytes; session 1 (line 50)
        // delivered only 5 bytes before its backend died; session 2 starts at line 60.
        let sessions = Arc::new(Mutex::new(vec![
            session(0, 1600, 1290),
            session(50, 320, 0),
            session(60, 320, 320),
        ]));
        let mut data = lines(0, 40);
        data.extend(&line(40)[..10]);
        data.extend(&line(50)[..5]);
        data.extend(lines(60, 70));
        let mut c = LineCheck::new(Some(sessions.clone()));
        c.feed(&data);
        assert!(c.errors().is_empty(), "{:?}", c.errors());
        let runs = c.runs(true);
        assert_eq!(
            runs,
            vec![
                Run {
                    start: 0,
                    end: 1290
                },
                Run {
                    start: 1600,
                    end: 1605
                },
                Run {
                    start: 1920,
                    end: 2240
                }
            ]
        );
        let acc = account(&sessions.lock().unwrap(), &runs, true);
        assert!(acc.violations(0).is_empty(), "{:?}", acc.violations(0));
        assert_eq!(acc.sessions[1].delivered, 5);
        assert_eq!(acc.total().lost, 310 + 315);
        // A session that ends where the next begins leaves no gap: one run across both.
        let mut data = lines(0, 50);
        data.extend(&line(50)[..5]);
        data.extend(lines(60, 61));
        let mut c = LineCheck::new(Some(sessions));
        c.feed(&data);
        assert_eq!(
            c.runs(true)[0],
            Run {
                start: 0,
                end: 1605
            }
        );
    }

    #[test]
    fn the_last_session_must_arrive_whole_once_complete() {
        let mut data = lines(0, 10);
        data.truncate(300);
        let mut c = LineCheck::new(None);
        c.feed(&data);
        let s = [session(0, 320, 0)];
        assert!(account(&s, &c.runs(true), false).violations(0).is_empty());
        assert!(!account(&s, &c.runs(true), true).violations(0).is_empty());
    }
}
