//! Stream mode: the guest side is QEMU's `-chardev socket` carrying plain bytes (a 16550
//! behind `-serial chardev:ID`, QEMU's own virtconsole, ...), so any QEMU version and any
//! serial device can use the same endpoints as the vhost-user ports.
//!
//! The socket is made by `devshare_common::listen` (no takeover, a stale socket only, never
//! a file removed). A hang-up of QEMU's connection is taken in every state, also while its
//! output is held back. How output is paced for a slow client is in `pump.rs`.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devshare_common::listen::{listen, ListenError, SocketFile, SocketOptions};
use vmm_sys_util::epoll::EventSet;

use crate::config::SocketMode;

mod pump;

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
    next_attempt: Instant,
    waiting_logged: bool,
    /// Set after an accept error: not accepting until then.
    listen_paused_until: Option<Instant>,
    /// Since when guest output is held back for a client that takes it slowly.
    pub(crate) held_since: Option<Instant>,
    /// The client took nothing for too long: output is read again, keeping the newest bytes,
    /// until the client takes some.
    pub(crate) gave_up: bool,
    /// Bounds the "second QEMU" warnings: any local client that may connect can repeat it.
    refused_warnings: devshare_common::ratelimit::RateLimit,
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
            next_attempt: Instant::now(),
            waiting_logged: false,
            listen_paused_until: None,
            refused_warnings: devshare_common::ratelimit::RateLimit::standard(format!(
                "{}: refused connections",
                path.display()
            )),
            held_since: None,
            gave_up: false,
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
                    devshare_common::warn_limited!(
                        self.refused_warnings,
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

    /// Reads guest output; Ok(0) when nothing more is there now (or QEMU went away).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(c) = &mut self.conn else {
            return Ok(0);
        };
        match c.read(buf) {
            Ok(0) if !buf.is_empty() => {
                self.drop_conn("end of stream");
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => {
                self.drop_conn(&e.to_string());
                Ok(0)
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
            log::info!("{}: QEMU went away ({why})", self.path.display());
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
