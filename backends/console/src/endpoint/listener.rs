//! Listener endpoints (`unix:PATH`, `tcp:[ADDR:]PORT`): one client at a time; a second one is
//! told `port busy` and closed, so the attached client never loses its session to a stray
//! connection.

use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::fd::send_vectored;
use super::{EndpointError, Readiness, Side};

/// Line written to a second client before it is closed.
const BUSY_MESSAGE: &[u8] = b"port busy\n";

#[derive(Debug)]
enum ListenSocket {
    Unix(UnixListener, SocketFile),
    Tcp(TcpListener, SocketAddr),
}

/// The file of a bound Unix socket, removed on drop if it is still ours.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.dev_ino) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove socket {}: {e}", self.path.display());
            }
        }
    }
}

#[derive(Debug)]
pub(super) struct Listener {
    socket: ListenSocket,
    client: Option<Client>,
}

#[derive(Debug)]
struct Client {
    fd: OwnedFd,
    peer: String,
}

impl Listener {
    fn listen_fd(&self) -> RawFd {
        match &self.socket {
            ListenSocket::Unix(l, _) => l.as_raw_fd(),
            ListenSocket::Tcp(l, _) => l.as_raw_fd(),
        }
    }

    /// Accepts one pending client as a non-blocking fd; None when none is pending.
    fn accept(&self) -> io::Result<Option<(OwnedFd, String)>> {
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
}

impl Side for Listener {
    fn describe(&self) -> String {
        let what = match &self.socket {
            ListenSocket::Unix(_, file) => format!("unix {}", file.path.display()),
            ListenSocket::Tcp(_, addr) => format!("tcp {addr}"),
        };
        match &self.client {
            Some(c) => format!("{what} (client {})", c.peer),
            None => format!("{what} (no client)"),
        }
    }

    fn watch_fds(&self) -> [Option<RawFd>; 2] {
        [
            Some(self.listen_fd()),
            self.client.as_ref().map(|c| c.fd.as_raw_fd()),
        ]
    }

    fn on_readable(&mut self, fd: RawFd) -> Result<Readiness, EndpointError> {
        if fd != self.listen_fd() {
            return Ok(Readiness::Nothing);
        }
        let (client, peer) = match self.accept() {
            Ok(Some(accepted)) => accepted,
            Ok(None) => return Ok(Readiness::Nothing),
            Err(source) => {
                return Err(EndpointError::Accept {
                    endpoint: self.describe(),
                    source,
                })
            }
        };
        if self.client.is_some() {
            // Best effort: the refused client may already be gone, and it must never block us.
            let _ = send_vectored(client.as_fd(), &[IoSlice::new(BUSY_MESSAGE)]);
            drop(client);
            log::info!("{}: refused {peer}: port busy", self.describe());
            return Ok(Readiness::Refused);
        }
        self.client = Some(Client { fd: client, peer });
        log::info!("{}: client connected", self.describe());
        Ok(Readiness::Connected)
    }

    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
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

    fn detach(&mut self) -> bool {
        self.client.take().is_some()
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            ListenSocket::Tcp(_, addr) => Some(*addr),
            ListenSocket::Unix(..) => None,
        }
    }
}

impl Listener {
    pub(super) fn unix(path: &Path) -> Result<Listener, EndpointError> {
        let listen_err = |source| EndpointError::UnixListen {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(listen_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; not removing it",
                )));
            }
            // A socket nobody answers on is left over from an earlier run.
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(EndpointError::UnixInUse {
                        path: path.to_path_buf(),
                    })
                }
                Err(_) => std::fs::remove_file(path).map_err(listen_err)?,
            }
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(listen_err)?;
        Ok(Listener {
            socket: ListenSocket::Unix(
                listener,
                SocketFile {
                    path: path.to_path_buf(),
                    dev_ino: (meta.dev(), meta.ino()),
                },
            ),
            client: None,
        })
    }

    pub(super) fn tcp(addr: SocketAddr) -> Result<Listener, EndpointError> {
        let listen_err = |source| EndpointError::TcpListen { addr, source };
        let listener = TcpListener::bind(addr).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let bound = listener.local_addr().map_err(listen_err)?;
        Ok(Listener {
            socket: ListenSocket::Tcp(listener, bound),
            client: None,
        })
    }
}
