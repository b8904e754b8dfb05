//! Host-side endpoints of console ports: PTYs, Unix and TCP listeners, log files and serial
//! devices, one file per kind, plus the spec parser ([`spec`]).
//!
//! An endpoint knows nothing about virtqueues. It owns non-blocking file descriptors and a
//! small API the device's event loop drives: [`Endpoint::watch_fds`] says what to poll for
//! readability, [`Endpoint::on_readable`] accepts clients or reports input,
//! [`Endpoint::input_fd`] / [`Endpoint::read_input`] carry host-to-guest bytes and
//! [`Endpoint::write_output`] carries guest-to-host bytes. Each kind implements the small
//! `Side` trait; what every kind shares (error mapping, dropping a peer that went away)
//! lives here once.
//!
//! Listeners serve one client at a time: a second client is accepted, told `port busy` and
//! closed, so the attached client never loses its session to a stray connection.

mod fd;
mod file;
mod listener;
mod pty;
mod serial;
pub mod spec;

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

pub use serialport::{DataBits, FlowControl, Parity, StopBits};
pub use spec::{EndpointSpec, SerialSettings};

/// Errors of endpoints: bad spec strings, failures to open, and I/O on attached clients.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The spec string does not name a valid endpoint.
    #[error("invalid endpoint {spec:?}: {reason}")]
    InvalidSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `posix_openpt` and friends failed.
    #[error("cannot create a PTY pair: {0}")]
    PtyCreate(#[source] io::Error),
    /// The PTY symlink could not be made.
    #[error("cannot create PTY link {link}: {source}")]
    PtyLink {
        /// Where the link was to go.
        link: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Binding the Unix socket failed.
    #[error("cannot listen on unix socket {path}: {source}")]
    UnixListen {
        /// Socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Another process already listens on the Unix socket path.
    #[error("unix socket {path} is in use: another process listens on it")]
    UnixInUse {
        /// Socket path.
        path: PathBuf,
    },
    /// Binding the TCP listener failed.
    #[error("cannot listen on tcp {addr}: {source}")]
    TcpListen {
        /// Listen address.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// `accept` failed for a reason other than "nothing pending".
    #[error("cannot accept a client on {endpoint}: {source}")]
    Accept {
        /// [`Endpoint::describe`] of the endpoint.
        endpoint: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The log file could not be opened.
    #[error("cannot open log file {path}: {source}")]
    FileOpen {
        /// Log file path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The serial device could not be opened.
    #[error("cannot open serial device {device}: {source}")]
    SerialOpen {
        /// Device path.
        device: PathBuf,
        /// The underlying error.
        source: serialport::Error,
    },
    /// The serial device's termios could not be set or read.
    #[error("cannot configure serial device {device}: {source}")]
    SerialConfig {
        /// Device path.
        device: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The client (or serial device) went away; the endpoint has already dropped it and,
    /// for listeners, keeps listening.
    #[error("{endpoint}: client went away")]
    Detached {
        /// [`Endpoint::describe`] of the endpoint.
        endpoint: String,
    },
    /// Output was written while nothing is attached (see [`Endpoint::is_attached`]).
    #[error("{endpoint}: nothing attached to write to")]
    NotAttached {
        /// [`Endpoint::describe`] of the endpoint.
        endpoint: String,
    },
    /// Writing guest output failed.
    #[error("write to {endpoint} failed: {source}")]
    Write {
        /// [`Endpoint::describe`] of the endpoint.
        endpoint: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading host input failed.
    #[error("read from {endpoint} failed: {source}")]
    Read {
        /// [`Endpoint::describe`] of the endpoint.
        endpoint: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// What happened on a ready fd (see [`Endpoint::on_readable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// A client was accepted and is now attached.
    Connected,
    /// A client arrived while another is attached; it was told "port busy" and closed.
    Refused,
    /// Host input is waiting on [`Endpoint::input_fd`].
    Input,
    /// Nothing to do (spurious wake-up, or not one of our fds).
    Nothing,
}

/// One kind of endpoint. The fds it hands out are non-blocking and close-on-exec; [`Endpoint`]
/// wraps it with what every kind shares.
pub(crate) trait Side: fmt::Debug + Send {
    /// One line for logs, e.g. `pty /dev/pts/4 (link /tmp/vm1-console)`.
    fn describe(&self) -> String;
    /// The fds to poll for readability now (at most two: a listener and its client).
    fn watch_fds(&self) -> [Option<RawFd>; 2];
    /// `fd` is readable and is not the input fd: a listener accepts here.
    fn on_readable(&mut self, _fd: RawFd) -> Result<Readiness, EndpointError> {
        Ok(Readiness::Nothing)
    }
    /// Where host input is read from; None when nothing is attached or there is no input.
    fn input_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Where to wait for writability after a short write; None when writes never wait.
    fn output_fd(&self) -> Option<BorrowedFd<'_>> {
        self.input_fd()
    }
    /// Whether output can be delivered now.
    fn is_attached(&self) -> bool;
    /// Writes guest output; None when nothing is attached.
    fn write(&mut self, bufs: &[IoSlice<'_>], total: usize) -> Option<io::Result<usize>>;
    /// Whether an error like EPIPE or EIO means a peer left (rather than, say, a full disk).
    fn has_peers(&self) -> bool {
        false
    }
    /// Drops the client (or closes a device that hung up); true if something was dropped.
    fn detach(&mut self) -> bool {
        false
    }
    /// Opens a device again after a hang-up; `Ok(true)` if it is open again.
    fn reopen(&mut self) -> Result<bool, EndpointError> {
        Ok(false)
    }
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

/// A host-side endpoint bridged to one guest console port.
#[derive(Debug)]
pub struct Endpoint {
    side: Box<dyn Side>,
}

impl Endpoint {
    /// Opens the endpoint `spec` describes: creates the PTY, binds the listener, opens the
    /// file or device. All fds are non-blocking and close-on-exec.
    pub fn open(spec: &EndpointSpec) -> Result<Endpoint, EndpointError> {
        let side: Box<dyn Side> = match spec {
            EndpointSpec::Pty { link } => Box::new(pty::Pty::open(link.as_deref())?),
            EndpointSpec::Unix(path) => Box::new(listener::Listener::unix(path)?),
            EndpointSpec::Tcp(addr) => Box::new(listener::Listener::tcp(*addr)?),
            EndpointSpec::File { path, timestamps } => {
                Box::new(file::LogFile::open(path, *timestamps)?)
            }
            EndpointSpec::Serial(settings) => Box::new(serial::Serial::open(settings)?),
        };
        let endpoint = Endpoint { side };
        log::info!("console endpoint ready: {}", endpoint.describe());
        Ok(endpoint)
    }

    /// Every fd the event loop must watch for readability right now (listener and/or the
    /// client / device fd). Changes after [`on_readable`](Self::on_readable),
    /// [`detach`](Self::detach) and calls that return [`EndpointError::Detached`].
    pub fn watch_fds(&self) -> Vec<RawFd> {
        self.side.watch_fds().into_iter().flatten().collect()
    }

    /// [`watch_fds`](Self::watch_fds) without an allocation, for the event loop.
    pub(crate) fn watch_set(&self) -> [Option<RawFd>; 2] {
        self.side.watch_fds()
    }

    /// `fd` (one of [`watch_fds`](Self::watch_fds)) is readable. On a listener this accepts:
    /// [`Readiness::Connected`], or [`Readiness::Refused`] while a client is attached. On a
    /// data fd it returns [`Readiness::Input`]: read from [`input_fd`](Self::input_fd) (or
    /// with [`read_input`](Self::read_input)).
    pub fn on_readable(&mut self, fd: RawFd) -> Result<Readiness, EndpointError> {
        if self.input_fd().map(|f| f.as_raw_fd()) == Some(fd) {
            return Ok(Readiness::Input);
        }
        self.side.on_readable(fd)
    }

    /// Where host-to-guest bytes are read from (non-blocking); None when nothing is attached
    /// or the kind has no input (file).
    pub fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        self.side.input_fd()
    }

    /// Reads host input into `buf`. `Ok(0)` means nothing available now (would block) or
    /// nothing attached. End of stream or a reset detaches the client (or closes the serial
    /// device) and returns [`EndpointError::Detached`].
    pub fn read_input(&mut self, buf: &mut [u8]) -> Result<usize, EndpointError> {
        let Some(fd) = self.input_fd() else {
            return Ok(0);
        };
        let fd = fd.as_raw_fd();
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `fd` is open (borrowed
            // from self just above, and nothing closes it in between).
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(n as usize);
            }
            if n == 0 && !buf.is_empty() {
                return Err(self.lose_client());
            }
            if n == 0 {
                return Ok(0);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ if self.is_client_gone(&e) => return Err(self.lose_client()),
                _ => {
                    return Err(EndpointError::Read {
                        endpoint: self.describe(),
                        source: e,
                    })
                }
            }
        }
    }

    /// Whether guest output can be delivered now: a client is attached, the device is open,
    /// or the kind always takes output (PTY, file).
    pub fn is_attached(&self) -> bool {
        self.side.is_attached()
    }

    /// Writes guest output with one `writev` (sockets: `sendmsg`, never raising SIGPIPE) and
    /// returns how much the kernel took: possibly short, or 0 when the fd would block; the
    /// caller keeps the rest and waits for [`output_fd`](Self::output_fd) to be writable.
    /// A log file takes everything (with timestamps it formats its own lines).
    /// A peer that went away gives [`EndpointError::Detached`], after the endpoint dropped it;
    /// writing with nothing attached gives [`EndpointError::NotAttached`].
    pub fn write_output(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, EndpointError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        match self.side.write(bufs, total) {
            None => Err(EndpointError::NotAttached {
                endpoint: self.describe(),
            }),
            Some(Ok(n)) => Ok(n),
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Some(Err(e)) if self.is_client_gone(&e) => Err(self.lose_client()),
            Some(Err(source)) => Err(EndpointError::Write {
                endpoint: self.describe(),
                source,
            }),
        }
    }

    /// The fd to wait on for writability after a short write; None when nothing is attached
    /// or writes never wait (file: regular files cannot be polled and take everything).
    pub fn output_fd(&self) -> Option<BorrowedFd<'_>> {
        self.side.output_fd()
    }

    /// Drops the client after the caller saw EOF / EPIPE / ECONNRESET on it; listeners keep
    /// listening. A serial device is closed (it hung up). PTY and file: nothing to drop.
    pub fn detach(&mut self) {
        let before = self.describe();
        if self.side.detach() {
            log::info!("{before}: detached");
        }
    }

    /// Serial endpoints whose device was closed after a hang-up: tries to open it again with
    /// the same settings (a USB adapter plugged back in). `Ok(true)` when it is open again;
    /// `Ok(false)` when there was nothing to reopen (other kinds, or still open).
    pub fn reopen(&mut self) -> Result<bool, EndpointError> {
        let reopened = self.side.reopen()?;
        if reopened {
            log::info!("{}: reopened", self.describe());
        }
        Ok(reopened)
    }

    /// Terminal size `(cols, rows)` of a PTY, as last set on it (TIOCSWINSZ by the program
    /// on the slave); None for other kinds and while no size was ever set (0x0). PTY masters
    /// get no notification of size changes, so the caller re-reads this periodically.
    pub fn window_size(&self) -> Option<(u16, u16)> {
        self.side.window_size()
    }

    /// One line for logs and `--help`, e.g. `pty /dev/pts/4 (link /tmp/vm1-console)`.
    pub fn describe(&self) -> String {
        self.side.describe()
    }

    /// The PTY slave path (what a terminal program opens); None for other kinds.
    pub fn pty_path(&self) -> Option<&Path> {
        self.side.pty_path()
    }

    /// The bound address of a TCP endpoint (with the real port when `tcp:0` was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.side.local_addr()
    }

    /// Serial endpoints: the line settings read back from the device (termios), which is what
    /// the driver really applied. None for other kinds or a closed device.
    pub fn serial_line(&self) -> Option<Result<SerialSettings, EndpointError>> {
        self.side.serial_line()
    }

    fn is_client_gone(&self, e: &io::Error) -> bool {
        // A log file's EIO is a disk problem, not a peer leaving.
        self.side.has_peers()
            && matches!(
                e.raw_os_error(),
                Some(
                    libc::EPIPE
                        | libc::ECONNRESET
                        | libc::ENOTCONN
                        | libc::ESHUTDOWN
                        | libc::EIO
                        | libc::ENXIO
                        | libc::ENODEV
                )
            )
    }

    fn lose_client(&mut self) -> EndpointError {
        let endpoint = self.describe();
        self.detach();
        EndpointError::Detached { endpoint }
    }
}
