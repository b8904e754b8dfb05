//! Log file endpoints (`file:PATH[,timestamps][,max-size=SIZE][,keep=N]`): guest output
//! appended to a regular file, optionally with an RFC 3339 UTC timestamp at the start of every
//! line, and bounded by default.
//!
//! - **Rotation by size**, as virtlogd does: before the file would grow past `max-size`
//!   (default 2 MiB), `PATH.N-1` becomes `PATH.N` ... `PATH` becomes `PATH.1`, the oldest
//!   (`PATH.keep`, default 3) is dropped, and a fresh `PATH` is started. Lines are not cut
//!   between files unless one line is larger than a whole file. `keep=0` empties the file
//!   instead; `max-size=0` turns rotation off (for an external logrotate).
//! - **Reopen on SIGHUP**: after an external `mv PATH PATH.1`, SIGHUP makes new output go to
//!   a fresh `PATH` ([`LogFile::reload`]).
//! - **Never through a planted link**: files are opened with `O_NOFOLLOW` and created 0600
//!   (`devshare_common::files::open_private`); a symlink at `PATH` is refused.
//! - **Rotation moves only our own files**: every name it would move or replace (`PATH`,
//!   `PATH.1` .. `PATH.keep`) must be absent or a regular file owned by this user (checked
//!   without following links) before anything is moved. Anything else in the way (another
//!   user's directory, file or symlink planted in a shared directory) is left alone: the log
//!   is emptied instead to stay bounded, which is logged at a bounded rate, counted in
//!   `rotation_failures`, and the bytes it held in the port's `dropped_bytes`.
//! - A file that cannot be opened again (a link planted at `PATH`, a missing directory) is
//!   retried at growing delays; meanwhile output waits in the port's buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use devshare_common::files::open_private;
use devshare_common::ratelimit::RateLimit;
use devshare_common::warn_limited;

use super::fd::write_all_vectored;
use super::reopen::{Reopen, DEFAULT_INTERVAL};
use super::{EndpointCounters, EndpointError, LogLimits, Readiness, Side, Watch};

#[derive(Debug)]
pub(super) struct LogFile {
    /// None while the file could not be opened again (retried on ticks).
    file: Option<File>,
    path: PathBuf,
    timestamps: bool,
    limits: LogLimits,
    /// Bytes in the file now.
    size: u64,
    /// Whether the next byte starts a line (and so gets a timestamp); kept across writes.
    at_line_start: bool,
    counters: Arc<EndpointCounters>,
    /// While the file is closed: when to try again.
    retry: Option<Reopen>,
    /// A rotation failed and was logged; cleared by the next one that works.
    rotation_failed: bool,
    /// Limits the lines about failed rotations: whoever can write to the log's directory
    /// decides how often they happen.
    rotation_log: RateLimit,
}

fn append_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.append(true).create(true);
    o
}

impl LogFile {
    pub(super) fn open(
        path: &Path,
        timestamps: bool,
        limits: LogLimits,
        counters: Arc<EndpointCounters>,
    ) -> Result<LogFile, EndpointError> {
        let (file, size) = open_log(path)?;
        Ok(LogFile {
            file: Some(file),
            path: path.to_path_buf(),
            timestamps,
            limits,
            size,
            at_line_start: true,
            counters,
            retry: None,
            rotation_failed: false,
            rotation_log: RateLimit::standard(format!("log {}", path.display())),
        })
    }

    /// Appends everything (a regular file does not take partial writes except on errors such
    /// as a full disk, which are reported), rotating the file where it would outgrow its
    /// limit. Returns the bytes of `bufs` taken: all of them, or those written before an
    /// error (then the error if none was).
    fn append(&mut self, bufs: &[IoSlice<'_>], total: usize) -> io::Result<usize> {
        let file = self.file.as_ref().ok_or(io::ErrorKind::NotConnected)?;
        let fits = self.limits.max_size == 0 || self.size + total as u64 <= self.limits.max_size;
        if fits && !self.timestamps {
            // The common case: one writev, nothing copied.
            write_all_vectored(file.as_fd(), bufs)?;
            self.size += total as u64;
            return Ok(total);
        }
        let stamp = self
            .timestamps
            .then(|| format!("[{}] ", rfc3339_utc(SystemTime::now())));
        // Lines are collected into one write while they fit the file; a rotation happens
        // between lines.
        let mut batch: Vec<u8> = Vec::with_capacity(total + stamp.as_ref().map_or(0, |s| s.len()));
        let mut batch_in = 0usize;
        let mut batch_line_start = self.at_line_start;
        let mut done = 0usize;
        let result = (|| -> io::Result<()> {
            for buf in bufs {
                for line in buf.split_inclusive(|&b| b == b'\n') {
                    let stamp_len = match &stamp {
                        Some(s) if batch_line_start => s.len(),
                        _ => 0,
                    };
                    let piece = (stamp_len + line.len()) as u64;
                    if self.limits.max_size != 0
                        && self.size + batch.len() as u64 + piece > self.limits.max_size
                    {
                        self.write_batch(&batch)?;
                        done += batch_in;
                        self.at_line_start = batch_line_start;
                        batch.clear();
                        batch_in = 0;
                        if piece > self.limits.max_size {
                            // One line larger than a whole file: cut it where files end.
                            if let Some(s) = stamp.as_ref().filter(|_| batch_line_start) {
                                batch.extend_from_slice(s.as_bytes());
                            }
                            batch.extend_from_slice(line);
                            self.write_cut(&batch)?;
                            batch.clear();
                            done += line.len();
                            batch_line_start = line.ends_with(b"\n");
                            self.at_line_start = batch_line_start;
                            continue;
                        }
                        if self.size > 0 {
                            self.rotate()?;
                        }
                    }
                    if stamp_len > 0 {
                        if let Some(s) = &stamp {
                            batch.extend_from_slice(s.as_bytes());
                        }
                    }
                    batch.extend_from_slice(line);
                    batch_in += line.len();
                    batch_line_start = line.ends_with(b"\n");
                }
            }
            self.write_batch(&batch)?;
            done += batch_in;
            self.at_line_start = batch_line_start;
            Ok(())
        })();
        match result {
            Ok(()) => Ok(done),
            Err(_) if done > 0 => Ok(done),
            Err(e) => Err(e),
        }
    }

    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let file = self.file.as_ref().ok_or(io::ErrorKind::NotConnected)?;
        write_all_vectored(file.as_fd(), &[IoSlice::new(batch)])?;
        self.size += batch.len() as u64;
        Ok(())
    }

    /// Writes `data` across as many files as it needs, each filled to the limit.
    fn write_cut(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = self.limits.max_size.saturating_sub(self.size);
            if room == 0 {
                self.rotate()?;
                continue;
            }
            let n = (room as usize).min(data.len());
            self.write_batch(&data[..n])?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Rotates: `PATH.keep-1` -> `PATH.keep`, ..., `PATH` -> `PATH.1`, then a fresh `PATH`.
    /// With `keep=0` the file is emptied. If the names cannot be moved, the file is emptied
    /// (it must stay bounded) and that is logged once.
    fn rotate(&mut self) -> io::Result<()> {
        let moved = if self.limits.keep == 0 {
            Ok(())
        } else {
            self.shift_names()
        };
        match moved {
            Ok(()) if self.limits.keep > 0 => match open_log(&self.path) {
                Ok((file, size)) => {
                    self.file = Some(file);
                    self.size = size;
                }
                Err(e) => {
                    // The old file is already PATH.1: stop writing until PATH can be opened.
                    log::warn!("{e}; output waits until it can be opened");
                    self.file = None;
                    self.retry = Some(Reopen::after(DEFAULT_INTERVAL, Instant::now()));
                    return Err(io::ErrorKind::NotConnected.into());
                }
            },
            Ok(()) => self.empty()?,
            Err(e) => {
                let discarded = self.size;
                warn_limited!(
                    self.rotation_log,
                    "log {}: cannot rotate ({e}); emptying the file instead to keep it bounded \
                     ({discarded} bytes dropped, counted in dropped_bytes)",
                    self.path.display()
                );
                self.rotation_failed = true;
                self.empty()?;
                self.counters.rotation_failures.inc();
                self.counters.dropped_bytes.add(discarded);
                return Ok(());
            }
        }
        if self.rotation_failed {
            log::info!("log {}: rotating again", self.path.display());
            self.rotation_failed = false;
        }
        self.counters.rotations.inc();
        Ok(())
    }

    fn empty(&mut self) -> io::Result<()> {
        let file = self.file.as_ref().ok_or(io::ErrorKind::NotConnected)?;
        file.set_len(0)?;
        self.size = 0;
        Ok(())
    }

    /// Moves every name one up; names that do not exist are skipped. Every name involved is
    /// checked first (see the module docs): if one is not ours, nothing is moved.
    fn shift_names(&self) -> io::Result<()> {
        let numbered = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        check_ours(&self.path)?;
        for i in 1..=self.limits.keep {
            check_ours(&numbered(i))?;
        }
        let rename = |from: &Path, to: &Path| match std::fs::rename(from, to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        for i in (1..self.limits.keep).rev() {
            rename(&numbered(i), &numbered(i + 1))?;
        }
        rename(&self.path, &numbered(1))
    }

    /// Opens `PATH` again (SIGHUP, retries); on failure the file stays closed and is retried.
    fn open_again(&mut self, now: Instant, why: &str) -> Result<bool, EndpointError> {
        match open_log(&self.path) {
            Ok((file, size)) => {
                let was_closed = self.file.is_none();
                self.file = Some(file);
                self.size = size;
                self.retry = None;
                log::info!(
                    "log {}: {why}: opened again{}",
                    self.path.display(),
                    if was_closed {
                        "; output flows again"
                    } else {
                        ""
                    }
                );
                Ok(true)
            }
            Err(e) => {
                match &mut self.retry {
                    Some(r) => r.failed(now),
                    None => {
                        log::warn!("{e}; output waits until it can be opened");
                        self.retry = Some(Reopen::after(DEFAULT_INTERVAL, now));
                    }
                }
                // Never go on writing into a file that was renamed away.
                self.file = None;
                Err(e)
            }
        }
    }
}

/// Whether rotation may move or replace `path`: nothing there, or a regular file owned by
/// this process's user (looked at without following a link).
fn check_ours(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let ft = meta.file_type();
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symlink"
    } else if !ft.is_file() {
        "not a regular file"
    } else if meta.uid() != euid {
        "another user's file"
    } else {
        return Ok(());
    };
    Err(io::Error::other(format!(
        "{} is {what}, not a log file of ours; it is left alone",
        path.display()
    )))
}

/// Opens (or creates, 0600) the log at `path` for appending, never through a symlink; returns
/// it with its size.
fn open_log(path: &Path) -> Result<(File, u64), EndpointError> {
    let err = |source| EndpointError::FileOpen {
        path: path.to_path_buf(),
        source,
    };
    let file = open_private(path, &append_options()).map_err(err)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((file, size))
}

impl Side for LogFile {
    fn describe(&self) -> String {
        format!(
            "file {}{}{}",
            self.path.display(),
            if self.timestamps { " (timestamps)" } else { "" },
            if self.file.is_none() { " (closed)" } else { "" }
        )
    }

    fn watch_fds(&self) -> [Option<Watch>; 2] {
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
        self.file.is_some()
    }

    fn write(&mut self, bufs: &[IoSlice<'_>], total: usize) -> Option<io::Result<usize>> {
        self.file.as_ref()?;
        Some(self.append(bufs, total))
    }

    fn needs_tick(&self) -> bool {
        self.file.is_none()
    }

    fn tick(&mut self, now: Instant) -> Readiness {
        match &self.retry {
            Some(r) if r.due(now) => match self.open_again(now, "retrying") {
                Ok(true) => Readiness::Reopened,
                _ => Readiness::Nothing,
            },
            _ => Readiness::Nothing,
        }
    }

    fn reload(&mut self) -> Result<bool, EndpointError> {
        self.open_again(Instant::now(), "SIGHUP")
    }

    fn shutdown(&mut self) {
        if let Some(f) = &self.file {
            let _ = f.sync_data();
        }
    }
}

/// First second humantime's RFC 3339 formatter cannot show: 10000-01-01T00:00:00Z.
const YEAR_10000: u64 = 253_402_300_800;

/// Formats `t` as RFC 3339 UTC with milliseconds: `2026-11-21T21:30:00.123Z`. Times the
/// formatter cannot show (before the epoch, from year 10000: a clock set wrong) are shown as
/// the epoch; formatting them would panic.
fn rfc3339_utc(t: SystemTime) -> String {
    let shown = match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() < YEAR_10000 => t,
        _ => UNIX_EPOCH,
    };
    humantime::format_rfc3339_millis(shown).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert_eq!(at(YEAR_10000 - 1, 0), "9999-12-31T23:59:59.000Z");
        assert_eq!(at(YEAR_10000, 0), "1970-01-01T00:00:00.000Z");
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339_utc(before), "1970-01-01T00:00:00.000Z");
    }
}
