//! Listener endpoints (`unix:PATH`, `tcp:[ADDR:]PORT`): one client at a time; a second one is
//! told `port busy` and closed, so the attached client never loses its session to a stray
//! connection.
//!
//! A client's input can end before the client does: `printf 'cmd\n' | socat -t3 - ...`
//! shuts down its sending side and waits for the answer. Such a client stays attached and
//! gets the guest's output until it closes. TCP cannot tell "closed" from "finished sending"
//! until a write fails, so a client whose input ended gives way to the next one that
//! connects; a client still sending keeps the port.
//!
//! Unix sockets are made by `devshare_common::listen::listen` (no takeover of a live
//! socket, a stale one replaced, never a file removed, mode and group as asked).

use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use devshare_common::listen::{listen, SocketFile, SocketOptions};
use devshare_common::log_limited_or_debug;
use devshare_common::ratelimit::RateLimit;
use log::Level;

use super::fd::send_vectored;
use super::fd::unread_bytes;
use super::{EndpointError, Readiness, Side, Watch, WatchRole};

/// Line written to a second client before it is closed.
const BUSY_MESSAGE: &[u8] = b"port busy\n";
/// How long a listener stops accepting after `accept` failed (out of fds, memory): the
/// pending connection stays readable, so accepting again at once would spin.
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum ListenSocket {
    Unix(UnixListener, SocketFile),
    Tcp(TcpListener, SocketAddr),
}

/// How far a client's input got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientInput {
    /// It may still send.
    Open,
    /// It shut down its sending side (EPOLLRDHUP); what it sent before may still wait.
    Closing,
    /// Everything it sent was read (end of file).
    Ended,
}

#[derive(Debug)]
pub(super) struct Listener {
    socket: ListenSocket,
    client: Option<Client>,
    /// Set after an accept error: not accepting until then.
    paused_until: Option<Instant>,
    /// Client fds dropped but maybe still in the event loop's epoll set.
    retired: Vec<OwnedFd>,
    /// Limits the lines about clients (connected, refused, detached): whoever may connect
    /// decides how often they happen, and a loop of connect and close must not fill the log.
    clients: RateLimit,
}

#[derive(Debug)]
struct Client {
    fd: OwnedFd,
    peer: String,
    input: ClientInput,
}

impl Listener {
    fn listen_fd(&self) -> RawFd {
        match &self.socket {
            ListenSocket::Unix(l, _) => l.as_raw_fd(),
            ListenSocket::Tcp(l, _) => l.as_raw_fd(),
        }
    }

    fn what(&self) -> String {
        match &self.socket {
            ListenSocket::Unix(_, file) => format!("unix {}", file.path().display()),
            ListenSocket::Tcp(_, addr) => format!("tcp {addr}"),
        }
    }

    /// Accepts one pending client as a non-blocking fd; None when none is pending.
    fn accept_one(&self) -> io::Result<Option<(OwnedFd, String)>> {
        let accepted = match &self.socket {
            ListenSocket::Unix(l, _) => l.accept().and_then(|(stream, _)| {
                stream.set_nonblocking(true)?;
                Ok((OwnedFd::from(stream), "unix peer".to_string()))
            }),
            ListenSocket::Tcp(l, _) => l.accept().and_then(|(stream, peer)| {
                stream.set_nonblocking(true)?;
                // Console traffic is interactive: keystrokes must not wait for Nagle.
                stream.set_nodelay(true)?;
                Ok((OwnedFd::from(stream), peer.to_string()))
            }),
        };
        match accepted {
            Ok(accepted) => Ok(Some(accepted)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Drops the client (its fd waits in `retired` until the event loop let go of it).
    fn drop_client(&mut self, why: &str) -> bool {
        let what = self.what();
        let Some(c) = self.client.take() else {
            return false;
        };
        let unread = unread_bytes(c.fd.as_fd());
        if unread > 0 {
            log_limited_or_debug!(
                Level::Info,
                self.clients,
                "{what}: client {} detached ({why}); {unread} bytes it sent were never taken by the guest",
                c.peer
            );
        } else {
            log_limited_or_debug!(
                Level::Info,
                self.clients,
                "{what}: client {} detached ({why})",
                c.peer
            );
        }
        self.retired.push(c.fd);
        true
    }
}

impl Side for Listener {
    fn describe(&self) -> String {
        let what = self.what();
        match &self.client {
            Some(c) if c.input == ClientInput::Open => format!("{what} (client {})", c.peer),
            Some(c) => format!("{what} (client {}, input ended)", c.peer),
            None => format!("{what} (no client)"),
        }
    }

    fn watch_fds(&self) -> [Option<Watch>; 2] {
        let listen = self.paused_until.is_none().then(|| Watch {
            fd: self.listen_fd(),
            role: WatchRole::Accept,
        });
        let client = self.client.as_ref().map(|c| Watch {
            fd: c.fd.as_raw_fd(),
            role: WatchRole::Data {
                read_hang_up: c.input == ClientInput::Open,
            },
        });
        [listen, client]
    }

    fn accept(&mut self, fd: RawFd) -> Readiness {
        if fd != self.listen_fd() || self.paused_until.is_some() {
            return Readiness::Nothing;
        }
        let (client, peer) = match self.accept_one() {
            Ok(Some(accepted)) => accepted,
            Ok(None) => return Readiness::Nothing,
            Err(source) => {
                let e = EndpointError::Accept {
                    endpoint: self.describe(),
                    source,
                };
                log::warn!("{e}; not accepting for {}s", ACCEPT_PAUSE.as_secs_f32());
                self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                return Readiness::Nothing;
            }
        };
        if let Some(current) = &self.client {
            if current.input == ClientInput::Open {
                // Best effort: the refused client may already be gone, and it must never
                // block us.
                let _ = send_vectored(client.as_fd(), &[IoSlice::new(BUSY_MESSAGE)]);
                drop(client);
                log_limited_or_debug!(
                    Level::Info,
                    self.clients,
                    "{}: refused {peer}: port busy",
                    self.describe()
                );
                return Readiness::Refused;
            }
            // The current client finished sending; it may be gone without our knowing (TCP).
            self.drop_client(&format!("its input had ended; {peer} takes the port over"));
        }
        self.client = Some(Client {
            fd: client,
            peer,
            input: ClientInput::Open,
        });
        log_limited_or_debug!(
            Level::Info,
            self.clients,
            "{}: client connected",
            self.describe()
        );
        Readiness::Connected
    }

    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        self.client
            .as_ref()
            .filter(|c| c.input != ClientInput::Ended)
            .map(|c| c.fd.as_fd())
    }

    fn output_fd(&self) -> Option<BorrowedFd<'_>> {
        self.client.as_ref().map(|c| c.fd.as_fd())
    }

    fn is_attached(&self) -> bool {
        self.client.is_some()
    }

    fn write(&mut self, bufs: &[IoSlice<'_>], _total: usize) -> Option<io::Result<usize>> {
        let client = self.client.as_ref()?;
        Some(send_vectored(client.fd.as_fd(), bufs))
    }

    fn has_peers(&self) -> bool {
        true
    }

    fn lose(&mut self, why: &str) -> bool {
        self.drop_client(why)
    }

    fn end_of_input(&mut self) -> Readiness {
        let Some(c) = &mut self.client else {
            return Readiness::Nothing;
        };
        // A peer that closed altogether reports a hang-up (Unix) or an error (TCP after a
        // reset) besides the end of file: then it is gone, not just done sending.
        let mut pfd = libc::pollfd {
            fd: c.fd.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd; timeout 0 never blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n == 1 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            self.drop_client("closed");
            return Readiness::Gone;
        }
        let was_open = c.input == ClientInput::Open;
        c.input = ClientInput::Ended;
        if was_open {
            log_limited_or_debug!(
                Level::Info,
                self.clients,
                "{}: client shut down its sending side; it gets output until it closes",
                self.what()
            );
        }
        Readiness::Nothing
    }

    fn hang_up(&mut self, fd: RawFd) -> Readiness {
        if fd == self.listen_fd() {
            // Not seen on a listening socket; if it ever is, do not spin on it.
            log::warn!(
                "{}: the listening socket reports an error; not accepting for {}s",
                self.what(),
                ACCEPT_PAUSE.as_secs_f32()
            );
            self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
            return Readiness::Nothing;
        }
        if self.client.as_ref().map(|c| c.fd.as_raw_fd()) == Some(fd) && self.lose("hung up") {
            return Readiness::Gone;
        }
        Readiness::Nothing
    }

    fn read_hang_up(&mut self, fd: RawFd) {
        let what = self.what();
        if let Some(c) = &mut self.client {
            if c.fd.as_raw_fd() == fd && c.input == ClientInput::Open {
                c.input = ClientInput::Closing;
                log_limited_or_debug!(
                    Level::Info,
                    self.clients,
                    "{what}: client {} shut down its sending side; it gets output until it closes",
                    c.peer
                );
            }
        }
    }

    fn needs_tick(&self) -> bool {
        self.paused_until.is_some()
    }

    fn tick(&mut self, now: Instant) -> Readiness {
        if self.paused_until.is_some_and(|t| now >= t) {
            self.paused_until = None;
            log::info!("{}: accepting again", self.what());
        }
        Readiness::Nothing
    }

    fn close_retired(&mut self) {
        self.retired.clear();
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            ListenSocket::Tcp(_, addr) => Some(*addr),
            ListenSocket::Unix(..) => None,
        }
    }
}

impl Listener {
    pub(super) fn unix(path: &Path, opts: &SocketOptions) -> Result<Listener, EndpointError> {
        let (listener, file) = listen(path, opts)?;
        listener.set_nonblocking(true).map_err(|source| {
            devshare_common::listen::ListenError::Io {
                path: path.to_path_buf(),
                op: "make the socket non-blocking",
                source,
            }
        })?;
        let clients = RateLimit::standard(format!("unix {}", path.display()));
        Ok(Listener {
            socket: ListenSocket::Unix(listener, file),
            client: None,
            paused_until: None,
            retired: Vec::new(),
            clients,
        })
    }

    pub(super) fn tcp(addr: SocketAddr) -> Result<Listener, EndpointError> {
        let listen_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::AddrInUse {
                EndpointError::TcpInUse { addr }
            } else {
                EndpointError::TcpListen { addr, source }
            }
        };
        let listener = TcpListener::bind(addr).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let bound = listener.local_addr().map_err(listen_err)?;
        if !bound.ip().is_loopback() {
            log::warn!(
                "tcp {bound}: listening beyond this host; a tcp: endpoint has no access control, \
                 so anyone who can reach {bound} gets this port (a guest console: its login); \
                 bind 127.0.0.1, put a firewall in front, or use unix: with socket permissions"
            );
        }
        Ok(Listener {
            socket: ListenSocket::Tcp(listener, bound),
            client: None,
            paused_until: None,
            retired: Vec::new(),
            clients: RateLimit::standard(format!("tcp {bound}")),
        })
    }
}
