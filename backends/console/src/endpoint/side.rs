//! The `Side` trait: what one kind of endpoint (PTY, listener, log file, serial device) does,
//! with defaults for what a kind does not have. [`Endpoint`] wraps a side with what every
//! kind shares.

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::Instant;

#[cfg(doc)]
use super::Endpoint;
use super::{EndpointError, Readiness, SerialSettings, Watch};

/// Errors that mean the peer or the device on the other side of a socket or terminal left.
/// A log file's EIO is a disk problem instead, so log files do not use this list.
pub(super) const GONE_ERRNOS: &[i32] = &[
    libc::EPIPE,
    libc::ECONNRESET,
    libc::ECONNABORTED,
    libc::ENOTCONN,
    libc::ESHUTDOWN,
    libc::ETIMEDOUT,
    libc::EHOSTUNREACH,
    libc::EIO,
    libc::ENXIO,
    libc::ENODEV,
];

/// One kind of endpoint. The fds it hands out are non-blocking and close-on-exec; [`Endpoint`]
/// wraps it with what every kind shares. An fd that leaves [`Side::watch_fds`] while open is
/// kept until [`Side::close_retired`].
pub(crate) trait Side: fmt::Debug + Send {
    /// One line for logs, e.g. `pty /dev/pts/4 (link /tmp/vm1-console)`.
    fn describe(&self) -> String;
    /// The fds to watch now (at most two: a listener and its client, a PTY master and the
    /// slave the backend holds).
    fn watch_fds(&self) -> [Option<Watch>; 2];
    /// The listening fd `fd` is readable: accept.
    fn accept(&mut self, _fd: RawFd) -> Readiness {
        Readiness::Nothing
    }
    /// Where host input is read from; None when nothing is attached, the input ended, or
    /// there is no input.
    fn input_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Where to wait for writability after a short write; None when writes never wait.
    fn output_fd(&self) -> Option<BorrowedFd<'_>> {
        self.input_fd()
    }
    /// Whether output can be delivered now.
    fn is_attached(&self) -> bool;
    /// Writes guest output; None when nothing is attached.
    fn write(&mut self, bufs: &[IoSlice<'_>], total: usize) -> Option<io::Result<usize>>;
    /// Whether an error in [`GONE_ERRNOS`] means the other side left (sockets, terminals)
    /// rather than, say, a full disk.
    fn has_peers(&self) -> bool {
        false
    }
    /// The client or device went away (`why`): drop it (a device is reopened later, a PTY's
    /// slave at once). Logs the change. Returns whether something was dropped.
    fn lose(&mut self, _why: &str) -> bool {
        false
    }
    /// A read gave end of file: a socket client finished sending, a terminal hung up.
    fn end_of_input(&mut self) -> Readiness {
        if self.lose("end of file") {
            Readiness::Gone
        } else {
            Readiness::Nothing
        }
    }
    /// `fd` reported the peer's half-close (EPOLLRDHUP).
    fn read_hang_up(&mut self, _fd: RawFd) {}
    /// `fd` reported a hang-up or an error.
    fn hang_up(&mut self, fd: RawFd) -> Readiness {
        let data = self.output_fd().map(|f| f.as_raw_fd());
        if data == Some(fd) && self.lose("hung up") {
            Readiness::Gone
        } else {
            Readiness::Nothing
        }
    }
    /// Whether [`Side::tick`] has work to do (a reopen is due, a paused listener resumes).
    fn needs_tick(&self) -> bool {
        false
    }
    /// Periodic work; [`Readiness::Reopened`] when something is open again.
    fn tick(&mut self, _now: Instant) -> Readiness {
        Readiness::Nothing
    }
    /// Opens the device again now, whatever the schedule; `Ok(true)` if it is open again.
    fn reopen(&mut self) -> Result<bool, EndpointError> {
        Ok(false)
    }
    /// SIGHUP: log files are opened again by name (after an external rotation).
    fn reload(&mut self) -> Result<bool, EndpointError> {
        Ok(false)
    }
    /// The process shuts down: remove what this endpoint created (a PTY link), make a log
    /// file's data durable.
    fn shutdown(&mut self) {}
    /// Closes the fds that left the watch set.
    fn close_retired(&mut self) {}
    /// Terminal size `(cols, rows)`, for kinds that have one.
    fn window_size(&self) -> Option<(u16, u16)> {
        None
    }
    /// The PTY slave path, for PTYs.
    fn pty_path(&self) -> Option<&Path> {
        None
    }
    /// The bound TCP address, for TCP listeners.
    fn local_addr(&self) -> Option<SocketAddr> {
        None
    }
    /// The line settings read back from a serial device.
    fn serial_line(&self) -> Option<Result<SerialSettings, EndpointError>> {
        None
    }
}
