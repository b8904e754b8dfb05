//! Host-side endpoints of console ports: PTYs, Unix and TCP listeners, log files and serial
//! devices.
//!
//! An endpoint knows nothing about virtqueues. It owns non-blocking file descriptors and a
//! small API the device's event loop drives: [`Endpoint::watch_fds`] says what to poll for
//! readability, [`Endpoint::on_readable`] accepts clients or reports input,
//! [`Endpoint::input_fd`] / [`Endpoint::read_input`] carry host-to-guest bytes and
//! [`Endpoint::write_output`] carries guest-to-host bytes.
//!
//! Spec strings (command line and TOML):
//!
//! | spec | endpoint |
//! |---|---|
//! | `pty`, `pty:LINK` | new PTY pair, slave path logged; LINK becomes a symlink to the slave |
//! | `unix:PATH` | Unix stream listener, one client at a time |
//! | `tcp:PORT`, `tcp:ADDR:PORT` | TCP listener (default address 127.0.0.1), one client at a time |
//! | `file:PATH`, `file:PATH,timestamps` | append-only log of guest output |
//! | `serial:DEV[,baud=N][,data=5-8][,parity=none/odd/even][,stop=1/2][,flow=none/hw/sw]` | serial device, default 115200 8N1, no flow control |
//!
//! Listeners serve one client at a time: a second client is accepted, told `port busy` and
//! closed, so the attached client never loses its session to a stray connection.

use std::ffi::{CStr, OsStr};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

pub use serialport::{DataBits, FlowControl, Parity, StopBits};

/// Upper bound of iovecs handed to one `writev`/`sendmsg` (Linux `IOV_MAX`); the rest is a
/// short write the engine retries.
const IOV_MAX: usize = 1024;

/// Line written to a second client before it is closed.
const BUSY_MESSAGE: &[u8] = b"port busy\n";

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

/// Line settings of a serial endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSettings {
    /// Device path, e.g. `/dev/ttyUSB0` (a PTY slave works too).
    pub device: PathBuf,
    /// Baud rate in bits per second.
    pub baud: u32,
    /// Bits per character.
    pub data_bits: DataBits,
    /// Parity bit.
    pub parity: Parity,
    /// Stop bits.
    pub stop_bits: StopBits,
    /// Flow control.
    pub flow: FlowControl,
}

impl SerialSettings {
    /// Settings for `device` with the defaults: 115200 8N1, no flow control.
    pub fn new(device: impl Into<PathBuf>) -> Self {
        SerialSettings {
            device: device.into(),
            baud: 115_200,
            data_bits: DataBits::Eight,
            parity: Parity::None,
            stop_bits: StopBits::One,
            flow: FlowControl::None,
        }
    }

    /// The line part in the usual short form, e.g. `115200 8N1 flow=none`.
    pub fn line(&self) -> String {
        let parity = match self.parity {
            Parity::None => 'N',
            Parity::Odd => 'O',
            Parity::Even => 'E',
        };
        format!(
            "{} {}{}{} flow={}",
            self.baud,
            data_bits_number(self.data_bits),
            parity,
            stop_bits_number(self.stop_bits),
            flow_name(self.flow)
        )
    }
}

fn data_bits_number(bits: DataBits) -> u8 {
    match bits {
        DataBits::Five => 5,
        DataBits::Six => 6,
        DataBits::Seven => 7,
        DataBits::Eight => 8,
    }
}

fn stop_bits_number(bits: StopBits) -> u8 {
    match bits {
        StopBits::One => 1,
        StopBits::Two => 2,
    }
}

fn parity_name(parity: Parity) -> &'static str {
    match parity {
        Parity::None => "none",
        Parity::Odd => "odd",
        Parity::Even => "even",
    }
}

fn flow_name(flow: FlowControl) -> &'static str {
    match flow {
        FlowControl::None => "none",
        FlowControl::Hardware => "hw",
        FlowControl::Software => "sw",
    }
}

/// What a console port is bridged to on the host, parsed from a spec string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    /// A new PTY pair; `link`, if given, becomes a symlink to the slave.
    Pty {
        /// Symlink to create pointing at the slave.
        link: Option<PathBuf>,
    },
    /// A Unix stream socket listener at this path.
    Unix(PathBuf),
    /// A TCP listener at this address.
    Tcp(SocketAddr),
    /// An append-only log file of guest output.
    File {
        /// Log file path.
        path: PathBuf,
        /// Start each line with an RFC 3339 UTC timestamp.
        timestamps: bool,
    },
    /// A serial device.
    Serial(SerialSettings),
}

impl FromStr for EndpointSpec {
    type Err = EndpointError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| EndpointError::InvalidSpec {
            spec: spec.to_string(),
            reason,
        };
        let (kind, rest) = match spec.split_once(':') {
            Some((kind, rest)) => (kind, Some(rest)),
            None => (spec, None),
        };
        let required = |what: &str| match rest {
            Some(rest) if !rest.is_empty() => Ok(rest),
            _ => Err(invalid(format!("missing {what} after \"{kind}:\""))),
        };
        match kind {
            "pty" => match rest {
                None => Ok(EndpointSpec::Pty { link: None }),
                Some("") => Err(invalid("missing link path after \"pty:\"".into())),
                Some(link) => Ok(EndpointSpec::Pty {
                    link: Some(PathBuf::from(link)),
                }),
            },
            "unix" => Ok(EndpointSpec::Unix(PathBuf::from(required("socket path")?))),
            "tcp" => {
                let rest = required("port or address:port")?;
                if let Ok(port) = rest.parse::<u16>() {
                    return Ok(EndpointSpec::Tcp(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                        port,
                    )));
                }
                rest.parse::<SocketAddr>()
                    .map(EndpointSpec::Tcp)
                    .map_err(|_| {
                        invalid(format!(
                            "{rest:?} is neither a port (0-65535) nor ADDR:PORT \
                             (IPv6 in brackets: [::1]:PORT)"
                        ))
                    })
            }
            "file" => {
                let rest = required("log file path")?;
                let mut parts = rest.split(',');
                let path = parts.next().unwrap_or_default();
                if path.is_empty() {
                    return Err(invalid("missing log file path after \"file:\"".into()));
                }
                let mut timestamps = false;
                for option in parts {
                    match option {
                        "timestamps" => timestamps = true,
                        other => {
                            return Err(invalid(format!(
                                "unknown file option {other:?} (known: timestamps)"
                            )))
                        }
                    }
                }
                Ok(EndpointSpec::File {
                    path: PathBuf::from(path),
                    timestamps,
                })
            }
            "serial" => {
                let rest = required("device path")?;
                parse_serial(rest)
                    .map(EndpointSpec::Serial)
                    .map_err(invalid)
            }
            other => Err(invalid(format!(
                "unknown endpoint kind {other:?} (known: pty, unix, tcp, file, serial)"
            ))),
        }
    }
}

/// Parses `DEVICE[,key=value...]`; errors are the reason only.
fn parse_serial(rest: &str) -> Result<SerialSettings, String> {
    let mut parts = rest.split(',');
    let device = parts.next().unwrap_or_default();
    if device.is_empty() {
        return Err("missing device path after \"serial:\"".into());
    }
    let mut settings = SerialSettings::new(device);
    let mut seen: Vec<&str> = Vec::new();
    for option in parts {
        let Some((key, value)) = option.split_once('=') else {
            return Err(format!(
                "serial option {option:?} is not key=value (keys: baud, data, parity, stop, flow)"
            ));
        };
        if seen.contains(&key) {
            return Err(format!("serial option {key:?} given twice"));
        }
        seen.push(key);
        match key {
            "baud" => {
                settings.baud = match value.parse::<u32>() {
                    Ok(baud) if baud > 0 => baud,
                    _ => return Err(format!("baud={value:?} is not a positive number")),
                }
            }
            "data" => {
                settings.data_bits = match value {
                    "5" => DataBits::Five,
                    "6" => DataBits::Six,
                    "7" => DataBits::Seven,
                    "8" => DataBits::Eight,
                    _ => return Err(format!("data={value:?} must be 5, 6, 7 or 8")),
                }
            }
            "parity" => {
                settings.parity = match value {
                    "none" => Parity::None,
                    "odd" => Parity::Odd,
                    "even" => Parity::Even,
                    _ => return Err(format!("parity={value:?} must be none, odd or even")),
                }
            }
            "stop" => {
                settings.stop_bits = match value {
                    "1" => StopBits::One,
                    "2" => StopBits::Two,
                    _ => return Err(format!("stop={value:?} must be 1 or 2")),
                }
            }
            "flow" => {
                settings.flow = match value {
                    "none" => FlowControl::None,
                    "hw" => FlowControl::Hardware,
                    "sw" => FlowControl::Software,
                    _ => return Err(format!("flow={value:?} must be none, hw or sw")),
                }
            }
            other => {
                return Err(format!(
                    "unknown serial option {other:?} (known: baud, data, parity, stop, flow)"
                ))
            }
        }
    }
    Ok(settings)
}

impl fmt::Display for EndpointSpec {
    /// The canonical spec string; parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointSpec::Pty { link: None } => write!(f, "pty"),
            EndpointSpec::Pty { link: Some(link) } => write!(f, "pty:{}", link.display()),
            EndpointSpec::Unix(path) => write!(f, "unix:{}", path.display()),
            EndpointSpec::Tcp(addr) => write!(f, "tcp:{addr}"),
            EndpointSpec::File { path, timestamps } => {
                write!(f, "file:{}", path.display())?;
                if *timestamps {
                    write!(f, ",timestamps")?;
                }
                Ok(())
            }
            EndpointSpec::Serial(s) => write!(
                f,
                "serial:{},baud={},data={},parity={},stop={},flow={}",
                s.device.display(),
                s.baud,
                data_bits_number(s.data_bits),
                parity_name(s.parity),
                stop_bits_number(s.stop_bits),
                flow_name(s.flow)
            ),
        }
    }
}

impl<'de> serde::Deserialize<'de> for EndpointSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spec = String::deserialize(deserializer)?;
        spec.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for EndpointSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
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

/// A host-side endpoint bridged to one guest console port.
#[derive(Debug)]
pub struct Endpoint {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Pty(Pty),
    Listener(Listener),
    File(LogFile),
    Serial(Serial),
}

#[derive(Debug)]
struct Pty {
    master: OwnedFd,
    /// Held open so the master never reads EIO while no program has the slave open.
    _slave: OwnedFd,
    slave_path: PathBuf,
    link: Option<PtyLink>,
}

/// A symlink to a PTY slave, removed on drop if it still points there.
#[derive(Debug)]
struct PtyLink {
    link: PathBuf,
    target: PathBuf,
}

impl Drop for PtyLink {
    fn drop(&mut self) {
        if std::fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            if let Err(e) = std::fs::remove_file(&self.link) {
                log::warn!("cannot remove PTY link {}: {e}", self.link.display());
            }
        }
    }
}

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
struct Listener {
    socket: ListenSocket,
    client: Option<Client>,
}

#[derive(Debug)]
struct Client {
    fd: OwnedFd,
    peer: String,
}

#[derive(Debug)]
struct LogFile {
    file: File,
    path: PathBuf,
    timestamps: bool,
    /// Whether the next byte starts a line (and so gets a timestamp); kept across writes.
    at_line_start: bool,
}

#[derive(Debug)]
struct Serial {
    /// None once the device went away (hang-up, unplug).
    fd: Option<OwnedFd>,
    settings: SerialSettings,
}

impl Drop for Serial {
    fn drop(&mut self) {
        if let Some(fd) = &self.fd {
            // Undo TIOCEXCL: a tty that outlives us (a PTY standing in) would otherwise refuse
            // the next opener.
            // SAFETY: TIOCNXCL takes no argument; the fd is open for the call.
            unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCNXCL) };
        }
    }
}

impl Endpoint {
    /// Opens the endpoint `spec` describes: creates the PTY, binds the listener, opens the
    /// file or device. All fds are non-blocking and close-on-exec.
    pub fn open(spec: &EndpointSpec) -> Result<Endpoint, EndpointError> {
        let kind = match spec {
            EndpointSpec::Pty { link } => Kind::Pty(open_pty(link.as_deref())?),
            EndpointSpec::Unix(path) => Kind::Listener(listen_unix(path)?),
            EndpointSpec::Tcp(addr) => Kind::Listener(listen_tcp(*addr)?),
            EndpointSpec::File { path, timestamps } => Kind::File(open_log(path, *timestamps)?),
            EndpointSpec::Serial(settings) => Kind::Serial(open_serial(settings)?),
        };
        let endpoint = Endpoint { kind };
        log::info!("console endpoint ready: {}", endpoint.describe());
        Ok(endpoint)
    }

    /// Every fd the event loop must watch for readability right now (listener and/or the
    /// client / device fd). Changes after [`on_readable`](Self::on_readable),
    /// [`detach`](Self::detach) and calls that return [`EndpointError::Detached`].
    pub fn watch_fds(&self) -> Vec<RawFd> {
        match &self.kind {
            Kind::Pty(pty) => vec![pty.master.as_raw_fd()],
            Kind::Listener(l) => {
                let mut fds = vec![l.listen_fd()];
                fds.extend(l.client.as_ref().map(|c| c.fd.as_raw_fd()));
                fds
            }
            // Regular files cannot be polled and a log has no input.
            Kind::File(_) => Vec::new(),
            Kind::Serial(s) => s.fd.iter().map(|fd| fd.as_raw_fd()).collect(),
        }
    }

    /// `fd` (one of [`watch_fds`](Self::watch_fds)) is readable. On a listener this accepts:
    /// [`Readiness::Connected`], or [`Readiness::Refused`] while a client is attached. On a
    /// data fd it returns [`Readiness::Input`]: read from [`input_fd`](Self::input_fd) (or
    /// with [`read_input`](Self::read_input)).
    pub fn on_readable(&mut self, fd: RawFd) -> Result<Readiness, EndpointError> {
        let input = self.input_fd().map(|f| f.as_raw_fd());
        if input == Some(fd) {
            return Ok(Readiness::Input);
        }
        let Kind::Listener(listener) = &mut self.kind else {
            return Ok(Readiness::Nothing);
        };
        if fd != listener.listen_fd() {
            return Ok(Readiness::Nothing);
        }
        let (client, peer) = match listener.accept() {
            Ok(Some(accepted)) => accepted,
            Ok(None) => return Ok(Readiness::Nothing),
            Err(source) => {
                return Err(EndpointError::Accept {
                    endpoint: self.describe(),
                    source,
                })
            }
        };
        if listener.client.is_some() {
            // Best effort: the refused client may already be gone, and it must never block us.
            let _ = send_vectored(client.as_fd(), &[IoSlice::new(BUSY_MESSAGE)]);
            drop(client);
            log::info!("{}: refused {peer}: port busy", self.describe());
            return Ok(Readiness::Refused);
        }
        listener.client = Some(Client { fd: client, peer });
        log::info!("{}: client connected", self.describe());
        Ok(Readiness::Connected)
    }

    /// Where host-to-guest bytes are read from (non-blocking); None when nothing is attached
    /// or the kind has no input (file).
    pub fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            Kind::Pty(pty) => Some(pty.master.as_fd()),
            Kind::Listener(l) => l.client.as_ref().map(|c| c.fd.as_fd()),
            Kind::File(_) => None,
            Kind::Serial(s) => s.fd.as_ref().map(|fd| fd.as_fd()),
        }
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
        match &self.kind {
            Kind::Pty(_) | Kind::File(_) => true,
            Kind::Listener(l) => l.client.is_some(),
            Kind::Serial(s) => s.fd.is_some(),
        }
    }

    /// Writes guest output with one `writev` (sockets: `sendmsg`, never raising SIGPIPE) and
    /// returns how much the kernel took: possibly short, or 0 when the fd would block; the
    /// engine keeps the rest and waits for [`output_fd`](Self::output_fd) to be writable.
    /// A log file takes everything (with timestamps it formats its own lines).
    /// A peer that went away gives [`EndpointError::Detached`], after the endpoint dropped it;
    /// writing with nothing attached gives [`EndpointError::NotAttached`].
    pub fn write_output(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, EndpointError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let result = match &mut self.kind {
            Kind::Pty(pty) => write_vectored(pty.master.as_fd(), bufs),
            Kind::Listener(l) => match &l.client {
                Some(client) => send_vectored(client.fd.as_fd(), bufs),
                None => {
                    return Err(EndpointError::NotAttached {
                        endpoint: self.describe(),
                    })
                }
            },
            Kind::Serial(s) => match &s.fd {
                Some(fd) => write_vectored(fd.as_fd(), bufs),
                None => {
                    return Err(EndpointError::NotAttached {
                        endpoint: self.describe(),
                    })
                }
            },
            Kind::File(log) => log.append(bufs, total),
        };
        match result {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if self.is_client_gone(&e) => Err(self.lose_client()),
            Err(source) => Err(EndpointError::Write {
                endpoint: self.describe(),
                source,
            }),
        }
    }

    /// The fd to wait on for writability after a short write; None when nothing is attached
    /// or writes never wait (file: regular files cannot be polled and take everything).
    pub fn output_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            Kind::File(_) => None,
            _ => self.input_fd(),
        }
    }

    /// Drops the client after the engine saw EOF / EPIPE / ECONNRESET on it; listeners keep
    /// listening. A serial device is closed (it hung up). PTY and file: nothing to drop.
    pub fn detach(&mut self) {
        let before = self.describe();
        let dropped = match &mut self.kind {
            Kind::Listener(l) => l.client.take().is_some(),
            Kind::Serial(s) => s.fd.take().is_some(),
            Kind::Pty(_) | Kind::File(_) => false,
        };
        if dropped {
            log::info!("{before}: detached");
        }
    }

    /// Serial endpoints whose device was closed after a hang-up: tries to open it again with
    /// the same settings (a USB adapter plugged back in). `Ok(true)` when it is open again;
    /// `Ok(false)` when there was nothing to reopen (other kinds, or still open).
    pub fn reopen(&mut self) -> Result<bool, EndpointError> {
        let Kind::Serial(serial) = &mut self.kind else {
            return Ok(false);
        };
        if serial.fd.is_some() {
            return Ok(false);
        }
        let mut reopened = open_serial(&serial.settings)?;
        serial.fd = reopened.fd.take();
        log::info!("{}: reopened", self.describe());
        Ok(true)
    }

    /// Terminal size `(cols, rows)` of a PTY, as last set on it (TIOCSWINSZ by the program
    /// on the slave); None for other kinds and while no size was ever set (0x0). PTY masters
    /// get no notification of size changes, so the engine re-reads this, e.g. on input.
    pub fn window_size(&self) -> Option<(u16, u16)> {
        let Kind::Pty(pty) = &self.kind else {
            return None;
        };
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, which is valid.
        let rc = unsafe { libc::ioctl(pty.master.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        if rc != 0 || (ws.ws_col == 0 && ws.ws_row == 0) {
            return None;
        }
        Some((ws.ws_col, ws.ws_row))
    }

    /// One line for logs and `--help`, e.g. `pty /dev/pts/4 (link /tmp/vm1-console)`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Pty(pty) => match &pty.link {
                Some(link) => format!(
                    "pty {} (link {})",
                    pty.slave_path.display(),
                    link.link.display()
                ),
                None => format!("pty {}", pty.slave_path.display()),
            },
            Kind::Listener(l) => {
                let what = match &l.socket {
                    ListenSocket::Unix(_, file) => format!("unix {}", file.path.display()),
                    ListenSocket::Tcp(_, addr) => format!("tcp {addr}"),
                };
                match &l.client {
                    Some(c) => format!("{what} (client {})", c.peer),
                    None => format!("{what} (no client)"),
                }
            }
            Kind::File(log) => format!(
                "file {}{}",
                log.path.display(),
                if log.timestamps { " (timestamps)" } else { "" }
            ),
            Kind::Serial(s) => format!(
                "serial {} {}{}",
                s.settings.device.display(),
                s.settings.line(),
                if s.fd.is_none() { " (closed)" } else { "" }
            ),
        }
    }

    /// The PTY slave path (what a terminal program opens); None for other kinds.
    pub fn pty_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Pty(pty) => Some(&pty.slave_path),
            _ => None,
        }
    }

    /// The bound address of a TCP endpoint (with the real port when `tcp:0` was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            Kind::Listener(Listener {
                socket: ListenSocket::Tcp(_, addr),
                ..
            }) => Some(*addr),
            _ => None,
        }
    }

    /// Serial endpoints: the line settings read back from the device (termios), which is what
    /// the driver really applied. None for other kinds or a closed device.
    pub fn serial_line(&self) -> Option<Result<SerialSettings, EndpointError>> {
        let Kind::Serial(s) = &self.kind else {
            return None;
        };
        let fd = s.fd.as_ref()?;
        Some(
            read_line_settings(fd.as_fd(), &s.settings.device).map_err(|source| {
                EndpointError::SerialConfig {
                    device: s.settings.device.clone(),
                    source,
                }
            }),
        )
    }

    fn is_client_gone(&self, e: &io::Error) -> bool {
        // A log file's EIO is a disk problem, not a peer leaving.
        matches!(self.kind, Kind::Listener(_) | Kind::Serial(_))
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

impl LogFile {
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

/// Formats `t` as RFC 3339 UTC with milliseconds: `2026-11-21T21:30:00.123Z`.
/// Times before 1970 are shown as the epoch.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let sod = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        since.subsec_millis()
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01, computed in 400-year eras
/// (146097 days each) counted from 0000-03-01 so the leap day falls at the end of a year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153; // month counted from March
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn open_pty(link: Option<&Path>) -> Result<Pty, EndpointError> {
    let (master, slave, slave_path) = open_pty_pair().map_err(EndpointError::PtyCreate)?;
    set_nonblocking(master.as_fd()).map_err(EndpointError::PtyCreate)?;
    // Raw mode: bytes pass unchanged, and no echo sends guest output back to the guest.
    make_raw(slave.as_fd()).map_err(EndpointError::PtyCreate)?;
    let link = match link {
        Some(link) => {
            Some(
                make_link(link, &slave_path).map_err(|source| EndpointError::PtyLink {
                    link: link.to_path_buf(),
                    source,
                })?,
            )
        }
        None => None,
    };
    Ok(Pty {
        master,
        _slave: slave,
        slave_path,
        link,
    })
}

/// Opens a new PTY pair: (master, slave, slave path).
pub(crate) fn open_pty_pair() -> io::Result<(OwnedFd, OwnedFd, PathBuf)> {
    // SAFETY: posix_openpt takes flags only; the result is checked before use.
    let raw = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: grantpt/unlockpt only take the master fd, which is open.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0
        // SAFETY: as above.
        || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes at most `name.len()` bytes, NUL-terminated, into `name`.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) };
    let slave_path = PathBuf::from(OsStr::from_bytes(name.to_bytes()));
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)?;
    Ok((master, OwnedFd::from(slave), slave_path))
}

fn make_raw(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: termios is plain data; zeroed is a valid value and tcgetattr overwrites it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write into; fd is open.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `t` is a valid termios; fd is open.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument; fd is open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an int of flags; fd is open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Points `link` at `target`, replacing a stale symlink but never another kind of file.
fn make_link(link: &Path, target: &Path) -> io::Result<PtyLink> {
    if let Ok(meta) = std::fs::symlink_metadata(link) {
        if !meta.file_type().is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a symlink; not replacing it",
            ));
        }
    }
    // Make the new link beside it and rename over: the old one is replaced atomically.
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(format!(".new-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, link) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(PtyLink {
        link: link.to_path_buf(),
        target: target.to_path_buf(),
    })
}

fn listen_unix(path: &Path) -> Result<Listener, EndpointError> {
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

fn listen_tcp(addr: SocketAddr) -> Result<Listener, EndpointError> {
    let listen_err = |source| EndpointError::TcpListen { addr, source };
    let listener = TcpListener::bind(addr).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let bound = listener.local_addr().map_err(listen_err)?;
    Ok(Listener {
        socket: ListenSocket::Tcp(listener, bound),
        client: None,
    })
}

fn open_log(path: &Path, timestamps: bool) -> Result<LogFile, EndpointError> {
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

fn open_serial(settings: &SerialSettings) -> Result<Serial, EndpointError> {
    let device = settings.device.to_string_lossy();
    let port = serialport::new(device, settings.baud)
        .data_bits(settings.data_bits)
        .parity(settings.parity)
        .stop_bits(settings.stop_bits)
        .flow_control(settings.flow)
        .open_native()
        .map_err(|source| EndpointError::SerialOpen {
            device: settings.device.clone(),
            source,
        })?;
    // SAFETY: into_raw_fd hands over the open fd; nothing else owns it afterwards.
    let fd = unsafe { OwnedFd::from_raw_fd(port.into_raw_fd()) };
    let config_err = |source| EndpointError::SerialConfig {
        device: settings.device.clone(),
        source,
    };
    // serialport clears O_NONBLOCK after open; the event loop needs it back.
    set_nonblocking(fd.as_fd()).map_err(config_err)?;
    use_standard_baud(fd.as_fd(), settings.baud).map_err(config_err)?;
    // Drivers may refuse parts of a setting silently (a PTY always runs 8 data bits without
    // parity); say so rather than let the user debug garbled bytes.
    let applied = read_line_settings(fd.as_fd(), &settings.device).map_err(config_err)?;
    if applied != *settings {
        log::warn!(
            "serial {}: asked for {}, the driver applied {}",
            settings.device.display(),
            settings.line(),
            applied.line()
        );
    }
    Ok(Serial {
        fd: Some(fd),
        settings: settings.clone(),
    })
}

/// Standard baud rates and their termios codes.
const BAUD_CODES: &[(u32, libc::speed_t)] = &[
    (50, libc::B50),
    (75, libc::B75),
    (110, libc::B110),
    (134, libc::B134),
    (150, libc::B150),
    (200, libc::B200),
    (300, libc::B300),
    (600, libc::B600),
    (1200, libc::B1200),
    (1800, libc::B1800),
    (2400, libc::B2400),
    (4800, libc::B4800),
    (9600, libc::B9600),
    (19_200, libc::B19200),
    (38_400, libc::B38400),
    (57_600, libc::B57600),
    (115_200, libc::B115200),
    (230_400, libc::B230400),
    (460_800, libc::B460800),
    (500_000, libc::B500000),
    (576_000, libc::B576000),
    (921_600, libc::B921600),
    (1_000_000, libc::B1000000),
    (1_152_000, libc::B1152000),
    (1_500_000, libc::B1500000),
    (2_000_000, libc::B2000000),
    (2_500_000, libc::B2500000),
    (3_000_000, libc::B3000000),
    (3_500_000, libc::B3500000),
    (4_000_000, libc::B4000000),
]; // keep in step with the kernel's baud table

/// serialport always sets the rate as BOTHER + a number; a standard rate is rewritten as
/// its Bnnn code so every termios reader (stty, cfgetospeed) sees it. Odd rates stay BOTHER.
fn use_standard_baud(fd: BorrowedFd<'_>, baud: u32) -> io::Result<()> {
    let Some(&(_, code)) = BAUD_CODES.iter().find(|(rate, _)| *rate == baud) else {
        return Ok(());
    };
    // SAFETY: termios is plain data; zeroed is a valid value and tcgetattr overwrites it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write into; fd is open.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: cfsetspeed only edits the struct it is given; `code` is a valid Bnnn.
    if unsafe { libc::cfsetspeed(&mut t, code) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `t` is a valid termios; fd is open.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the line settings back from the device's termios.
fn read_line_settings(fd: BorrowedFd<'_>, device: &Path) -> io::Result<SerialSettings> {
    // SAFETY: termios2 is plain data; zeroed is a valid value and TCGETS2 overwrites it.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes one termios2 into the pointer, which is valid; fd is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let data_bits = match t.c_cflag & libc::CSIZE {
        libc::CS5 => DataBits::Five,
        libc::CS6 => DataBits::Six,
        libc::CS7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let parity = match (t.c_cflag & libc::PARENB != 0, t.c_cflag & libc::PARODD != 0) {
        (false, _) => Parity::None,
        (true, true) => Parity::Odd,
        (true, false) => Parity::Even,
    };
    let stop_bits = if t.c_cflag & libc::CSTOPB != 0 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let flow = if t.c_cflag & libc::CRTSCTS != 0 {
        FlowControl::Hardware
    } else if t.c_iflag & libc::IXON != 0 {
        FlowControl::Software
    } else {
        FlowControl::None
    };
    Ok(SerialSettings {
        device: device.to_path_buf(),
        baud: t.c_ospeed,
        data_bits,
        parity,
        stop_bits,
        flow,
    })
}

fn iov_count(bufs: &[IoSlice<'_>]) -> usize {
    bufs.len().min(IOV_MAX)
}

/// One `writev`, retried on EINTR.
fn write_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    loop {
        // SAFETY: IoSlice is guaranteed ABI-compatible with iovec on Unix; the slices stay
        // borrowed for the call and the kernel only reads them; count <= bufs.len().
        let n = unsafe {
            libc::writev(
                fd.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                iov_count(bufs) as libc::c_int,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `sendmsg` with MSG_NOSIGNAL (a vanished peer gives EPIPE, not SIGPIPE), retried on
/// EINTR.
fn send_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; all-zero is "no name, no control data".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_ptr().cast::<libc::iovec>().cast_mut();
    msg.msg_iovlen = iov_count(bufs);
    loop {
        // SAFETY: msg points at `bufs` (IoSlice is ABI-compatible with iovec), which stays
        // borrowed for the call; sendmsg only reads the iovecs and the buffers.
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes all of `bufs` to a blocking fd (a regular file).
fn write_all_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<()> {
    let mut owned: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
    let mut rest = owned.as_mut_slice();
    while !rest.is_empty() {
        let n = write_vectored(fd, rest)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "file took no bytes",
            ));
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn err(spec: &str) -> String {
        match spec.parse::<EndpointSpec>() {
            Ok(parsed) => panic!("{spec:?} parsed as {parsed:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn ok(spec: &str) -> EndpointSpec {
        match spec.parse::<EndpointSpec>() {
            Ok(parsed) => parsed,
            Err(e) => panic!("{spec:?}: {e}"),
        }
    }

    #[test]
    fn parses_good_specs() {
        assert_eq!(ok("pty"), EndpointSpec::Pty { link: None });
        assert_eq!(
            ok("pty:/tmp/vm1-console"),
            EndpointSpec::Pty {
                link: Some("/tmp/vm1-console".into())
            }
        );
        assert_eq!(
            ok("unix:/run/c.sock"),
            EndpointSpec::Unix("/run/c.sock".into())
        );
        assert_eq!(
            ok("tcp:4555"),
            EndpointSpec::Tcp("127.0.0.1:4555".parse().unwrap())
        );
        assert_eq!(
            ok("tcp:0.0.0.0:23"),
            EndpointSpec::Tcp("0.0.0.0:23".parse().unwrap())
        );
        assert_eq!(
            ok("tcp:[::1]:23"),
            EndpointSpec::Tcp("[::1]:23".parse().unwrap())
        );
        assert_eq!(
            ok("file:/var/log/vm.log"),
            EndpointSpec::File {
                path: "/var/log/vm.log".into(),
                timestamps: false
            }
        );
        assert_eq!(
            ok("file:/var/log/vm.log,timestamps"),
            EndpointSpec::File {
                path: "/var/log/vm.log".into(),
                timestamps: true
            }
        );
        assert_eq!(
            ok("serial:/dev/ttyUSB0"),
            EndpointSpec::Serial(SerialSettings::new("/dev/ttyUSB0"))
        );
        assert_eq!(
            ok("serial:/dev/ttyS1,baud=9600,data=7,parity=even,stop=2,flow=hw"),
            EndpointSpec::Serial(SerialSettings {
                device: "/dev/ttyS1".into(),
                baud: 9600,
                data_bits: DataBits::Seven,
                parity: Parity::Even,
                stop_bits: StopBits::Two,
                flow: FlowControl::Hardware,
            })
        );
        let sw = ok("serial:/dev/ttyS1,flow=sw,parity=odd,data=5");
        let EndpointSpec::Serial(sw) = sw else {
            panic!("not serial: {sw:?}")
        };
        assert_eq!(sw.flow, FlowControl::Software);
        assert_eq!(sw.parity, Parity::Odd);
        assert_eq!(sw.data_bits, DataBits::Five);
        assert_eq!(sw.baud, 115_200);
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        assert_eq!(
            err("telnet:23"),
            "invalid endpoint \"telnet:23\": unknown endpoint kind \"telnet\" \
             (known: pty, unix, tcp, file, serial)"
        );
        assert_eq!(
            err("unix:"),
            "invalid endpoint \"unix:\": missing socket path after \"unix:\""
        );
        assert_eq!(
            err("unix"),
            "invalid endpoint \"unix\": missing socket path after \"unix:\""
        );
        assert_eq!(
            err("pty:"),
            "invalid endpoint \"pty:\": missing link path after \"pty:\""
        );
        assert!(err("tcp:70000").contains("\"70000\" is neither a port"));
        assert!(err("tcp:localhost:23").contains("is neither a port"));
        assert!(err("file:/x.log,stamps").contains("unknown file option \"stamps\""));
        assert!(err("file:,timestamps").contains("missing log file path"));
        assert!(err("serial:").contains("missing device path"));
        assert!(err("serial:/dev/ttyS0,baud=0").contains("baud=\"0\" is not a positive number"));
        assert!(err("serial:/dev/ttyS0,baud=fast").contains("baud=\"fast\""));
        assert!(err("serial:/dev/ttyS0,data=9").contains("data=\"9\" must be 5, 6, 7 or 8"));
        assert!(err("serial:/dev/ttyS0,parity=mark").contains("must be none, odd or even"));
        assert!(err("serial:/dev/ttyS0,stop=3").contains("stop=\"3\" must be 1 or 2"));
        assert!(err("serial:/dev/ttyS0,flow=rts").contains("flow=\"rts\" must be none, hw or sw"));
        assert!(err("serial:/dev/ttyS0,speed=9600").contains("unknown serial option \"speed\""));
        assert!(err("serial:/dev/ttyS0,9600").contains("\"9600\" is not key=value"));
        assert!(err("serial:/dev/ttyS0,baud=1,baud=2").contains("\"baud\" given twice"));
    }

    #[test]
    fn display_round_trips() {
        for spec in [
            "pty",
            "pty:/tmp/l",
            "unix:/run/a.sock",
            "tcp:127.0.0.1:99",
            "tcp:[::1]:99",
            "file:/a.log",
            "file:/a.log,timestamps",
            "serial:/dev/ttyS0,baud=9600,data=7,parity=odd,stop=2,flow=sw",
        ] {
            assert_eq!(ok(spec).to_string(), spec);
            assert_eq!(ok(&ok(spec).to_string()), ok(spec));
        }
        assert_eq!(ok("tcp:7").to_string(), "tcp:127.0.0.1:7");
    }

    #[test]
    fn deserializes_from_toml_strings() {
        #[derive(serde::Deserialize)]
        struct Port {
            endpoint: EndpointSpec,
        }
        let port: Port = toml::from_str("endpoint = \"tcp:4555\"").unwrap();
        assert_eq!(
            port.endpoint,
            EndpointSpec::Tcp("127.0.0.1:4555".parse().unwrap())
        );
        let bad = toml::from_str::<Port>("endpoint = \"serial:/dev/ttyS0,stop=4\"")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(bad.contains("stop=\"4\" must be 1 or 2"), "{bad}");
    }

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
