//! Log file endpoints (`file:PATH[,timestamps]`): guest output appended to a regular file,
//! optionally with an RFC 3339 UTC timestamp at the start of every line.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use time::format_description::FormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

use super::fd::write_all_vectored;
use super::{EndpointError, Side};

/// `2026-11-21T21:30:00.123Z`: RFC 3339, UTC, milliseconds.
const STAMP: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

#[derive(Debug)]
pub(super) struct LogFile {
    file: File,
    path: PathBuf,
    timestamps: bool,
    /// Whether the next byte starts a line (and so gets a timestamp); kept across writes.
    at_line_start: bool,
}

impl LogFile {
    pub(super) fn open(path: &Path, timestamps: bool) -> Result<LogFile, EndpointError> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|source| EndpointError::FileOpen {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(LogFile {
            file,
            path: path.to_path_buf(),
            timestamps,
            at_line_start: true,
        })
    }

    /// Appends everything (a regular file does not take partial writes except on errors such
    /// as a full disk, which are reported).
    fn append(&mut self, bufs: &[IoSlice<'_>], total: usize) -> io::Result<usize> {
        if self.timestamps {
            let stamp = format!("[{}] ", rfc3339_utc(SystemTime::now()));
            let mut out = Vec::with_capacity(total + stamp.len());
            for buf in bufs {
                stamp_lines(&mut out, &mut self.at_line_start, buf, &stamp);
            }
            write_all_vectored(self.file.as_fd(), &[IoSlice::new(&out)])?;
        } else {
            write_all_vectored(self.file.as_fd(), bufs)?;
        }
        Ok(total)
    }
}

impl Side for LogFile {
    fn describe(&self) -> String {
        format!(
            "file {}{}",
            self.path.display(),
            if self.timestamps { " (timestamps)" } else { "" }
        )
    }

    fn watch_fds(&self) -> [Option<RawFd>; 2] {
        // Regular files cannot be polled and a log has no input.
        [None, None]
    }

    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn output_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn is_attached(&self) -> bool {
        true
    }

    fn write(&mut self, bufs: &[IoSlice<'_>], total: usize) -> Option<io::Result<usize>> {
        Some(self.append(bufs, total))
    }
}

/// Formats `t` as RFC 3339 UTC with milliseconds: `2026-11-21T21:30:00.123Z`. Times the
/// formatter cannot show (before year 0 or after 9999) are shown as the epoch.
fn rfc3339_utc(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(STAMP)
        .or_else(|_| OffsetDateTime::UNIX_EPOCH.format(STAMP))
        .unwrap_or_default()
}

/// Copies `data` into `out`, putting `stamp` before every line start; `at_line_start`
/// carries the state across calls so split writes stamp each line once.
fn stamp_lines(out: &mut Vec<u8>, at_line_start: &mut bool, data: &[u8], stamp: &str) {
    for line in data.split_inclusive(|&b| b == b'\n') {
        if *at_line_start {
            out.extend_from_slice(stamp.as_bytes());
        }
        out.extend_from_slice(line);
        *at_line_start = line.ends_with(b"\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats_rfc3339() {
        let at = |secs: u64, ms: u64| {
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(951_782_399, 999), "2000-02-28T23:59:59.999Z");
        assert_eq!(at(1_795_296_600, 123), "2026-11-21T21:30:00.123Z");
        assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn stamps_each_line_once_across_splits() {
        let mut out = Vec::new();
        let mut start = true;
        for piece in ["hel", "lo\nwor", "ld\n", "\n", "x"] {
            stamp_lines(&mut out, &mut start, piece.as_bytes(), "T ");
        }
        assert_eq!(String::from_utf8(out).unwrap(), "T hello\nT world\nT \nT x");
        assert!(!start);
    }
}
