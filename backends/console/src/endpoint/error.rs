//! Why an endpoint spec was refused, an endpoint could not be opened, or its I/O failed.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use devshare_common::files::FileError;
use devshare_common::listen::ListenError;

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
    /// The Unix socket could not be made to listen (in use by another process, something
    /// that is not a socket in the way, ...); the message names the path.
    #[error("unix endpoint: {0}")]
    UnixListen(#[from] ListenError),
    /// Another process already listens on the TCP address.
    #[error("cannot listen on tcp {addr}: the address is in use by another process (choose another port, or stop the other process)")]
    TcpInUse {
        /// Listen address.
        addr: SocketAddr,
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
        /// [`Endpoint::describe`](super::Endpoint::describe) of the endpoint.
        endpoint: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The log file could not be opened.
    #[error("cannot open log file {path}: {source}")]
    FileOpen {
        /// Log file path.
        path: PathBuf,
        /// The underlying error (names the path again, with the reason).
        source: FileError,
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
        /// [`Endpoint::describe`](super::Endpoint::describe) of the endpoint.
        endpoint: String,
    },
    /// Output was written while nothing is attached (see [`Endpoint::is_attached`](super::Endpoint::is_attached)).
    #[error("{endpoint}: nothing attached to write to")]
    NotAttached {
        /// [`Endpoint::describe`](super::Endpoint::describe) of the endpoint.
        endpoint: String,
    },
    /// Writing guest output failed.
    #[error("write to {endpoint} failed: {source}")]
    Write {
        /// [`Endpoint::describe`](super::Endpoint::describe) of the endpoint.
        endpoint: String,
        /// The underlying error.
        source: io::Error,
    },
}
