//! Stream mode: the guest side is QEMU's `-chardev socket` carrying plain bytes (a 16550
//! behind `-serial chardev:ID`, QEMU's own virtconsole, ...), so any QEMU version and any
//! serial device can use the same endpoints as the vhost-user ports.
//!
//! The socket is made by `devshare_common::listen` (no takeover, a stale socket only, never
//! a file removed). A hang-up of QEMU's connection is taken in every state, also while its
//! output is held back. How output is paced for a slow client is in `pump.rs`.

use devshare_common::log_limited_or_debug;
use devshare_common::ratelimit::RateLimit;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devshare_common::listen::{listen, ListenError, SocketFile, SocketOptions};
use vmm_sys_util::epoll::EventSet;

use crate::config::SocketMode;
use crate::port::PeekSource;

mod pump;

/// Bytes taken out of QEMU's socket per `recv` once they are in the buffer.
const CONSUME_CHUNK: usize = 64 * 1024;
/// Most host input held for QEMU before the endpoint is no longer read.
const TO_GUEST_LIMIT: usize = 64 * 1024;
/// Delay between attempts to reach a listening QEMU.
const RECONNECT: Duration = Duration::from_millis(500);
/// How long the listener stops accepting after `accept` failed (out of fds, memory).
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// Why a stream socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The listening socket could not be made (the message names the path).
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// What a ready fd meant.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// QEMU connected (listen mode).
    Connected,
    /// QEMU went away.
    Disconnected,
    /// Guest output is waiting to be read.
    Output,
    /// QEMU hung up or failed: read everything it sent, whatever holds output back.
    Drain,
    /// QEMU can take more host input.
    Writable,
    /// Nothing to do.
    Nothing,
}

/// The QEMU side of a stream device.
pub struct StreamGuest {
    path: PathBuf,
    listener: Option<(UnixListener, SocketFile)>,
    conn: Option<UnixStream>,
    to_guest: Vec<u8>,
    /// Where output already in the buffer is read again to take it out of the socket.
    scratch: Vec<u8>,
    next_attempt: Instant,
    waiting_logged: bool,
    /// Set after an accept error: not accepting until then.
    listen_paused_until: Option<Instant>,
    /// Since when guest output is held back for a client that takes it slowly.
    pub(crate) held_since: Option<Instant>,
    /// The client took nothing for too long: output is read again, keeping the newest bytes,
    /// until the client takes some.
    pub(crate) gave_up: bool,
    /// Limits the lines about connections and stalls: whoever may reach the socket, or a
    /// client that reads by fits and starts, decides how often they happen.
    pub(crate) events: RateLimit,
}

impl StreamGuest {
    /// Listens on (through `devshare_common::listen`: no takeover, a stale socket only,
    /// `socket`'s mode and group), or prepares to connect to, `path`.
    pub fn new(
        path: &Path,
        mode: SocketMode,
        socket: &SocketOptions,
    ) -> Result<StreamGuest, StreamError> {
        let listener = match mode {
            SocketMode::Listen => {
                let (l, file) = listen(path, socket)?;
                l.set_nonblocking(true).map_err(|source| ListenError::Io {
                    path: path.to_path_buf(),
                    op: "make the socket non-blocking",
                    source,
                })?;
                Some((l, file))
            }
            SocketMode::Connect => None,
        };
        Ok(StreamGuest {
            path: path.to_owned(),
            listener,
            conn: None,
            to_guest: Vec::new(),
            scratch: vec![0; CONSUME_CHUNK],
            next_attempt: Instant::now(),
            waiting_logged: false,
            listen_paused_until: None,
            held_since: None,
            gave_up: false,
            events: RateLimit::standard(path.display().to_string()),
        })
    }

    /// The fds to watch and for what. With `held`, QEMU's output is not read (a slow client
    /// is catching up); the connection stays registered, so a hang-up is still seen.
    pub fn watch(&self, held: bool) -> [Option<(RawFd, EventSet)>; 2] {
        let listener = self
            .listener
            .as_ref()
            .filter(|_| self.listen_paused_until.is_none())
            .map(|(l, _)| (l.as_raw_fd(), EventSet::IN));
        let conn = self.conn.as_ref().map(|c| {
            let mut ev = EventSet::empty();
            if !held {
                ev |= EventSet::IN;
            }
            if !self.to_guest.is_empty() {
                ev |= EventSet::OUT;
            }
            (c.as_raw_fd(), ev)
        });
        [listener, conn]
    }

    /// Whether the timer is needed: output held back, or accepting paused.
    pub fn needs_tick(&self) -> bool {
        self.held_since.is_some() || self.listen_paused_until.is_some()
    }

    /// Whether this side dials QEMU (client mode) rather than listening.
    pub fn dials(&self) -> bool {
        self.listener.is_none()
    }

    /// Whether QEMU is connected.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether more host input may be queued for QEMU.
    pub fn can_take(&self) -> bool {
        self.to_guest.len() < TO_GUEST_LIMIT
    }

    /// Handles readiness of one of our fds.
    pub fn on_ready(&mut self, fd: RawFd, ev: EventSet) -> io::Result<StreamEvent> {
        if let Some((l, _)) = &self.listener {
            if l.as_raw_fd() == fd {
                let (c, _) = match l.accept() {
                    Ok(x) => x,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::Interrupted
                                | io::ErrorKind::ConnectionAborted
                        ) =>
                    {
                        return Ok(StreamEvent::Nothing)
                    }
                    Err(e) => {
                        // The connection stays pending: accepting again at once would spin.
                        self.listen_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "{}: cannot accept ({e}); not accepting for {}s",
                                self.path.display(),
                                ACCEPT_PAUSE.as_secs()
                            ),
                        ));
                    }
                };
                if self.conn.is_some() {
                    log_limited_or_debug!(
                        log::Level::Warn,
                        self.events,
                        "{}: a second QEMU connected; refused",
                        self.path.display()
                    );
                    return Ok(StreamEvent::Nothing);
                }
                c.set_nonblocking(true)?;
                self.conn = Some(c);
                return Ok(StreamEvent::Connected);
            }
        }
        if self.conn.as_ref().map(|c| c.as_raw_fd()) != Some(fd) {
            return Ok(StreamEvent::Nothing);
        }
        if ev.contains(EventSet::OUT) {
            self.write_pending();
            if self.conn.is_none() {
                return Ok(StreamEvent::Disconnected);
            }
        }
        if ev.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            return Ok(StreamEvent::Drain);
        }
        if ev.contains(EventSet::IN) {
            return Ok(StreamEvent::Output);
        }
        Ok(StreamEvent::Writable)
    }

    /// One `recvmsg` of guest output into `a` then `b` with `flags` (MSG_PEEK or not);
    /// 0 when nothing is there now, or QEMU went away (end of stream, an error: the
    /// connection is dropped).
    fn recv(&mut self, a: &mut [u8], b: &mut [u8], flags: libc::c_int) -> usize {
        let Some(c) = &self.conn else {
            return 0;
        };
        if a.len() + b.len() == 0 {
            return 0;
        }
        let mut iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: msghdr is plain data; all-zero is "no name, no control data".
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        loop {
            // SAFETY: the iovecs point at `a` and `b`, borrowed mutably for the call, with
            // their lengths; the socket is open (owned by `self.conn`).
            let n = unsafe { libc::recvmsg(c.as_raw_fd(), &mut msg, flags | libc::MSG_DONTWAIT) };
            if n > 0 {
                return n as usize;
            }
            if n == 0 {
                self.drop_conn("end of stream");
                return 0;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return 0,
                _ => {
                    self.drop_conn(&e.to_string());
                    return 0;
                }
            }
        }
    }

    /// Queues host input for QEMU and writes what the socket takes.
    pub fn send(&mut self, data: &[u8]) {
        self.to_guest.extend_from_slice(data);
        self.write_pending();
    }

    fn write_pending(&mut self) {
        let Some(c) = &mut self.conn else { return };
        while !self.to_guest.is_empty() {
            match c.write(&self.to_guest) {
                Ok(n) => {
                    self.to_guest.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.drop_conn(&e.to_string());
                    break;
                }
            }
        }
    }

    fn drop_conn(&mut self, why: &str) {
        if self.conn.take().is_some() {
            log_limited_or_debug!(
                log::Level::Info,
                self.events,
                "{}: QEMU went away ({why})",
                self.path.display()
            );
        }
        // Host input queued for a guest that is gone would arrive out of context later.
        self.to_guest.clear();
        self.held_since = None;
        self.gave_up = false;
        self.next_attempt = Instant::now() + RECONNECT;
    }

    /// Client mode: tries to reach QEMU when due. Returns true when newly connected. Listen
    /// mode: accepts again once a pause after an accept error is over.
    pub fn tick(&mut self) -> bool {
        if self
            .listen_paused_until
            .is_some_and(|t| Instant::now() >= t)
        {
            self.listen_paused_until = None;
        }
        if self.listener.is_some() || self.conn.is_some() || Instant::now() < self.next_attempt {
            return false;
        }
        match UnixStream::connect(&self.path) {
            Ok(c) => {
                if c.set_nonblocking(true).is_err() {
                    return false;
                }
                self.conn = Some(c);
                self.waiting_logged = false;
                true
            }
            Err(e) => {
                if !self.waiting_logged {
                    log::info!(
                        "{}: QEMU not reachable yet ({e}); retrying",
                        self.path.display()
                    );
                    self.waiting_logged = true;
                }
                self.next_attempt = Instant::now() + RECONNECT;
                false
            }
        }
    }
}

/// Guest output is peeked into the port's buffer, published there, and only then taken out
/// of QEMU's socket (see `port::output`): what a dead process peeked but did not take dies
/// with the connection, QEMU's like anything it sent while no backend was connected.
impl PeekSource for StreamGuest {
    fn waiting(&self) -> usize {
        self.conn
            .as_ref()
            .map_or(0, |c| crate::endpoint::unread_bytes(c.as_fd()))
    }

    fn peek(&mut self, a: &mut [u8], b: &mut [u8]) -> usize {
        self.recv(a, b, libc::MSG_PEEK)
    }

    fn consume(&mut self, mut n: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while n > 0 {
            let k = n.min(scratch.len());
            let got = self.recv(&mut scratch[..k], &mut [], 0);
            if got == 0 {
                // Bytes a peek showed are there until taken; only a connection that went
                // away meanwhile (and took them along) gets here.
                break;
            }
            n -= got;
        }
        self.scratch = scratch;
    }
}
