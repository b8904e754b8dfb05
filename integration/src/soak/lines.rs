//! Numbered lines through a console port, and the reader-side check that splits what arrived
//! into contiguous runs.
//!
//! The writer (playing QEMU's `-chardev socket`, a guest driver, or a guest behind QEMU) sends
//! line after line, [`LINE_LEN`] bytes each: `S`, the line number in 16 digits, a space, 13
//! hex digits derived from the number, `\n`. `S` occurs nowhere else, so a reader can always
//! find the next line start, even after a line torn by a backend kill.
//!
//! The writer keeps one [`Session`] per connection: where its bytes start in the global byte
//! stream (line `first_seq` * `LINE_LEN`), how many it wrote, and how many of those the
//! backend has certainly accepted. A new session always starts on a fresh line.
//!
//! The reader feeds everything it receives (over all its connections to the endpoint, in
//! order) to a [`LineCheck`], which splits it into [`Run`]s: maximal stretches that are
//! contiguous in the global byte stream. [`super::accounting`] holds the runs against the
//! sessions.

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
/// not a line (corruption). Whether the runs make sense is [`super::accounting::account`]'s
/// question.
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::soak::accounting::account;

    /// Lines `from..to`, back to back.
    pub(crate) fn lines(from: u64, to: u64) -> Vec<u8> {
        (from..to).flat_map(line).collect()
    }

    /// A closed session starting at line `first_seq`.
    pub(crate) fn session(first_seq: u64, written: u64, accepted: u64) -> Session {
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
}
