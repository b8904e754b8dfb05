//! Numbered lines through a console port, and the check that every accepted byte arrived
//! exactly once and in order.
//!
//! The writer (playing QEMU's `-chardev socket`, or a guest driver) sends line after line,
//! [`LINE_LEN`] bytes each: `S`, the line number in 16 digits, a space, 13 hex digits derived
//! from the number, `\n`. `S` occurs nowhere else, so a reader can always find the next line
//! start, even after a line torn by a backend kill.
//!
//! The writer keeps one [`Session`] per connection: where its bytes start in the global byte
//! stream (line `first_seq` * `LINE_LEN`), how many it wrote, and how many of those the
//! backend has certainly accepted. A new session always starts on a fresh line.
//!
//! The reader feeds everything it receives (over all its connections to the endpoint, in
//! order) to a [`LineCheck`], which splits it into [`Run`]s: maximal stretches that are
//! contiguous in the global byte stream. [`account`] then holds the runs against the
//! sessions: a run may only begin where a session begins (a gap inside a session would be a
//! loss with no kill to explain it), the bytes between runs must be unaccepted tails of
//! sessions (or bytes never written), and runs must not overlap (a duplicate).

use std::sync::{Arc, Mutex};

/// Bytes per line.
pub const LINE_LEN: usize = 32;
/// Lines per chunk a writer sends at once (4 KiB).
pub const LINES_PER_CHUNK: usize = 128;
/// Bytes per chunk.
pub const CHUNK_LEN: usize = LINE_LEN * LINES_PER_CHUNK;

const HEX: &[u8; 16] = b"0123456789abcdef";
const SEQ_DIGITS: usize = 16;

/// The check value of line `seq` (52 bits, printed as 13 hex digits): a multiplicative hash
/// a guest's shell computes too, so a real guest can print the same lines:
/// `printf 'S%016d %013x\n' $i $(( (i * 2654435761) & 0xFFFFFFFFFFFFF ))`.
fn check_value(seq: u64) -> u64 {
    seq.wrapping_mul(2_654_435_761) & ((1 << 52) - 1)
}

/// Line number `seq`, as sent.
pub fn line(seq: u64) -> [u8; LINE_LEN] {
    let mut l = [0u8; LINE_LEN];
    l[0] = b'S';
    let mut n = seq;
    for i in (1..=SEQ_DIGITS).rev() {
        l[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    l[SEQ_DIGITS + 1] = b' ';
    let h = check_value(seq);
    for i in 0..13 {
        l[SEQ_DIGITS + 2 + i] = HEX[((h >> (4 * (12 - i))) & 0xf) as usize];
    }
    l[LINE_LEN - 1] = b'\n';
    l
}

/// Fills `out` (a multiple of [`LINE_LEN`] long) with lines `first_seq`, `first_seq + 1`, ...
pub fn fill_lines(out: &mut [u8], first_seq: u64) {
    for (i, l) in out.chunks_exact_mut(LINE_LEN).enumerate() {
        l.copy_from_slice(&line(first_seq + i as u64));
    }
}

/// The line number written in a token of at least 17 bytes, if it is one.
fn parse_seq(token: &[u8]) -> Option<u64> {
    let digits = token.get(1..=SEQ_DIGITS)?;
    if token[0] != b'S' || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// One connection of a writer: its place in the global byte stream and what became of it.
/// Offsets and counts are bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// Line the session started with; its first byte is at `first_seq * LINE_LEN`.
    pub first_seq: u64,
    /// Bytes written into the connection.
    pub written: u64,
    /// Bytes the backend has certainly accepted (a lower bound; at most `written`).
    pub accepted: u64,
    /// The connection is over: `written` and `accepted` are final.
    pub closed: bool,
}

impl Session {
    /// Global offset of the first byte.
    pub fn start(&self) -> u64 {
        self.first_seq * LINE_LEN as u64
    }

    /// Global offset after the last byte written.
    pub fn end(&self) -> u64 {
        self.start() + self.written
    }
}

/// The sessions of a writer, shared with the reader side (which needs the session starts to
/// place a fragment too short to carry its line number).
pub type Sessions = Arc<Mutex<Vec<Session>>>;

/// A stretch of the global byte stream that arrived contiguously: `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Global offset of the first byte.
    pub start: u64,
    /// Global offset after the last byte.
    pub end: u64,
}

/// The reader-side check: splits the received bytes into [`Run`]s and notes anything that is
/// not a line (corruption). Whether the runs make sense is [`account`]'s question.
pub struct LineCheck {
    /// Sessions of the writer, to place short fragments.
    sessions: Option<Sessions>,
    /// Bytes since the last line start (at most a line).
    token: Vec<u8>,
    /// The run being received and the line it continues with, if any.
    current: Option<(u64, u64)>,
    /// Finished runs, in order.
    runs: Vec<Run>,
    /// End of the last finished run.
    last_end: u64,
    /// What is not a line.
    errors: Vec<String>,
    /// Bytes fed so far.
    received: u64,
    /// Lines received whole.
    lines: u64,
    /// Lenient: bytes that are not part of a line are torn pieces, not corruption.
    lenient: bool,
    /// Bytes counted as torn pieces (lenient only).
    torn: u64,
}

impl LineCheck {
    /// A check; `sessions` lets it place fragments of fewer than 17 bytes.
    pub fn new(sessions: Option<Sessions>) -> LineCheck {
        LineCheck {
            sessions,
            token: Vec::with_capacity(LINE_LEN),
            current: None,
            runs: Vec::new(),
            last_end: 0,
            errors: Vec::new(),
            received: 0,
            lines: 0,
            lenient: false,
            torn: 0,
        }
    }

    /// A check for a writer that cannot say where it resumed after losing bytes at any
    /// position (a guest behind QEMU's serial port: QEMU drops what the UART sends while no
    /// backend is connected). Pieces of lines around such a gap are counted as torn instead
    /// of reported as corruption; whole lines are checked as ever, and every gap still makes
    /// a new run, so the caller can hold the number of gaps against the number of kills.
    pub fn lenient() -> LineCheck {
        LineCheck {
            lenient: true,
            ..LineCheck::new(None)
        }
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Lines received whole.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Bytes of torn pieces of lines ([`lenient`](Self::lenient) checks only).
    pub fn torn(&self) -> u64 {
        self.torn
    }

    /// The line the data received so far continues with (0 before anything arrived).
    pub fn next_seq(&self) -> u64 {
        self.current
            .map_or(self.last_end / LINE_LEN as u64, |(_, next)| next)
    }

    /// Corruption found (bytes that are not the lines sent); empty when all is well.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// The finished runs plus the one in progress (ending at the last whole line, or inside
    /// it when `with_partial` and the bytes after it are a prefix of the expected line).
    pub fn runs(&self, with_partial: bool) -> Vec<Run> {
        let mut v = self.runs.clone();
        if let Some((start, next)) = self.current {
            let mut end = next * LINE_LEN as u64;
            if with_partial && line(next).starts_with(&self.token) {
                end += self.token.len() as u64;
            }
            v.push(Run { start, end });
        }
        v
    }

    fn error(&mut self, e: String) {
        // Bounded: the first problems say everything.
        if self.errors.len() < 100 {
            self.errors.push(e);
        }
    }

    /// Feeds received bytes.
    pub fn feed(&mut self, mut data: &[u8]) {
        self.received += data.len() as u64;
        while !data.is_empty() {
            // Fast path: a whole expected line at a line start.
            if self.token.is_empty() {
                if let Some((_, next)) = &mut self.current {
                    if data.len() >= LINE_LEN && data[..LINE_LEN] == line(*next) {
                        *next += 1;
                        self.lines += 1;
                        data = &data[LINE_LEN..];
                        continue;
                    }
                }
            }
            let b = data[0];
            data = &data[1..];
            if b == b'S' && !self.token.is_empty() {
                let t = std::mem::take(&mut self.token);
                self.token_done(&t, true);
            }
            if self.token.is_empty() && b != b'S' {
                if self.lenient {
                    self.end_current(0);
                    self.torn += 1;
                    continue;
                }
                let at = self.received - data.len() as u64 - 1;
                self.error(format!(
                    "byte {b:#04x} at received offset {at} where a line should start"
                ));
                continue;
            }
            self.token.push(b);
            if self.token.len() == LINE_LEN {
                let t = std::mem::take(&mut self.token);
                self.token_done(&t, false);
            }
        }
    }

    /// A token ended: `torn` when the next line start cut it short.
    fn token_done(&mut self, t: &[u8], torn: bool) {
        if !torn {
            if let Some((_, next)) = &mut self.current {
                if t == line(*next) {
                    *next += 1;
                    self.lines += 1;
                    return;
                }
            }
            // A whole line that does not continue the current run: a new run starts with it.
            let Some(seq) = parse_seq(t).filter(|&s| t == line(s)) else {
                if self.lenient {
                    // The head of the expected line, then the tail of a later one.
                    let k = match self.current {
                        Some((_, next)) => {
                            let l = line(next);
                            t.iter().zip(l.iter()).take_while(|(a, b)| a == b).count()
                        }
                        None => 0,
                    };
                    self.end_current(k as u64);
                    self.torn += (t.len() - k) as u64;
                    return;
                }
                self.error(format!("corrupt line {:?}", String::from_utf8_lossy(t)));
                return;
            };
            self.end_current(0);
            self.start_run(seq);
            if let Some((_, next)) = &mut self.current {
                *next += 1;
                self.lines += 1;
            }
            return;
        }
        // A torn line: the tail of the current run, or a run of less than one line.
        if let Some((_, next)) = self.current {
            if line(next).starts_with(t) {
                self.end_current(t.len() as u64);
                return;
            }
        }
        self.end_current(0);
        let seq = match parse_seq(t) {
            Some(s) if line(s).starts_with(t) => Some(s),
            Some(_) => None,
            None => self.session_start_matching(t),
        };
        let Some(seq) = seq else {
            if self.lenient {
                self.torn += t.len() as u64;
                return;
            }
            self.error(format!(
                "corrupt fragment {:?} after offset {}",
                String::from_utf8_lossy(t),
                self.last_end
            ));
            return;
        };
        self.start_run(seq);
        self.end_current(t.len() as u64);
    }

    /// The first session start at or after the last run's end whose line begins with `t`.
    fn session_start_matching(&self, t: &[u8]) -> Option<u64> {
        let sessions = self.sessions.as_ref()?.lock().ok()?;
        let from = self.last_end.div_ceil(LINE_LEN as u64);
        sessions
            .iter()
            .map(|s| s.first_seq)
            .find(|&s| s >= from && line(s).starts_with(t))
    }

    /// A run starts with line `seq` (one going back is a duplicate, which [`account`] reports).
    fn start_run(&mut self, seq: u64) {
        self.current = Some((seq * LINE_LEN as u64, seq));
    }

    /// Ends the run in progress `partial` bytes into its next line.
    fn end_current(&mut self, partial: u64) {
        if let Some((start, next)) = self.current.take() {
            let end = next * LINE_LEN as u64 + partial;
            self.runs.push(Run { start, end });
            self.last_end = self.last_end.max(end);
        }
    }
}

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

    fn lines(from: u64, to: u64) -> Vec<u8> {
        (from..to).flat_map(line).collect()
    }

    fn session(first_seq: u64, written: u64, accepted: u64) -> Session {
        Session {
            first_seq,
            written,
            accepted,
            closed: true,
        }
    }

    #[test]
    fn line_format_is_fixed_width_and_self_describing() {
        let l = line(1234);
        assert_eq!(l.len(), LINE_LEN);
        assert!(l.starts_with(b"S0000000000001234 "));
        assert_eq!(l[LINE_LEN - 1], b'\n');
        assert_eq!(l.iter().filter(|&&b| b == b'S').count(), 1);
        assert_eq!(parse_seq(&l), Some(1234));
        assert_ne!(line(1234)[18..31], line(1235)[18..31]);
        // What the guest's shell prints for the same number (see check_value).
        assert_eq!(&line(123_456_789_012), b"S0000123456789012 d1af3177a7bd4\n");
    }

    #[test]
    fn a_clean_stream_in_odd_pieces_is_one_run() {
        let data = lines(0, 1000);
        let mut c = LineCheck::new(None);
        for piece in data.chunks(7) {
            c.feed(piece);
        }
        assert!(c.errors().is_empty(), "{:?}", c.errors());
        assert_eq!(
            c.runs(true),
            vec![Run {
                start: 0,
                end: 32_000
            }]
        );
        assert_eq!(c.lines(), 1000);
        let acc = account(&[session(0, 32_000, 32_000)], &c.runs(true), true);
        assert!(acc.violations(0).is_empty(), "{:?}", acc.violations(0));
        assert_eq!(acc.total().lost, 0);
    }

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
    fn a_lenient_check_counts_torn_pieces_and_still_splits_runs() {
        // Bytes lost at any position, as QEMU's serial port loses them: the head of line 10,
        // then the middle of line 25 onwards.
        let mut data = lines(0, 10);
        data.extend(&line(10)[..20]);
        data.extend(&line(25)[5..]);
        data.extend(lines(26, 30));
        let mut c = LineCheck::lenient();
        c.feed(&data);
        assert!(c.errors().is_empty(), "{:?}", c.errors());
        let runs = c.runs(true);
        assert_eq!(runs.len(), 2, "{runs:?}");
        // Line 10's head (20 bytes, plus whatever of line 25's tail happens to match it).
        assert!(
            runs[0].start == 0 && (340..352).contains(&runs[0].end),
            "{runs:?}"
        );
        assert_eq!(
            runs[1],
            Run {
                start: 832,
                end: 960
            }
        );
        // Every byte is in a run or torn.
        assert_eq!(
            c.torn() + (runs[0].end - 320) + 128 + 320,
            data.len() as u64
        );
        // A line cut short by the next line start, and junk before a line start.
        let mut data = lines(0, 3);
        data.extend(&line(3)[..7]);
        data.extend(b"123 abc\n");
        data.extend(lines(9, 10));
        let mut c = LineCheck::lenient();
        c.feed(&data);
        assert!(c.errors().is_empty(), "{:?}", c.errors());
        assert_eq!(c.runs(true).len(), 2);
        // Corruption inside a whole line still splits the run: the caller counts gaps.
        let mut data = lines(0, 5);
        data[40] = b'x';
        let mut c = LineCheck::lenient();
        c.feed(&data);
        assert_eq!(c.runs(true).len(), 2);
        // The strict check reports all of these.
        let mut c = LineCheck::new(None);
        c.feed(&data);
        assert!(!c.errors().is_empty());
    }

    #[test]
    fn garbage_is_reported() {
        let mut data = lines(0, 3);
        data.extend(b"port busy\n");
        data.extend(lines(3, 4));
        let mut c = LineCheck::new(None);
        c.feed(&data);
        assert!(!c.errors().is_empty());
        let mut data = lines(0, 3);
        data[40] = b'x';
        let mut c = LineCheck::new(None);
        c.feed(&data);
        assert!(!c.errors().is_empty());
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
