//! Host-side endpoints of console ports: PTYs, Unix and TCP listeners, log files and serial
//! devices, one file per kind, plus the spec parser ([`spec`]) and the reopen schedule
//! ([`reopen`]).
//!
//! An endpoint knows nothing about virtqueues or epoll. It owns non-blocking file descriptors
//! and a small API the device's event loop drives: [`Endpoint::watch_set`] says which fds to
//! watch and what each one is for ([`Watch`]), [`Endpoint::on_readable`] accepts clients or
//! reports input, [`Endpoint::on_hang_up`] / [`Endpoint::on_read_hang_up`] take the
//! conditions the kernel reports even when nobody asked (a peer that left, a device that went
//! away), [`Endpoint::input_fd`] / [`Endpoint::read_input`] carry host-to-guest bytes and
//! [`Endpoint::write_output`] carries guest-to-host bytes. Each kind implements the small
//! `Side` trait; what every kind shares (error mapping, dropping a peer that went away,
//! counters) lives here once.
//!
//! The rule that keeps the event loop from spinning: a condition the kernel reports is
//! always consumed. A peer that hung up is dropped, a device that went away is closed (and
//! reopened later on [`Endpoint::tick`]), a PTY slave that was hung up is opened again. An fd
//! that leaves the watch set is not closed at once but handed to [`Endpoint::close_retired`],
//! which the event loop calls after removing it from its epoll set, so a new fd that reuses
//! the number is never confused with the old one.
//!
//! Listeners serve one client at a time: a second client is accepted, told `port busy` and
//! closed, so the attached client never loses its session to a stray connection. A client
//! that shut down its sending side (`shutdown(SHUT_WR)`, `socat -t`) keeps receiving guest
//! output until it closes; a new client then takes the port over.

mod error;
mod fd;
mod file;
mod listener;
mod pty;
pub mod reopen;
mod serial;
mod side;
pub mod spec;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use devshare_common::stats::Counter;
pub use error::EndpointError;
pub(crate) use fd::unread_bytes;
use serde::{Serialize, Serializer};
pub use serialport::{DataBits, FlowControl, Parity, StopBits};
pub(crate) use side::Side;
use side::GONE_ERRNOS;
pub use spec::{EndpointSpec, LogLimits, SerialSettings};
use vmm_sys_util::epoll::EventSet;

/// What happened on a ready fd (see [`Endpoint::on_readable`], [`Endpoint::on_hang_up`],
/// [`Endpoint::tick`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// A client was accepted and is now attached (possibly taking over from a client that
    /// had finished sending).
    Connected,
    /// A client arrived while another is attached; it was told "port busy" and closed.
    Refused,
    /// Host input is waiting on [`Endpoint::input_fd`].
    Input,
    /// The client or device went away and was dropped (a device is reopened later).
    Gone,
    /// A device or file was opened again (after a hang-up, a replug, a SIGHUP): output can
    /// flow again.
    Reopened,
    /// Nothing to do (spurious wake-up, or not one of our fds).
    Nothing,
}

/// What an fd of an endpoint is watched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchRole {
    /// A listening socket: readable means a client waits to be accepted.
    Accept,
    /// The fd the data goes through: input is read from it when the guest can take input,
    /// output waits on it for writability.
    Data {
        /// Ask for the peer's half-close (EPOLLRDHUP), which a socket reports even when its
        /// input is not read: the only way to learn that a TCP client closed while the guest
        /// takes no input.
        read_hang_up: bool,
    },
    /// Watched for nothing but a hang-up or an error (the PTY slave the backend holds).
    HangUp,
}

/// One fd to watch (see [`Endpoint::watch_set`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// The fd.
    pub fd: RawFd,
    /// What for.
    pub role: WatchRole,
}

/// Counters of one endpoint, part of its port's entry in the stats document.
#[derive(Debug, Default, Serialize)]
pub struct EndpointCounters {
    /// 1 while a client is connected, the device is open or the log file is open; else 0.
    #[serde(serialize_with = "gauge")]
    pub attached: AtomicU64,
    /// Times a serial device or log file was opened again (after a hang-up or replug, a
    /// SIGHUP, a failure), or a hung-up PTY slave was reopened.
    pub reopens: Counter,
    /// Times a log file was rotated because it reached its size limit.
    pub rotations: Counter,
    /// Times a log file reached its size limit and could not be rotated (a name in the way
    /// that is not our regular file, a rename that failed): it was emptied instead, and the
    /// bytes it held are counted in the port's `dropped_bytes`.
    pub rotation_failures: Counter,
    /// The port's `dropped_bytes`, shared: what the endpoint itself discards is counted there.
    #[serde(skip)]
    pub dropped_bytes: Arc<Counter>,
}

fn gauge<S: Serializer>(v: &AtomicU64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.load(Ordering::Relaxed))
}

/// A host-side endpoint bridged to one guest console port.
#[derive(Debug)]
pub struct Endpoint {
    side: Box<dyn Side>,
    counters: Arc<EndpointCounters>,
}

impl Endpoint {
    /// Opens the endpoint `spec` describes: creates the PTY, listens (a Unix socket with the
    /// spec's own mode and group), opens the file or device. All fds are non-blocking and
    /// close-on-exec.
    pub fn open(spec: &EndpointSpec) -> Result<Endpoint, EndpointError> {
        let counters = Arc::new(EndpointCounters::default());
        let side: Box<dyn Side> = match spec {
            EndpointSpec::Pty { link } => Box::new(pty::Pty::open(link.as_deref())?),
            EndpointSpec::Unix { path, socket } => {
                Box::new(listener::Listener::unix(path, socket)?)
            }
            EndpointSpec::Tcp(addr) => Box::new(listener::Listener::tcp(*addr)?),
            EndpointSpec::File {
                path,
                timestamps,
                limits,
            } => Box::new(file::LogFile::open(
                path,
                *timestamps,
                *limits,
                counters.clone(),
            )?),
            EndpointSpec::Serial(settings) => Box::new(serial::Serial::open(settings)?),
        };
        let endpoint = Endpoint { side, counters };
        endpoint.note_attached();
        log::info!("console endpoint ready: {}", endpoint.describe());
        Ok(endpoint)
    }

    /// The endpoint's counters (shared with the stats document).
    pub fn counters(&self) -> Arc<EndpointCounters> {
        self.counters.clone()
    }

    fn note_attached(&self) {
        self.counters
            .attached
            .store(self.side.is_attached() as u64, Ordering::Relaxed);
    }

    /// Every fd the event loop must watch right now. Changes after
    /// [`on_readable`](Self::on_readable), [`on_hang_up`](Self::on_hang_up),
    /// [`detach`](Self::detach), [`tick`](Self::tick) and calls that return
    /// [`EndpointError::Detached`].
    pub fn watch_fds(&self) -> Vec<RawFd> {
        self.side
            .watch_fds()
            .into_iter()
            .flatten()
            .map(|w| w.fd)
            .collect()
    }

    /// The fds to watch and what each is for, without an allocation, for the event loop.
    pub fn watch_set(&self) -> [Option<Watch>; 2] {
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
        let r = self.side.accept(fd);
        self.note_attached();
        Ok(r)
    }

    /// `fd` reported a hang-up or an error (EPOLLHUP/EPOLLERR, reported whether asked for or
    /// not): the client is dropped, a device closed (and reopened later), a PTY slave the
    /// backend holds opened again. Read what input is still wanted before calling this.
    pub fn on_hang_up(&mut self, fd: RawFd) -> Readiness {
        let r = self.side.hang_up(fd);
        if r == Readiness::Reopened {
            self.counters.reopens.inc();
        }
        self.note_attached();
        r
    }

    /// The attached peer's data fd with what it reports now, if that is a hang-up, an error
    /// or the peer's half-close: a client that left but whose going the event loop has not
    /// taken yet (its event waits later in the round, or in the next one). Asked before a
    /// new client is accepted, so a client that reattaches at once is not told `port busy`
    /// for one that is already gone. None for kinds without peers, or a peer still there.
    pub fn peer_left(&self) -> Option<(RawFd, EventSet)> {
        if !self.side.has_peers() {
            return None;
        }
        let fd = self.side.output_fd()?.as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for an fd the endpoint holds open; timeout 0 never blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        let r = pfd.revents;
        if n != 1 || r & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) == 0 {
            return None;
        }
        let mut ev = EventSet::empty();
        for (bit, set) in [
            (libc::POLLIN, EventSet::IN),
            (libc::POLLRDHUP, EventSet::READ_HANG_UP),
            (libc::POLLHUP, EventSet::HANG_UP),
            (libc::POLLERR, EventSet::ERROR),
        ] {
            if r & bit != 0 {
                ev |= set;
            }
        }
        Some((fd, ev))
    }

    /// `fd` reported the peer's half-close (EPOLLRDHUP): it sends nothing more after what is
    /// still buffered. The client stays attached for output.
    pub fn on_read_hang_up(&mut self, fd: RawFd) {
        self.side.read_hang_up(fd);
    }

    /// Where host-to-guest bytes are read from (non-blocking); None when nothing is attached,
    /// the client's input ended, or the kind has no input (file).
    pub fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        self.side.input_fd()
    }

    /// Reads host input into `buf`. `Ok(0)` means nothing available now (would block),
    /// nothing attached, or the input ended (a client that finished sending stays attached
    /// for output). A peer or device that went away is dropped and gives
    /// [`EndpointError::Detached`].
    pub fn read_input(&mut self, buf: &mut [u8]) -> Result<usize, EndpointError> {
        let Some(fd) = self.input_fd() else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let fd = fd.as_raw_fd();
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `fd` is open (borrowed
            // from self just above, and nothing closes it in between).
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(n as usize);
            }
            if n == 0 {
                return match self.end_of_input() {
                    Readiness::Gone => Err(EndpointError::Detached {
                        endpoint: self.describe(),
                    }),
                    _ => Ok(0),
                };
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(self.input_failed(&e)),
            }
        }
    }

    /// A read from [`input_fd`](Self::input_fd) gave end of file: a socket client finished
    /// sending (it stays attached for output, or is dropped if it is gone altogether), a
    /// terminal or device hung up. [`Readiness::Gone`] when the client or device was dropped.
    pub fn end_of_input(&mut self) -> Readiness {
        let r = self.side.end_of_input();
        if r == Readiness::Reopened {
            self.counters.reopens.inc();
        }
        self.note_attached();
        r
    }

    /// A read from [`input_fd`](Self::input_fd) failed with `e` (not EAGAIN/EINTR). Every
    /// such error ends the client or closes the device: an fd left in an error state would be
    /// reported ready forever.
    pub fn input_failed(&mut self, e: &io::Error) -> EndpointError {
        let endpoint = self.describe();
        self.lose(&format!("read failed: {e}"));
        EndpointError::Detached { endpoint }
    }

    /// Whether guest output can be delivered now: a client is attached, the device is open,
    /// or the kind always takes output (PTY, an open log file).
    pub fn is_attached(&self) -> bool {
        self.side.is_attached()
    }

    /// Writes guest output with one `writev` (sockets: `sendmsg`, never raising SIGPIPE) and
    /// returns how much the kernel took: possibly short, or 0 when the fd would block; the
    /// caller keeps the rest and waits for [`output_fd`](Self::output_fd) to be writable.
    /// A log file takes everything (with timestamps it formats its own lines; it rotates
    /// itself when it reaches its size limit).
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
            Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            // Sockets and terminals: any other error ends the peer (an fd left in an error
            // state would be reported writable forever).
            Some(Err(e)) if self.side.has_peers() => {
                let endpoint = self.describe();
                let why = if e.raw_os_error().is_some_and(|n| GONE_ERRNOS.contains(&n)) {
                    format!("write: {e}")
                } else {
                    format!("write failed: {e}")
                };
                self.lose(&why);
                Err(EndpointError::Detached { endpoint })
            }
            Some(Err(source)) => {
                self.note_attached();
                Err(EndpointError::Write {
                    endpoint: self.describe(),
                    source,
                })
            }
        }
    }

    /// The fd to wait on for writability after a short write; None when nothing is attached
    /// or writes never wait (file: regular files cannot be polled and take everything).
    pub fn output_fd(&self) -> Option<BorrowedFd<'_>> {
        self.side.output_fd()
    }

    /// Drops the client; listeners keep listening. A serial device is closed (and reopened
    /// later, see [`tick`](Self::tick)). PTY and file: nothing to drop.
    pub fn detach(&mut self) {
        self.lose("detached");
    }

    fn lose(&mut self, why: &str) {
        let r = self.side.lose(why);
        if r {
            self.note_attached();
        }
    }

    /// Whether [`tick`](Self::tick) has work to do: a device or log file waits to be
    /// reopened, or a listener paused after an accept error waits to resume.
    pub fn needs_tick(&self) -> bool {
        self.side.needs_tick()
    }

    /// Periodic work: reopens a serial device or log file whose retry is due (with growing
    /// delays, logged once per change, counted in `reopens`), resumes a paused listener.
    /// [`Readiness::Reopened`] when output can flow again.
    pub fn tick(&mut self, now: Instant) -> Readiness {
        let r = self.side.tick(now);
        if r == Readiness::Reopened {
            self.counters.reopens.inc();
        }
        self.note_attached();
        r
    }

    /// Serial endpoints whose device was closed after a hang-up: opens it again now with the
    /// same settings, whatever the retry schedule. `Ok(true)` when it is open again;
    /// `Ok(false)` when there was nothing to reopen (other kinds, or still open).
    pub fn reopen(&mut self) -> Result<bool, EndpointError> {
        let reopened = self.side.reopen()?;
        if reopened {
            self.counters.reopens.inc();
            log::info!("{}: reopened", self.describe());
        }
        self.note_attached();
        Ok(reopened)
    }

    /// SIGHUP: a log file is opened again by its name, so output goes to a fresh file after
    /// an external rotation (`mv PATH PATH.1`, then SIGHUP). Other kinds do nothing: no
    /// client is dropped, nothing is reset. `Ok(true)` when a file was reopened.
    pub fn reload(&mut self) -> Result<bool, EndpointError> {
        let r = self.side.reload();
        if matches!(r, Ok(true)) {
            self.counters.reopens.inc();
        }
        self.note_attached();
        r
    }

    /// The process shuts down: removes the PTY link this endpoint made (if it still points at
    /// its PTY) and makes a log file's data durable. Sockets are removed by the process
    /// (`devshare_common::listen::remove_created_sockets`).
    pub fn shutdown(&mut self) {
        self.side.shutdown();
    }

    /// Closes the fds that left the watch set; call after the event loop stopped watching
    /// them.
    pub fn close_retired(&mut self) {
        self.side.close_retired();
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
}
